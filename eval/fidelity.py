"""Sample fidelity on procedural prompts: did the model draw the scene its caption describes?

The renderer (:mod:`vdit.data.synthetic`) knows each physics prompt's background, floor and ball
colours and sizes, so a generated video of that prompt can be checked region by region, with no
learned weights. New metrics (no published original); they answer the first question to ask of a
text-to-video model trained on these scenes, before any physics: is the scene there at all?

Per video (``uint8 (T, H, W, 3)`` RGB) against its :class:`~vdit.data.synthetic.SceneParams`
(rescaled to the video's size when they differ):

- ``bg_color_err``: mean absolute per-channel error (0-255) against the background RGB over the
  background region: the rows above the floor band, less a one-row margin at the floor line and the
  pixels of any ball-coloured blob (dilated by one pixel);
- ``floor_color_err``: the same over the floor band (less the margin row at its top when the band
  has more than one row); None for a scene without a floor band;
- ``ball_found_frac``: per ball, the fraction of frames in which its colour (within ``tol`` per
  channel) forms a blob of at least ``max(2, 0.2 pi r^2)`` pixels (the rule of
  :func:`vdit.eval.physics.track_balls`) and at most ``4 pi r^2`` (twice the caption's radius): a
  cloud of the ball's colour over much of the frame is not a ball; mean over the scene's balls;
- ``ball_size_err``: per ball, the median over found frames of ``|sqrt(area / pi) - r| / r`` (the
  blob's equivalent radius against the caption's radius), mean over balls; None if never found.

:func:`summarize_fidelity` aggregates videos into means plus ``ball_found_80_frac``: the fraction of
videos whose ball is found in at least 80 % of frames (the bar at which the trajectory checks have
enough points to be evaluable).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import cv2
import numpy as np

from vdit.data.synthetic import BallParams, SceneParams
from vdit.eval.metrics.base import check_video

__all__ = ["FIDELITY_KEYS", "rescale_scene", "scene_fidelity", "summarize_fidelity"]

FIDELITY_KEYS = ("bg_color_err", "floor_color_err", "ball_found_frac", "ball_size_err")
IMPLEMENTATION = "vdit.eval.fidelity"
MAX_AREA_FACTOR = 4.0  # a found ball's blob is at most MAX_AREA_FACTOR * pi r^2 pixels (radius <= 2 r)
ORIGINAL = "vdit scene fidelity on procedural prompts (new metric, no published original)"


def rescale_scene(params: SceneParams, height: int, width: int, num_frames: int | None = None,
                  fps: float | None = None) -> SceneParams:
    """The same scene at another frame size (pixels) and, optionally, frame count and rate.

    Positions, radii and the floor band scale with the frame (radii by the smaller factor);
    velocities scale with space (px/s) and gravity likewise (px/s^2); time is unchanged, so the clip
    shows the first ``num_frames / fps`` seconds of the same motion.

    Raises:
        ValueError: from :class:`SceneParams` when the rescaled scene is invalid.
    """
    sy, sx = height / params.height, width / params.width
    s = min(sx, sy)
    balls = [BallParams(b.color, b.rgb, b.radius * s, b.x * sx, b.y * sy, b.vx * sx, b.vy * sy) for b in params.balls]
    return dataclasses.replace(
        params, height=int(height), width=int(width), num_frames=int(num_frames or params.num_frames),
        fps=float(fps or params.fps), floor_height=int(round(params.floor_height * sy)), balls=balls,
        gravity=params.gravity * sy)


def _blob_areas(frame: np.ndarray, rgb: tuple[int, int, int], tol: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mask of pixels within tol of rgb, areas of its 8-connected components)`` for one ``(H, W, 3)`` frame."""
    mask = (np.abs(frame.astype(np.int16) - np.asarray(rgb, np.int16)).max(-1) <= tol).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return mask, stats[1:n, cv2.CC_STAT_AREA]


def scene_fidelity(video: np.ndarray, params: SceneParams, tol: int = 40) -> dict[str, Any]:
    """Colour and ball fidelity of one video against the scene its prompt describes (see the module doc).

    Args:
        video: uint8 ``(T, H, W, 3)`` RGB. Its size may differ from ``params`` (the scene is rescaled).
        params: the prompt's scene.
        tol: per-channel colour tolerance (0-255) for ball pixels.

    Returns:
        ``{"bg_color_err", "floor_color_err", "ball_found_frac", "ball_size_err",
        "ball_found_per_ball": [...], "implementation", "original", "exact"}`` (floats or None).

    Raises:
        ValueError: an invalid video (:func:`vdit.eval.metrics.base.check_video`).
    """
    video = check_video(video)
    T, H, W, _ = video.shape
    if (H, W) != (params.height, params.width):
        params = rescale_scene(params, H, W)
    floor_rows = int(params.floor_height)
    bg_rows = max(1, H - floor_rows - 1)  # one margin row above the floor line
    floor_top = H - floor_rows + (1 if floor_rows > 1 else 0)
    bg_sum = bg_n = floor_sum = floor_n = 0.0
    found = np.zeros((len(params.balls), T), bool)
    radii: list[list[float]] = [[] for _ in params.balls]
    kernel = np.ones((3, 3), np.uint8)
    for i in range(T):
        frame = video[i]
        balls_mask = np.zeros((H, W), np.uint8)
        for k, ball in enumerate(params.balls):
            mask, areas = _blob_areas(frame, ball.rgb, tol)
            balls_mask |= mask
            ball_sized = areas[(areas >= max(2.0, 0.2 * math.pi * ball.radius ** 2))
                               & (areas <= MAX_AREA_FACTOR * math.pi * ball.radius ** 2)]
            if ball_sized.size:
                found[k, i] = True
                radii[k].append(math.sqrt(float(ball_sized.max()) / math.pi))
        keep = cv2.dilate(balls_mask, kernel) == 0  # (H, W) not near a ball-coloured pixel
        err = np.abs(frame.astype(np.float64) - np.asarray(params.background_rgb, np.float64)).mean(-1)  # (H, W)
        region = keep[:bg_rows]
        bg_sum += float(err[:bg_rows][region].sum())
        bg_n += float(region.sum())
        if floor_rows > 0:
            ferr = np.abs(frame[floor_top:].astype(np.float64) - np.asarray(params.floor_rgb, np.float64)).mean(-1)
            fregion = keep[floor_top:]
            floor_sum += float(ferr[fregion].sum())
            floor_n += float(fregion.sum())
    per_ball = [float(f.mean()) for f in found]
    size = [float(np.median([abs(r - b.radius) / b.radius for r in rs])) for rs, b in zip(radii, params.balls) if rs]
    return {
        "bg_color_err": bg_sum / bg_n if bg_n else None,
        "floor_color_err": floor_sum / floor_n if floor_n else None,
        "ball_found_frac": float(np.mean(per_ball)) if per_ball else None,
        "ball_size_err": float(np.mean(size)) if size else None,
        "ball_found_per_ball": per_ball,
        "implementation": IMPLEMENTATION, "original": ORIGINAL, "exact": True,
    }


def summarize_fidelity(rows: list[dict[str, Any]], found_bar: float = 0.8) -> dict[str, Any]:
    """Means of :func:`scene_fidelity` rows: ``{key: {"mean", "count", "not_evaluable"}}`` for each of
    :data:`FIDELITY_KEYS` plus ``ball_found_80_frac`` (videos with ``ball_found_frac >= found_bar``).

    A None value (e.g. no floor band, or a ball never found for the size error) is counted as not
    evaluable, never averaged in.
    """
    out: dict[str, Any] = {}
    meta = {"implementation": IMPLEMENTATION, "original": ORIGINAL, "exact": True}
    for key in FIDELITY_KEYS:
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key] = {"mean": float(np.mean(vals)) if vals else None, "count": len(vals),
                    "not_evaluable": len(rows) - len(vals), **meta}
    found = [r["ball_found_frac"] for r in rows if r.get("ball_found_frac") is not None]
    out["ball_found_80_frac"] = {"mean": float(np.mean([f >= found_bar for f in found])) if found else None,
                                 "count": len(found), "not_evaluable": len(rows) - len(found), **meta}
    return out

"""Ball tracking and flight segmentation for the trajectory physics checks (EVAL.md B2).

Coordinates follow :mod:`vdit.data.synthetic`: pixels, x right, y down, pixel centres at
integers, floor surface at ``params.floor_line``. Pixel thresholds are given at the reference
height of 64 px (:data:`REFERENCE_HEIGHT`) and scaled by ``height / 64``.
Used by :mod:`vdit.eval.physics`, which re-exports the public names.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from vdit.data.synthetic import SceneParams
from vdit.eval.metrics.base import check_video

__all__ = ["REFERENCE_HEIGHT", "track_balls", "detect_bounces", "split_flight_segments"]

REFERENCE_HEIGHT = 64  # pixel thresholds are stated at this frame height


def _scale(params: SceneParams, video: np.ndarray | None = None) -> float:
    height = video.shape[1] if video is not None else params.height
    return height / REFERENCE_HEIGHT


# ---------------------------------------------------------------------------------------------
# Tracking
# ---------------------------------------------------------------------------------------------


def _track(video: np.ndarray, params: SceneParams, tol: int = 40) -> dict:
    """Centroids plus blob statistics per frame and ball (see :func:`track_balls`)."""
    video = check_video(video)
    T, H, W, _ = video.shape
    K = len(params.balls)
    centroids = np.full((T, K, 2), np.nan)
    blobs = np.zeros((T, K), np.int64)  # large components of the ball's color (duplicates > 1)
    # Per-pixel "empty scene" color: background above the floor line, floor below. Used to turn
    # anti-aliased edge pixels into fractional coverage for subpixel centroids.
    floor_rows = int(round(params.floor_height * H / params.height))
    empty = np.empty((H, W, 3), np.float64)
    empty[:] = params.background_rgb
    if floor_rows > 0:
        empty[H - floor_rows:] = params.floor_rgb
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    kernel = np.ones((3, 3), np.uint8)
    for k, ball in enumerate(params.balls):
        color = np.asarray(ball.rgb, np.int16)
        radius = ball.radius * W / params.width
        min_area = max(2.0, 0.2 * math.pi * radius * radius)
        direction = color[None, None, :] - empty  # (H, W, 3) from empty color to ball color
        norm2 = np.maximum((direction ** 2).sum(-1), 1.0)
        for i in range(T):
            frame = video[i]
            mask = (np.abs(frame.astype(np.int16) - color).max(-1) <= tol).astype(np.uint8)
            n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            if n <= 1:
                continue
            areas = stats[1:, cv2.CC_STAT_AREA]
            blobs[i, k] = int((areas >= min_area).sum())
            best = 1 + int(np.argmax(areas))
            if stats[best, cv2.CC_STAT_AREA] < min_area:
                continue
            # Coverage alpha of each pixel near the blob: projection of (pixel - empty) onto
            # (ball - empty), clipped to [0, 1]; weights 0 outside a 1-px dilation of the blob.
            near = cv2.dilate((labels == best).astype(np.uint8), kernel).astype(bool)
            diff = frame.astype(np.float64) - empty
            alpha = np.clip((diff * direction).sum(-1) / norm2, 0.0, 1.0)
            w = np.where(near, alpha, 0.0)
            total = w.sum()
            if total <= 0:
                continue
            centroids[i, k] = ((w * xs).sum() / total, (w * ys).sum() / total)
    return {"centroids": centroids, "blobs": blobs}


def track_balls(video: np.ndarray, params: SceneParams, tol: int = 40) -> np.ndarray:
    """Centroid of every ball in every frame, found by the ball's known color.

    Per frame and ball: pixels within ``tol`` (per channel, 0-255) of the ball's RGB, the largest
    8-connected component (cv2.connectedComponentsWithStats; at least 20 % of the disc area), then
    a subpixel centroid weighting each pixel in and around the component by its coverage: the
    projection of (pixel - empty-scene color) onto (ball color - empty-scene color), where the
    empty-scene color is the background above the floor line and the floor color below it.

    Args:
        video: uint8 (T, H, W, 3) RGB. If its size differs from ``params`` (e.g. a generated
            video at another resolution), radii and the floor band are rescaled to it.
        params: the scene (ball colors and radii, background, floor). Balls need distinct colors.
        tol: color tolerance per channel.

    Returns:
        float64 (T, K, 2) centroids (x, y) in pixels of the video; NaN where a ball is not found.

    Raises:
        ValueError: an invalid video (see :func:`vdit.eval.metrics.base.check_video`).
    """
    return _track(video, params, tol)["centroids"]


def _params_geometry(video: np.ndarray, params: SceneParams) -> tuple[float, float, float, np.ndarray]:
    """(scale_y, scale_x, floor_line, radii) in the video's pixels."""
    sy = video.shape[1] / params.height
    sx = video.shape[2] / params.width
    floor_line = (params.floor_line + 0.5) * sy - 0.5
    radii = np.array([b.radius for b in params.balls]) * sx
    return sy, sx, floor_line, radii


# ---------------------------------------------------------------------------------------------
# Flight segments
# ---------------------------------------------------------------------------------------------


def _kinks(w: np.ndarray, threshold: float, expected: float = 0.0) -> list[int]:
    """Local maxima of w at which the per-frame velocity drops by more than ``threshold`` below
    the free-flight change ``expected`` (per frame)."""
    d = np.diff(w)  # d[j] = w[j+1] - w[j]
    n = len(w)
    out: list[int] = []
    if n < 3:
        return out
    if d[1] < 0 and d[1] - d[0] - expected < -threshold:  # contact between the first two frames
        out.append(0)
    for j in range(1, n - 1):
        if not (w[j] > w[j - 1] and w[j] >= w[j + 1]):
            continue
        # The contact lies within one frame of j on either side, so its velocity jump can be
        # split over two differences: take the largest drop of three.
        drops = [d[j] - d[j - 1] - expected]
        if j >= 2:
            drops.append(d[j] - d[j - 2] - 2 * expected)
        if j + 1 < len(d):
            drops.append(d[j + 1] - d[j - 1] - 2 * expected)
        if min(drops) < -threshold:
            out.append(j)
    if d[-2] > 0 and d[-1] - d[-2] - expected < -threshold and (n - 2) not in out:
        out.append(n - 1)  # contact between the last two frames
    return out


def detect_bounces(y: np.ndarray, min_kink_px: float = 1.0, typical: float | None = None) -> list[int]:
    """Frames next to an impulse that reverses the vertical motion (bounces).

    Floor bounces: frame ``i`` is a local maximum of y (lowest point in image coordinates),
    ``y[i] > y[i-1]`` and ``y[i] >= y[i+1]``, where the per-frame velocity d_j = y[j+1] - y[j]
    drops by more than ``min_kink_px``: the most negative of ``d_i - d_{i-1}``, ``d_i - d_{i-2}``
    and ``d_{i+1} - d_{i-1}`` (the contact lies within one frame of ``i``, so its velocity jump
    can be split over two differences). Free flight has positive velocity changes (g / fps^2 per
    frame), so only an impulse passes; the threshold rejects tracking noise near apexes and on
    the floor. At the clip's ends, where an extremum cannot be seen, the first (last) frame counts
    when the velocity drops by more than the threshold right after (before) it.

    Ceiling bounces (upside-down motion, e.g. a generated ball that falls upwards and rebounds
    from the top): the same test on -y, measured against the typical free-flight velocity change
    (the median second difference of y away from floor bounces, if positive), so the smooth
    apexes of correct ballistic flights (second difference g / fps^2) never count. Without this,
    an upside-down clip would be fitted across its rebounds and could look like downward gravity.

    ``typical`` (px/frame^2) replaces that median when the expected free-flight change is known
    (the scene's g / fps^2): at low fps flights last a few frames and the median is unreliable.

    NaN frames are skipped (neighbours are the nearest finite frames).

    Args:
        y: float (T,) vertical positions in pixels (image coordinates, y down), NaN = missing.
        min_kink_px: pixels per frame (scale it with the frame height).

    Returns:
        Sorted frame indices (into ``y``).
    """
    y = np.asarray(y, np.float64)
    idx = np.flatnonzero(np.isfinite(y))
    v = y[idx]
    if len(v) < 3:
        return []
    # Free flight raises the per-frame velocity by g / fps^2; with that known (``typical``), a floor
    # contact between the last two frames shows as a smaller rise too.
    floor = _kinks(v, min_kink_px, expected=typical or 0.0)
    # Typical free-flight velocity change per frame: median second difference away from the
    # floor bounces (second difference j involves frames j..j+2).
    near = np.zeros(len(v), bool)
    for j in floor:
        near[max(0, j - 1):j + 2] = True
    dd = np.diff(v, 2)
    clean = dd[~(near[:-2] | near[1:-1] | near[2:])]
    if typical is None:
        if clean.size < 3:  # short flights (low fps): every window touches a bounce; bounces are
            clean = dd      # rare among the second differences, so their median is still flight's
        typical = max(float(np.median(clean)), 0.0) if clean.size else 0.0
    ceiling = _kinks(-v, min_kink_px, expected=-typical)
    return sorted(int(idx[j]) for j in set(floor) | set(ceiling))


def split_flight_segments(y: np.ndarray, bounce_frames: list[int] | None = None, *,
                          contact_y: float | None = None, rest_tol: float = 0.5,
                          min_len: int = 1, min_kink_px: float = 1.0,
                          typical: float | None = None) -> list[np.ndarray]:
    """Split a vertical trajectory into free flights between bounces.

    The bounce frames themselves are left out (the contact happens within a frame of them, so they
    may belong to either parabola), and so are frames resting on the floor: with ``contact_y``
    (the centre height at floor contact) given, runs of >= 2 consecutive frames with
    ``y >= contact_y - rest_tol``. NaN frames stay inside their segment but are not listed.

    Args:
        y: float (T,) vertical positions in pixels, y down, NaN = missing.
        bounce_frames: frame indices of bounces; detected with :func:`detect_bounces` if None.
        contact_y: pixels; None disables rest detection.
        rest_tol: pixels.
        min_len: drop segments with fewer finite frames than this.
        min_kink_px: forwarded to :func:`detect_bounces`.

    Returns:
        List of int arrays of frame indices (finite y only), in time order.
    """
    y = np.asarray(y, np.float64)
    T = len(y)
    if bounce_frames is None:
        bounce_frames = detect_bounces(y, min_kink_px, typical)
    cut = np.zeros(T, bool)
    cut[[b for b in bounce_frames if 0 <= b < T]] = True
    if contact_y is not None:
        low = np.isfinite(y) & (y >= contact_y - rest_tol)
        resting = low & (np.r_[False, low[:-1]] | np.r_[low[1:], False])
        cut |= resting
    segments, current = [], []
    for i in range(T):
        if cut[i]:
            if current:
                segments.append(np.array(current))
            current = []
        elif np.isfinite(y[i]):
            current.append(i)
    if current:
        segments.append(np.array(current))
    return [s for s in segments if len(s) >= min_len]


def _fit_parabola(t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Least squares y = a t^2 + b t + c. Returns ((a, b, c), rmse_px, info_a) where info_a is
    1 / Var(a) per unit noise variance (how much the segment says about a)."""
    X = np.stack([t * t, t, np.ones_like(t)], axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    rmse = float(np.sqrt(np.mean((X @ coef - y) ** 2)))
    info_a = 1.0 / float(np.linalg.inv(X.T @ X)[0, 0])
    return coef, rmse, info_a


def _ball_segments(centroids: np.ndarray, k: int, contact_y: float, scale: float,
                   min_len: int, typical: float | None = None) -> list[np.ndarray]:
    # Resting balls sit within a fraction of a pixel of contact_y; mp4 coding near the floor edge
    # biases their centroid by up to ~0.3 px, hence a tolerance of 1 px (at least 0.75 px).
    return split_flight_segments(centroids[:, k, 1], contact_y=contact_y, rest_tol=max(scale, 0.75),
                                 min_len=min_len, min_kink_px=1.0 * scale, typical=typical)

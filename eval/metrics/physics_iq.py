"""Physics-IQ metrics (google-deepmind/physics-IQ-benchmark, Apache-2.0): an exact port of the arithmetic.

Independent implementation of EVAL.md B1 (the benchmark's ``binary_mask_generator.py``,
``calculate_and_write_metrics_to_csv.py`` and ``calculate_iq_score.py``):

1. Motion masks at the video's full resolution (:func:`motion_masks`): grayscale, 5x5 Gaussian
   blur; the running average starts as the first blurred frame (float64); for every later frame
   ``accumulateWeighted(frame, avg, 0.3)`` first, then ``|frame - round_sat_uint8(avg)| > 10``,
   5x5 morphological open then close; the first frame's mask is empty. Values 0/255.
   The benchmark writes masks to an mp4v file and reads them back (:func:`mask_roundtrip`,
   optional: it changes the numbers slightly).
2. Real take 1 sets the size: frames and masks of every video of the scenario are resized to
   ``(W // 4, H // 4)`` (cv2 bilinear); masks re-thresholded at > 127; frames / 255. Only the
   first ``seconds * fps`` frames are used.
3. Per pair (real, generated): spatiotemporal IoU per frame (both empty -> 1); spatial IoU of the
   max-over-time masks; weighted spatial IoU = sum(min) / sum(max) of the time-averaged masks
   (1 when both are empty); MSE per frame in float32 (lengths must match, as in the original).
   Per-frame values are rounded to 4 decimals (the original stores them in a CSV and parses them
   with ``round(x, 4)``).
4. Score (:func:`physics_iq_score`): A = generated vs take 1, V = take 1 vs take 2 (physical
   variance). A_ST, A_MSE: per scenario the mean of all per-frame values of its views, then the
   mean over scenarios; A_S, A_WS: mean over views of the mean over scenarios. V_ST, V_MSE: per
   view the mean of all per-frame values, then the mean over views (rounded to 4 decimals); V_S
   the same per-scenario values (rounded to 5), V_WS (rounded to 4).
   score = 100 * clip(mean(A_ST/V_ST, A_S/V_S, A_WS/V_WS) - (A_MSE - V_MSE), 0, 1), rounded to 2.
   A ratio of dataset-level means, not a per-video score.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import cv2
import numpy as np

from vdit.eval.metrics.base import check_video

__all__ = ["motion_masks", "mask_roundtrip", "prepare", "compare", "PhysicsIQRecord", "physics_iq_record",
           "physics_iq_score", "ORIGINAL"]

ORIGINAL = "Physics-IQ (google-deepmind/physics-IQ-benchmark)"
_KERNEL = np.ones((5, 5), np.uint8)


def motion_masks(video: np.ndarray, threshold: int = 10) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB -> uint8 (T, H, W) motion masks in {0, 255} (module doc, step 1)."""
    video = check_video(video)
    out = np.zeros(video.shape[:3], np.uint8)
    avg = None
    for i, frame in enumerate(video):
        gray = cv2.GaussianBlur(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (5, 5), 0)
        if avg is None:
            avg = gray.astype(np.float64)
            continue  # first frame: empty mask
        cv2.accumulateWeighted(gray, avg, 0.3)
        diff = cv2.absdiff(gray, cv2.convertScaleAbs(avg))
        _, mask = cv2.threshold(diff, threshold, 255, cv2.THRESH_BINARY)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _KERNEL)
        out[i] = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _KERNEL)
    return out


def mask_roundtrip(masks: np.ndarray, fps: float) -> np.ndarray:
    """Write masks (T, H, W) to an mp4v file with OpenCV and read them back, as the benchmark
    does (frame size cut to even numbers like its writer). Returns uint8 (T, H', W')."""
    T, H, W = masks.shape
    H2, W2 = H - H % 2, W - W % 2
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mask.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), round(fps), (W2, H2), isColor=False)
        for m in masks:
            writer.write(np.ascontiguousarray(m[:H2, :W2]))
        writer.release()
        cap = cv2.VideoCapture(path)
        frames = []
        while True:
            ok, f = cap.read()
            if not ok:
                break
            frames.append(f[..., 0])
        cap.release()
    if not frames:
        raise RuntimeError("OpenCV could not write/read an mp4v mask video (mask_roundtrip)")
    return np.stack(frames)


def prepare(video: np.ndarray, masks: np.ndarray, size: tuple[int, int], max_frames: int
            ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Resize frames and masks to ``size = (w, h)`` (cv2 bilinear), first ``max_frames`` only.

    Returns (frames as float64 in [0, 1] (h, w, 3), masks as uint8 {0, 1} (h, w)).
    """
    frames = [cv2.resize(f, size) / 255.0 for f in video[:max_frames]]
    mk = [(cv2.resize(m, size) > 127).astype(np.uint8) for m in masks[:max_frames]]
    return frames, mk


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare(frames_a, masks_a, frames_b, masks_b) -> dict:
    """Physics-IQ comparison of two prepared videos (see :func:`prepare`).

    Returns ``spatiotemporal_iou`` (per frame, rounded to 4 decimals), ``spatial_iou``,
    ``weighted_spatial_iou``, ``mse`` (per frame, float32 arithmetic, rounded to 4 decimals).

    Raises:
        ValueError: different numbers of frames (MSE needs equal lengths, as in the original).
    """
    if len(frames_a) != len(frames_b):
        raise ValueError(f"Physics-IQ MSE needs videos of equal length; got {len(frames_a)} and {len(frames_b)} frames")
    st = [round(_iou(a, b), 4) for a, b in zip(masks_a, masks_b)]
    spatial = _iou(np.max(masks_a, axis=0) > 0, np.max(masks_b, axis=0) > 0)
    wa = np.sum(masks_a, axis=0, dtype=np.uint16) / len(masks_a)
    wb = np.sum(masks_b, axis=0, dtype=np.uint16) / len(masks_b)
    union = np.maximum(wa, wb)
    weighted = 1.0 if np.sum(union) == 0 else float(np.sum(np.minimum(wa, wb)) / np.sum(union))
    mse = [round(float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)), 4)
           for a, b in zip(frames_a, frames_b)]
    return {"spatiotemporal_iou": st, "spatial_iou": spatial, "weighted_spatial_iou": weighted, "mse": mse}


@dataclass
class PhysicsIQRecord:
    """One view of one scenario: ``gen`` = generated vs take 1, ``var`` = take 1 vs take 2 (or None)."""

    scenario: str
    view: str
    gen: dict
    var: dict | None = None
    extra: dict = field(default_factory=dict)


def physics_iq_record(generated: np.ndarray, take1: np.ndarray, take2: np.ndarray | None = None, fps: float = 30.0,
                      *, seconds: float = 5.0, scenario: str = "", view: str = "", roundtrip: bool = False
                      ) -> PhysicsIQRecord:
    """Compare a generated continuation with real take 1 (and take 1 with take 2 when given).

    Args:
        generated, take1, take2: uint8 (T, H, W, 3) RGB; masks are computed on each full video at
            its own resolution, then everything is resized to take 1's (W // 4, H // 4).
        fps: frames per second; the first ``int(seconds * fps)`` frames are compared.
        roundtrip: pass masks through an mp4v file like the benchmark (:func:`mask_roundtrip`).

    Raises:
        ValueError: invalid videos, or compared lengths that differ.
    """
    H, W = take1.shape[1:3]
    size, n = (W // 4, H // 4), int(round(seconds * fps))

    def prep(v: np.ndarray):
        m = motion_masks(v)
        if roundtrip:
            m = mask_roundtrip(m, fps)
        return prepare(v, m, size, n)

    g, r1 = prep(generated), prep(take1)
    gen = compare(*r1, *g)
    var = compare(*r1, *prep(take2)) if take2 is not None else None
    return PhysicsIQRecord(scenario or "scenario", view or "view", gen, var)


def _mean(values) -> float:
    return float(np.mean(values))


def physics_iq_score(records: list[PhysicsIQRecord]) -> dict:
    """Dataset-level Physics-IQ numbers from per-view records (module doc, step 4).

    Returns ``{"score", "A": {spatiotemporal_iou, spatial_iou, weighted_spatial_iou, mse},
    "V": {...} or None, "num_scenarios", "num_views"}``; ``score`` is None when any record lacks
    take 2 (single-reference mode: raw IoUs and MSE only).

    Raises:
        ValueError: no records.
    """
    if not records:
        raise ValueError("physics_iq_score needs at least one record")
    scenarios: dict[str, list[PhysicsIQRecord]] = {}
    for r in records:
        scenarios.setdefault(r.scenario, []).append(r)
    views = sorted({r.view for r in records})
    a_st = _mean([_mean(np.concatenate([r.gen["spatiotemporal_iou"] for r in rs])) for rs in scenarios.values()])
    a_mse = _mean([_mean(np.concatenate([r.gen["mse"] for r in rs])) for rs in scenarios.values()])
    per_view = {v: [r for r in records if r.view == v] for v in views}
    a_s = _mean([_mean([r.gen["spatial_iou"] for r in rs]) for rs in per_view.values()])
    a_ws = _mean([_mean([r.gen["weighted_spatial_iou"] for r in rs]) for rs in per_view.values()])
    out = {"A": {"spatiotemporal_iou": a_st, "spatial_iou": a_s, "weighted_spatial_iou": a_ws, "mse": a_mse},
           "V": None, "score": None, "num_scenarios": len(scenarios), "num_views": len(views)}
    if any(r.var is None for r in records):
        out["reason"] = "no second real take: raw IoUs and MSE only (no physical-variance ratio)"
        return out
    v_st = round(_mean([_mean(np.concatenate([r.var["spatiotemporal_iou"] for r in rs])) for rs in per_view.values()]), 4)
    v_mse = round(_mean([_mean(np.concatenate([r.var["mse"] for r in rs])) for rs in per_view.values()]), 4)
    v_s = round(_mean([_mean([r.var["spatial_iou"] for r in rs]) for rs in per_view.values()]), 5)
    v_ws = round(_mean([_mean([r.var["weighted_spatial_iou"] for r in rs]) for rs in per_view.values()]), 4)
    out["V"] = {"spatiotemporal_iou": v_st, "spatial_iou": v_s, "weighted_spatial_iou": v_ws, "mse": v_mse}
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = (a_st / v_st + a_s / v_s + a_ws / v_ws) / 3.0 - (a_mse - v_mse)
    if not np.isfinite(raw):
        out["reason"] = "physical variance has a zero IoU: the ratio is undefined"
        return out
    out["score"] = round(max(min(raw * 100.0, 100.0), 0.0), 2)
    return out

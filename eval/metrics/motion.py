"""Flow-based VBench dimensions: static filter, dynamic degree, motion smoothness; and motion jerk.

Sources (Vchitect/VBench, Apache-2.0; independent implementations of the rules EVAL.md A states):

- ``vbench/static_filter.py``: pairs = every consecutive pair, then (first, last) and (last,
  first); per pair the mean of the top 2 % flow magnitudes; thres = 3 * min(H, W) / 256,
  count_num = round(2 T / 16). Static when at most count_num consecutive pairs score above thres
  and each of the two first/last pairs scores <= thres * count_num * 2.
- ``vbench/dynamic_degree.py``: keep every max(1, round(fps / 8))-th frame (N frames); per pair
  the mean of the top 5 % magnitudes; thres = 6 * min(H, W) / 256, count_num = round(4 N / 16);
  walking the pairs, the video is dynamic as soon as the number of pairs above thres reaches
  count_num (checked after every pair, so count_num = 0 means dynamic).
- ``vbench/motion_smoothness.py``: keep frames 0, 2, 4, ...; re-create each odd frame 2k+1 by
  interpolating frames 2k and 2k+2 (VBench: the AMT-S network); score = (255 - mean over the
  re-created frames of the mean uint8 absolute error) / 255. Ours interpolates by warping both
  neighbours half-way along their optical flow (no weights; inexact).

Python's ``round`` (half to even) is used where the original uses it. All functions take uint8
(T, H, W, 3) RGB, fps, an optional flow backend (``vdit.eval.metrics.flow``; OpenCV Farneback by
default) and an optional shared :class:`~vdit.eval.metrics.flow.FlowCache`.
"""

from __future__ import annotations

import cv2
import numpy as np

from vdit.eval.metrics.base import MetricResult, check_fps, check_video
from vdit.eval.metrics.flow import FlowCache, flow_magnitude, top_fraction_mean

__all__ = ["static_filter", "dynamic_degree", "motion_magnitude", "motion_smoothness", "motion_jerk",
           "midpoint_frame"]

_IMPL = "vdit.eval.metrics.motion."


def _cache(video: np.ndarray, cache: FlowCache | None, flow) -> FlowCache:
    return cache if cache is not None else FlowCache(video, flow)


def _flow_note(cache: FlowCache) -> dict:
    return {"flow": getattr(cache.backend, "name", type(cache.backend).__name__)}


def static_filter(video: np.ndarray, fps: float | None = None, *, cache: FlowCache | None = None,
                  flow=None) -> MetricResult:
    """VBench's static filter: value 1.0 (static) or 0.0 (moving). Set mean = fraction static.

    Returns:
        MetricResult(name="static_filter", exact = the flow backend's (RAFT: True, OpenCV: False))
        with details ``static`` (bool), ``pair_scores`` (top-2 % mean magnitude per consecutive
        pair, px/frame), ``end_scores`` ((first, last) and (last, first)), ``thres``,
        ``count_num``, ``max_flow`` (largest magnitude seen, px).

    Raises:
        ValueError: invalid video.
    """
    video = check_video(video)
    c = _cache(video, cache, flow)
    T, H, W = video.shape[:3]
    pairs = [(i, i + 1) for i in range(T - 1)] + [(0, T - 1), (T - 1, 0)]
    scores, max_flow = [], 0.0
    for i, j in pairs:
        f = c(i, j, padded=True)
        scores.append(top_fraction_mean(f, 0.02))
        max_flow = max(max_flow, float(flow_magnitude(f).max()))
    thres = 3.0 * min(H, W) / 256.0
    count_num = round(2 * T / 16.0)
    exceed = sum(s > thres for s in scores[:-2])
    static = exceed <= count_num and all(s <= thres * count_num * 2 for s in scores[-2:])
    return MetricResult(
        name="static_filter", value=1.0 if static else 0.0, implementation=_IMPL + "static_filter",
        original="VBench static_filter (RAFT raft-things)", exact=bool(getattr(c.backend, "exact", False)),
        details={"static": bool(static), "pair_scores": scores[:-2], "end_scores": scores[-2:],
                 "thres": thres, "count_num": count_num, "max_flow": max_flow, **_flow_note(c)},
    )


def _dynamic_scores(video: np.ndarray, fps: float, c: FlowCache) -> tuple[list[int], list[float]]:
    step = max(1, round(check_fps(fps) / 8.0))
    idx = list(range(0, video.shape[0], step))
    return idx, [top_fraction_mean(c(a, b, padded=True), 0.05) for a, b in zip(idx[:-1], idx[1:])]


def dynamic_degree(video: np.ndarray, fps: float, *, cache: FlowCache | None = None, flow=None) -> MetricResult:
    """VBench's dynamic degree for one video: 1.0 (dynamic) or 0.0. Set mean = VBench's score.

    Args:
        video: uint8 (T, H, W, 3). fps: frames per second (sets the subsampling step).

    Returns:
        MetricResult(name="dynamic_degree", exact = the flow backend's) with details ``dynamic``,
        ``frames`` (kept indices), ``pair_scores`` (top-5 % mean magnitude, px per kept step),
        ``thres``, ``count_num``, ``max_flow``.

    Raises:
        ValueError: invalid video or fps <= 0.
    """
    video = check_video(video)
    c = _cache(video, cache, flow)
    idx, scores = _dynamic_scores(video, fps, c)
    H, W = video.shape[1:3]
    thres = 6.0 * min(H, W) / 256.0
    count_num = round(4 * len(idx) / 16.0)
    count, dynamic = 0, False
    for s in scores:
        count += s > thres
        if count >= count_num:
            dynamic = True
            break
    max_flow = max((float(flow_magnitude(c(a, b, padded=True)).max()) for a, b in zip(idx[:-1], idx[1:])),
                   default=0.0)
    return MetricResult(
        name="dynamic_degree", value=1.0 if dynamic else 0.0, implementation=_IMPL + "dynamic_degree",
        original="VBench dynamic_degree (RAFT raft-things)", exact=bool(getattr(c.backend, "exact", False)),
        details={"dynamic": dynamic, "frames": idx, "pair_scores": scores, "thres": thres,
                 "count_num": count_num, "max_flow": max_flow, **_flow_note(c)},
    )


def motion_magnitude(video: np.ndarray, fps: float, *, cache: FlowCache | None = None, flow=None) -> MetricResult:
    """Continuous dynamic degree: mean over dynamic degree's pairs of the top-5 % flow magnitude.

    Same frames and pairs as :func:`dynamic_degree` (every max(1, round(fps/8))-th frame); value in
    pixels per kept step at the video's resolution. New (VBench only thresholds these numbers).
    """
    video = check_video(video)
    c = _cache(video, cache, flow)
    idx, scores = _dynamic_scores(video, fps, c)
    value = float(np.mean(scores)) if scores else None
    return MetricResult(
        name="motion_magnitude", value=value, implementation=_IMPL + "motion_magnitude",
        original="continuous form of VBench dynamic_degree's per-pair score (new)", exact=False,
        details={"frames": idx, "pair_scores": scores, "unit": "px per kept step", **_flow_note(c),
                 **({} if scores else {"reason": "fewer than 2 frames after subsampling"})},
    )


def midpoint_frame(a: np.ndarray, b: np.ndarray, f_ab: np.ndarray, f_ba: np.ndarray) -> np.ndarray:
    """Frame half-way between ``a`` and ``b`` (uint8 (H, W, 3)) from their flows (H, W, 2).

    Backward warping: M(x) = (a(x + f_ba(x) / 2) + b(x + f_ab(x) / 2)) / 2, bilinear, border
    replicated, rounded to uint8. Exact for a uniform translation; an approximation elsewhere
    (the flow at x stands in for the flow through x at mid-time).
    """
    H, W = a.shape[:2]
    gx, gy = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    wa = cv2.remap(a, gx + 0.5 * f_ba[..., 0], gy + 0.5 * f_ba[..., 1], cv2.INTER_LINEAR,
                   borderMode=cv2.BORDER_REPLICATE)
    wb = cv2.remap(b, gx + 0.5 * f_ab[..., 0], gy + 0.5 * f_ab[..., 1], cv2.INTER_LINEAR,
                   borderMode=cv2.BORDER_REPLICATE)
    return np.clip(np.rint((wa.astype(np.float32) + wb.astype(np.float32)) / 2.0), 0, 255).astype(np.uint8)


def motion_smoothness(video: np.ndarray, fps: float | None = None, *, cache: FlowCache | None = None,
                      flow=None) -> MetricResult:
    """VBench's motion smoothness protocol with flow-based midpoint interpolation (inexact).

    Odd frames 2k+1 (with 2k+2 < T) are re-created from frames 2k and 2k+2 by
    :func:`midpoint_frame`; score = (255 - mean_k mean|F_{2k+1} - M_k|) / 255 on uint8 values.

    Returns:
        MetricResult(name="motion_smoothness", exact=False) with details ``frame_mae`` (per
        re-created frame, 0-255); value None when T < 3 (nothing to re-create).
    """
    video = check_video(video)
    c = _cache(video, cache, flow)
    maes = []
    for k in range(0, video.shape[0] - 2, 2):
        mid = midpoint_frame(video[k], video[k + 2], c(k, k + 2), c(k + 2, k))
        maes.append(float(cv2.absdiff(mid, video[k + 1]).mean()))
    value = (255.0 - float(np.mean(maes))) / 255.0 if maes else None
    return MetricResult(
        name="motion_smoothness", value=value, implementation=_IMPL + "motion_smoothness",
        original="VBench motion_smoothness (AMT-S frame interpolation)", exact=False,
        details={"frame_mae": maes, "interpolation": "flow midpoint warp", **_flow_note(c),
                 **({} if maes else {"reason": "fewer than 3 frames"})},
    )


def motion_jerk(video: np.ndarray, fps: float | None = None, *, cache: FlowCache | None = None,
                flow=None) -> MetricResult:
    """Largest change of the median flow vector between consecutive frame pairs (px/frame). New.

    m_i = (median dx, median dy) of the flow from frame i to i+1 over all pixels; value =
    max_i |m_{i+1} - m_i|. 0 for a still or uniformly moving video; an adjacent frame swap in a
    pan of v px/frame gives >= v (the motion reverses), a repeated frame >= v (it stops).
    Catches swaps and stutter that smoothness barely sees. Value None when T < 3.

    Returns:
        MetricResult(name="motion_jerk", exact=False: no original) with details
        ``median_flow`` (per pair (dx, dy)), ``median_speed`` (median over pairs of |m_i|).
    """
    video = check_video(video)
    c = _cache(video, cache, flow)
    med = np.array([np.median(c(i, i + 1).reshape(-1, 2), axis=0) for i in range(video.shape[0] - 1)])
    jumps = np.linalg.norm(np.diff(med, axis=0), axis=-1) if len(med) > 1 else np.zeros(0)
    value = float(jumps.max()) if jumps.size else None
    return MetricResult(
        name="motion_jerk", value=value, implementation=_IMPL + "motion_jerk",
        original="new (vdit): no published original", exact=False,
        details={"median_flow": med.tolist(), "median_speed": float(np.median(np.linalg.norm(med, axis=-1))),
                 "jumps": jumps.tolist(), "unit": "px/frame", **_flow_note(c),
                 **({} if jumps.size else {"reason": "fewer than 3 frames"})},
    )

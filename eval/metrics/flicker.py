"""Temporal flickering, following VBench's ``temporal_flickering`` dimension.

Source of the formula: VBench (Vchitect/VBench, ``vbench/temporal_flickering.py``, Apache-2.0):
for each pair of consecutive frames the mean absolute difference over all pixels and channels on
the 0-255 scale, averaged over pairs; score = (255 - mean) / 255. VBench scores only the videos
its static filter keeps (:func:`vdit.eval.metrics.motion.static_filter`). Two metrics, never one
under the other's name:

- ``temporal_flickering``: VBench's dimension. Not evaluable (value None) on a video the static
  filter rejects, so the per-set mean runs over static videos only.
- ``temporal_flickering_all``: the same formula on every video.

Our code is an independent implementation of that formula.
"""

from __future__ import annotations

import numpy as np

from vdit.eval.metrics.base import MetricResult, check_video

__all__ = ["flicker_score", "temporal_flickering", "temporal_flickering_all"]

_ORIGINAL = "VBench temporal_flickering (Vchitect/VBench)"


def flicker_score(video: np.ndarray) -> tuple[float, np.ndarray]:
    """(score, per-pair MAE) of VBench's flicker formula for uint8 (T, H, W, 3), T >= 2.

    score = (255 - mean_i MAE(F_i, F_{i+1})) / 255; MAE over all H*W*3 values on the 0-255 scale,
    computed in int16 / float64 so uint8 wrap-around cannot occur. Raises ValueError on an
    invalid video (:func:`vdit.eval.metrics.base.check_video`).
    """
    video = check_video(video)
    # One pair at a time keeps the int16 temporary at 2 frames, whatever T is.
    pair_mae = np.array([
        np.abs(video[i + 1].astype(np.int16) - video[i].astype(np.int16)).mean(dtype=np.float64)
        for i in range(video.shape[0] - 1)
    ])
    return float((255.0 - pair_mae.mean()) / 255.0), pair_mae


def temporal_flickering_all(video: np.ndarray, fps: float | None = None) -> MetricResult:
    """VBench's flicker formula on any video, static or not (1.0 = no change between frames).

    Args:
        video: uint8 (T, H, W, 3) RGB, T >= 2. fps: unused (the formula has no time unit).

    Returns:
        MetricResult(name="temporal_flickering_all", exact=True: the per-video formula is VBench's;
        the set mean is not VBench's dimension, which filters first) with details ``pair_mae``
        (T-1 per-pair MAEs, 0-255 scale), ``mean_mae`` and ``num_frames``.

    Raises:
        ValueError: invalid video.
    """
    score, pair_mae = flicker_score(video)
    return MetricResult(
        name="temporal_flickering_all",
        value=score,
        implementation="vdit.eval.metrics.flicker.temporal_flickering_all",
        original=_ORIGINAL + " formula, without the static filter",
        exact=True,
        details={"pair_mae": [float(v) for v in pair_mae], "mean_mae": float(pair_mae.mean()),
                 "num_frames": int(video.shape[0])},
    )


def temporal_flickering(video: np.ndarray, fps: float | None = None, *, static: bool | None = None,
                        cache=None, flow=None) -> MetricResult:
    """VBench's temporal flickering dimension for one video: the score if static, else not evaluable.

    Args:
        video: uint8 (T, H, W, 3) RGB, T >= 2. fps: unused.
        static: the static filter's verdict when already known; computed with
            :func:`vdit.eval.metrics.motion.static_filter` (``flow`` backend, shared ``cache``)
            when None.

    Returns:
        MetricResult(name="temporal_flickering"): value = the formula's score for a static video,
        None (``details["reason"]``) otherwise. ``exact`` is the flow backend's: with RAFT the
        static filter is VBench's, with OpenCV flow (default) the set it keeps may differ.

    Raises:
        ValueError: invalid video.
    """
    from vdit.eval.metrics.motion import static_filter

    score, pair_mae = flicker_score(video)
    exact = True
    if static is None:
        sf = static_filter(video, fps, cache=cache, flow=flow)
        static, exact = bool(sf.value), sf.exact
    details = {"pair_mae": [float(v) for v in pair_mae], "mean_mae": float(pair_mae.mean()),
               "num_frames": int(video.shape[0]), "static": bool(static), "score_unfiltered": score}
    if not static:
        details["reason"] = "not static: VBench scores flicker only on videos its static filter keeps"
    return MetricResult(
        name="temporal_flickering",
        value=score if static else None,
        implementation="vdit.eval.metrics.flicker.temporal_flickering",
        original=_ORIGINAL,
        exact=bool(exact),
        details=details,
    )

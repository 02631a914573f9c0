"""Temporal flickering, following VBench's ``temporal_flickering`` dimension.

Source of the formula: VBench (Vchitect/VBench, ``vbench/temporal_flickering.py``, Apache-2.0):
for each pair of consecutive frames the mean absolute difference over all pixels and channels on
the 0-255 scale, averaged over pairs; score = (255 - mean) / 255. Our code is an independent
implementation of that formula.
"""

from __future__ import annotations

import numpy as np

from vdit.eval.metrics.base import MetricResult, check_video

__all__ = ["temporal_flickering"]


def temporal_flickering(video: np.ndarray) -> MetricResult:
    """VBench temporal flickering score of one video (1.0 = no change between frames).

    score = (255 - mean_i MAE(F_i, F_{i+1})) / 255, where MAE is the mean absolute difference
    over all H*W*3 values of two consecutive frames on the 0-255 scale (computed in int16 /
    float64, so uint8 wrap-around cannot occur).

    VBench applies its static filter (RAFT optical flow) first and scores only static videos; this
    function reports the raw score of whatever it is given. The static filter is a separate step.

    Args:
        video: uint8 (T, H, W, 3) RGB, T >= 2.

    Returns:
        MetricResult(name="temporal_flickering", exact=True) with details ``pair_mae`` (list of
        T-1 per-pair MAEs, 0-255 scale), ``mean_mae`` and ``num_frames``.

    Raises:
        ValueError: see :func:`vdit.eval.metrics.base.check_video`.
    """
    video = check_video(video)
    # One pair at a time keeps the int16 temporary at 2 frames, whatever T is.
    pair_mae = np.array([
        np.abs(video[i + 1].astype(np.int16) - video[i].astype(np.int16)).mean(dtype=np.float64)
        for i in range(video.shape[0] - 1)
    ])
    mean_mae = float(pair_mae.mean())
    score = (255.0 - mean_mae) / 255.0
    return MetricResult(
        name="temporal_flickering",
        value=float(score),
        implementation="vdit.eval.metrics.flicker.temporal_flickering",
        original="VBench temporal_flickering (Vchitect/VBench)",
        exact=True,
        details={
            "pair_mae": [float(v) for v in pair_mae],
            "mean_mae": mean_mae,
            "num_frames": int(video.shape[0]),
            "static_filter": "not applied (VBench scores only videos its static filter keeps)",
        },
    )

"""The result record every metric returns, and the shared input check for videos."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MetricResult", "check_video"]


@dataclass
class MetricResult:
    """One metric value with its provenance.

    Fields:
        name: metric name as logged, e.g. ``"temporal_flickering"`` (logged as ``eval/<name>``).
        value: the score (float).
        implementation: our code that computed it, e.g. ``"vdit.eval.metrics.flicker"``.
        original: what it follows, e.g. ``"VBench temporal_flickering (Vchitect/VBench)"``.
        exact: True when the formula is an exact port of the original, False for approximations
            (so a proxy number is never mistaken for a leaderboard number).
        details: extra JSON-serialisable numbers (per-pair values, counts, notes).
    """

    name: str
    value: float
    implementation: str
    original: str
    exact: bool
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (``value`` as a Python float), ready for JSON / wandb."""
        d = dataclasses.asdict(self)
        d["value"] = float(self.value)
        return d


def check_video(video: Any) -> np.ndarray:
    """Validate a video for metrics and return it unchanged.

    Args:
        video: uint8 numpy array (T, H, W, 3), RGB, with T >= 2 frames and H, W >= 1.

    Returns:
        The same array.

    Raises:
        ValueError: not a numpy array, wrong dtype, wrong number of dimensions, last axis not 3,
            fewer than 2 frames, or an empty frame size.
    """
    if not isinstance(video, np.ndarray):
        raise ValueError(f"video must be a numpy array uint8 (T, H, W, 3); got {type(video).__name__}")
    if video.dtype != np.uint8:
        raise ValueError(f"video must be uint8 (T, H, W, 3) on the 0-255 scale; got dtype {video.dtype}")
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must have shape (T, H, W, 3); got {video.shape}")
    if video.shape[0] < 2:
        raise ValueError(f"video needs at least 2 frames (T >= 2); got T = {video.shape[0]}")
    if video.shape[1] < 1 or video.shape[2] < 1:
        raise ValueError(f"video frames are empty: H x W = {video.shape[1]} x {video.shape[2]}")
    return video

"""The result record every metric returns, and the shared input check for videos."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MetricResult", "MissingWeightsError", "check_video", "check_fps", "require_path"]


@dataclass
class MetricResult:
    """One metric value with its provenance.

    Fields:
        name: metric name as logged, e.g. ``"temporal_flickering"`` (logged as ``eval/<name>``).
        value: the score (float), or None when the metric is not evaluable on this video (e.g.
            VBench's flicker on a video the static filter rejects, a physics check with nothing to
            judge); ``details["reason"]`` then says why. Not evaluable is counted, never a pass.
        implementation: our code that computed it, e.g. ``"vdit.eval.metrics.flicker"``.
        original: what it follows, e.g. ``"VBench temporal_flickering (Vchitect/VBench)"``.
        exact: True when the formula is an exact port of the original, False for approximations
            (so a proxy number is never mistaken for a leaderboard number).
        details: extra JSON-serialisable numbers (per-pair values, counts, notes).
    """

    name: str
    value: float | None
    implementation: str
    original: str
    exact: bool
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (``value`` as a Python float), ready for JSON / wandb."""
        d = dataclasses.asdict(self)
        d["value"] = None if self.value is None else float(self.value)
        return d

    @property
    def evaluable(self) -> bool:
        """False when ``value`` is None (see ``details["reason"]``)."""
        return self.value is not None


class MissingWeightsError(FileNotFoundError):
    """A metric backend that needs weights was given no path, or a path that does not exist."""


def require_path(path: str | None, metric: str, setting: str) -> str:
    """Return ``path`` if it exists; otherwise raise :class:`MissingWeightsError` naming the metric
    and the setting (CLI ``--weights KEY=PATH`` / Python keyword) that should point at the weights."""
    import os

    if not path:
        raise MissingWeightsError(f"metric {metric!r} needs local weights: set {setting} to a local path "
                                  f"(nothing is downloaded)")
    if not os.path.exists(path):
        raise MissingWeightsError(f"metric {metric!r}: {setting} = {path!r} does not exist")
    return path


def check_fps(fps: Any) -> float:
    """Return ``fps`` as a float; ValueError unless it is finite and > 0 (frames per second)."""
    try:
        value = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"fps must be a number > 0; got {fps!r}") from None
    if not (value > 0 and np.isfinite(value)):
        raise ValueError(f"fps must be finite and > 0; got {fps!r}")
    return value


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

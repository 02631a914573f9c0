"""Clip quality filters and de-duplication keys for ``vdit-ingest``: small pure functions.

Each ``check_*`` function returns None when the input passes, else a :class:`Rejection` with the
skip ``reason`` the ingest report counts and a detail sentence:

=====================  ================================================  ===========================
reason                 when                                              flag
=====================  ================================================  ===========================
``low_resolution``     source height or width below the minimum          ``--min-height/--min-width``
``bad_aspect``         source width / height outside the range           ``--min-aspect/--max-aspect``
``few_frames``         clip (as written) has fewer frames                ``--min-frames``
``too_short``          clip shorter than the minimum, in seconds         ``--min-seconds``
``too_long``           clip longer than the maximum, in seconds          ``--max-seconds``
``low_motion``         motion score below the minimum                    ``--min-motion``
=====================  ================================================  ===========================

Resolution and aspect are judged on the source video (before downscaling), frames, seconds and
motion on each clip as it is written (after ``--fps`` resampling and ``--max-clip-seconds``).

**Motion score** (:func:`motion_score`): the mean optical-flow magnitude, in pixels per frame, at
a 64-pixel short side. A few pairs of consecutive frames spread over the clip are converted to
grayscale, resized so the shorter side is 64 px, and OpenCV's Farneback dense flow is computed
between each pair; the score is the per-pixel flow length averaged over all pixels and pairs.
A static shot scores ~0; a full-frame pan of 2 px/frame at 64 px scores ~2; an object covering
a quarter of the frame and moving 4 px/frame scores ~1. It is cheap (four 64-px flow fields per clip).

**De-duplication keys**: :func:`sha256_file` (exact copies of a source file) and
:func:`perceptual_key` (identical clips: a hash of a few frames reduced to 16x16 gray, quantized
to 16 levels, so tiny re-encoding differences do not matter).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "FilterOptions",
    "Rejection",
    "check_resolution",
    "check_aspect",
    "check_frames",
    "check_seconds",
    "check_motion",
    "video_rejection",
    "clip_length_rejection",
    "motion_score",
    "perceptual_key",
    "sha256_file",
    "MOTION_SHORT_SIDE",
]

MOTION_SHORT_SIDE = 64  # pixels: motion scores are in pixels per frame at this short side
MOTION_PAIRS = 4  # frame pairs per clip for the motion score


@dataclass(frozen=True)
class Rejection:
    """Why an input was filtered out: a short ``reason`` (counted) and a ``detail`` sentence."""

    reason: str
    detail: str


@dataclass(frozen=True)
class FilterOptions:
    """Thresholds; 0 / None switch a filter off.

    Attributes:
        min_height, min_width: source size in pixels.
        min_frames: frames per clip as written.
        min_seconds, max_seconds: clip duration in seconds.
        min_aspect, max_aspect: source width / height.
        min_motion: motion score (pixels per frame at a 64 px short side, see :func:`motion_score`).
    """

    min_height: int = 0
    min_width: int = 0
    min_frames: int = 0
    min_seconds: float = 0.0
    max_seconds: float | None = None
    min_aspect: float | None = None
    max_aspect: float | None = None
    min_motion: float | None = None

    def __post_init__(self):
        for name in ("min_height", "min_width", "min_frames"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")
        for name in ("min_seconds", "max_seconds", "min_aspect", "max_aspect", "min_motion"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0; got {v}")
        if self.max_seconds is not None and self.max_seconds < self.min_seconds:
            raise ValueError(f"--max-seconds {self.max_seconds} < --min-seconds {self.min_seconds}")
        if self.min_aspect is not None and self.max_aspect is not None and self.max_aspect < self.min_aspect:
            raise ValueError(f"--max-aspect {self.max_aspect} < --min-aspect {self.min_aspect}")


def check_resolution(height: int, width: int, min_height: int = 0, min_width: int = 0) -> Rejection | None:
    """``low_resolution`` when ``height < min_height`` or ``width < min_width`` (pixels)."""
    if height < min_height or width < min_width:
        return Rejection("low_resolution", f"source is {width}x{height} px, below --min-width {min_width} / "
                                           f"--min-height {min_height}")
    return None


def check_aspect(height: int, width: int, min_aspect: float | None = None,
                 max_aspect: float | None = None) -> Rejection | None:
    """``bad_aspect`` when ``width / height`` is outside ``[min_aspect, max_aspect]``."""
    aspect = width / height
    if (min_aspect is not None and aspect < min_aspect) or (max_aspect is not None and aspect > max_aspect):
        lo = "-inf" if min_aspect is None else f"{min_aspect:g}"
        hi = "inf" if max_aspect is None else f"{max_aspect:g}"
        return Rejection("bad_aspect", f"aspect (w/h) {aspect:.3f} of {width}x{height} outside [{lo}, {hi}]")
    return None


def check_frames(num_frames: int, min_frames: int = 0) -> Rejection | None:
    """``few_frames`` when the clip has fewer than ``min_frames`` frames."""
    if num_frames < min_frames:
        return Rejection("few_frames", f"clip has {num_frames} frames < --min-frames {min_frames}")
    return None


def check_seconds(seconds: float, min_seconds: float = 0.0, max_seconds: float | None = None) -> Rejection | None:
    """``too_short`` / ``too_long`` when the clip's duration in seconds is outside the range."""
    if seconds < min_seconds:
        return Rejection("too_short", f"clip is {seconds:.3f} s < --min-seconds {min_seconds:g}")
    if max_seconds is not None and seconds > max_seconds:
        return Rejection("too_long", f"clip is {seconds:.3f} s > --max-seconds {max_seconds:g}")
    return None


def check_motion(score: float | None, min_motion: float | None = None) -> Rejection | None:
    """``low_motion`` when the motion score is below ``min_motion`` (a clip without a score passes)."""
    if min_motion is not None and score is not None and score < min_motion:
        return Rejection("low_motion", f"motion score {score:.4f} px/frame < --min-motion {min_motion:g}")
    return None


def video_rejection(height: int, width: int, f: FilterOptions) -> Rejection | None:
    """The first source-level filter (resolution, aspect) the video fails, or None."""
    return check_resolution(height, width, f.min_height, f.min_width) or check_aspect(
        height, width, f.min_aspect, f.max_aspect)


def clip_length_rejection(num_frames: int, seconds: float, f: FilterOptions) -> Rejection | None:
    """The first length filter (frames, seconds) a clip fails, or None; checked before decoding."""
    return check_frames(num_frames, f.min_frames) or check_seconds(seconds, f.min_seconds, f.max_seconds)


def _gray_at(frame: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    return cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), size, interpolation=interpolation)


def motion_score(frames: np.ndarray, num_pairs: int = MOTION_PAIRS, short_side: int = MOTION_SHORT_SIDE) -> float:
    """Mean optical-flow magnitude of a clip, in pixels per frame at a ``short_side``-pixel short side.

    Uses ``num_pairs`` pairs of consecutive frames ``(t, t + 1)`` spread evenly over the clip,
    resized (keeping aspect) so the shorter side is ``short_side`` px, and OpenCV's Farneback
    dense flow (3 pyramid levels, 15 px window). Deterministic; rounded to 4 decimals.

    Args:
        frames: uint8 ``(T, H, W, 3)`` RGB.
        num_pairs: frame pairs to average (>= 1).
        short_side: analysis resolution in pixels.

    Returns:
        The score (>= 0); 0.0 for a single-frame clip.
    """
    t, h, w = frames.shape[:3]
    if t < 2:
        return 0.0
    starts = sorted({_round_half_up(k * (t - 2) / max(1, num_pairs - 1)) for k in range(max(1, num_pairs))})
    scale = short_side / min(h, w)
    size = (max(1, _round_half_up(w * scale)), max(1, _round_half_up(h * scale)))  # cv2 wants (W, H)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    magnitudes = []
    for s in starts:
        a, b = _gray_at(frames[s], size, interpolation), _gray_at(frames[s + 1], size, interpolation)
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)  # (H', W', 2) in pixels
        magnitudes.append(float(np.sqrt((flow.astype(np.float64) ** 2).sum(axis=2)).mean()))
    return round(float(np.mean(magnitudes)), 4)


def perceptual_key(frames: np.ndarray, num_samples: int = 4, size: int = 16, levels: int = 16) -> str:
    """A short hex key equal for identical clips: ``num_samples`` frames at ``size``x``size`` gray, quantized.

    The frame count and aspect ratio are part of the key, so clips of different lengths or shapes
    never collide.

    Args:
        frames: uint8 ``(T, H, W, 3)`` RGB.
        num_samples: frames spread evenly over the clip.
        size: side of the downscaled gray thumbnails, pixels.
        levels: gray levels kept (of 256).

    Returns:
        16 hex characters (64 bits of a SHA-1).
    """
    t, h, w = frames.shape[:3]
    idx = np.unique(np.round(np.linspace(0, t - 1, num_samples)).astype(np.int64))
    thumbs = np.stack([_gray_at(frames[i], (size, size), cv2.INTER_AREA) for i in idx])
    quantized = (thumbs.astype(np.uint16) * levels // 256).astype(np.uint8)
    digest = hashlib.sha1(f"{t}:{w / h:.2f}:{size}:{levels}:".encode())
    digest.update(quantized.tobytes())
    return digest.hexdigest()[:16]


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))

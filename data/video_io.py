"""Encoding videos to mp4 (H.264) without a system ffmpeg.

PyAV's wheels bundle FFmpeg with libx264, so writing clips, samples and test fixtures needs no
system package. Decoding for training goes through decord (see ``vdit.data.decode``); this module
only writes, plus a small PyAV reader used by tests and tools that need every frame.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be a uint8 array (T, H, W, 3); got {getattr(frames, 'shape', type(frames))}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8; got {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("frames is empty (T == 0)")
    return frames


def encode_mp4(frames: np.ndarray, fps: float, crf: int = 18, preset: str = "veryfast") -> bytes:
    """Encode RGB frames to an H.264 mp4 held in memory.

    Args:
        frames: uint8 ``(T, H, W, 3)`` RGB. Odd H or W are padded by one pixel (edge replicate),
            because yuv420p needs even sizes.
        fps: frames per second of the output (may be fractional, e.g. 29.97).
        crf: x264 constant rate factor (0 lossless-ish luma .. 51 worst); 18 is visually lossless.
        preset: x264 speed preset.

    Returns:
        The mp4 file as bytes.

    Raises:
        ValueError: frames with the wrong shape or dtype, or ``fps <= 0``.
    """
    frames = _check_frames(frames)
    if not fps > 0:
        raise ValueError(f"fps must be > 0; got {fps}")
    t, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    buf = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width = w + pw
        stream.height = h + ph
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, crf: int = 18) -> str:
    """Write RGB frames ``uint8 (T, H, W, 3)`` to ``path`` as H.264 mp4; returns the path as str.

    Raises:
        ValueError: as :func:`encode_mp4`.
    """
    data = encode_mp4(frames, fps, crf=crf)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def read_all_frames(src: str | os.PathLike | bytes | BinaryIO) -> tuple[np.ndarray, float]:
    """Decode every frame of a video with PyAV; returns ``(uint8 (T, H, W, 3), fps)``.

    For tests and tools; training decodes with decord on selected indices instead.

    Raises:
        av.error.FFmpegError (or a subclass) when the data is not a decodable video.
    """
    if isinstance(src, (bytes, bytearray)):
        src = io.BytesIO(src)
    with av.open(src) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError("video has no decodable frames")
    return np.stack(frames), fps

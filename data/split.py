"""Held-out validation clips chosen by a hash of their source video.

Clips cut from one video overlap in time (``vdit-ingest`` cuts 2 s windows at a 1 s stride) and
share its caption, so a clip-level split would validate on frames the model trained on. The split
is therefore made per source video: every clip of a held-out video is held out. The source is read
from the clip's json (``source_sha256``, else ``source``, both written by ``vdit-ingest``), falling
back to the clip key. The hash is a fixed function of that id (no seed), so the same clips are held
out in every run, on any number of ranks, and whatever the shard order.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

__all__ = ["SPLITS", "source_id", "is_held_out", "in_split", "sample_in_split"]

SPLITS = ("all", "train", "val")


def source_id(key: str, meta: dict[str, Any] | None = None) -> str:
    """The id a clip is split by: ``meta["source_sha256"]``, else ``meta["source"]``, else ``key``."""
    if meta:
        for name in ("source_sha256", "source"):
            if meta.get(name):
                return str(meta[name])
    return key


def is_held_out(source: str, fraction: float) -> bool:
    """True when the source id falls in the held-out ``fraction``: ``crc32(source) / 2**32 < fraction``.

    Deterministic, uniform over sources, no state.

    Raises:
        ValueError: ``fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1); got {fraction}")
    return fraction > 0.0 and zlib.crc32(source.encode("utf-8")) / 2**32 < fraction


def in_split(source: str, split: str, fraction: float) -> bool:
    """Whether a clip of this source id belongs to ``split``: ``all`` (everything), ``train`` (not
    held out) or ``val`` (held out).

    Raises:
        ValueError: an unknown ``split`` or a bad ``fraction``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if split == "all":
        return True
    return is_held_out(source, fraction) == (split == "val")


def sample_in_split(sample: dict[str, Any], split: str, fraction: float) -> bool:
    """:func:`in_split` for a raw webdataset sample (``__key__`` plus optional ``json`` bytes).

    The json is parsed only when ``split`` is not ``all``; unparsable json falls back to the key.
    """
    if split == "all":
        return True
    meta = None
    raw = sample.get("json")
    if raw is not None:
        try:
            meta = json.loads(raw)
        except (ValueError, TypeError):
            meta = None
    return in_split(source_id(sample.get("__key__", "?"), meta if isinstance(meta, dict) else None), split, fraction)

"""Shard lists and their deterministic assignment to data slots.

A *data slot* is one (rank, dataloader worker) pair; there are ``world_size * num_workers`` of
them (``num_workers = 0`` counts as one). Each epoch the shard list is permuted by
``(seed, epoch)`` and dealt round-robin to the slots, so the order any slot reads is a pure
function of ``(seed, epoch, slot, num_slots)``; nothing depends on timing or prefetching.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import webdataset as wds


def expand_shards(spec: str | list[str]) -> list[str]:
    """Resolve a shard spec into a list of shard URLs.

    ``spec`` may be a list of URLs, a directory (uses its ``index.json`` from ``vdit-ingest`` when
    present, else every ``*.tar`` in it, sorted), a brace pattern (``clips-{000000..000009}.tar``),
    a glob (``/data/*.tar``), a single path, or a ``pipe:`` URL (kept as is).

    Raises:
        FileNotFoundError: the spec names nothing (the message includes the spec).
    """
    if isinstance(spec, (list, tuple)):
        urls = [str(u) for u in spec]
    elif spec.startswith("pipe:") or "://" in spec:
        urls = list(wds.shardlists.expand_urls(spec))
    elif os.path.isdir(spec):
        index = os.path.join(spec, "index.json")
        if os.path.exists(index):
            with open(index) as f:
                entries = json.load(f)["shards"]
            urls = [os.path.join(spec, e["name"] if isinstance(e, dict) else e) for e in entries]
        else:
            urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif any(c in spec for c in "{*?["):
        urls = sorted(u for pat in wds.shardlists.expand_urls(spec) for u in (glob.glob(pat) or [pat]))
        urls = [u for u in urls if os.path.exists(u)]
    else:
        urls = [spec] if os.path.exists(spec) else []
    if not urls:
        raise FileNotFoundError(f"no shards found for data.shards={spec!r} (expected a directory of .tar shards, "
                                "a brace pattern, a glob or a list; run vdit-ingest to create shards)")
    return urls


def epoch_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Shard indices in the order epoch ``epoch`` reads them: a permutation seeded by ``(seed, epoch)``."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def slot_shards(order: list[int], slot: int, num_slots: int) -> list[int]:
    """The shards one data slot reads this epoch: every ``num_slots``-th entry of ``order`` from ``slot``.

    Raises:
        ValueError: fewer shards than slots (some slot would get nothing and its rank would stall).
    """
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} out of range for {num_slots} slots")
    if len(order) < num_slots:
        raise ValueError(f"{len(order)} shards cannot feed {num_slots} data slots (ranks x dataloader workers); "
                         "write more, smaller shards (vdit-ingest --samples-per-shard) or lower data.num_workers")
    return order[slot::num_slots]

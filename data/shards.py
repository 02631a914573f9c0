"""Shard lists and their deterministic assignment to data slots.

A *data slot* is one (rank, dataloader worker) pair; there are ``world_size * num_workers`` of
them (``num_workers = 0`` counts as one). Each epoch the shard list is permuted by
``(seed, epoch)`` and dealt round-robin to the slots, so the order any slot reads is a pure
function of ``(seed, epoch, slot, num_slots)``; nothing depends on timing or prefetching.

A slot that only has a data-parallel rank and no worker split is the unit sequence-parallel groups
share: every rank of one SP group passes the same ``dp_rank`` and so reads the same shards.

:func:`read_shard` reads one shard into memory through webdataset's ``gopen`` (local paths,
``file:``, ``pipe:`` commands, and the URL schemes webdataset maps to commands such as ``curl``),
with retries, exponential backoff and a time limit, and never raises. A shard that still fails after
its retries (truncated or unreadable) is remembered as bad by this process for the rest of the run:
later epochs read it once, without retries or waits (:func:`forget_bad_shards` clears the memory).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

log = logging.getLogger(__name__)

_BAD_SHARDS: dict[str, str] = {}  # url -> reason, for shards that failed every attempt in this process


def forget_bad_shards() -> None:
    """Forget the shards remembered as bad (e.g. after replacing them on disk)."""
    _BAD_SHARDS.clear()


@dataclass
class ShardReadSpec:
    """How hard to try reading a shard.

    ``retries`` extra attempts after a failed read, waiting ``backoff_s * 2**k`` seconds before
    attempt ``k + 1``; ``timeout_s`` bounds one attempt (open + read; None: no bound). On timeout a
    ``pipe:`` command is killed and a file stream closed, so a stuck command never hangs a worker.
    """

    retries: int = 2
    backoff_s: float = 1.0
    timeout_s: Optional[float] = 600.0


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (Linux ``/proc``; empty elsewhere)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    out.append(int(child))
                    out.extend(_descendants(int(child)))
    except OSError:
        pass
    return out


def _kill_tree(proc) -> None:
    """Kill a ``pipe:`` command and everything it started (``sh -c`` leaves children holding stdout)."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def _read_once(url: str, timeout_s: float | None) -> tuple[list[dict[str, Any]], list[BaseException]]:
    errors: list[BaseException] = []

    def handler(exn: BaseException) -> bool:
        errors.append(exn)
        return True  # keep going: samples before a truncation are still good

    try:
        stream = wds.gopen(url, "rb")
    except Exception as exn:  # noqa: BLE001 - any open failure is a failed attempt
        return [], [exn]
    timed_out = threading.Event()

    def abort() -> None:
        timed_out.set()
        proc = getattr(stream, "proc", None)
        try:
            if proc is not None:
                _kill_tree(proc)  # unblocks the reader: stdout reaches EOF
            else:
                stream.close()
        except Exception:  # noqa: BLE001 - best effort
            pass

    timer = threading.Timer(timeout_s, abort) if timeout_s else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    samples: list[dict[str, Any]] = []
    try:
        source = [{"url": url, "stream": stream}]
        for s in group_by_keys(tar_file_expander(source, handler=handler, eof_value=None), handler=handler):
            samples.append(s)
    except Exception as exn:  # noqa: BLE001 - a broken shard must not kill the run
        errors.append(exn)
    finally:
        if timer is not None:
            timer.cancel()
        try:
            stream.close()  # a pipe: command's exit status is checked here
        except Exception as exn:  # noqa: BLE001
            errors.append(exn)
    if timed_out.is_set():
        errors.insert(0, TimeoutError(f"reading took more than {timeout_s} s"))
    return samples, errors


def read_shard(url: str, skipped: Counter | None = None, read: ShardReadSpec | None = None) -> list[dict[str, Any]]:
    """Read every sample of one shard into memory (compressed bytes); errors are counted, never raised.

    A failed attempt (cannot open, non-zero exit of a ``pipe:`` command, truncated tar, timeout) is
    retried ``read.retries`` times with backoff; the attempt with the most samples is kept. A shard
    that failed every attempt is remembered (per process) and later read once, without retries. A shard
    that still yields nothing counts ``skipped["shard_unreadable"]``, one that yields a part counts
    ``skipped["shard_truncated"]``; both log one line.

    Returns:
        webdataset sample dicts (``__key__``, ``mp4``, ``txt``, ``json``, ...) sorted by key, so the
        result does not depend on how the tar was written.
    """
    read = read or ShardReadSpec()
    best: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    known_bad = url in _BAD_SHARDS
    retries = 0 if known_bad else read.retries  # a shard that failed every attempt before: once, no waiting
    for attempt in range(retries + 1):
        samples, errors = _read_once(url, read.timeout_s)
        if len(samples) > len(best) or attempt == 0:
            best = samples
        if not errors:
            best = samples
            break
        if attempt < retries:
            wait = read.backoff_s * 2 ** attempt
            log.warning("data: %s: read failed (%s); retry %d/%d in %.2g s", url, errors[0], attempt + 1,
                        read.retries, wait)
            time.sleep(wait)
    if errors:
        reason = "shard_unreadable" if not best else "shard_truncated"
        if skipped is not None:
            skipped[reason] += 1
        if not known_bad:
            log.warning("data: %s: %s after %d attempts (%s); kept %d samples; not retried again in this run", url,
                        reason, retries + 1, errors[0], len(best))
        _BAD_SHARDS[url] = reason
    best.sort(key=lambda s: s["__key__"])
    return best


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

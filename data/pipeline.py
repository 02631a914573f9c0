"""The streaming training pipeline: shards -> samples -> decoded clips -> batches, with exact resume.

Stages (each small and deterministic):

1. ``shards.expand_shards`` lists shard URLs; ``epoch_shard_order`` permutes them by (seed, epoch);
   ``slot_shards`` deals them to data slots (rank x dataloader worker).
2. A slot reads one shard at a time with webdataset's tar reader, holds that shard's samples
   (compressed bytes), permutes them by (seed, epoch, shard) and walks them in that order.
3. Each sample is decoded with decord on sorted frame indices (``vdit.data.decode``), transformed to
   ``(C, T, H, W)`` in [-1, 1]; its random choices (window start, crop) come from a generator seeded
   by (seed, epoch, shard, position), so they do not depend on what was decoded before.
4. ``batch_size`` clips form a batch ``{"video": (B, C, T, H, W), "caption": [B], "key": [B]}``.

Position: a slot's state is ``(epoch, shard_pos, sample_pos, skipped)``. Every batch carries the
state *after* it; the trainer calls :meth:`VideoPipeline.commit` once a step has used the batch,
so a checkpoint records what training consumed, never what was prefetched. Resuming rebuilds
each slot from its committed state: the next batches equal those of the uninterrupted run.

A sample that cannot be used (corrupt or too-short video, missing caption, unreadable or truncated
shard) is skipped and counted by reason in ``skipped``; it never stops the run.
"""

from __future__ import annotations

import copy
import logging
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vdit.data.decode import DecodeError, decode_clip
from vdit.data.shards import epoch_shard_order, expand_shards, slot_shards
from vdit.data.transforms import clip_to_model_input

log = logging.getLogger(__name__)


@dataclass
class SlotState:
    """Where one data slot is: epoch, index into its shard list, samples taken from the current shard.

    ``skipped`` counts unusable samples by reason since the start of training (cumulative).
    """

    epoch: int = 0
    shard_pos: int = 0
    sample_pos: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class ClipSpec:
    """What a clip must look like: frames, pixels, temporal sampling, randomness."""

    num_frames: int
    height: int
    width: int
    target_fps: float | None = None
    frame_stride: int = 1
    random_crop: bool = False
    shuffle: bool = True
    seed: int = 0


def _sample_rng(seed: int, epoch: int, shard: int, pos: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, shard, pos, 0x5EED])


def read_shard(url: str, skipped: Counter) -> list[dict[str, Any]]:
    """Read every sample of one shard into memory (compressed bytes); errors are counted, not raised.

    Returns a list of webdataset sample dicts (``__key__``, ``mp4``, ``txt``, ``json``, ...), sorted
    by key so the result does not depend on how the tar was written.
    """
    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True  # keep going: samples before a truncation are still good

    samples = []
    try:
        for s in wds.tarfile_samples([{"url": url}], handler=handler):
            samples.append(s)
    except Exception as exn:  # noqa: BLE001 - a broken shard must not kill the run
        errors.append(exn)
    if errors:
        reason = "shard_unreadable" if not samples else "shard_truncated"
        skipped[reason] += 1
        log.warning("data: %s: %s (%s); kept %d samples", url, reason, errors[0], len(samples))
    samples.sort(key=lambda s: s["__key__"])
    return samples


def iterate_slot(urls: list[str], spec: ClipSpec, slot: int, num_slots: int,
                 state: SlotState) -> Iterator[tuple[dict[str, Any], SlotState]]:
    """Yield ``(sample, state_after)`` forever for one data slot, starting at ``state``.

    ``sample`` is ``{"video": float32 (C, T, H, W) in [-1, 1], "caption": str, "key": str, "meta": dict}``.

    Raises:
        ValueError: fewer shards than slots.
    """
    state = copy.deepcopy(state)
    skipped = Counter(state.skipped)
    while True:
        shards = slot_shards(epoch_shard_order(len(urls), spec.seed, state.epoch, spec.shuffle), slot, num_slots)
        produced_this_epoch = 0
        full_epoch = state.shard_pos == 0 and state.sample_pos == 0
        while state.shard_pos < len(shards):
            shard = shards[state.shard_pos]
            samples = read_shard(urls[shard], skipped)
            if spec.shuffle:
                order = np.random.default_rng([spec.seed, state.epoch, shard]).permutation(len(samples)).tolist()
            else:
                order = list(range(len(samples)))
            while state.sample_pos < len(order):
                pos = state.sample_pos
                raw = samples[order[pos]]
                state.sample_pos += 1
                sample = _prepare(raw, spec, _sample_rng(spec.seed, state.epoch, shard, pos), skipped, urls[shard])
                if sample is None:
                    continue
                produced_this_epoch += 1
                state.skipped = dict(skipped)
                yield sample, copy.deepcopy(state)
            state.shard_pos += 1
            state.sample_pos = 0
        if produced_this_epoch == 0 and full_epoch:  # nothing usable at all: fail loudly instead of spinning
            raise RuntimeError(f"data slot {slot}: a whole epoch of shards {[urls[i] for i in shards]} "
                               f"yielded no usable clip (skipped: {dict(skipped)})")
        state.epoch += 1
        state.shard_pos = 0
        state.sample_pos = 0


def _prepare(raw: dict[str, Any], spec: ClipSpec, rng: np.random.Generator, skipped: Counter,
             url: str) -> dict[str, Any] | None:
    key = raw.get("__key__", "?")
    video = raw.get("mp4")
    if video is None:
        skipped["no_video"] += 1
        log.warning("data: %s: sample %s has no .mp4; skipped", url, key)
        return None
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except (KeyError, UnicodeDecodeError):
        skipped["no_caption"] += 1
        log.warning("data: %s: sample %s has no usable .txt caption; skipped", url, key)
        return None
    try:
        frames, _ = decode_clip(video, spec.num_frames, target_fps=spec.target_fps,
                                stride=None if spec.target_fps else spec.frame_stride, rng=rng)
    except DecodeError as exn:
        skipped[exn.reason] += 1
        log.warning("data: %s: sample %s: %s; skipped", url, key, exn)
        return None
    crop_rng = rng if spec.random_crop else None
    try:
        x = clip_to_model_input(frames, spec.height, spec.width, crop_rng)
    except ValueError as exn:
        skipped["bad_frames"] += 1
        log.warning("data: %s: sample %s: %s; skipped", url, key, exn)
        return None
    return {"video": x, "caption": caption, "key": key}


def iterate_batches(urls: list[str], spec: ClipSpec, batch_size: int, slot: int, num_slots: int,
                    state: SlotState) -> Iterator[dict[str, Any]]:
    """Group one slot's samples into batches; each carries ``"slot_state"``, the state after it."""
    buf: list[dict[str, Any]] = []
    for sample, after in iterate_slot(urls, spec, slot, num_slots, state):
        buf.append(sample)
        if len(buf) == batch_size:
            yield {
                "video": torch.stack([s["video"] for s in buf]),  # (B, C, T, H, W)
                "caption": [s["caption"] for s in buf],
                "key": [s["key"] for s in buf],
                "slot_state": asdict(after),
            }
            buf = []


class _WorkerBatches(IterableDataset):
    """DataLoader view: worker ``w`` plays logical worker ``(w + phase) % W`` of this rank.

    DataLoader takes batches round-robin from workers 0, 1, ...; rotating the mapping by
    ``phase`` on resume continues the uninterrupted run's round-robin exactly.
    """

    def __init__(self, pipeline: "VideoPipeline"):
        self.p = pipeline

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w = 0 if info is None else info.id
        logical = (w + self.p.phase) % self.p.workers
        slot = self.p.rank * self.p.workers + logical
        for batch in iterate_batches(self.p.urls, self.p.spec, self.p.batch_size, slot, self.p.num_slots,
                                     SlotState(**self.p.start_states[logical])):
            batch["logical_worker"] = logical
            yield batch


class VideoPipeline:
    """Batches of decoded clips for one rank, with a checkpointable position (Stateful).

    Args:
        shards: shard spec, see :func:`vdit.data.shards.expand_shards`.
        spec: clip shape and sampling.
        batch_size: clips per batch (per rank).
        rank, world_size: this rank's position among the data-parallel ranks.
        num_workers: DataLoader worker processes (0 decodes in the training process).

    Iterating yields ``{"video": float32 (B, C, T, H, W) in [-1, 1], "caption": list[str], "key":
    list[str], ...}`` forever (epochs roll over). Call :meth:`commit` with each batch once the
    training step that used it has finished; :meth:`state_dict` returns the committed position.

    Raises:
        FileNotFoundError: no shards match. ValueError: fewer shards than data slots.
    """

    def __init__(self, shards: str | list[str], spec: ClipSpec, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        self.urls = expand_shards(shards)
        self.spec = spec
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.workers = max(1, num_workers)
        self.num_slots = world_size * self.workers
        slot_shards(list(range(len(self.urls))), rank * self.workers, self.num_slots)  # fail early if too few
        self.start_states: list[dict[str, Any]] = [asdict(SlotState()) for _ in range(self.workers)]
        self.committed: list[dict[str, Any]] = copy.deepcopy(self.start_states)
        self.phase = 0
        self._next_logical = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.start_states = copy.deepcopy(self.committed)
        self.phase = self._next_logical
        ds = _WorkerBatches(self)
        if self.num_workers == 0:
            return iter(ds)
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, prefetch_factor=2,
                            persistent_workers=False, multiprocessing_context="fork"
                            if torch.multiprocessing.get_start_method(allow_none=True) in (None, "fork") else None)
        return iter(loader)

    def commit(self, batch: dict[str, Any]) -> None:
        """Record that ``batch`` was consumed by a finished training step."""
        logical = batch.get("logical_worker", 0)
        self.committed[logical] = batch["slot_state"]
        self._next_logical = (logical + 1) % self.workers

    @property
    def skipped(self) -> dict[str, int]:
        """Unusable samples by reason, summed over this rank's slots (committed position)."""
        total: Counter = Counter()
        for s in self.committed:
            total.update(s["skipped"])
        return dict(total)

    def state_dict(self) -> dict[str, Any]:
        return {"slots": copy.deepcopy(self.committed), "next_logical": self._next_logical,
                "num_slots": self.num_slots, "num_shards": len(self.urls), "seed": self.spec.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a committed position.

        Raises:
            ValueError: the checkpoint was written with a different data-slot layout or shard list
                (re-splitting a position across a new layout is future work of the data issue).
        """
        if state["num_slots"] != self.num_slots or state["num_shards"] != len(self.urls):
            raise ValueError(
                f"data position was saved with {state['num_slots']} data slots over {state['num_shards']} shards; "
                f"this run has {self.num_slots} slots over {len(self.urls)} shards. Resume with the same "
                "world size, data.num_workers and shards")
        self.committed = copy.deepcopy(state["slots"])
        self._next_logical = int(state["next_logical"])

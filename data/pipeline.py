"""The streaming training pipeline: shards -> samples -> decoded clips -> bucketed batches, with exact resume.

Stages (each small and deterministic):

1. ``shards.expand_shards`` lists shard URLs; each epoch ``epoch_shard_order`` permutes them by
   ``(seed, epoch)`` and ``slot_shards`` deals them to the data slots (data-parallel rank x
   DataLoader worker). Every shard of an epoch is read by exactly one slot.
2. A slot reads one shard at a time (``shards.read_shard``: retries, time limit, never raises),
   holds its samples (compressed bytes), and walks them in a permutation seeded by
   ``(seed, epoch, shard)``. An *item* is ``(epoch, shard, position in that order)``.
3. Each item is decoded (``vdit.data.decode``: sorted indices, damage salvage, rotation, VFR by
   time), assigned to a bucket (``vdit.data.buckets``: duration, size, aspect ratio, weight) and
   transformed (resize-cover, crop, [-1, 1]). Its random choices (bucket among equals, window
   start, crop) come from a generator seeded by the item alone, so an item decodes to the same
   tensor whenever and wherever it is decoded.
4. Items queue per bucket (as uint8 ``(C, T, H, W)``, 4x smaller than float); when a bucket's queue
   reaches its batch size the batch is emitted: ``{"video": (B, C, T, H, W) float32 in [-1, 1],
   "caption": [B], "key": [B], "item": [B x (epoch, shard, pos)], "bucket": (T, H, W),
   "num_tokens": int, "slot_state", "logical_worker"}``. DataLoader workers ship uint8; the
   conversion to float happens in the consuming process, overlapping the workers' decoding. Without buckets there is one bucket, ``(num_frames, height, width)``
   with ``batch_size``, and no aspect matching (every clip is cropped to it), as before.

Sequence parallelism: all ranks of one SP group must train on the same clips, so they are one
data slot: build the pipeline with the group's ``dp_rank`` / ``dp_size`` (not the global rank).
They then produce identical batches, hence the same bucket at every step. Different DP ranks may
get different buckets at the same step; normalise the loss by tokens, not by batch size.

State (``SlotState``, per slot, plain data): the epoch, the slot's work list for the epoch
(``None`` = the layout's default deal, else explicit ``[shard, start]`` units after a re-deal),
the position ``(unit, pos)``, explicit work lists of following epochs (``future``), the items in
bucket queues (``queued``: ids, not tensors; re-decoded on resume), and cumulative counters
(``skipped`` by reason, ``handled`` by fix). That is O(shards per slot + queue length) ints.

Commit, not prefetch: every batch carries the state of its slot *after* it; the trainer calls
:meth:`VideoPipeline.commit` when the step that used the batch has finished, and
:meth:`VideoPipeline.state_dict` returns committed states only. Guarantees, each tested:

* same layout: a rebuilt pipeline continues with exactly the batches of the uninterrupted run
  (buckets and DataLoader workers included);
* different layout (data-parallel ranks and/or workers): :func:`merge_states` of every rank's
  state, loaded into the new ranks, re-deals what is left of each epoch in flight (the unread rest
  of every shard, shards not started, and queued items) to the new slots; every sample of every
  epoch is then seen exactly once. Later epochs use the new layout.

A sample that cannot be used (corrupt or too-short video, missing caption, no bucket, unreadable or
truncated shard) is skipped and counted by reason in ``skipped``; fixes that kept a sample
(salvaged damaged video, PyAV fallback, VFR timing, rotation) are counted in ``handled``.

Latent shards (written by ``vdit-encode``, see docs/latents.md) go through the same slots, shard
orders, queues, commit and state; only step 3 differs. The pipeline is in latent mode when a shard
lives in a folder with ``encode_meta.json`` (:func:`vdit.data.latents.is_latent_dir`); then every
sample is read with :func:`vdit.data.latents.read_latent_sample` against the encoded latent and
text shapes, and a failure is counted under its ``LatentSampleError.reason`` (``no_latent``,
``corrupt_latent``, ``latent_shape_mismatch``, ``corrupt_text``, ...). Without that file (e.g.
``pipe:`` URLs) a sample holding ``latent.pt`` is still read as a latent sample, and batches then
group samples of equal latent and text shape. Latent shards have one geometry, so buckets do not
apply (a bucket config with latent shards is a ``ValueError``). A latent batch is
``{"latent": float32 (B, C, T', H', W'), "text": float32 (B, L, D), "text_mask": bool (B, L),
"caption": [B], "key": [B], "item": [B x (epoch, shard, pos)], "bucket": (C, T', H', W'),
"num_tokens": int, "slot_state", "logical_worker"}`` (no ``"video"``).
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vdit.data.buckets import BucketConfig, Buckets
from vdit.data.decode import DecodeError, VideoDecoder
from vdit.data.latents import LatentSampleError, is_latent_dir, is_latent_sample, read_encode_meta, read_latent_sample
from vdit.data.split import sample_in_split
from vdit.data.shards import ShardReadSpec, epoch_shard_order, expand_shards, read_shard, slot_shards
from vdit.data.transforms import clip_to_uint8, to_model_range

log = logging.getLogger(__name__)

STATE_VERSION = 2

__all__ = ["ClipSpec", "LatentSpec", "SlotState", "VideoPipeline", "merge_states", "redeal", "read_shard",
           "ShardReadSpec", "find_latent_meta"]


@dataclass
class SlotState:
    """Where one data slot is (see the module docstring). Plain data: lists, ints, dicts."""

    epoch: int = 0
    plan: list[list[int]] | None = None  # [[shard, start], ...] this epoch; None = the layout's deal
    unit: int = 0  # index into the plan
    pos: int = 0  # next position in the current unit's shard order
    future: list[list[Any]] = field(default_factory=list)  # [[epoch, plan], ...], consecutive epochs
    queued: list[list[int]] = field(default_factory=list)  # [[epoch, shard, pos], ...] in arrival order
    skipped: dict[str, int] = field(default_factory=dict)
    handled: dict[str, int] = field(default_factory=dict)


@dataclass
class ClipSpec:
    """What a clip must look like: frames, pixels, temporal sampling, randomness, and which clips.

    ``num_frames``/``height``/``width`` are the fixed shape when no buckets are given.
    ``split`` (``all`` | ``train`` | ``val``) with ``held_out_fraction`` keeps only the clips of that
    side of the per-source hash split (:func:`vdit.data.split.sample_in_split`); a clip of the other side
    is passed over silently (not counted as skipped), so training never sees a validation clip.
    """

    num_frames: int
    height: int
    width: int
    target_fps: float | None = None
    frame_stride: int = 1
    random_crop: bool = False
    shuffle: bool = True
    seed: int = 0
    split: str = "all"
    held_out_fraction: float = 0.0


@dataclass(frozen=True)
class LatentSpec:
    """How samples of latent shards are checked and batched (built by :class:`VideoPipeline`).

    Attributes:
        batch_size: samples per latent batch (None: the pipeline is bucketed, latent samples are an error).
        latent_shape: expected ``(C, T', H', W')`` (from ``encode_meta.json``); None accepts any
            shape and batches samples of equal shape together.
        text_shape: expected ``(L, D)`` (from ``encode_meta.json``), or None likewise.
        pixel_shape: the clip geometry ``(T, H, W)`` the latents were encoded from (meta, else the
            :class:`ClipSpec`'s).
        patch_size: ``(pt, ph, pw)``: tokens per sample ``(T'//pt)(H'//ph)(W'//pw)``.
        pixel_tokens: tokens per sample from the pipeline's ``tokens_fn(*pixel_shape)`` (computed
            once: the geometry is fixed), used when ``patch_size`` is None.
        only: every sample is a latent sample (the shards are in a ``vdit-encode`` folder).
    """

    batch_size: int | None
    latent_shape: tuple[int, ...] | None = None
    text_shape: tuple[int, int] | None = None
    pixel_shape: tuple[int, int, int] | None = None
    patch_size: tuple[int, int, int] | None = None
    pixel_tokens: int | None = None
    only: bool = False

    def tokens(self, latent_shape: tuple[int, ...]) -> int:
        """Transformer tokens of one latent: patch grid, else ``pixel_tokens``, else ``T' H' W'``."""
        t, h, w = (int(v) for v in latent_shape[-3:])
        if self.patch_size is not None:
            pt, ph, pw = self.patch_size
            return (t // pt) * (h // ph) * (w // pw)
        if self.pixel_tokens is not None:
            return self.pixel_tokens
        return t * h * w


def find_latent_meta(shards: str | list[str], urls: list[str]) -> tuple[str | None, dict[str, Any] | None]:
    """The ``vdit-encode`` folder of a shard spec and its ``encode_meta.json``, or ``(None, None)``.

    Looks at the spec itself (a folder) and at the folder of every local shard URL. Several latent
    folders must agree on the latent and text shapes.

    Raises:
        ValueError: latent folders encoded with different shapes, or a malformed ``encode_meta.json``.
    """
    dirs = [shards] if isinstance(shards, str) and os.path.isdir(shards) else []
    dirs += [os.path.dirname(u) or "." for u in urls if not u.startswith("pipe:") and "://" not in u]
    found: dict[str, dict[str, Any]] = {}
    for d in dict.fromkeys(os.path.abspath(d) for d in dirs):
        if is_latent_dir(d):
            found[d] = read_encode_meta(d)
    if not found:
        return None, None
    first, meta = next(iter(found.items()))
    fields = ("latent_shape", "max_length", "text_hidden_size")
    for d, m in found.items():
        if any(m.get(f) != meta.get(f) for f in fields):
            raise ValueError(f"latent folders {first} and {d} were encoded with different shapes "
                             f"({ {f: meta.get(f) for f in fields} } vs { {f: m.get(f) for f in fields} }); "
                             "batches need one latent and text shape: train on one of them, or re-encode")
    return first, meta


def _sample_rng(seed: int, epoch: int, shard: int, pos: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, shard, pos, 0x5EED])


def default_plan(num_shards: int, spec: ClipSpec, epoch: int, slot: int, num_slots: int) -> list[list[int]]:
    """The work list of ``slot`` in ``epoch`` under a ``num_slots`` layout: whole shards from position 0."""
    order = epoch_shard_order(num_shards, spec.seed, epoch, spec.shuffle)
    return [[s, 0] for s in slot_shards(order, slot, num_slots)]


def _shard_order(spec: ClipSpec, epoch: int, shard: int, n: int) -> list[int]:
    if not spec.shuffle:
        return list(range(n))
    return np.random.default_rng([spec.seed, epoch, shard]).permutation(n).tolist()


class _Slot:
    """One data slot's iterator: reads items, decodes, buckets, emits batches with the state after each."""

    def __init__(self, urls: list[str], spec: ClipSpec, buckets: Buckets, slot: int, num_slots: int,
                 state: SlotState, read: ShardReadSpec, latent: LatentSpec | None = None):
        self.urls, self.spec, self.buckets = urls, spec, buckets
        self.slot, self.num_slots, self.read = slot, num_slots, read
        self.latent = latent or LatentSpec(batch_size=None)
        self.st = copy.deepcopy(state)
        self.skipped = Counter(self.st.skipped)
        self.handled = Counter(self.st.handled)
        # queue key: a bucket index (video) or ("latent", latent shape, text shape)
        self.queues: dict[Any, list[tuple[list[int], dict[str, Any]]]] = {}
        self.arrival: list[list[int]] = []  # queued item ids in arrival order
        self._cache: tuple[int, int, list[dict[str, Any]]] | None = None  # (epoch, shard, samples)

    # ------------------------------------------------------------------------------------ items
    def _samples(self, shard: int, count_errors: bool) -> list[dict[str, Any]]:
        if self._cache is not None and self._cache[0] == self.st.epoch and self._cache[1] == shard:
            return self._cache[2]
        samples = read_shard(self.urls[shard], self.skipped if count_errors else Counter(), self.read)
        self._cache = (self.st.epoch, shard, samples)
        return samples

    def _raw(self, item: list[int], cache: dict[int, list[dict[str, Any]]]) -> dict[str, Any] | None:
        """The raw sample of a queued item (re-read on resume; errors were counted the first time)."""
        epoch, shard, pos = item
        if shard not in cache:
            cache[shard] = read_shard(self.urls[shard], Counter(), self.read)
        samples = cache[shard]
        order = _shard_order(self.spec, epoch, shard, len(samples))
        return samples[order[pos]] if pos < len(order) else None

    def _prepare(self, item: list[int], raw: dict[str, Any] | None, count: bool) -> tuple[Any, dict] | None:
        """Decode one item into ``(queue key, {"video" | "latent", ..., "caption", "key"})``, or None (counted)."""
        skipped = self.skipped if count else Counter()
        handled = self.handled if count else Counter()
        epoch, shard, pos = item
        url = self.urls[shard]
        if raw is None:
            skipped["missing_on_reread"] += 1
            return None
        if not sample_in_split(raw, self.spec.split, self.spec.held_out_fraction):
            return None  # the other side of the train/val split
        if self.latent.only or is_latent_sample(raw):
            return self._prepare_latent(item, raw, skipped)
        key = raw.get("__key__", "?")
        video = raw.get("mp4")
        if video is None:
            skipped["no_video"] += 1
            log.warning("data: %s: sample %s has no .mp4; skipped", url, key)
            return None
        try:
            caption = raw["txt"].decode("utf-8").strip()
        except (KeyError, UnicodeDecodeError, AttributeError):
            skipped["no_caption"] += 1
            log.warning("data: %s: sample %s has no usable .txt caption; skipped", url, key)
            return None
        rng = _sample_rng(self.spec.seed, epoch, shard, pos)
        fps = self.spec.target_fps
        stride = None if fps else self.spec.frame_stride
        try:
            with VideoDecoder(video, name=f"{url}:{key}") as dec:
                b, reason = self.buckets.assign(dec.info.height, dec.info.width,
                                                lambda t: dec.fits(t, fps, stride), rng)
                if b is None:
                    skipped[reason] += 1
                    log.warning("data: %s: sample %s (%d frames, %dx%d): %s for every bucket; skipped", url, key,
                                dec.num_frames, dec.info.height, dec.info.width, reason)
                    return None
                bucket = self.buckets[b]
                frames, _ = dec.read_clip(bucket.num_frames, fps, stride, rng)
                fixes = [("salvaged", dec.salvaged), ("pyav_fallback", dec.used_pyav and not dec.salvaged),
                         ("rotated", dec.rotation != 0), ("vfr", fps is not None and dec.is_vfr)]
        except DecodeError as exn:
            skipped[exn.reason] += 1
            log.warning("data: %s: sample %s: %s; skipped", url, key, exn)
            return None
        try:
            x = clip_to_uint8(frames, bucket.height, bucket.width, rng if self.spec.random_crop else None)
        except ValueError as exn:
            skipped["bad_frames"] += 1
            log.warning("data: %s: sample %s: %s; skipped", url, key, exn)
            return None
        for name, hit in fixes:
            if hit:
                handled[name] += 1
        return b, {"video": x, "caption": caption, "key": key, "item": list(item)}  # video: uint8 (C, T, H, W)

    def _prepare_latent(self, item: list[int], raw: dict[str, Any], skipped: Counter) -> tuple[tuple, dict] | None:
        """Read one latent-shard item into ``(("latent", latent shape, text shape), sample)``, or None (counted).

        Deterministic (no random choice: the clip was fixed at encoding), so a re-read on resume
        gives the same tensors.
        """
        if self.latent.batch_size is None:
            raise ValueError(f"data: {self.urls[item[1]]}: sample {raw.get('__key__', '?')} is a latent sample "
                             "(latent.pt) but this pipeline is bucketed; latent shards have one fixed geometry: "
                             "build the pipeline with batch_size instead of buckets")
        try:
            s = read_latent_sample(raw, latent_shape=self.latent.latent_shape, text_shape=self.latent.text_shape)
        except LatentSampleError as exn:
            skipped[exn.reason] += 1
            log.warning("data: %s: latent sample %s; skipped", self.urls[item[1]], exn)
            return None
        s["item"] = list(item)  # latent (C, T', H', W') / text (L, D) float32, text_mask (L,) bool
        return ("latent", tuple(s["latent"].shape), tuple(s["text"].shape)), s

    def _push(self, item: list[int], prepared: tuple[Any, dict] | None) -> dict[str, Any] | None:
        """Queue a prepared item; return a batch when its bucket (or latent-shape group) is full."""
        if prepared is None:
            return None
        b, sample = prepared
        q = self.queues.setdefault(b, [])
        q.append((item, sample))
        self.arrival.append(item)
        latent = isinstance(b, tuple)
        if len(q) < (self.latent.batch_size if latent else self.buckets[b].batch_size):
            return None
        del self.queues[b]
        done = {tuple(i) for i, _ in q}
        self.arrival = [i for i in self.arrival if tuple(i) not in done]
        if latent:
            return {
                "latent": torch.stack([s["latent"] for _, s in q]),  # (B, C, T', H', W') float32
                "text": torch.stack([s["text"] for _, s in q]),  # (B, L, D) float32, zero at padding
                "text_mask": torch.stack([s["text_mask"] for _, s in q]),  # (B, L) bool
                "caption": [s["caption"] for _, s in q],
                "key": [s["key"] for _, s in q],
                "item": [s["item"] for _, s in q],
                "bucket": b[1],  # (C, T', H', W')
                "num_tokens": self.latent.tokens(b[1]) * len(q),
            }
        bucket = self.buckets[b]
        return {
            # uint8 (B, C, T, H, W); float in the consumer
            "video": q[0][1]["video"][None] if len(q) == 1 else torch.stack([s["video"] for _, s in q]),
            "caption": [s["caption"] for _, s in q],
            "key": [s["key"] for _, s in q],
            "item": [s["item"] for _, s in q],  # (epoch, shard, position) of each clip
            "bucket": bucket.shape,
            "num_tokens": bucket.tokens * len(q),
        }

    def _snapshot(self, pending: deque) -> dict[str, Any]:
        self.st.queued = [list(i) for i in self.arrival] + [list(i) for i in pending]
        self.st.skipped = dict(self.skipped)
        self.st.handled = dict(self.handled)
        return asdict(self.st)

    # ------------------------------------------------------------------------------------- loop
    def _plan(self) -> list[list[int]]:
        if self.st.plan is not None:
            return self.st.plan
        return default_plan(len(self.urls), self.spec, self.st.epoch, self.slot, self.num_slots)

    def _next_epoch(self) -> None:
        if self.st.future:
            epoch, plan = self.st.future.pop(0)
            self.st.epoch, self.st.plan = int(epoch), [list(u) for u in plan]
        else:
            self.st.epoch, self.st.plan = self.st.epoch + 1, None
        self.st.unit, self.st.pos = 0, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # 1. re-queue what the state held in bucket queues (re-decoded, not re-counted)
        pending = deque(list(i) for i in self.st.queued)
        self.st.queued = []
        reread: dict[int, list[dict[str, Any]]] = {}
        while pending:
            item = pending.popleft()
            batch = self._push(item, self._prepare(item, self._raw(item, reread), count=False))
            if batch is not None:
                batch["slot_state"] = self._snapshot(pending)
                yield batch
        reread.clear()
        # 2. walk the work list, epoch after epoch
        self._accepted, self._fresh = 0, self.st.unit == 0 and self.st.pos == 0 and self.st.plan is None
        while True:
            plan = self._plan()
            if self.st.unit >= len(plan):
                self._roll(plan)
                continue
            shard, start = plan[self.st.unit]
            first_visit = self.st.pos <= start
            self.st.pos = max(self.st.pos, start)
            samples = self._samples(shard, count_errors=first_visit)
            order = _shard_order(self.spec, self.st.epoch, shard, len(samples))
            if self.st.pos >= len(order):
                self.st.unit, self.st.pos = self.st.unit + 1, 0
                continue
            item = [self.st.epoch, shard, self.st.pos]
            raw = samples[order[self.st.pos]]
            self.st.pos += 1
            prepared = self._prepare(item, raw, count=True)
            self._accepted += prepared is not None
            if self.st.pos >= len(order):  # advance now, so a snapshot never points at a finished shard
                self.st.unit, self.st.pos = self.st.unit + 1, 0
                if self.st.unit >= len(plan):
                    self._roll(plan)
            batch = self._push(item, prepared)
            if batch is not None:
                batch["slot_state"] = self._snapshot(deque())
                yield batch

    def _roll(self, plan: list[list[int]]) -> None:
        """End the epoch (its work list is done) and start the next."""
        if self._fresh and self._accepted == 0:  # nothing usable at all: fail loudly instead of spinning
            raise RuntimeError(
                f"data slot {self.slot}: a whole epoch of shards {[self.urls[s] for s, _ in plan]} yielded "
                f"no usable clip (skipped: {dict(self.skipped)})")
        self._next_epoch()
        self._accepted, self._fresh = 0, self.st.plan is None


def iterate_batches(urls: list[str], spec: ClipSpec, buckets: Buckets, slot: int, num_slots: int,
                    state: SlotState, read: ShardReadSpec | None = None,
                    latent: LatentSpec | None = None) -> Iterator[dict[str, Any]]:
    """Batches of one data slot, forever; each carries ``"slot_state"``, the slot's state after it."""
    return iter(_Slot(urls, spec, buckets, slot, num_slots, state, read or ShardReadSpec(), latent))


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
        slot = self.p.dp_rank * self.p.workers + logical
        for batch in iterate_batches(self.p.urls, self.p.spec, self.p.buckets, slot, self.p.num_slots,
                                     SlotState(**self.p.start_states[logical]), self.p.read, self.p.latent):
            batch["logical_worker"] = logical
            yield batch


def _slot_from_dict(d: dict[str, Any]) -> SlotState:
    """A SlotState from a saved dict, including version-1 states (``shard_pos``, ``sample_pos``)."""
    d = dict(d)
    if "shard_pos" in d:
        d["unit"], d["pos"] = d.pop("shard_pos"), d.pop("sample_pos")
    return SlotState(**d)


def redeal(slots: dict[int, dict[str, Any]], old_num_slots: int, new_num_slots: int, num_shards: int,
           spec: ClipSpec) -> list[dict[str, Any]]:
    """Re-deal the unconsumed work of every epoch in flight from ``old_num_slots`` to ``new_num_slots`` slots.

    For each epoch from the earliest any old slot is in to the latest any has touched, the work left
    is: the rest of each old slot's current shard (from its position), its shards not started, and
    whole epochs it has not reached while others have. Those units (``[shard, start]``) are dealt
    round-robin to the new slots in a fixed order; queued items likewise, into the new slots'
    queues. Cumulative counters go to new slot 0. Pure function of its arguments.

    Returns:
        ``new_num_slots`` SlotState dicts.
    """
    states = {int(k): _slot_from_dict(v) for k, v in slots.items()}
    if sorted(states) != list(range(old_num_slots)):
        raise ValueError(f"re-dealing needs the state of all {old_num_slots} old data slots; have "
                         f"{sorted(states)} (merge every rank's state_dict() with merge_states)")
    e_min = min(s.epoch for s in states.values())
    e_max = max(max([s.epoch] + [int(e) for e, _ in s.future]) for s in states.values())
    remaining: dict[int, list[list[int]]] = {e: [] for e in range(e_min, e_max + 1)}
    queued: list[list[int]] = []
    skipped, handled = Counter(), Counter()
    for k in range(old_num_slots):
        s = states[k]
        plan = s.plan if s.plan is not None else default_plan(num_shards, spec, s.epoch, k, old_num_slots)
        if s.unit < len(plan):
            shard, start = plan[s.unit]
            remaining[s.epoch].append([int(shard), max(int(s.pos), int(start))])
            remaining[s.epoch] += [[int(a), int(b)] for a, b in plan[s.unit + 1:]]
        future = {int(e): p for e, p in s.future}
        last = max([s.epoch] + list(future))
        for e in range(s.epoch + 1, e_max + 1):
            if e in future:
                remaining[e] += [[int(a), int(b)] for a, b in future[e]]
            elif e > last:
                remaining[e] += default_plan(num_shards, spec, e, k, old_num_slots)
        queued += [list(map(int, i)) for i in s.queued]
        skipped.update(s.skipped)
        handled.update(s.handled)
    queued.sort()
    out = []
    for j in range(new_num_slots):
        st = SlotState(epoch=e_min, plan=remaining[e_min][j::new_num_slots],
                       future=[[e, remaining[e][j::new_num_slots]] for e in range(e_min + 1, e_max + 1)],
                       queued=queued[j::new_num_slots],
                       skipped=dict(skipped) if j == 0 else {}, handled=dict(handled) if j == 0 else {})
        out.append(asdict(st))
    return out


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One global data position from every rank's :meth:`VideoPipeline.state_dict` (any order).

    Ranks of one sequence-parallel group share a data slot and carry identical entries; duplicates
    are dropped. Load the result on every rank of the new job (any layout).

    Raises:
        ValueError: states of different runs or layouts, or a slot missing.
    """
    if not states:
        raise ValueError("no states to merge")
    first = states[0]
    keys = ("num_slots", "num_shards", "seed", "workers")
    slots: dict[int, dict[str, Any]] = {}
    for s in states:
        if any(s[k] != first[k] for k in keys):
            raise ValueError(f"states disagree on {[k for k in keys if s[k] != first[k]]}")
        for k, v in s["slots"].items():
            slots[int(k)] = v
    if sorted(slots) != list(range(first["num_slots"])):
        raise ValueError(f"merged states cover slots {sorted(slots)} of {first['num_slots']}")
    return {**{k: first[k] for k in ("version", *keys, "dp_size", "shuffle")}, "slots": slots,
            "next_logical": {int(s["dp_rank"]): s["next_logical"] for s in states}, "merged": True}


class VideoPipeline:
    """Batches of decoded clips for one data-parallel rank, with a checkpointable position (Stateful).

    Args:
        shards: shard spec, see :func:`vdit.data.shards.expand_shards`.
        spec: clip sampling (and the fixed shape when there are no buckets).
        batch_size: clips per batch (fixed shape), or a :class:`BucketConfig` (same as ``buckets=``).
        rank, world_size: old names of ``dp_rank``, ``dp_size``.
        num_workers: DataLoader worker processes (0 decodes in the training process).
        dp_rank, dp_size: this rank's data-parallel index and the data-parallel size. Ranks of
            one sequence-parallel group pass the same ``dp_rank`` and get identical batches.
        buckets: a :class:`BucketConfig` (or dict, or :class:`Buckets`): variable ``(T, H, W)``.
        tokens_fn: ``(T, H, W) -> tokens`` for the bucket batch sizes (default: from the config);
            with latent shards (and no ``patch_size``) it gives ``num_tokens`` from the encoded
            pixel geometry.
        read: retries, backoff and time limit of shard reads.
        video_dtype: ``"float32"`` (``video`` in [-1, 1]) or ``"uint8"`` ([0, 255], for normalising
            on the accelerator with :func:`vdit.data.transforms.to_model_range` or ``x / 127.5 - 1``).
        patch_size: ``(pt, ph, pw)`` of the model, for ``num_tokens`` of latent batches
            (``(T'//pt)(H'//ph)(W'//pw)`` per sample). Without it (and without ``tokens_fn``) a
            latent sample counts ``T' H' W'`` tokens. Unused for video shards.
        pin_memory: pin each batch's tensors in page-locked host memory (for a CUDA trainer, whose
            ``non_blocking`` copies are only asynchronous from pinned memory): by the DataLoader's
            pin thread with workers and uint8 frames, in the consuming process otherwise.

    Iterating yields ``{"video": float32 (B, C, T, H, W) in [-1, 1], "caption": list[str], "key":
    list[str], "bucket": (T, H, W), "num_tokens": int, ...}`` forever (epochs roll over). Call
    :meth:`commit` with each batch once the training step that used it has finished;
    :meth:`state_dict` returns the committed position.

    Latent shards (a shard in a ``vdit-encode`` folder, or a sample with ``latent.pt``) yield
    ``{"latent": float32 (B, C, T', H', W'), "text": float32 (B, L, D), "text_mask": bool (B, L),
    "caption", "key", "bucket": (C, T', H', W'), "num_tokens", ...}`` instead; ``latent_dir`` and
    ``latent_meta`` are the folder and its ``encode_meta.json`` (None for video shards).

    Raises:
        FileNotFoundError: no shards match. ValueError: fewer shards than data slots, neither a
            batch size nor buckets, buckets with latent shards, or latent folders that disagree.
    """

    def __init__(self, shards: str | list[str], spec: ClipSpec, batch_size: int | BucketConfig | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, *, dp_rank: int | None = None,
                 dp_size: int | None = None, buckets: BucketConfig | Buckets | dict | None = None,
                 tokens_fn=None, read: ShardReadSpec | None = None, video_dtype: str = "float32",
                 patch_size: tuple[int, int, int] | list[int] | None = None, pin_memory: bool = False):
        self.pin_memory = pin_memory
        if video_dtype not in ("float32", "uint8"):
            raise ValueError(f"video_dtype must be 'float32' or 'uint8'; got {video_dtype!r}")
        self.video_dtype = video_dtype
        self.urls = expand_shards(shards)
        self.spec = spec
        if isinstance(batch_size, (BucketConfig, Buckets, dict)):
            buckets, batch_size = batch_size, None
        if patch_size is not None:
            patch_size = tuple(int(v) for v in patch_size)
            if len(patch_size) != 3 or min(patch_size) < 1:
                raise ValueError(f"patch_size must be 3 positive ints (pt, ph, pw); got {patch_size}")
        self.latent_dir, self.latent_meta = find_latent_meta(shards, self.urls)
        meta = self.latent_meta
        if meta is not None and buckets is not None:
            raise ValueError(
                f"{self.latent_dir} holds latent shards (encode_meta.json): every latent was encoded at one fixed "
                f"geometry ({meta.get('num_frames')} x {meta.get('height')} x {meta.get('width')} -> latent "
                f"{tuple(meta.get('latent_shape') or ())}), so (T, H, W) buckets cannot apply to them. Give "
                "batch_size (data.batch_size) instead of buckets, or train on video shards to use buckets")
        if meta is not None and batch_size is None:
            raise ValueError(f"{self.latent_dir} holds latent shards: give batch_size")
        pixel = (meta["num_frames"], meta["height"], meta["width"]) if meta is not None and \
            all(meta.get(k) is not None for k in ("num_frames", "height", "width")) else \
            (spec.num_frames, spec.height, spec.width)
        text_shape = (int(meta["max_length"]), int(meta["text_hidden_size"])) if meta is not None and \
            meta.get("max_length") is not None and meta.get("text_hidden_size") is not None else None
        self.latent = LatentSpec(
            batch_size=None if batch_size is None else int(batch_size),
            latent_shape=tuple(int(v) for v in meta["latent_shape"]) if meta and meta.get("latent_shape") else None,
            text_shape=text_shape, pixel_shape=tuple(int(v) for v in pixel), patch_size=patch_size,
            pixel_tokens=int(tokens_fn(*pixel)) if tokens_fn is not None and patch_size is None
            and (meta is not None or buckets is None) else None,
            only=meta is not None)
        if buckets is not None:
            self.buckets = buckets if isinstance(buckets, Buckets) else Buckets(buckets, tokens_fn)
        elif batch_size is not None:
            self.buckets = Buckets.fixed(spec.num_frames, spec.height, spec.width, int(batch_size))
        else:
            raise ValueError("give batch_size (fixed clip shape) or buckets")
        self.batch_size = batch_size
        self.dp_rank = rank if dp_rank is None else dp_rank
        self.dp_size = world_size if dp_size is None else dp_size
        self.rank, self.world_size = self.dp_rank, self.dp_size  # old names
        self.read = read or ShardReadSpec()
        self.num_workers = num_workers
        self.workers = max(1, num_workers)
        self.num_slots = self.dp_size * self.workers
        slot_shards(list(range(len(self.urls))), self.dp_rank * self.workers, self.num_slots)  # fail early
        self.start_states: list[dict[str, Any]] = [asdict(SlotState()) for _ in range(self.workers)]
        self.committed: list[dict[str, Any]] = copy.deepcopy(self.start_states)
        self.phase = 0
        self._next_logical = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.start_states = copy.deepcopy(self.committed)
        self.phase = self._next_logical
        ds = _WorkerBatches(self)
        if self.num_workers == 0:
            return self._finish(iter(ds))
        # float32: the consumer converts into a new tensor and pins that; pinning the uint8 would be wasted
        pin_in_loader = self.pin_memory and self.video_dtype == "uint8"
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, prefetch_factor=2,
                            pin_memory=pin_in_loader, persistent_workers=False, multiprocessing_context="fork"
                            if torch.multiprocessing.get_start_method(allow_none=True) in (None, "fork") else None)
        return self._finish(iter(loader))  # uint8: the loader's pin thread pinned what the workers shipped

    def _finish(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """uint8 -> float32 [-1, 1] in the consuming process; with ``pin_memory``, every tensor of the
        batch not pinned yet (no workers, or float frames converted here) is pinned.

        Workers ship uint8 clips (4x less shared memory than float) and the conversion overlaps
        with their decoding instead of adding to it. ``video_dtype="uint8"`` skips it, for a
        trainer that normalises on the accelerator (4x less host-to-device traffic too).
        """
        for batch in batches:
            if self.video_dtype == "float32" and "video" in batch:
                batch["video"] = to_model_range(batch["video"])
            if self.pin_memory:
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) and not v.is_pinned() else v
                         for k, v in batch.items()}
            yield batch

    @property
    def is_latent(self) -> bool:
        """True when the shards are latent shards of a ``vdit-encode`` folder (batches hold ``"latent"``)."""
        return self.latent_meta is not None

    def commit(self, batch: dict[str, Any]) -> None:
        """Record that ``batch`` was consumed by a finished training step."""
        logical = batch.get("logical_worker", 0)
        self.committed[logical] = batch["slot_state"]
        self._next_logical = (logical + 1) % self.workers

    @property
    def skipped(self) -> dict[str, int]:
        """Unusable samples by reason, summed over this rank's slots (committed position, cumulative)."""
        total: Counter = Counter()
        for s in self.committed:
            total.update(s["skipped"])
        return dict(total)

    @property
    def handled(self) -> dict[str, int]:
        """Samples kept after a fix (salvaged, pyav_fallback, rotated, vfr), summed over this rank's slots."""
        total: Counter = Counter()
        for s in self.committed:
            total.update(s.get("handled", {}))
        return dict(total)

    def state_dict(self) -> dict[str, Any]:
        """This rank's committed position: plain, picklable, O(shards per slot + queued items)."""
        first = self.dp_rank * self.workers
        return {"version": STATE_VERSION, "slots": {first + i: copy.deepcopy(s) for i, s in enumerate(self.committed)},
                "next_logical": self._next_logical, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "workers": self.workers, "num_slots": self.num_slots, "num_shards": len(self.urls),
                "seed": self.spec.seed, "shuffle": self.spec.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a committed position: this rank's own state, or :func:`merge_states` of all ranks.

        With the same layout (data-parallel size x workers) the position is taken as saved and the
        following batches equal the uninterrupted run's. With another layout the state must be the
        merged one; the rest of each epoch in flight is re-dealt (:func:`redeal`) and every sample
        is still seen once per epoch.

        Raises:
            ValueError: another shard list or seed, or a layout change from a single rank's state.
        """
        if state.get("version", 1) == 1:  # version 1: a list of this rank's slot states
            state = {**state, "slots": {self.dp_rank * self.workers + i: s for i, s in enumerate(state["slots"])},
                     "workers": state["num_slots"] // max(1, self.dp_size), "dp_rank": self.dp_rank,
                     "shuffle": self.spec.shuffle}
        if state["num_shards"] != len(self.urls) or state["seed"] != self.spec.seed:
            raise ValueError(f"data position was saved over {state['num_shards']} shards with seed {state['seed']}; "
                             f"this run has {len(self.urls)} shards and seed {self.spec.seed}")
        slots = {int(k): v for k, v in state["slots"].items()}
        mine = list(range(self.dp_rank * self.workers, (self.dp_rank + 1) * self.workers))
        if state["num_slots"] == self.num_slots and state.get("workers", self.workers) == self.workers \
                and all(k in slots for k in mine):
            self.committed = [asdict(_slot_from_dict(slots[k])) for k in mine]
            nl = state["next_logical"]
            self._next_logical = int(nl.get(self.dp_rank, 0) if isinstance(nl, dict) else nl)
            return
        if sorted(slots) != list(range(state["num_slots"])):
            raise ValueError(
                f"data position was saved with {state['num_slots']} data slots; this run has {self.num_slots} "
                "data slots (data-parallel size x data.num_workers). Resuming on another layout needs the "
                "merged state of all ranks (vdit.data.pipeline.merge_states)")
        new = redeal(slots, state["num_slots"], self.num_slots, len(self.urls), self.spec)
        self.committed = [new[k] for k in mine]
        self._next_logical = 0
        log.info("data: re-dealt the position of %d data slots to %d", state["num_slots"], self.num_slots)

"""Streaming pipeline: determinism, exact mid-epoch resume (fixed shapes, buckets, workers), epochs,
skipped samples, resume on another data-parallel / worker layout (every sample once per epoch)."""

from __future__ import annotations

import itertools
import pickle
from collections import Counter

import pytest
import torch

from vdit.data.pipeline import ClipSpec, VideoPipeline, merge_states
from vdit.data.shards import epoch_shard_order, expand_shards, slot_shards
from tests.conftest import write_shards
from tests.test_buckets import BUCKETS, write_varied_shards

SPEC = ClipSpec(num_frames=4, height=8, width=8, target_fps=None, frame_stride=2, random_crop=True, seed=3)


def take(pipe, n):
    return list(itertools.islice(iter(pipe), n))


def keys(batches):
    return [k for b in batches for k in b["key"]]


def test_batches_shape_range_and_determinism(small_shards):
    a = take(VideoPipeline(small_shards, SPEC, batch_size=3), 4)
    b = take(VideoPipeline(small_shards, SPEC, batch_size=3), 4)
    assert a[0]["video"].shape == (3, 3, 4, 8, 8)  # (B, C, T, H, W)
    assert a[0]["video"].dtype == torch.float32
    assert -1.0 <= a[0]["video"].min() and a[0]["video"].max() <= 1.0
    assert keys(a) == keys(b)
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(a, b))
    assert all(c == f"clip {int(k.split('_')[1])}" for x in a for c, k in zip(x["caption"], x["key"]))


def test_epoch_covers_every_sample_once_and_reshuffles(small_shards):
    pipe = VideoPipeline(small_shards, SPEC, batch_size=4)
    epoch0, epoch1 = keys(take(pipe, 6)[:6]), None
    assert sorted(epoch0) == [f"clip_{i:05d}" for i in range(24)]
    both = keys(take(VideoPipeline(small_shards, SPEC, batch_size=4), 12))
    epoch1 = both[24:]
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0


@pytest.mark.parametrize("stop", [1, 2, 5, 7])
def test_resume_mid_epoch_equals_uninterrupted(small_shards, stop):
    """mosaicml/streaming-style guarantee: stop after `stop` committed batches, rebuild, continue."""
    full = take(VideoPipeline(small_shards, SPEC, batch_size=5), 10)
    pipe = VideoPipeline(small_shards, SPEC, batch_size=5)
    it = iter(pipe)
    for _ in range(stop):
        pipe.commit(next(it))
    next(it)  # prefetched but never committed: must be replayed after resume
    state = pipe.state_dict()
    resumed = VideoPipeline(small_shards, SPEC, batch_size=5)
    resumed.load_state_dict(state)
    rest = take(resumed, 10 - stop)
    assert keys(rest) == keys(full[stop:])
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(rest, full[stop:]))


def test_resume_with_dataloader_workers_equals_uninterrupted(small_shards):
    full = take(VideoPipeline(small_shards, SPEC, batch_size=2, num_workers=2), 9)
    pipe = VideoPipeline(small_shards, SPEC, batch_size=2, num_workers=2)
    it = iter(pipe)
    for _ in range(5):  # odd: the next batch comes from worker 1, so the round-robin phase matters
        pipe.commit(next(it))
    del it
    resumed = VideoPipeline(small_shards, SPEC, batch_size=2, num_workers=2)
    resumed.load_state_dict(pipe.state_dict())
    assert keys(take(resumed, 4)) == keys(full[5:])


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    d = str(tmp_path / "bad")
    write_shards(d, 2, 4, bad={1: b"not a video at all", 6: b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64})
    pipe = VideoPipeline(d, ClipSpec(4, 8, 8, None, 1, seed=0), batch_size=3)
    it = iter(pipe)
    got = []
    for _ in range(2):
        b = next(it)
        pipe.commit(b)
        got += b["key"]
    assert "clip_00001" not in got and "clip_00006" not in got
    assert sorted(got) == sorted(f"clip_{i:05d}" for i in range(8) if i not in (1, 6))
    assert sum(pipe.skipped.values()) == 2


def test_truncated_and_missing_shards_do_not_crash(tmp_path):
    d = tmp_path / "trunc"
    urls = write_shards(str(d), 2, 4)
    data = open(urls[1], "rb").read()
    open(urls[1], "wb").write(data[: len(data) // 2])
    pipe = VideoPipeline(str(d), ClipSpec(4, 8, 8, None, 1, shuffle=False), batch_size=1)
    it = iter(pipe)
    seen = []
    for _ in range(5):
        b = next(it)
        pipe.commit(b)
        seen += b["key"]
    assert set(seen[:4]) == {f"clip_{i:05d}" for i in range(4)}
    assert pipe.skipped.get("shard_truncated", 0) >= 1


def test_too_few_shards_and_missing_spec_fail_at_start(small_shards, tmp_path):
    with pytest.raises(ValueError, match="data slots"):
        VideoPipeline(small_shards, SPEC, batch_size=1, world_size=8)
    with pytest.raises(FileNotFoundError, match="no shards"):
        VideoPipeline(str(tmp_path / "nothing"), SPEC, batch_size=1)


def test_layout_change_needs_the_merged_state(small_shards):
    """One rank's state covers only its slots: a new layout must load merge_states(all ranks)."""
    pipe = VideoPipeline(small_shards, SPEC, batch_size=1, dp_rank=0, dp_size=2)
    other = VideoPipeline(small_shards, SPEC, batch_size=1, num_workers=2)
    with pytest.raises(ValueError, match="merged state"):
        other.load_state_dict(pipe.state_dict())
    with pytest.raises(ValueError, match="cover slots"):
        merge_states([pipe.state_dict()])
    with pytest.raises(ValueError, match="shards"):
        VideoPipeline(small_shards, ClipSpec(4, 8, 8, seed=99), batch_size=1).load_state_dict(pipe.state_dict())


def test_version1_state_still_loads(small_shards):
    full = take(VideoPipeline(small_shards, SPEC, batch_size=2), 4)
    old = {"slots": [{"epoch": 0, "shard_pos": 0, "sample_pos": 4, "skipped": {}}], "next_logical": 0,
           "num_slots": 1, "num_shards": 4, "seed": SPEC.seed}
    pipe = VideoPipeline(small_shards, SPEC, batch_size=2)
    pipe.load_state_dict(old)
    assert keys(take(pipe, 1)) == keys(full[2:3])


# ---- buckets, workers and layouts ---------------------------------------------------------------

BSPEC = ClipSpec(num_frames=4, height=16, width=16, target_fps=None, frame_stride=2, random_crop=True, seed=11)


@pytest.fixture(scope="module")
def layout_shards(tmp_path_factory):
    """6 shards x 4 clips of mixed aspect ratio and length."""
    d = tmp_path_factory.mktemp("layout")
    write_varied_shards(str(d), 6, 4)
    return str(d)


@pytest.mark.parametrize("workers, stop", [(0, 3), (0, 8), (2, 5)])
def test_bucketed_resume_equals_uninterrupted(layout_shards, workers, stop):
    """Stop with clips waiting in bucket queues, rebuild, continue: the same batches, bit for bit."""
    n = stop + 6
    full = take(VideoPipeline(layout_shards, BSPEC, buckets=BUCKETS, num_workers=workers), n)
    pipe = VideoPipeline(layout_shards, BSPEC, buckets=BUCKETS, num_workers=workers)
    it = iter(pipe)
    for _ in range(stop):
        pipe.commit(next(it))
    next(it)  # prefetched, never committed
    del it
    state = pickle.loads(pickle.dumps(pipe.state_dict()))
    resumed = VideoPipeline(layout_shards, BSPEC, buckets=BUCKETS, num_workers=workers)
    resumed.load_state_dict(state)
    rest = take(resumed, n - stop)
    assert [b["bucket"] for b in rest] == [b["bucket"] for b in full[stop:]]
    assert keys(rest) == keys(full[stop:])
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(rest, full[stop:]))


def run_ranks(shards, dp_size, workers, steps, state=None):
    """Simulate ``dp_size`` data-parallel ranks stepping in lockstep; returns (pipes, committed batches)."""
    pipes = [VideoPipeline(shards, BSPEC, buckets=BUCKETS, dp_rank=r, dp_size=dp_size, num_workers=workers)
             for r in range(dp_size)]
    if state is not None:
        for p in pipes:
            p.load_state_dict(state)
    its = [iter(p) for p in pipes]
    seen = []
    for _ in range(steps):
        for p, it in zip(pipes, its):
            b = next(it)
            p.commit(b)
            seen.append(b)
    for it in its:
        next(it)  # prefetched, never committed
    return pipes, seen


@pytest.mark.parametrize("old, new, stop", [((2, 0), (3, 0), 2), ((1, 2), (4, 0), 3), ((3, 0), (1, 2), 1)])
def test_resume_on_another_layout_sees_every_sample_once(layout_shards, old, new, stop):
    """Stop mid-epoch on one (ranks, workers) layout, resume on another: no sample missing, none twice."""
    pipes, before = run_ranks(layout_shards, old[0], old[1], stop)
    state = merge_states([pickle.loads(pickle.dumps(p.state_dict())) for p in pipes])
    assert len(pickle.dumps(state)) < 4000  # O(shards + queued items), no per-sample history
    seen = Counter((e, k) for b in before for (e, _, _), k in zip(b["item"], b["key"]))
    all_keys = {f"clip_{i:05d}" for i in range(24)}
    _, after = run_ranks(layout_shards, new[0], new[1], 0, state)
    its = [iter(p) for p in _]
    for _step in range(40):
        for it in its:
            b = next(it)
            seen.update((e, k) for (e, _, _), k in zip(b["item"], b["key"]))
        if {k for (e, k) in seen if e == 0} == all_keys:
            break
    assert max(seen.values()) == 1, [x for x, c in seen.items() if c > 1]
    assert {k for (e, k) in seen if e == 0} == all_keys


def test_state_is_small_and_plain(layout_shards):
    pipes, _ = run_ranks(layout_shards, 2, 0, 3)
    st = pipes[0].state_dict()
    slot = next(iter(st["slots"].values()))
    assert set(slot) == {"epoch", "plan", "unit", "pos", "future", "queued", "skipped", "handled"}
    assert len(slot["queued"]) < sum(b.batch_size for b in __import__("vdit.data.buckets", fromlist=["Buckets"])
                                     .Buckets(BUCKETS))
    pickle.loads(pickle.dumps(st))


def test_shard_assignment_is_a_partition():
    order = epoch_shard_order(10, seed=1, epoch=2)
    assert sorted(order) == list(range(10)) and order != epoch_shard_order(10, seed=1, epoch=3)
    parts = [slot_shards(order, s, 3) for s in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(10))


def test_expand_shards_spec_forms(small_shards):
    by_dir = expand_shards(small_shards)
    assert len(by_dir) == 4
    assert expand_shards(small_shards + "/clips-{000000..000003}.tar") == by_dir
    assert expand_shards(small_shards + "/*.tar") == by_dir

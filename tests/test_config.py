"""Config: every group composes, typos fail at start-up naming the key, values are validated."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from vdit.train.config import TrainConfig, load_config, validate

CONF = os.path.join(os.path.dirname(__file__), "..", "conf")


def group_options(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


@pytest.mark.parametrize("group", ["model", "data", "optim", "train", "eval"])
def test_every_group_option_composes(group):
    options = group_options(group)
    assert options, f"conf/{group}/ is empty"
    for opt in options:
        cfg = load_config([f"{group}={opt}"])
        assert isinstance(validate(cfg), TrainConfig)


@pytest.mark.parametrize("exp", group_options("experiment"))
def test_every_experiment_composes(exp):
    cfg = load_config([f"+experiment={exp}"])
    validate(cfg)


def test_text_dim_follows_text_encoder():
    cfg = load_config(["text_encoder.name=random", "text_encoder.hidden_size=32"])
    assert cfg.model.text_dim == 32


@pytest.mark.parametrize("override,key", [("optim.lrr=1e-4", "lrr"), ("model.hiden_size=8", "hiden_size"),
                                          ("data.num_frame=8", "num_frame")])
def test_typo_fails_naming_the_key(override, key):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        load_config([override])
    assert key in str(info.value) + str(info.value.__cause__)


def test_typo_in_a_group_file_fails(tmp_path):
    bad = tmp_path / "conf" / "optim"
    bad.mkdir(parents=True)
    (bad / "typo.yaml").write_text("lr: 1.0e-3\nwarmup_stpes: 10\n")
    with pytest.raises(Exception) as info:
        load_config([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "optim=typo"])
    assert "warmup_stpes" in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize("override,match", [
    ("optim.schedule=linear", "optim.schedule"),
    ("data.height=30", "data.height"),
    ("model.num_heads=3", "num_heads"),
    ("train.precision=fp8", "train.precision"),
    ("eval.physics_radius_frac=[0.2,0.1]", "eval.physics_radius_frac"),
    ("eval.physics_scene_spread=1.5", "eval.physics_scene_spread"),
    ("model.sigma_data=0", "sigma_data"),
    ("eval.cfg_interval=[0.5]", "eval.cfg_interval"),
])
def test_invalid_values_fail_with_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config([override])


def test_cli_typo_stops_before_any_work(tmp_path):
    """`vdit-train optim.lrr=1e-4` exits non-zero naming the key, and creates no run directory."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "vdit.train.main", "optim.lrr=1e-4", f"run_dir={run_dir}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "lrr" in proc.stderr + proc.stdout
    assert not (run_dir / "checkpoints").exists()

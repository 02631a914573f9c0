"""bench/step.py (vdit vs diffusers' Wan training step) on a tiny shape: it runs, both models compute the same
function, every profile category gets time and the last printed line is the JSON summary. Run:

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_step_bench.py -q
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from bench.step import CATEGORIES, main  # noqa: E402

TINY = ["--hidden", "48", "--heads", "2", "--ffn", "96", "--depth", "1", "--frames", "2", "--height", "4",
        "--width", "6", "--text-len", "5", "--text-dim", "16", "--reps", "2", "--warmup", "1", "--gemm-n", "64",
        "--threads", "1"]


def test_step_bench_smoke(capsys):
    result = main(TINY)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(result))
    for key in ("ratio_vs_diffusers_wan", "ours_s", "ref_s", "ours_gemm_frac", "ref_gemm_frac"):
        assert result[key] > 0, key
    assert result["forward_max_diff"] == 0.0  # same weights, same function, same rounding
    assert result["tokens"] == 2 * 2 * 3
    for name in ("profile_ours_s", "profile_ref_s"):
        assert set(CATEGORIES) <= set(result[name])
    for cat in ("attention", "projections", "norms+modulation", "rope", "mlp", "optimizer", "other"):
        assert result["profile_ours_s"][cat] > 0, cat  # forward hooks and backward attribution reach every one


def test_step_bench_reports_loader_headroom(capsys):
    result = main(TINY + ["--no-profile", "--loader", "3"])
    out = capsys.readouterr().out
    assert "loader (batch 1, 5 x 32 x 48 pixels)" in out  # latent 2 x 4 x 6 through the Wan VAE's 4x / 8x
    for w in (1, 2):
        assert result[f"loader_batches_per_s_{w}w"] > 0
    assert result["steps_per_s"] == pytest.approx(1 / result["ours_s"], rel=1e-3)

"""vdit-scaling fit: the fits recover known laws, run directories are read and excluded as documented,
and the CLI writes strict JSON (and a figure) even when a fit has too few points."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from vdit.launch.scaling import (
    collect_runs,
    fit_compute_optimal,
    fit_loss_vs_compute,
    fit_params_tokens,
    fit_sweep,
    isoflop_optima,
    main,
)

# Hoffmann et al. 2022's fitted law (approach 3), used as ground truth.
E, A, ALPHA, B, BETA = 1.7, 400.0, 0.34, 410.0, 0.28
A_N, A_D = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)
BUDGETS = (1e16, 1e17, 1e18, 1e19)


def chinchilla(n, d):
    return E + A * n ** -ALPHA + B * d ** -BETA


def isoflop_grid(budgets=BUDGETS, per_budget=5, noise=0.0, seed=0):
    """Runs on iso-FLOP lines C = 6 N D, 5 sizes a factor 3 apart centred on the true optimum (N ~ 1e6..2e9)."""
    rng = np.random.default_rng(seed)
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    runs = []
    for c in budgets:
        n_opt = g * (c / 6) ** A_N
        for k in range(per_budget):
            n = n_opt * 3.0 ** (k - per_budget // 2)
            d = c / (6 * n)
            loss = chinchilla(n, d) * math.exp(noise * rng.standard_normal())
            runs.append({"run_dir": f"C{c:.0e}/N{n:.3g}", "N": n, "D": d, "C": c, "loss_val": loss, "step": 100,
                         "budget": c})
    return runs


def test_params_tokens_fit_recovers_chinchilla_law():
    runs = isoflop_grid()
    fit = fit_params_tokens([r["N"] for r in runs], [r["D"] for r in runs], [r["loss_val"] for r in runs])
    assert fit["alpha"] == pytest.approx(ALPHA, rel=0.05)
    assert fit["beta"] == pytest.approx(BETA, rel=0.05)
    assert fit["E"] == pytest.approx(E, rel=0.05)
    assert fit["a_N"] == pytest.approx(A_N, abs=0.02) and fit["a_D"] == pytest.approx(A_D, abs=0.02)
    assert fit["n_points"] == 20 and "reason" not in fit


def test_loss_vs_compute_fit_recovers_power_law():
    a, b, e = 200.0, 0.15, 1.0
    c = np.geomspace(1e10, 1e20, 8)
    fit = fit_loss_vs_compute(c, a * c ** -b + e)
    assert fit["a"] == pytest.approx(a, rel=0.05)
    assert fit["b"] == pytest.approx(b, rel=0.05)
    assert fit["e"] == pytest.approx(e, rel=0.05)
    assert fit["n_points"] == 8


def test_isoflop_vertex_of_an_exact_parabola():
    c, n_true = 1e15, 3e6
    runs = [{"N": n, "D": c / (6 * n), "C": c, "budget": c, "loss_val": 2.0 + 0.3 * math.log(n / n_true) ** 2}
            for n in np.geomspace(3e5, 1e8, 5)]
    (row,) = isoflop_optima(runs)
    assert row["status"] == "ok"
    assert row["N_opt"] == pytest.approx(n_true, rel=1e-6)
    assert row["D_opt"] == pytest.approx(c / (6 * n_true), rel=1e-6)  # ln D is linear in ln N here
    assert row["loss_opt"] == pytest.approx(2.0, rel=1e-9)


def test_isoflop_exponents_and_edge_cases():
    per_budget = isoflop_optima(isoflop_grid())
    assert [r["status"] for r in per_budget] == ["ok"] * 4
    co = fit_compute_optimal(per_budget)
    # the parabola's vertex is off the true optimum by the same factor at every budget: the slope is exact
    assert co["a_N"] == pytest.approx(A_N, abs=0.01) and co["a_D"] == pytest.approx(A_D, abs=0.01)
    edge = [{"N": n, "D": 1e9 / n, "C": 1e15, "budget": 1e15,
             "loss_val": 3.0 - 0.1 * math.log(n) + 1e-3 * math.log(n) ** 2}  # convex, vertex at N = e^50
            for n in (1e6, 1e7, 1e8)]
    assert isoflop_optima(edge)[0]["status"] == "at edge" and isoflop_optima(edge)[0]["N_opt"] is None
    few = edge[:2]
    assert isoflop_optima(few)[0]["status"] == "too few sizes"
    single = fit_compute_optimal(isoflop_optima(isoflop_grid(budgets=(1e17,))))
    assert single["a_N"] is None and "need >= 2" in single["reason"]


def test_too_few_points_give_null_and_reason():
    f = fit_loss_vs_compute([1e12, 2e12], [1.0, 0.9])
    assert f["b"] is None and f["reason"]
    f = fit_params_tokens([1e6, 2e6, 3e6], [1e9, 1e9, 2e9], [2.0, 1.9, 1.8])
    assert f["alpha"] is None and f["reason"]
    for runs in ([], isoflop_grid()[:2]):
        out = fit_sweep(runs, n_bootstrap=5)
        assert out["loss_vs_compute"]["b"] is None and out["loss_vs_compute"]["reason"]
        assert out["loss_vs_params_tokens"]["alpha"] is None and out["compute_optimal"]["a_N"] is None
        assert out["loss_vs_compute"]["ci"]["b"] is None


def test_fit_sweep_bootstrap_intervals():
    runs = isoflop_grid(noise=0.002, seed=1)
    out = fit_sweep(runs, n_bootstrap=20, seed=0)
    assert out["loss_vs_compute"]["points"].startswith("frontier") and out["loss_vs_compute"]["n_points"] == 4
    pt, co = out["loss_vs_params_tokens"], out["compute_optimal"]
    for key, value, ci in (("alpha", pt["alpha"], pt["ci"]["alpha"]), ("beta", pt["beta"], pt["ci"]["beta"]),
                           ("b", out["loss_vs_compute"]["b"], out["loss_vs_compute"]["ci"]["b"])):
        assert ci is not None and ci[0] <= ci[1], key
        assert ci[0] - 0.05 <= value <= ci[1] + 0.05, key
    assert co["from_params_tokens"]["a_N"] == pytest.approx(A_N, abs=0.05)
    n_ok = 20 - co["bootstrap_failed"]
    assert (co["ci"]["a_N"] is None) == (n_ok < 2)
    assert fit_sweep(runs, n_bootstrap=20, seed=0) == out  # seeded


# ------------------------------------------------------------------------------------- run folders

MODEL = {"in_channels": 3, "patch_size": [2, 4, 4], "hidden_size": 64, "depth": 1, "num_heads": 1, "text_dim": 32}


def write_run(path, steps=100, last_step=100, budget=1e12, num_params=1000.0, val=(0.5, 0.4), per_step=1e9,
              tokens_per_step=256.0, model=None):
    """A fake run directory: config.yaml (OmegaConf) and metrics.jsonl rows every 10 steps, loss/val
    at the last two log steps (values ``val``, None = non-finite)."""
    path.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"model": model or MODEL, "train": {"steps": steps, "flops_budget": budget}}),
                   path / "config.yaml")
    rows = []
    for s in range(10, last_step + 1, 10):
        row = {"step": s, "time": 0.0, "loss/train": 1.0 / s, "perf/total_flops": s * per_step,
               "perf/total_tokens": s * tokens_per_step, "perf/total_samples": s * 4.0}
        if s == 10 and num_params is not None:
            row["model/num_params"] = num_params
        rows.append(row)
    if val is not None:
        for row, v in zip(rows[-len(val):], val):
            row["loss/val"] = v
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_collect_runs_reads_and_excludes(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "good")
    write_run(sweep / "nested" / "good2", budget=0.0, num_params=None, val=(0.6, 0.55), per_step=1.234e9)
    write_run(sweep / "incomplete", last_step=50)
    write_run(sweep / "diverged", val=(0.3, 0.7))
    write_run(sweep / "nan", val=(0.3, None))
    write_run(sweep / "noval", val=None)
    (sweep / "good" / ".hydra").mkdir()
    (sweep / "good" / ".hydra" / "config.yaml").write_text("a: 1\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    runs, excluded = collect_runs(str(sweep))
    by_name = {r["run_dir"].split("/")[-1]: r for r in runs}
    assert set(by_name) == {"good", "good2"}
    good = by_name["good"]
    assert (good["N"], good["D"], good["C"], good["loss_val"], good["step"], good["budget"]) == \
        (1000.0, 100 * 256.0, 100 * 1e9, 0.4, 100, 1e12)
    from vdit.model.dit import DiTConfig

    good2 = by_name["good2"]
    assert good2["N"] == DiTConfig(**MODEL).num_params()  # not logged: computed from config.yaml
    assert good2["budget"] == 1.2e11  # no train.flops_budget: C to 2 significant figures
    reasons = {e["run_dir"].split("/")[-1]: e["reason"] for e in excluded}
    assert reasons == {"incomplete": "incomplete", "diverged": "diverged", "nan": "diverged",
                       "noval": "no loss/val"}
    assert all(e["detail"] for e in excluded)


def _strict(text):
    def bad(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=bad)


def test_cli_writes_strict_json_and_plot(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for r in isoflop_grid():
        steps = 100
        write_run(sweep / r["run_dir"].replace("/", "_"), steps=steps, last_step=steps, budget=r["C"],
                  num_params=r["N"], val=(r["loss_val"] * 1.01, r["loss_val"]), per_step=r["C"] / steps,
                  tokens_per_step=r["D"] / steps)
    write_run(sweep / "broken", last_step=30)
    out, png = tmp_path / "out" / "fit.json", tmp_path / "fit.png"
    assert main(["fit", str(sweep), "--out", str(out), "--plot", str(png), "--n-bootstrap", "10"]) == 0
    fit = _strict(out.read_text())
    assert len(fit["runs"]) == 20 and fit["n_bootstrap"] == 10
    assert fit["excluded"] == [{"run_dir": str(sweep / "broken"), "reason": "incomplete",
                                "detail": "last step 30 < train.steps 100"}]
    assert fit["loss_vs_params_tokens"]["alpha"] == pytest.approx(ALPHA, rel=0.05)
    assert fit["compute_optimal"]["a_N"] == pytest.approx(A_N, abs=0.01)
    assert len(fit["compute_optimal"]["per_budget"]) == 4
    assert {"a", "b", "e", "ci", "n_points"} <= set(fit["loss_vs_compute"])
    assert png.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "alpha" in printed and "a_N" in printed and "excluded" in printed


def test_cli_on_a_sweep_too_small_to_fit(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "only")
    assert main(["fit", str(sweep), "--plot", str(tmp_path / "fit.png"), "--n-bootstrap", "5"]) == 0
    fit = _strict((sweep / "fit.json").read_text())
    assert len(fit["runs"]) == 1
    assert fit["loss_vs_compute"]["b"] is None and fit["loss_vs_compute"]["reason"]
    assert fit["loss_vs_params_tokens"]["alpha"] is None and fit["compute_optimal"]["a_N"] is None
    assert fit["compute_optimal"]["per_budget"][0]["status"] == "too few sizes"
    assert (tmp_path / "fit.png").exists()

"""Scaling-law fits of a sweep of vdit runs: ``vdit-scaling fit SWEEP_DIR [--out fit.json] [--plot fit.png]``.

A sweep directory holds run directories written by the trainer (found recursively: any folder with
both ``config.yaml`` and ``metrics.jsonl``). Per run the fit reads

* ``N``: parameters of the DiT (``model/num_params``, logged once; else ``DiTConfig.num_params()``),
* ``D``: training tokens seen (``perf/total_tokens`` at its last row; patch tokens, all ranks),
* ``C``: training compute in model FLOPs (``perf/total_flops`` at its last row; 3x the forward
  matmul FLOPs, see :mod:`vdit.train.flops`),
* ``loss_val``: the last non-null ``loss/val``, the fitted quantity,
* ``budget``: the iso-FLOP group, ``train.flops_budget`` (fallback: ``C`` to 2 significant figures).

Runs are excluded, and listed with the reason, when ``incomplete`` (last logged step <
``train.steps``), with ``no loss/val``, or ``diverged`` (last ``loss/val`` null/non-finite, or more
than twice the run's minimum ``loss/val``).

Fits (all in log loss, :func:`fit_sweep`):

1. ``L(C) = a C^-b + e`` on the compute frontier (the lowest loss per budget; all runs when there
   are fewer than 3 budgets) -- Kaplan et al. 2020 (arXiv 2001.08361), and for diffusion
   transformers Liang et al. 2024 (arXiv 2411.17470).
2. ``L(N, D) = E + A N^-alpha + B D^-beta`` -- Hoffmann et al. 2022 (Chinchilla, arXiv 2203.15556)
   approach 3: Huber loss (delta 1e-3) on ``log L`` over a grid of initial guesses.
3. Compute-optimal exponents ``N_opt ~ C^a_N``, ``D_opt ~ C^a_D``: (a) Chinchilla approach 2, the
   vertex of a parabola of loss vs ``ln N`` per budget, then a log-log line over budgets; (b) from
   fit 2, ``a_N = beta / (alpha + beta)``, ``a_D = alpha / (alpha + beta)``.
4. Bootstrap 95 % intervals (runs resampled with replacement) for b, alpha, beta, a_N, a_D.

A fit with too few points is ``null`` with a ``reason``; nothing raises on a small sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

import numpy as np
from scipy.optimize import least_squares, nnls
from scipy.special import expit, logsumexp, softmax

EXP_MAX = 3.0            # upper bound of the fitted exponents b, alpha, beta (lower bound 0)
LOG_FLOOR = -30.0        # lower bound of log(e), log(E): an irreducible loss of ~1e-13 is "zero"
HUBER_DELTA = 1e-3       # Hoffmann et al. 2022, approach 3
DIVERGE_FACTOR = 2.0     # last loss/val > 2 x the run's minimum -> "diverged"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a line cut short (a crashed or still-running writer) is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and _finite(row.get("step")):
                rows.append(row)
    return rows


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    return next((float(r[key]) for r in reversed(rows) if _finite(r.get(key))), None)


def find_run_dirs(sweep_dir: str) -> list[str]:
    """Folders under ``sweep_dir`` (itself included) holding both ``config.yaml`` and ``metrics.jsonl``;
    hidden folders (``.hydra``) are not searched and a run directory is not searched further."""
    found = []
    for root, dirs, files in os.walk(sweep_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "config.yaml" in files and "metrics.jsonl" in files:
            found.append(root)
            dirs[:] = []
    return sorted(found)


def _num_params_from_config(model_cfg: dict[str, Any]) -> float | None:
    try:
        from vdit.model.dit import DiTConfig

        return float(DiTConfig(**model_cfg).num_params())
    except Exception:  # noqa: BLE001 - an old or partial config: the run is excluded instead
        return None


def read_run(run_dir: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """One run directory -> ``(run, None)`` or ``(None, {"run_dir", "reason", "detail"})``.

    ``run`` holds ``run_dir``, ``N`` (parameters), ``D`` (tokens), ``C`` (FLOPs), ``loss_val``,
    ``step`` (last logged step) and ``budget`` (FLOPs, the iso-FLOP group)."""
    from omegaconf import OmegaConf

    def excluded(reason: str, detail: str) -> tuple[None, dict[str, Any]]:
        return None, {"run_dir": run_dir, "reason": reason, "detail": detail}

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(run_dir, "config.yaml")), resolve=False)
    except Exception as err:  # noqa: BLE001 - a broken file excludes the run, it does not stop the fit
        return excluded("unreadable config.yaml", str(err))
    train, model = cfg.get("train") or {}, cfg.get("model") or {}
    rows = _read_rows(os.path.join(run_dir, "metrics.jsonl"))
    if not rows:
        return excluded("incomplete", "metrics.jsonl has no rows")
    step = int(max(r["step"] for r in rows))
    target = train.get("steps")
    if _finite(target) and step < target:
        return excluded("incomplete", f"last step {step} < train.steps {int(target)}")
    vals = [r["loss/val"] for r in rows if "loss/val" in r]
    if not vals:
        return excluded("no loss/val", "no row has loss/val (is eval.val_every set?)")
    finite = [float(v) for v in vals if _finite(v)]
    if not _finite(vals[-1]):
        return excluded("diverged", "the last loss/val is null (non-finite)")
    if vals[-1] > DIVERGE_FACTOR * min(finite):
        return excluded("diverged", f"last loss/val {vals[-1]:.4g} > {DIVERGE_FACTOR:g} x the run's minimum "
                                    f"{min(finite):.4g}")
    n = _last(rows, "model/num_params") or _num_params_from_config(model)
    d, c = _last(rows, "perf/total_tokens"), _last(rows, "perf/total_flops")
    for key, v in (("model/num_params", n), ("perf/total_tokens", d), ("perf/total_flops", c)):
        if v is None or v <= 0:
            return excluded(f"no {key}", f"{key} is not logged")
    budget = train.get("flops_budget")
    budget = float(budget) if _finite(budget) and budget > 0 else float(f"{c:.2g}")
    return {"run_dir": run_dir, "N": n, "D": d, "C": c, "loss_val": float(vals[-1]), "step": step,
            "budget": budget}, None


def collect_runs(sweep_dir: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All run directories under ``sweep_dir`` -> ``(runs, excluded)`` (see :func:`read_run`)."""
    runs, excluded = [], []
    for run_dir in find_run_dirs(sweep_dir):
        run, why = read_run(run_dir)
        if run is not None:
            runs.append(run)
        else:
            excluded.append(why)
    return runs, excluded


# ---------------------------------------------------------------------------------------------- fits

def _solve(resid, jac, inits: list[np.ndarray], lb: np.ndarray, ub: np.ndarray, **kw) -> tuple[np.ndarray, float]:
    """Best of bounded ``least_squares`` from each initial guess -> ``(params, cost)``; ValueError if none converged."""
    best, best_cost = None, math.inf
    for x0 in inits:
        x0 = np.clip(np.asarray(x0, float), lb + 1e-9, ub - 1e-9)
        try:
            res = least_squares(resid, x0, jac=jac, bounds=(lb, ub), **kw)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            continue
        if np.all(np.isfinite(res.x)) and math.isfinite(res.cost) and res.cost < best_cost:
            best, best_cost = res.x, float(res.cost)
    if best is None:
        raise ValueError("no initial guess converged")
    return best, best_cost


def _log(v: float) -> float:
    """ln of a fitted coefficient used as a start, kept finite (0 -> ln 1e-13, inf -> ln 1e300)."""
    return math.log(min(max(v, 1e-13), 1e300)) if v == v else 0.0


def _points(*cols: Sequence[float]) -> list[np.ndarray]:
    a = np.asarray(cols, float).reshape(len(cols), -1)
    keep = np.all(np.isfinite(a) & (a > 0), axis=0)
    return list(a[:, keep])


def fit_loss_vs_compute(C: Sequence[float], L: Sequence[float], init: list[dict] | None = None) -> dict[str, Any]:
    """Fit ``L(C) = a * C^-b + e`` (C in FLOPs, L the validation loss) by least squares on ``log L``.

    Kaplan et al. 2020 (arXiv 2001.08361) eq. 1.4 with an irreducible term, as Liang et al. 2024
    (arXiv 2411.17470) fit diffusion transformers. Bounds: ``0 <= b <= 3``, ``e >= 0``. Initial guesses:
    a grid over ``b`` and ``e`` (only ``e = min(L) / 2`` when ``init``, dicts with ``a``, ``b``, ``e``,
    is given: the bootstrap's start). Returns
    ``{"a", "b", "e", "n_points"}`` or the same with nulls and a ``reason`` (fewer than 3 compute values).
    """
    C, L = _points(C, L)
    if len(np.unique(C)) < 3:
        return {"a": None, "b": None, "e": None, "n_points": len(C),
                "reason": f"{len(np.unique(C))} distinct compute values (need >= 3 for 3 parameters)"}
    lc0 = float(np.mean(np.log(C)))
    x, y = np.log(C) - lc0, np.log(L)

    def resid(p):  # p = [log a' , b, log e] with a' the power term at C = exp(lc0)
        return np.logaddexp(p[0] - p[1] * x, p[2]) - y

    def jac(p):
        w = expit(p[0] - p[1] * x - p[2])
        return np.stack([w, -w * x, 1 - w], axis=1)

    inits = []
    for e in (0.5 * L.min(),) if init else (0.0, 0.5 * L.min(), 0.9 * L.min()):
        for b in (0.05, 0.2, 0.5, 1.0):
            inits.append([math.log(max(L.mean() - e, 1e-3 * L.mean())), b, math.log(max(e, 1e-13))])
    for g in init or []:
        inits.insert(0, [_log(g["a"]) - g["b"] * lc0, g["b"], _log(g["e"])])
    lb, ub = np.array([-np.inf, 0.0, LOG_FLOOR]), np.array([np.inf, EXP_MAX, math.log(L.max())])
    try:
        p, cost = _solve(resid, jac, inits, lb, ub)
    except ValueError as err:
        return {"a": None, "b": None, "e": None, "n_points": len(C), "reason": str(err)}
    out = {"a": float(np.exp(p[0] + p[1] * lc0)), "b": float(p[1]), "e": float(np.exp(p[2])),
           "n_points": len(C), "rms_log_residual": float(np.sqrt(2 * cost / len(C)))}
    return _warn(out, {"b": p[1]}, len(np.unique(C)), 3)


def _warn(out: dict[str, Any], exponents: dict[str, float], n_distinct: int, n_params: int) -> dict[str, Any]:
    """Add a ``warning`` to a fit whose exponents sit on their bounds or that has no spare points."""
    notes = [f"{k} at the bound [0, {EXP_MAX:g}]: not identified by this sweep"
             for k, v in exponents.items() if v < 1e-6 or v > EXP_MAX - 1e-6]
    if n_distinct <= n_params:
        notes.append(f"{n_distinct} distinct points for {n_params} parameters: the curve interpolates, "
                     "nothing checks the law")
    return {**out, "warning": "; ".join(notes)} if notes else out


def _seeds_params_tokens(x: np.ndarray, z: np.ndarray, L: np.ndarray, k: int) -> list[list[float]]:
    """The ``k`` best starting points ``[a', alpha, b', beta, e]`` of a grid over ``(alpha, beta)``, each with
    ``E, A', B' >= 0`` solved by non-negative least squares on ``L`` weighted by ``1 / L`` (~ log space)."""
    grid, w, cands = np.linspace(0.05, 1.5, 15), 1.0 / L, []
    for alpha in grid:
        for beta in grid:
            m = np.stack([np.ones_like(x), np.exp(-alpha * x), np.exp(-beta * z)], axis=1) * w[:, None]
            coef, rnorm = nnls(m, np.ones_like(L))
            cands.append((rnorm, alpha, beta, np.maximum(coef, 1e-6 * L.min())))
    cands.sort(key=lambda c: c[0])
    return [[math.log(c[3][1]), c[1], math.log(c[3][2]), c[2], math.log(c[3][0])] for c in cands[:k]]


def fit_params_tokens(N: Sequence[float], D: Sequence[float], L: Sequence[float], init: list[dict] | None = None,
                      huber_delta: float = HUBER_DELTA, n_starts: int = 8) -> dict[str, Any]:
    """Fit ``L(N, D) = E + A N^-alpha + B D^-beta`` (N parameters, D training tokens, L validation loss).

    Hoffmann et al. 2022 (Chinchilla, arXiv 2203.15556) approach 3: minimise the Huber loss (delta
    ``huber_delta``) of ``LSE(a - alpha ln N, b - beta ln D, e) - ln L`` with ``A, B, E = exp(a, b, e)``
    from several initial guesses, keeping the best: the ``n_starts`` best points of a 15 x 15 grid over
    ``(alpha, beta)`` in [0.05, 1.5] (``E, A, B`` of each by non-negative least squares), plus ``init``
    (dicts with ``E, A, alpha, B, beta``). N and D are normalised by their geometric means inside.
    Bounds: ``0 <= alpha, beta <= 3``, ``E > 0``.
    Returns ``{"E", "A", "alpha", "B", "beta", "a_N", "a_D", "n_points"}`` with the compute-optimal
    allocation ``N_opt ~ C^a_N``, ``a_N = beta / (alpha + beta)``, ``a_D = alpha / (alpha + beta)``;
    nulls and a ``reason`` with fewer than 5 points or fewer than 2 distinct N or D.
    """
    N, D, L = _points(N, D, L)
    null = {k: None for k in ("E", "A", "alpha", "B", "beta", "a_N", "a_D")}
    if len(L) < 5 or len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        return {**null, "n_points": len(L), "reason": f"{len(L)} points, {len(np.unique(N))} distinct N, "
                f"{len(np.unique(D))} distinct D (need >= 5 points and >= 2 distinct N and D)"}
    ln0, ld0 = float(np.mean(np.log(N))), float(np.mean(np.log(D)))
    x, z, y = np.log(N) - ln0, np.log(D) - ld0, np.log(L)

    def terms(p):  # p = [a', alpha, b', beta, e]
        return np.stack([p[0] - p[1] * x, p[2] - p[3] * z, np.full_like(x, p[4])], axis=1)

    def resid(p):
        return logsumexp(terms(p), axis=1) - y

    def jac(p):
        w = softmax(terms(p), axis=1)
        return np.stack([w[:, 0], -w[:, 0] * x, w[:, 1], -w[:, 1] * z, w[:, 2]], axis=1)

    inits = _seeds_params_tokens(x, z, L, n_starts)
    for g in init or []:
        inits.insert(0, [_log(g["A"]) - g["alpha"] * ln0, g["alpha"], _log(g["B"]) - g["beta"] * ld0, g["beta"],
                         _log(g["E"])])
    lb = np.array([-np.inf, 0.0, -np.inf, 0.0, LOG_FLOOR])
    ub = np.array([np.inf, EXP_MAX, np.inf, EXP_MAX, math.log(L.max())])
    try:
        p, cost = _solve(resid, jac, inits, lb, ub, loss="huber", f_scale=huber_delta)
    except ValueError as err:
        return {**null, "n_points": len(L), "reason": str(err)}
    alpha, beta = float(p[1]), float(p[3])
    s = alpha + beta
    out = {"E": float(np.exp(p[4])), "A": float(np.exp(p[0] + alpha * ln0)), "alpha": alpha,
           "B": float(np.exp(p[2] + beta * ld0)), "beta": beta, "a_N": beta / s if s > 0 else None,
           "a_D": alpha / s if s > 0 else None, "n_points": len(L),
           "rms_log_residual": float(np.sqrt(np.mean(resid(p) ** 2)))}
    return _warn(out, {"alpha": alpha, "beta": beta}, len({(a, b) for a, b in zip(N, D)}), 5)


def _groups(runs: list[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    groups: dict[float, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(float(r["budget"]), []).append(r)
    return dict(sorted(groups.items()))


def isoflop_optima(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compute-optimal size per budget, Hoffmann et al. 2022 approach 2 (iso-FLOP profiles).

    For each budget group (FLOPs) with >= 3 distinct N: a parabola of ``loss_val`` vs ``ln N`` (least
    squares over the group's runs); its vertex is ``N_opt`` (parameters) when it is a minimum inside
    the sampled N range. ``D_opt`` (tokens) is ``ln D`` interpolated piecewise-linearly in ``ln N`` at
    ``N_opt`` between the group's runs (D of same-N runs averaged in log): the tokens a run of that size
    sees under this budget with the sweep's own FLOPs-per-token, not ``C / 6N``.
    Returns ``[{"budget", "N_opt", "D_opt", "loss_opt", "status", "n_runs"}]`` with status ``ok``,
    ``too few sizes``, ``no minimum`` (parabola opens downward) or ``at edge`` (vertex outside the
    sampled range, then ``N_vertex`` is given and ``N_opt`` is null); a ``detail`` says more.
    """
    out = []
    for budget, group in _groups(runs).items():
        row = {"budget": budget, "N_opt": None, "D_opt": None, "loss_opt": None, "n_runs": len(group)}
        x = np.log([r["N"] for r in group])
        sizes, which = np.unique(x, return_inverse=True)
        if len(sizes) < 3:
            out.append({**row, "status": "too few sizes", "detail": f"{len(sizes)} distinct N (need >= 3)"})
            continue
        c2, c1, c0 = np.polyfit(x, [r["loss_val"] for r in group], 2)
        if c2 <= 0:
            out.append({**row, "status": "no minimum", "detail": "the parabola in ln N opens downward"})
            continue
        xv = -c1 / (2 * c2)
        if not sizes[0] <= xv <= sizes[-1]:
            out.append({**row, "status": "at edge", "N_vertex": float(np.exp(xv)),
                        "detail": f"vertex {'below' if xv < sizes[0] else 'above'} the sampled N range"})
            continue
        ld_runs = np.log([r["D"] for r in group])
        ld = [ld_runs[which == i].mean() for i in range(len(sizes))]
        out.append({**row, "N_opt": float(np.exp(xv)), "D_opt": float(np.exp(np.interp(xv, sizes, ld))),
                    "loss_opt": float(c0 - c1 * c1 / (4 * c2)), "status": "ok"})
    return out


def fit_compute_optimal(per_budget: list[dict[str, Any]]) -> dict[str, Any]:
    """``N_opt = k_N C^a_N`` and ``D_opt = k_D C^a_D`` (C the budget in FLOPs) by linear regression in
    log-log over the budgets whose iso-FLOP vertex is ``ok``; nulls and a ``reason`` with fewer than 2."""
    ok = [r for r in per_budget if r["status"] == "ok"]
    if len(ok) < 2:
        return {"a_N": None, "a_D": None, "k_N": None, "k_D": None, "n_budgets": len(ok),
                "reason": f"{len(ok)} budget(s) with an iso-FLOP minimum inside the sampled sizes (need >= 2)"}
    lc = np.log([r["budget"] for r in ok])
    a_n, k_n = np.polyfit(lc, np.log([r["N_opt"] for r in ok]), 1)
    a_d, k_d = np.polyfit(lc, np.log([r["D_opt"] for r in ok]), 1)
    return {"a_N": float(a_n), "a_D": float(a_d), "k_N": float(np.exp(k_n)), "k_D": float(np.exp(k_d)),
            "n_budgets": len(ok)}


def _loss_vs_compute(runs: list[dict[str, Any]], init: list[dict] | None = None) -> dict[str, Any]:
    groups = _groups(runs)
    if len(groups) >= 3:
        pts = [min(g, key=lambda r: r["loss_val"]) for g in groups.values()]
        used = "frontier (lowest loss per budget)"
    else:
        pts, used = runs, "all runs (fewer than 3 budgets)"
    fit = fit_loss_vs_compute([r["C"] for r in pts], [r["loss_val"] for r in pts], init)
    return {**fit, "points": used}


def _ci(draws: list[float]) -> list[float] | None:
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))] if len(draws) >= 2 else None


def fit_sweep(runs: list[dict[str, Any]], n_bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    """All fits of a sweep (``runs`` from :func:`collect_runs`) with bootstrap intervals.

    The bootstrap resamples runs with replacement ``n_bootstrap`` times (``numpy`` generator seeded
    by ``seed``), refits each fit that succeeded on all runs (starting from that fit as well as the
    default grid for L(C); with the best grid seed for L(N, D)) and reports the 2.5 / 97.5 percentiles; a
    resample whose fit fails (too few budgets or sizes left, no convergence) is skipped and counted in
    ``bootstrap_failed``. Returns the fit.json dict except ``excluded``.
    """
    lvc = _loss_vs_compute(runs)
    pt = fit_params_tokens([r["N"] for r in runs], [r["D"] for r in runs], [r["loss_val"] for r in runs])
    per_budget = isoflop_optima(runs)
    co = fit_compute_optimal(per_budget)
    draws: dict[str, list[float]] = {k: [] for k in ("b", "alpha", "beta", "a_N", "a_D", "pt_a_N", "pt_a_D")}
    failed = {"loss_vs_compute": 0, "loss_vs_params_tokens": 0, "compute_optimal": 0}
    rng = np.random.default_rng(seed)
    refits = (  # (fit, its full-data value, refit of a resample, {draw: key of the refit})
        ("loss_vs_compute", lvc["b"], lambda s: _loss_vs_compute(s, init=[lvc]), {"b": "b"}),
        ("loss_vs_params_tokens", pt["alpha"],
         lambda s: fit_params_tokens(*([r[k] for r in s] for k in ("N", "D", "loss_val")), init=[pt], n_starts=1),
         {"alpha": "alpha", "beta": "beta", "pt_a_N": "a_N", "pt_a_D": "a_D"}),
        ("compute_optimal", co["a_N"], lambda s: fit_compute_optimal(isoflop_optima(s)), {"a_N": "a_N", "a_D": "a_D"}))
    for _ in range(n_bootstrap if runs else 0):
        sample = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
        for name, full, refit, keys in refits:
            if full is None:
                continue
            f = refit(sample)
            if any(f[k] is None for k in keys.values()):
                failed[name] += 1
            else:
                for d, k in keys.items():
                    draws[d].append(f[k])
    pt_ci = {k: _ci(draws[k]) for k in ("alpha", "beta")}
    return {
        "loss_vs_compute": {**lvc, "ci": {"b": _ci(draws["b"])}, "bootstrap_failed": failed["loss_vs_compute"]},
        "loss_vs_params_tokens": {**pt, "ci": pt_ci, "bootstrap_failed": failed["loss_vs_params_tokens"]},
        "compute_optimal": {
            **co, "method": "iso-FLOP parabolas (Hoffmann et al. 2022, approach 2)",
            "ci": {"a_N": _ci(draws["a_N"]), "a_D": _ci(draws["a_D"])},
            "bootstrap_failed": failed["compute_optimal"],
            "from_params_tokens": {"a_N": pt["a_N"], "a_D": pt["a_D"],
                                   "ci": {"a_N": _ci(draws["pt_a_N"]), "a_D": _ci(draws["pt_a_D"])}},
            "per_budget": per_budget,
        },
        "runs": runs,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
    }


def strict_json(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers and every NaN/Inf as None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# ------------------------------------------------------------------------------------- report, plot

def _g(v: Any, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def _with_ci(v: Any, ci: list[float] | None) -> str:
    return _g(v, ".3f") + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def summary(fit: dict[str, Any]) -> str:
    """A short human-readable table of a fit.json dict."""
    lines = [f"{len(fit['runs'])} runs, {len(fit.get('excluded', []))} excluded, "
             f"{fit['n_bootstrap']} bootstrap resamples (95 % intervals)",
             f"{'run':<40} {'N':>9} {'D':>9} {'C':>9} {'budget':>9} {'loss/val':>9}"]
    for r in sorted(fit["runs"], key=lambda r: (r["budget"], r["N"])):
        lines.append(f"{os.path.basename(r['run_dir'].rstrip('/'))[:40]:<40} {_g(r['N']):>9} {_g(r['D']):>9} "
                     f"{_g(r['C']):>9} {_g(r['budget']):>9} {r['loss_val']:>9.4f}")
    for e in fit.get("excluded", []):
        lines.append(f"excluded {e['run_dir']}: {e['reason']} ({e.get('detail', '')})")
    c, p, o = fit["loss_vs_compute"], fit["loss_vs_params_tokens"], fit["compute_optimal"]
    f = o["from_params_tokens"]
    sections = (
        ("L(C) = a C^-b + e", c, "b",
         lambda: f"b = {_with_ci(c['b'], c['ci']['b'])}, a = {_g(c['a'])}, e = {_g(c['e'])} "
                 f"({c['n_points']} points: {c['points']})"),
        ("L(N,D) = E + A N^-alpha + B D^-beta", p, "alpha",
         lambda: f"alpha = {_with_ci(p['alpha'], p['ci']['alpha'])}, beta = {_with_ci(p['beta'], p['ci']['beta'])}, "
                 f"E = {_g(p['E'])}"),
        ("iso-FLOP optimum", o, "a_N",
         lambda: f"a_N = {_with_ci(o['a_N'], o['ci']['a_N'])}, a_D = {_with_ci(o['a_D'], o['ci']['a_D'])}"),
        ("optimum from L(N,D)", f, "a_N",
         lambda: f"a_N = {_with_ci(f['a_N'], f['ci']['a_N'])}, a_D = {_with_ci(f['a_D'], f['ci']['a_D'])}"))
    for name, section, key, text in sections:
        lines.append(f"{name}: " + (text() if section[key] is not None else
                                    f"not fitted -- {section.get('reason', 'no L(N,D) fit')}"))
        if section.get("warning"):
            lines.append(f"  warning: {section['warning']}")
        if section is o:
            lines += [f"  budget {b['budget']:.3g} FLOPs: " + (f"N_opt {b['N_opt']:.3g}, D_opt {b['D_opt']:.3g}"
                      if b["status"] == "ok" else f"{b['status']} ({b['detail']})") for b in o["per_budget"]]
    return "\n".join(lines)


def plot_fit(fit: dict[str, Any], path: str) -> None:
    """Write a figure: loss vs C (FLOPs) with the fitted L(C), and loss vs N (parameters) per budget with
    the iso-FLOP parabolas and their vertices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = fit["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    budgets = sorted({r["budget"] for r in runs})
    colors = {b: plt.cm.viridis(i / max(len(budgets) - 1, 1)) for i, b in enumerate(budgets)}
    for b in budgets:
        g = sorted((r for r in runs if r["budget"] == b), key=lambda r: r["N"])
        ax1.scatter([r["C"] for r in g], [r["loss_val"] for r in g], color=colors[b], s=18)
        ax2.scatter([r["N"] for r in g], [r["loss_val"] for r in g], color=colors[b], s=18, label=f"C={b:.2g}")
        if len({r["N"] for r in g}) >= 3:
            x = np.log([r["N"] for r in g])
            coef = np.polyfit(x, [r["loss_val"] for r in g], 2)
            xs = np.linspace(x.min(), x.max(), 100)
            ax2.plot(np.exp(xs), np.polyval(coef, xs), color=colors[b], lw=1)
    for b in fit["compute_optimal"]["per_budget"]:
        if b["status"] == "ok":
            ax2.plot(b["N_opt"], b["loss_opt"], "x", color=colors.get(b["budget"], "k"), ms=9, mew=2)
    c = fit["loss_vs_compute"]
    if c["b"] is not None and runs:
        cs = np.geomspace(min(r["C"] for r in runs), max(r["C"] for r in runs), 100)
        ax1.plot(cs, c["a"] * cs ** -c["b"] + c["e"], "k-", lw=1,
                 label=f"{c['a']:.3g} C^-{c['b']:.3f} + {c['e']:.3g}")
        ax1.legend(fontsize=8)
    ax1.set(xscale="log", xlabel="training compute C (FLOPs)", ylabel="loss/val", title="loss vs compute")
    ax2.set(xscale="log", xlabel="parameters N", ylabel="loss/val", title="iso-FLOP profiles (x: vertex)")
    if budgets:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vdit-scaling", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit scaling laws to the run directories under SWEEP_DIR")
    f.add_argument("sweep_dir")
    f.add_argument("--out", default=None, help="fit.json path (default SWEEP_DIR/fit.json)")
    f.add_argument("--plot", default=None, help="also write a figure (png) here")
    f.add_argument("--n-bootstrap", type=int, default=200)
    f.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not os.path.isdir(args.sweep_dir):
        p.error(f"{args.sweep_dir} is not a directory")
    runs, excluded = collect_runs(args.sweep_dir)
    fit = strict_json({**fit_sweep(runs, args.n_bootstrap, args.seed), "excluded": excluded,
                       "sweep_dir": args.sweep_dir})
    out = args.out or os.path.join(args.sweep_dir, "fit.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(fit, fh, indent=1, allow_nan=False)
    print(summary(fit))
    print(f"wrote {out}")
    if args.plot:
        plot_fit(fit, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

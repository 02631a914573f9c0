"""Trajectory physics as a registry metric, and its per-set report (pass rates per check and scene type).

    from vdit.eval.physics_report import trajectory_physics, pass_rates
    r = trajectory_physics(video, params, fps)      # MetricResult: value 1.0 / 0.0 / None
    pass_rates([r.details for r in results])        # {"pass_rate", "checks": {...}, "scenes": {...}}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vdit.eval.metrics.base import MetricResult
from vdit.eval.physics import _ORIGINAL, CHECKS, physics_checks

__all__ = ["ERROR_KEYS", "trajectory_physics", "pass_rates"]

# The continuous error each check reports (units: relative, pixels or px/frame of the video).
ERROR_KEYS = {"gravity": "g_rel_error", "energy": "max_gain_px", "penetration": "max_floor_depth_px",
              "continuity": "max_residual_px", "horizontal": "max_speed_gain", "order": "max_gain_px",
              "permanence": "missing"}


def trajectory_physics(video: np.ndarray, scene, fps: float | None = None, gravity_tol: float = 0.05) -> MetricResult:
    """All trajectory checks on one video (:func:`vdit.eval.physics.physics_checks`) as a MetricResult.

    value: 1.0 when every evaluable check passed, 0.0 when one failed, None when none was
    evaluable. details: the full report. exact=True means "exactly the checks EVAL.md B2
    specifies"; this is a new metric with no published original.
    """
    report = physics_checks(video, scene, fps, gravity_tol=gravity_tol)
    value = None if report["passed"] is None else float(report["passed"])
    if value is None:
        report["reason"] = "no check was evaluable"
    return MetricResult(name="physics", value=value, implementation="vdit.eval.physics.physics_checks",
                        original=_ORIGINAL + "; exact = exactly the specified checks", exact=True, details=report)


def _rate(verdicts: list[bool | None], errors: list[float | None]) -> dict[str, Any]:
    judged = [v for v in verdicts if v is not None]
    errs = [e for e in errors if e is not None]
    return {"pass_rate": float(np.mean(judged)) if judged else None, "count": len(judged),
            "not_evaluable": len(verdicts) - len(judged), "mean_error": float(np.mean(errs)) if errs else None}


def pass_rates(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate physics reports (``physics_checks`` dicts; empty dicts for videos without a scene).

    Returns ``{"pass_rate", "checks": {check: {pass_rate, count, not_evaluable, mean_error,
    error_key}}, "scenes": {scene type: {pass_rate, count, not_evaluable}}}``. Not evaluable is
    counted separately and never as a pass.
    """
    reports = [r for r in reports if r and "scene" in r]
    out: dict[str, Any] = {"pass_rate": _rate([r["passed"] for r in reports], [])["pass_rate"], "checks": {},
                           "scenes": {}}
    for name in CHECKS:
        key = ERROR_KEYS[name]
        out["checks"][name] = {**_rate([r[name]["passed"] for r in reports], [r[name].get(key) for r in reports]),
                               "error_key": key}
    for scene in sorted({r["scene"] for r in reports}):
        rs = [r for r in reports if r["scene"] == scene]
        out["scenes"][scene] = {k: v for k, v in _rate([r["passed"] for r in rs], []).items() if k != "mean_error"}
        out["scenes"][scene]["checks"] = {n: _rate([r[n]["passed"] for r in rs], [])["pass_rate"] for n in CHECKS}
    return out

"""Metric registry: names -> pure per-video functions, and per-set aggregation as each original does.

    from vdit.eval.metrics.registry import REGISTRY, Inputs, score_set
    out = score_set([Inputs(video, fps=8.0, prompt="...")], ["temporal_flickering", "dynamic_degree"])
    out["metrics"]["dynamic_degree"]["value"], out["videos"][0]["temporal_flickering"]

Every entry has a ``name``, the per-video function it calls (uint8 (T, H, W, 3) RGB + fps, plus
what it ``needs``: ``prompt``, ``scene`` (SceneParams), ``reference`` (real video / take 1),
``reference2`` (real take 2), or local ``weights`` keys), and an aggregation:

- ``mean``: mean over the videos where the metric is evaluable (VBench dimensions, raw
  Physics-IQ terms). ``temporal_flickering`` is evaluable only on static videos, and with prompts
  at most 5 static videos per prompt count (VBench's rule).
- ``pair_weighted``: VBench's consistency dimensions: sum of per-frame similarities over all
  videos / number of frame pairs (the mean over videos when all have the same length).
- ``physics_iq``: the dataset-level ratio of means (:func:`vdit.eval.metrics.physics_iq.physics_iq_score`).
- ``pass_rate``: trajectory physics; pass rate over evaluable videos, per check and per scene type.

Set results: ``{"value", "count" (evaluable videos), "not_evaluable", "implementation",
"original", "exact", ...}``. ``exact`` is True only when every contributing video's result was.
Set-level metrics (:data:`SET_METRICS`: ``fvd``, ``kvd``) compare the generated set with the
reference videos and need ``weights["i3d"]``. Weights are never downloaded: ``weights`` maps keys
(``dino``, ``clip``, ``clip_l14``, ``aesthetic_head``, ``musiq``, ``raft``, ``i3d``) to local paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from vdit.eval.metrics import consistency, flicker, motion, physics_iq
from vdit.eval.metrics.base import MetricResult
from vdit.eval.metrics.flow import FlowCache

__all__ = ["MetricSpec", "Inputs", "Backends", "REGISTRY", "WEIGHT_FREE", "SET_METRICS", "available", "score_video",
           "aggregate", "score_item", "aggregate_set", "score_set"]


@dataclass
class Inputs:
    """One video to score: uint8 (T, H, W, 3) RGB, fps, and optional per-video inputs."""

    video: np.ndarray
    fps: float
    prompt: str | None = None
    scene: Any = None  # vdit.data.synthetic.SceneParams
    reference: np.ndarray | None = None
    reference2: np.ndarray | None = None
    scenario: str | None = None  # Physics-IQ scenario and view (grouping for the score)
    view: str | None = None


@dataclass
class Backends:
    """Loaded weight-backed components, built once per set from ``weights`` (None = weight-free)."""

    weights: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    _cache: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        if key not in self._cache:
            self._cache[key] = self._build(key)
        return self._cache[key]

    def _build(self, key: str) -> Any:
        from vdit.eval.metrics import backbones, flow, quality

        w, d = self.weights, self.device
        if key == "flow":
            return flow.RaftFlow(w["raft"], device=d) if w.get("raft") else flow.FarnebackFlow()
        if key == "dino":
            return backbones.DinoBackbone(w.get("dino"), d) if w.get("dino") else None
        if key == "clip":
            return backbones.ClipBackbone(w.get("clip"), d) if w.get("clip") else None
        if key == "clip_l14":
            return backbones.ClipBackbone(w.get("clip_l14"), d, metric="aesthetic_quality/clipsim",
                                          setting="weights.clip_l14 (--weights clip_l14=PATH)")
        if key == "aesthetic_head":
            return quality.AestheticHead(w.get("aesthetic_head"))
        if key == "musiq":
            return quality.MusiqScorer(w.get("musiq"), d)
        raise KeyError(key)


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: ``run(inputs, cache, backends) -> MetricResult``."""

    name: str
    run: Callable[[Inputs, FlowCache, Backends], MetricResult]
    original: str
    aggregate: str = "mean"
    needs: tuple[str, ...] = ()  # per-video inputs: prompt, scene, reference, reference2
    weights: tuple[str, ...] = ()  # required weight keys
    in_all: bool = True  # part of "all" when its inputs and weights are there


def _trajectory(i: Inputs, c: FlowCache, b: Backends) -> MetricResult:
    from vdit.eval.physics_report import trajectory_physics

    return trajectory_physics(i.video, i.scene, i.fps)


def _physics_iq(i: Inputs, c: FlowCache, b: Backends) -> MetricResult:
    rec = physics_iq.physics_iq_record(i.video, i.reference, i.reference2, i.fps, scenario=i.scenario or "",
                                       view=i.view or "")
    g = rec.gen
    return MetricResult(name="physics_iq", value=float(np.mean(g["spatiotemporal_iou"])),
                        implementation="vdit.eval.metrics.physics_iq", original=physics_iq.ORIGINAL, exact=True,
                        details={"record": rec, "spatial_iou": g["spatial_iou"],
                                 "weighted_spatial_iou": g["weighted_spatial_iou"], "mse": float(np.mean(g["mse"])),
                                 "note": "per-video value: spatiotemporal IoU vs real take 1; the set value is "
                                         "the Physics-IQ score (needs take 2)"})


def _quality(name: str):
    def run(i: Inputs, c: FlowCache, b: Backends) -> MetricResult:
        from vdit.eval.metrics import quality

        if name == "aesthetic_quality":
            return quality.aesthetic_quality(i.video, i.fps, clip=b.get("clip_l14"), head=b.get("aesthetic_head"))
        if name == "imaging_quality":
            return quality.imaging_quality(i.video, i.fps, musiq=b.get("musiq"))
        return quality.clipsim(i.video, i.fps, prompt=i.prompt, clip=b.get("clip_l14"))
    return run


_VB = "Vchitect/VBench"
REGISTRY: dict[str, MetricSpec] = {s.name: s for s in [
    MetricSpec("static_filter", lambda i, c, b: motion.static_filter(i.video, i.fps, cache=c),
               f"VBench static_filter ({_VB})"),
    MetricSpec("temporal_flickering", lambda i, c, b: flicker.temporal_flickering(i.video, i.fps, cache=c),
               f"VBench temporal_flickering, static videos only ({_VB})", aggregate="static_mean"),
    MetricSpec("temporal_flickering_all", lambda i, c, b: flicker.temporal_flickering_all(i.video, i.fps),
               "VBench temporal_flickering formula on every video"),
    MetricSpec("dynamic_degree", lambda i, c, b: motion.dynamic_degree(i.video, i.fps, cache=c),
               f"VBench dynamic_degree ({_VB})"),
    MetricSpec("motion_magnitude", lambda i, c, b: motion.motion_magnitude(i.video, i.fps, cache=c),
               "continuous VBench dynamic_degree score (new)"),
    MetricSpec("motion_smoothness", lambda i, c, b: motion.motion_smoothness(i.video, i.fps, cache=c),
               f"VBench motion_smoothness ({_VB})"),
    MetricSpec("motion_jerk", lambda i, c, b: motion.motion_jerk(i.video, i.fps, cache=c), "new (vdit)"),
    MetricSpec("subject_consistency",
               lambda i, c, b: consistency.subject_consistency(i.video, i.fps, backbone=b.get("dino")),
               f"VBench subject_consistency ({_VB})", aggregate="pair_weighted"),
    MetricSpec("background_consistency",
               lambda i, c, b: consistency.background_consistency(i.video, i.fps, backbone=b.get("clip")),
               f"VBench background_consistency ({_VB})", aggregate="pair_weighted"),
    MetricSpec("aesthetic_quality", _quality("aesthetic_quality"), f"VBench aesthetic_quality ({_VB})",
               weights=("clip_l14", "aesthetic_head")),
    MetricSpec("imaging_quality", _quality("imaging_quality"), f"VBench imaging_quality ({_VB})",
               weights=("musiq",)),
    MetricSpec("clipsim", _quality("clipsim"), "CLIPSIM", needs=("prompt",), weights=("clip_l14",)),
    MetricSpec("physics", _trajectory, "vdit trajectory physics (EVAL.md B2)", aggregate="pass_rate",
               needs=("scene",)),
    MetricSpec("physics_iq", _physics_iq, physics_iq.ORIGINAL, aggregate="physics_iq", needs=("reference",)),
]}

WEIGHT_FREE = [n for n, s in REGISTRY.items() if not s.weights]

# Set-level metrics: compare the generated set with the set of reference videos (no per-video value).
SET_METRICS = {"fvd": "FVD (I3D features, Frechet distance)", "kvd": "KVD (I3D features, polynomial MMD^2)"}


def _set_metric(name: str, items: list[Inputs], weights: dict[str, str], device: str) -> dict[str, Any]:
    from vdit.eval.metrics import distribution

    real = [it.reference for it in items if it.reference is not None]
    model = distribution.load_i3d(weights.get("i3d"), device)
    r = getattr(distribution, name)(real, [it.video for it in items], model)
    return {"value": r.value, "count": len(items), "not_evaluable": 0, "implementation": r.implementation,
            "original": r.original, "exact": r.exact, **r.details}


def _set_available(name: str, items: list[Inputs], weights: dict[str, str]) -> str | None:
    if not weights.get("i3d"):
        return "needs local weights: --weights i3d=PATH (TorchScript I3D)"
    if sum(it.reference is not None for it in items) < 2 or len(items) < 2:
        return "needs >= 2 generated and >= 2 reference videos"
    return None


def available(name: str, inputs: Inputs, weights: dict[str, str]) -> str | None:
    """None when ``name`` can run on ``inputs`` with ``weights``; else the reason it cannot."""
    spec = REGISTRY[name]
    missing_w = [k for k in spec.weights if not weights.get(k)]
    if missing_w:
        return "needs local weights: " + ", ".join(f"--weights {k}=PATH" for k in missing_w)
    missing = [k for k in spec.needs if getattr(inputs, k) is None]
    if missing:
        return "needs " + ", ".join(missing)
    return None


def score_video(inputs: Inputs, names: list[str], backends: Backends | None = None) -> dict[str, MetricResult]:
    """Run ``names`` on one video, sharing one flow cache. Raises on invalid input."""
    backends = backends or Backends()
    cache = FlowCache(inputs.video, backends.get("flow"))
    return {n: REGISTRY[n].run(inputs, cache, backends) for n in names}


def _provenance(name: str, results: list[MetricResult]) -> dict[str, Any]:
    results = [r for r in results if not r.details.get("placeholder")]
    r0 = results[0] if results else None
    return {"implementation": r0.implementation if r0 else f"vdit.eval.metrics ({name})",
            "original": r0.original if r0 else REGISTRY[name].original,
            "exact": bool(results) and all(r.exact for r in results)}


def aggregate(name: str, results: list[MetricResult], prompts: list[str | None] | None = None) -> dict[str, Any]:
    """Per-set value of metric ``name`` from its per-video results (module doc)."""
    kind = REGISTRY[name].aggregate if name in REGISTRY else "mean"
    missing = sum(1 for r in results if r.details.get("placeholder"))
    vals = [r.value for r in results]
    ok = [v for v in vals if v is not None]
    out: dict[str, Any] = {"value": None, "count": len(ok), "not_evaluable": len(vals) - len(ok) - missing,
                           **_provenance(name, results)}
    if missing:
        out["missing_inputs"] = missing  # videos without the inputs this metric needs
    if kind == "static_mean" and prompts is not None:
        kept, per_prompt = [], {}
        for r, p in zip(results, prompts):
            if r.value is None:
                continue
            per_prompt[p] = per_prompt.get(p, 0) + 1
            if p is None or per_prompt[p] <= 5:
                kept.append(r.value)
        out["dropped_over_5_per_prompt"] = len(ok) - len(kept)
        ok = kept
        out["count"] = len(kept)
    if kind == "pair_weighted" and ok:
        pairs = [r.details["num_pairs"] for r in results if r.value is not None]
        out["value"] = float(sum(v * n for v, n in zip(ok, pairs)) / sum(pairs))
        out["mean_over_videos"] = float(np.mean(ok))
    elif kind == "physics_iq" and ok:
        recs = [r.details["record"] for r in results if r.value is not None]
        stats = physics_iq.physics_iq_score(recs)
        out.update(value=stats["score"], A=stats["A"], V=stats["V"], num_scenarios=stats["num_scenarios"])
        if stats.get("reason"):
            out["reason"] = stats["reason"]
    elif kind == "pass_rate":
        from vdit.eval.physics_report import pass_rates

        out.update(pass_rates([r.details for r in results if not r.details.get("placeholder")]))
        out["value"] = out.pop("pass_rate")
    elif ok:
        out["value"] = float(np.mean(ok))
    return out


def _video_row(results: dict[str, MetricResult]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for n, r in results.items():
        row[n] = r.value
        if r.details.get("placeholder"):
            row.setdefault("missing_inputs", {})[n] = r.details["reason"]
        elif n == "physics":
            row["physics_details"] = r.details
        elif n == "physics_iq":
            row["physics_iq_details"] = {k: v for k, v in r.details.items() if k != "record"}
        elif r.value is None and "reason" in r.details:
            row.setdefault("not_evaluable", {})[n] = r.details["reason"]
    return row


def score_item(inputs: Inputs, names: list[str], weights: dict[str, str] | None = None,
               backends: Backends | None = None) -> dict[str, MetricResult]:
    """The per-video half of :func:`score_set`: ``{name: MetricResult}`` for every name in ``names``;
    a metric whose inputs or weights this video lacks gets a placeholder (value None,
    ``details["placeholder"]``) that aggregation counts as missing. Pure per video, so videos may be
    scored on different ranks and aggregated together (:func:`aggregate_set`). Raises on invalid input."""
    weights = dict(weights or {})
    runnable = [n for n in names if available(n, inputs, weights) is None]
    res = score_video(inputs, runnable, backends or Backends(weights))
    for n in names:
        if n not in res:
            res[n] = MetricResult(n, None, "vdit.eval.metrics.registry", REGISTRY[n].original, False,
                                  {"reason": available(n, inputs, weights), "placeholder": True})
    return {n: res[n] for n in names}


def aggregate_set(results: list[dict[str, MetricResult] | None], names: list[str],
                  prompts: list[str | None] | None = None) -> dict[str, Any]:
    """The per-set half of :func:`score_set`: per-video rows and per-set aggregates of ``names``.

    Args:
        results: per video, :func:`score_item`'s output, or None for a video that failed (left out
            of every aggregate, its row None).
        prompts: per video, its prompt or None (VBench's at-most-5-static-videos-per-prompt rule).

    Returns ``{"metrics": {name: aggregate}, "videos": [row or None]}``.
    """
    prompts = list(prompts) if prompts is not None else [None] * len(results)
    per_name: dict[str, list[MetricResult]] = {n: [] for n in names}
    rows, kept_prompts = [], []
    for res, prompt in zip(results, prompts):
        if res is None:
            rows.append(None)
            continue
        for n in names:
            per_name[n].append(res[n])
        rows.append(_video_row(res))
        kept_prompts.append(prompt)
    use_prompts = kept_prompts if any(p is not None for p in kept_prompts) else None
    return {"metrics": {n: aggregate(n, per_name[n], use_prompts) for n in names}, "videos": rows}


def score_set(items: list[Inputs], names: list[str] | str, weights: dict[str, str] | None = None,
              device: str = "cpu", on_error: Callable[[int, Exception], None] | None = None) -> dict[str, Any]:
    """Score a set of videos with metrics ``names`` (or ``"all"``) and aggregate.

    ``"all"`` selects every registered metric whose weights are given and whose per-video inputs
    exist for at least one video; the rest are listed in ``skipped`` with the reason. A metric
    whose inputs a given video lacks is not evaluable on that video. ``on_error(index, exn)``
    receives videos that raise (default: re-raise).

    Returns ``{"metrics": {name: aggregate}, "videos": [{name: value, ...}], "skipped": {name: reason}}``.
    """
    weights = dict(weights or {})
    skipped: dict[str, str] = {}
    set_names: list[str] = []
    if names == "all":
        names = []
        for n in SET_METRICS:
            reason = _set_available(n, items, weights)
            if reason:
                skipped[n] = reason
            else:
                set_names.append(n)
        for n, spec in REGISTRY.items():
            reasons = [available(n, it, weights) for it in items] or ["no videos"]
            if all(reasons):
                skipped[n] = reasons[0]
            elif spec.in_all:
                names.append(n)
    else:
        unknown = [n for n in names if n not in REGISTRY and n not in SET_METRICS]
        if unknown:
            raise KeyError(f"unknown metric(s) {unknown}; registered: {sorted(REGISTRY) + sorted(SET_METRICS)}")
        set_names = [n for n in names if n in SET_METRICS]
        names = [n for n in names if n in REGISTRY]
        for n in set_names:
            reason = _set_available(n, items, weights)
            if reason:
                raise ValueError(f"metric {n!r} cannot run: {reason}")
    backends = Backends(weights, device)
    results: list[dict[str, MetricResult] | None] = []
    for idx, it in enumerate(items):
        try:
            results.append(score_item(it, names, weights, backends))
        except Exception as exn:  # noqa: BLE001 - reported per video
            if on_error is None:
                raise
            on_error(idx, exn)
            results.append(None)
    out = aggregate_set(results, names, [it.prompt for it in items])
    metrics, rows = out["metrics"], out["videos"]
    ok_items = [it for it, row in zip(items, rows) if row is not None]
    for n in set_names:
        metrics[n] = _set_metric(n, ok_items, weights, device)
    return {"metrics": metrics, "videos": rows, "skipped": skipped}

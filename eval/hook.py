"""Evaluation pieces: the prompt list, per-video writing and scoring, per-set aggregation, the JSON.

Used by :func:`vdit.eval.sharded.evaluate_sharded`, which the Trainer runs every ``eval.every`` steps
and at the end of training (prompts shared out over the data-parallel ranks), and which
``vdit-eval checkpoint`` / ``vdit-eval watch`` (:mod:`vdit.eval.watch`) run on one device through
:func:`evaluate_model`. The per-video half (:func:`sample_entry`: mp4, :func:`score_one`, contact-sheet
frames) runs on the rank that sampled the video; the per-set half (:func:`finish_evaluation`) on
rank 0 over every prompt. Output per step N:
``{run_dir}/samples/step-N/*.mp4``, ``contact_sheet.png``, ``prompts.json``, ``scenes.json`` and
``{run_dir}/eval/step-N.json`` with per-video scores and per-checkpoint means (with counts).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vdit.data.shards import expand_shards, read_shard
from vdit.data.split import in_split, source_id
from vdit.data.synthetic import DEFAULT_RADIUS_FRAC, SceneParams, caption, random_scene
from vdit.data.transforms import to_uint8_video
from vdit.data.video_io import write_mp4
from vdit.eval.fidelity import rescale_scene, scene_fidelity, summarize_fidelity
from vdit.eval.report import contact_sheet, sheet_frames

log = logging.getLogger(__name__)

# The two kinds of physics prompt (EvalConfig.num_train_physics_prompts / num_physics_prompts).
TRAIN_CAPTIONS, NEW_SCENES = "train_captions", "new_scenes"


def _combo(params: SceneParams) -> tuple:
    """The colour combination a caption names: (background, floor, sorted ball colours)."""
    return params.background, params.floor, tuple(sorted(b.color for b in params.balls))


@functools.lru_cache(maxsize=4)
def training_scenes(shards: str, val_fraction: float = 0.0, max_shards: int = 64) -> tuple[tuple[str, SceneParams], ...]:
    """``(caption, params)`` of the procedural clips in the training shards (renderer parameters in
    the clip json, ``extra.synthetic``), in shard and key order; held-out clips excluded.

    Reads at most ``max_shards`` shards (only their captions and json are used), and stops after
    two shards without a procedural clip (a dataset of real footage, whose shards may be large).
    Unreadable shards and clips without parameters are passed over.
    """
    out = []
    for i, url in enumerate(expand_shards(shards)[:max_shards]):
        if i >= 2 and not out:
            break
        for sample in read_shard(url, Counter()):
            if sample.get("json") is None:
                continue
            try:
                meta = json.loads(sample["json"])
                if not in_split(source_id(sample.get("__key__", "?"), meta), "train", val_fraction):
                    continue
                params = (meta.get("extra") or {}).get("synthetic") or meta.get("synthetic")
                if params:
                    out.append((sample["txt"].decode("utf-8").strip(), SceneParams.from_json(params)))
            except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
                continue
    return tuple(out)


def physics_prompts(num: int, seed: int, num_frames: int, height: int, width: int,
                    fps: float, avoid: set[tuple] | None = None,
                    radius_frac: Sequence[float] = DEFAULT_RADIUS_FRAC,
                    spread: float = 1.0) -> list[tuple[str, SceneParams]]:
    """``num`` procedural scenes sized like the training clips: ``(caption, params)`` pairs.

    The parameters are drawn by the synthetic renderer at the sample's resolution, frame count
    and fps (frames, pixels, frames per second), so the trajectory checks compare the generated
    video with the physics the caption describes. Scenes whose colour combination (background,
    floor, ball colours) is in ``avoid`` are re-drawn (up to 200 times each), so prompts built with
    the training set's combinations in ``avoid`` test generalisation to new combinations.
    ``radius_frac``: the balls' radius range (:func:`vdit.data.synthetic.random_scene`), which should
    match the training clips' (``eval.physics_radius_frac``), like ``spread``, the share of the
    motion parameters' ranges drawn (``eval.physics_scene_spread``).
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        for _attempt in range(200):
            params = random_scene(rng, height, width, num_frames, fps, radius_frac, spread)
            if not avoid or _combo(params) not in avoid:
                break
        out.append((caption(params, start_third=spread < 1), params))
    return out


def eval_prompts(cfg) -> tuple[list[str], list[SceneParams | None], list[str | None]]:
    """The prompts an evaluation samples: ``(prompts, scene params or None, kind or None)``.

    ``cfg.eval.prompts`` (no scene), then ``num_train_physics_prompts`` captions of procedural
    training clips (kind ``train_captions``, scenes rescaled to the sample geometry), then
    ``num_physics_prompts`` new renderer scenes whose colour combinations the training shards do
    not contain (kind ``new_scenes``).
    """
    e, d = cfg.eval, cfg.data
    fps = d.target_fps or 8.0
    prompts, params, kinds = list(e.prompts), [None] * len(e.prompts), [None] * len(e.prompts)
    seen = training_scenes(d.shards, d.val_fraction if not d.val_shards else 0.0) \
        if (e.num_train_physics_prompts or e.num_physics_prompts) and d.shards else ()
    if e.num_train_physics_prompts:
        if len(seen) < e.num_train_physics_prompts:
            log.warning("eval: %d training-caption physics prompts asked for, %d procedural clips found in %s",
                        e.num_train_physics_prompts, len(seen), d.shards)
        step = max(1, len(seen) // max(1, e.num_train_physics_prompts))  # spread over the shards
        for text, p in list(seen)[::step][:e.num_train_physics_prompts]:
            prompts.append(text)
            params.append(rescale_scene(p, d.height, d.width, d.num_frames, fps))
            kinds.append(TRAIN_CAPTIONS)
    for text, p in physics_prompts(e.num_physics_prompts, e.physics_seed, d.num_frames, d.height, d.width, fps,
                                   avoid={_combo(q) for _, q in seen}, radius_frac=e.physics_radius_frac,
                                   spread=e.physics_scene_spread):
        prompts.append(text)
        params.append(p)
        kinds.append(NEW_SCENES)
    return prompts, params, kinds


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "empty"


def sample_name(index: int, prompt: str) -> str:
    """File name of prompt ``index``'s mp4 (``{index:02d}_{slug}.mp4``): unique per prompt, in prompt order."""
    return f"{index:02d}_{_slug(prompt)}.mp4"


def write_samples(out_dir: str, videos: torch.Tensor, prompts: list[str], fps: float) -> list[str]:
    """Write ``videos`` float ``(B, 3, T, H, W)`` in [-1, 1] as mp4s, a contact sheet and prompts.json.

    Returns the mp4 paths (one per prompt, :func:`sample_name`).
    """
    os.makedirs(out_dir, exist_ok=True)
    frames = [to_uint8_video(v) for v in videos]  # each uint8 (T, H, W, 3)
    paths = [write_mp4(os.path.join(out_dir, sample_name(i, p)), f, fps)
             for i, (f, p) in enumerate(zip(frames, prompts))]
    contact_sheet(frames, prompts, path=os.path.join(out_dir, "contact_sheet.png"))
    with open(os.path.join(out_dir, "prompts.json"), "w") as f:
        json.dump([{"prompt": p, "path": os.path.basename(q)} for p, q in zip(prompts, paths)], f, indent=2)
    return paths


# Weight-free metrics scored inside training (about 0.1 s per 16 x 32 x 32 video on one core).
HOOK_METRICS = ["temporal_flickering", "temporal_flickering_all", "static_filter", "dynamic_degree",
                "motion_magnitude", "motion_smoothness", "motion_jerk", "subject_consistency",
                "background_consistency"]


def score_names(params: list[SceneParams | None], metrics: list[str] | None = None) -> list[str]:
    """Registry names an evaluation scores: ``metrics`` (default :data:`HOOK_METRICS`), plus the
    trajectory checks (``physics``) when any prompt of the whole set has scene parameters."""
    physics = ["physics"] if any(p is not None for p in params) else []
    return list(HOOK_METRICS if metrics is None else metrics) + physics


def score_one(video: np.ndarray, scene: SceneParams | None, fps: float, names: list[str]) -> dict[str, Any]:
    """The per-video half of :func:`score_videos` (pure: may run on any rank): ``{"results": {name:
    MetricResult}, "fidelity": scene_fidelity(...) or None}`` for uint8 ``(T, H, W, 3)`` ``video``
    at ``fps`` frames per second; ``names`` from :func:`score_names`. Raises on an invalid video."""
    from vdit.eval.metrics.registry import Inputs, score_item

    return {"results": score_item(Inputs(video, fps, scene=scene), names),
            "fidelity": scene_fidelity(video, scene) if scene is not None else None}


def summarize_scores(scored: list[dict[str, Any] | None], names: list[str],
                     kinds: list[str | None] | None = None) -> dict[str, Any]:
    """The per-set half of :func:`score_videos`: per-video rows and per-set means from :func:`score_one`
    outputs in prompt order (None: a video whose scoring failed, left out of every mean; its row is
    ``{"error": ...}`` when the caller adds one). Returns what :func:`score_videos` returns."""
    from vdit.eval.metrics.registry import aggregate_set

    kinds = list(kinds) if kinds is not None else [None] * len(scored)
    out = aggregate_set([s["results"] if s is not None else None for s in scored], names)
    fidelity: dict[str | None, list[dict[str, Any]]] = {}
    per_video = []
    for row, s, kind in zip(out["videos"], scored, kinds):
        if row is None:
            per_video.append({})
            continue
        row = dict(row)
        details = row.pop("physics_details", None)
        row.pop("physics", None)
        if details is not None:  # the full report for videos with a scene (as before)
            row["physics"] = details
        fid = s["fidelity"]
        if fid is not None:
            row["fidelity"] = {k: v for k, v in fid.items() if k not in ("implementation", "original", "exact")}
            fidelity.setdefault(None, []).append(fid)
            if kind is not None:
                row["kind"] = kind
                fidelity.setdefault(kind, []).append(fid)
        per_video.append(row)
    metrics_out: dict[str, Any] = {}
    for name, agg in out["metrics"].items():
        if name == "physics":
            prov = {k: agg[k] for k in ("implementation", "original", "exact")}
            checks = {"all": {"pass_rate": agg["value"], "count": agg["count"], "not_evaluable": agg["not_evaluable"]},
                      **agg["checks"]}
            for check, r in checks.items():
                metrics_out[f"physics/{check}_pass_rate"] = {
                    "mean": r["pass_rate"], "value": r["pass_rate"], "count": r["count"],
                    "not_evaluable": r["not_evaluable"], **({"mean_error": r["mean_error"]} if "mean_error" in r else {}),
                    **prov}
            for scene, r in agg["scenes"].items():
                metrics_out[f"physics/scene_{scene}_pass_rate"] = {
                    "mean": r["pass_rate"], "value": r["pass_rate"], "count": r["count"],
                    "not_evaluable": r["not_evaluable"], "checks": r["checks"], **prov}
        else:
            metrics_out[name] = {"mean": agg["value"], **agg}
    for kind, rows in fidelity.items():
        for key, value in summarize_fidelity(rows).items():
            metrics_out[f"gen/{key}" if kind is None else f"gen/{kind}/{key}"] = value
    return {"per_video": per_video, "metrics": metrics_out}


def score_videos(videos: list[np.ndarray], params: list[SceneParams | None], fps: float | None = None,
                 metrics: list[str] | None = None, kinds: list[str | None] | None = None) -> dict[str, Any]:
    """Score uint8 ``(T, H, W, 3)`` videos with the registry's weight-free metrics, plus the
    trajectory checks and the scene fidelity (:mod:`vdit.eval.fidelity`) where scene params exist.

    Args:
        fps: frames per second of the videos (default: the first scene's fps, else 8).
        metrics: registry names (default :data:`HOOK_METRICS`).
        kinds: per video, the prompt kind (``train_captions`` / ``new_scenes``, from
            :func:`eval_prompts`) or None; fidelity means are reported over all physics prompts
            (``gen/<key>``) and per kind (``gen/<kind>/<key>``).

    Returns ``{"per_video": [{name: value, "physics": report}], "metrics": {name: {"mean", "value",
    "count", "not_evaluable", ...provenance}}}``; trajectory checks appear as
    ``physics/<check>_pass_rate``, ``physics/all_pass_rate`` and ``physics/scene_<type>_pass_rate``
    (``mean`` None when nothing was evaluable). Every entry has ``mean``. The same numbers come from
    :func:`score_one` per video (on any rank) and :func:`summarize_scores` over all of them.
    """
    if fps is None:
        fps = next((p.fps for p in params if p is not None), 8.0)
    names = score_names(params, metrics)
    return summarize_scores([score_one(v, p, fps, names) for v, p in zip(videos, params)], names, kinds)


def sample_entry(index: int, prompt: str, video: np.ndarray, scene: SceneParams | None, fps: float,
                 out_dir: str, run_dir: str, names: list[str]) -> dict[str, Any]:
    """The per-video work of an evaluation, done by the rank that sampled prompt ``index``: write its
    mp4 (:func:`sample_name`) into ``out_dir``, keep its contact-sheet frames
    (:func:`vdit.eval.report.sheet_frames`: at most 8 frames, not the whole video) and score it
    (:func:`score_one`).

    A failure (an unwritable file, an invalid video, a metric that raises) is logged and recorded
    (``"error"``), never raised: every rank must reach the gather that follows
    (:func:`vdit.eval.sharded.evaluate_sharded`), or the others would wait for it.

    Returns a picklable ``{"index", "path" (relative to run_dir), "scored" (or None), "error" (or None),
    "sheet": (frame numbers, frames) or None}``.
    """
    path = os.path.join(out_dir, sample_name(index, prompt))
    entry: dict[str, Any] = {"index": index, "path": os.path.relpath(path, run_dir), "scored": None, "error": None,
                             "sheet": None}
    try:
        write_mp4(path, video, fps)
        entry["sheet"] = sheet_frames(video)
        entry["scored"] = score_one(video, scene, fps, names)
    except Exception as exn:  # noqa: BLE001 - one bad video must not fail (or hang) the evaluation
        log.exception("eval: prompt %d (%r) failed after sampling", index, prompt)
        entry["error"] = f"{type(exn).__name__}: {exn}"
    return entry


def finish_evaluation(cfg, step: int, run_dir: str, prompts: list[str], params: list[SceneParams | None],
                      kinds: list[str | None], entries: list[dict[str, Any]],
                      extra: dict[str, Any] | None = None,
                      extra_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write what one evaluation leaves besides the mp4s, from every prompt's :func:`sample_entry`
    (on one rank): ``contact_sheet.png``, ``prompts.json`` and ``scenes.json`` in
    ``samples/step-N/`` and ``eval/step-N.json`` (atomically: temp file + rename, so a reader never
    sees half of it). Per-set means are taken over all prompts here (:func:`summarize_scores`);
    ``extra_metrics`` (e.g. the continuation suite's, :mod:`vdit.eval.continuation`) join them.

    Raises:
        ValueError: ``entries`` do not hold each prompt index exactly once.

    Returns the JSON written (``{"step", "metrics", "videos", "contact_sheet", "sampler", **extra}``).
    """
    e = cfg.eval
    by_index = {en["index"]: en for en in entries}
    if len(by_index) != len(entries) or sorted(by_index) != list(range(len(prompts))):
        raise ValueError(f"evaluation entries cover prompts {sorted(en['index'] for en in entries)}, "
                         f"expected each of 0..{len(prompts) - 1} once")
    entries = [by_index[i] for i in range(len(prompts))]
    out_dir = os.path.join(run_dir, "samples", f"step-{step}")
    os.makedirs(out_dir, exist_ok=True)
    sheet = os.path.join(out_dir, "contact_sheet.png")
    shown = [(en, p) for en, p in zip(entries, prompts) if en["sheet"] is not None]  # all but failed videos
    if shown:
        contact_sheet([en["sheet"][1] for en, _ in shown], [p for _, p in shown], path=sheet,
                      frame_indices=[en["sheet"][0] for en, _ in shown])
    names = [os.path.basename(en["path"]) for en in entries]
    with open(os.path.join(out_dir, "prompts.json"), "w") as f:
        json.dump([{"prompt": p, "path": n} for p, n in zip(prompts, names)], f, indent=2)
    with open(os.path.join(out_dir, "scenes.json"), "w") as f:  # lets `vdit-eval videos` rerun the physics checks
        json.dump({n: p.to_json() for n, p in zip(names, params) if p is not None}, f, indent=2)
    scores = summarize_scores([en["scored"] for en in entries], score_names(params), kinds)
    result = {
        "step": step,
        "metrics": {**scores["metrics"], **(extra_metrics or {})},
        "videos": [{"prompt": p, "path": en["path"], **s, **({"error": en["error"]} if en["error"] else {})}
                   for p, en, s in zip(prompts, entries, scores["per_video"])],
        "contact_sheet": os.path.relpath(sheet, run_dir),
        "sampler": {"num_steps": e.num_steps, "solver": e.solver, "cfg_scale": e.cfg_scale, "flow_shift": e.flow_shift,
                    "cfg_interval": list(e.cfg_interval),
                    "seed": e.seed, "weights": "ema" if e.use_ema else "raw", "batch_size": e.batch_size},
    }
    result.update(extra or {})
    path = eval_json_path(run_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=float)
    os.replace(tmp, path)
    return result


def evaluate_model(cfg, model: torch.nn.Module, text_encoder, vae, step: int, run_dir: str, device: torch.device,
                   encode_text: Callable, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sample ``cfg.eval.prompts`` plus physics prompts, write them, score them, save ``eval/step-N.json``.

    ``model`` is a plain single-device model (e.g. one loaded from a checkpoint by ``vdit-eval
    checkpoint`` / ``watch``); ``extra`` keys are added to the JSON (e.g. who scored it and from which
    checkpoint). The one-rank case of :func:`vdit.eval.sharded.evaluate_sharded`, the code the
    Trainer's in-loop evaluation runs on every layout, so both write the same files and numbers.
    ``text_encoder`` is unused (``encode_text`` wraps it); kept for callers.

    Returns the JSON written (``{"step", "metrics", "videos", "contact_sheet", "sampler", **extra}``),
    or None when there is no prompt to sample.
    """
    from vdit.eval.sharded import evaluate_sharded

    return evaluate_sharded(cfg, model, encode_text, vae, step, run_dir, device, extra=extra)


def eval_json_path(run_dir: str, step: int) -> str:
    """``{run_dir}/eval/step-N.json``: where the evaluation of step N is written (in-loop or beside training)."""
    return os.path.join(run_dir, "eval", f"step-{step}.json")

"""Evaluation inside training: sample prompts, write mp4s and a contact sheet, score, save JSON.

Called by the Trainer every ``eval.every`` steps and at the end of training. Output per step N:
``{run_dir}/samples/step-N/*.mp4``, ``contact_sheet.png``, ``prompts.json`` and
``{run_dir}/eval/step-N.json`` with per-video scores and per-checkpoint means (with counts).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch

from vdit.data.shards import expand_shards, read_shard
from vdit.data.split import in_split, source_id
from vdit.data.synthetic import SceneParams, caption, random_scene
from vdit.data.transforms import to_uint8_video
from vdit.data.video_io import write_mp4
from vdit.eval.fidelity import rescale_scene, scene_fidelity, summarize_fidelity
from vdit.eval.metrics.flicker import temporal_flickering
from vdit.eval.physics import physics_checks
from vdit.eval.report import contact_sheet
from vdit.eval.sample import generate

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

    Reads at most ``max_shards`` shards (only their captions and json are used). Unreadable shards
    and clips without parameters are passed over.
    """
    out = []
    for url in expand_shards(shards)[:max_shards]:
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
                    fps: float, avoid: set[tuple] | None = None) -> list[tuple[str, SceneParams]]:
    """``num`` procedural scenes sized like the training clips: ``(caption, params)`` pairs.

    The parameters are drawn by the synthetic renderer at the sample's resolution, frame count
    and fps (frames, pixels, frames per second), so the trajectory checks compare the generated
    video with the physics the caption describes. Scenes whose colour combination (background,
    floor, ball colours) is in ``avoid`` are re-drawn (up to 200 times each), so prompts built with
    the training set's combinations in ``avoid`` test generalisation to new combinations.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        for _attempt in range(200):
            params = random_scene(rng, height, width, num_frames, fps)
            if not avoid or _combo(params) not in avoid:
                break
        out.append((caption(params), params))
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
                                   avoid={_combo(q) for _, q in seen}):
        prompts.append(text)
        params.append(p)
        kinds.append(NEW_SCENES)
    return prompts, params, kinds


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "empty"


def write_samples(out_dir: str, videos: torch.Tensor, prompts: list[str], fps: float) -> list[str]:
    """Write ``videos`` float ``(B, 3, T, H, W)`` in [-1, 1] as mp4s, a contact sheet and prompts.json.

    Returns the mp4 paths (one per prompt, ``{i:02d}_{slug}.mp4``).
    """
    os.makedirs(out_dir, exist_ok=True)
    frames = [to_uint8_video(v) for v in videos]  # each uint8 (T, H, W, 3)
    paths = [write_mp4(os.path.join(out_dir, f"{i:02d}_{_slug(p)}.mp4"), f, fps)
             for i, (f, p) in enumerate(zip(frames, prompts))]
    contact_sheet(frames, prompts, path=os.path.join(out_dir, "contact_sheet.png"))
    with open(os.path.join(out_dir, "prompts.json"), "w") as f:
        json.dump([{"prompt": p, "path": os.path.basename(q)} for p, q in zip(prompts, paths)], f, indent=2)
    return paths


def score_videos(videos: list[np.ndarray], params: list[SceneParams | None],
                 kinds: list[str | None] | None = None) -> dict[str, Any]:
    """Score uint8 ``(T, H, W, 3)`` videos: temporal flickering for all; trajectory checks and scene
    fidelity (:mod:`vdit.eval.fidelity`) where params exist.

    Fidelity means are reported over all physics prompts (``gen/<key>``) and per prompt kind
    (``gen/<kind>/<key>``, kinds from :func:`eval_prompts`).

    Returns ``{"per_video": [...], "metrics": {name: {"mean", "count", ...provenance}}}``.
    """
    kinds = list(kinds) if kinds is not None else [None] * len(videos)
    fidelity: dict[str | None, list[dict[str, Any]]] = {}
    per_video: list[dict[str, Any]] = []
    flicker_vals, checks = [], {}
    flicker_meta: dict[str, Any] = {}
    for video, p, kind in zip(videos, params, kinds):
        row: dict[str, Any] = {}
        fl = temporal_flickering(video)
        flicker_meta = {k: v for k, v in fl.to_dict().items() if k in ("implementation", "original", "exact")}
        row["temporal_flickering"] = fl.value
        flicker_vals.append(fl.value)
        if p is not None:
            fid = scene_fidelity(video, p)
            row["fidelity"] = {k: v for k, v in fid.items() if k not in ("implementation", "original", "exact")}
            fidelity.setdefault(None, []).append(fid)
            if kind is not None:
                row["kind"] = kind
                fidelity.setdefault(kind, []).append(fid)
            phys = physics_checks(video, p)
            row["physics"] = phys
            for name, res in phys.items():
                if isinstance(res, dict) and "passed" in res:
                    checks.setdefault(name, []).append(res["passed"])
            checks.setdefault("all", []).append(bool(phys["passed"]))
        per_video.append(row)
    metrics: dict[str, Any] = {
        "temporal_flickering": {"mean": float(np.mean(flicker_vals)), "count": len(flicker_vals), **flicker_meta}}
    for name, results in checks.items():
        judged = [bool(r) for r in results if r is not None]  # None: nothing tracked, not evaluable
        metrics[f"physics/{name}_pass_rate"] = {
            "mean": float(np.mean(judged)) if judged else None, "count": len(judged),
            "not_evaluable": len(results) - len(judged), "implementation": "vdit.eval.physics",
            "original": "vdit trajectory physics on procedural scenes (EVAL.md B2)", "exact": True}
    for kind, rows in fidelity.items():
        for key, value in summarize_fidelity(rows).items():
            metrics[f"gen/{key}" if kind is None else f"gen/{kind}/{key}"] = value
    return {"per_video": per_video, "metrics": metrics}


def evaluate_model(cfg, model: torch.nn.Module, text_encoder, vae, step: int, run_dir: str, device: torch.device,
                   encode_text: Callable) -> dict[str, Any]:
    """Sample ``cfg.eval.prompts`` plus physics prompts, write them, score them, save ``eval/step-N.json``.

    Returns the JSON written (``{"step", "metrics", "videos", "contact_sheet"}``).
    """
    e, d = cfg.eval, cfg.data
    fps = d.target_fps or 8.0
    prompts, params, kinds = eval_prompts(cfg)
    was_training = model.training
    videos = generate(model, encode_text, vae, prompts, d.num_frames, d.height, d.width, e.num_steps, e.cfg_scale,
                      e.flow_shift, e.seed, device, solver=e.solver)  # (B, 3, T, H, W)
    model.train(was_training)
    out_dir = os.path.join(run_dir, "samples", f"step-{step}")
    paths = write_samples(out_dir, videos, prompts, fps)
    scores = score_videos([to_uint8_video(v) for v in videos], params, kinds)
    result = {
        "step": step,
        "metrics": scores["metrics"],
        "videos": [{"prompt": p, "path": os.path.relpath(q, run_dir), **s}
                   for p, q, s in zip(prompts, paths, scores["per_video"])],
        "contact_sheet": os.path.relpath(os.path.join(out_dir, "contact_sheet.png"), run_dir),
        "sampler": {"num_steps": e.num_steps, "solver": e.solver, "cfg_scale": e.cfg_scale, "flow_shift": e.flow_shift,
                    "seed": e.seed, "weights": "ema" if e.use_ema else "raw"},
    }
    os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
    with open(os.path.join(run_dir, "eval", f"step-{step}.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    return result

"""Evaluation inside training: sample prompts, write mp4s and a contact sheet, score, save JSON.

Called by the Trainer every ``eval.every`` steps and at the end of training. Output per step N:
``{run_dir}/samples/step-N/*.mp4``, ``contact_sheet.png``, ``prompts.json`` and
``{run_dir}/eval/step-N.json`` with per-video scores and per-checkpoint means (with counts).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import numpy as np
import torch

from vdit.data.synthetic import SceneParams, caption, random_scene
from vdit.data.transforms import to_uint8_video
from vdit.data.video_io import write_mp4
from vdit.eval.metrics.flicker import temporal_flickering
from vdit.eval.physics import physics_checks
from vdit.eval.report import contact_sheet
from vdit.eval.sample import generate


def physics_prompts(num: int, seed: int, num_frames: int, height: int, width: int,
                    fps: float) -> list[tuple[str, SceneParams]]:
    """``num`` procedural scenes sized like the training clips: ``(caption, params)`` pairs.

    The parameters are drawn by the synthetic renderer at the sample's resolution, frame count
    and fps (frames, pixels, frames per second), so the trajectory checks compare the generated
    video with the physics the caption describes.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        params = random_scene(rng, height, width, num_frames, fps)
        out.append((caption(params), params))
    return out


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


def score_videos(videos: list[np.ndarray], params: list[SceneParams | None]) -> dict[str, Any]:
    """Score uint8 ``(T, H, W, 3)`` videos: temporal flickering for all, trajectory checks where params exist.

    Returns ``{"per_video": [...], "metrics": {name: {"mean", "count", ...provenance}}}``.
    """
    per_video: list[dict[str, Any]] = []
    flicker_vals, checks = [], {}
    flicker_meta: dict[str, Any] = {}
    for video, p in zip(videos, params):
        row: dict[str, Any] = {}
        fl = temporal_flickering(video)
        flicker_meta = {k: v for k, v in fl.to_dict().items() if k in ("implementation", "original", "exact")}
        row["temporal_flickering"] = fl.value
        flicker_vals.append(fl.value)
        if p is not None:
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
    return {"per_video": per_video, "metrics": metrics}


def evaluate_model(cfg, model: torch.nn.Module, text_encoder, vae, step: int, run_dir: str, device: torch.device,
                   encode_text: Callable) -> dict[str, Any]:
    """Sample ``cfg.eval.prompts`` plus physics prompts, write them, score them, save ``eval/step-N.json``.

    Returns the JSON written (``{"step", "metrics", "videos", "contact_sheet"}``).
    """
    e, d = cfg.eval, cfg.data
    fps = d.target_fps or 8.0
    physics = physics_prompts(e.num_physics_prompts, e.physics_seed, d.num_frames, d.height, d.width, fps)
    prompts = list(e.prompts) + [c for c, _ in physics]
    params: list[SceneParams | None] = [None] * len(e.prompts) + [p for _, p in physics]
    was_training = model.training
    videos = generate(model, encode_text, vae, prompts, d.num_frames, d.height, d.width, e.num_steps, e.cfg_scale,
                      e.flow_shift, e.seed, device)  # (B, 3, T, H, W)
    model.train(was_training)
    out_dir = os.path.join(run_dir, "samples", f"step-{step}")
    paths = write_samples(out_dir, videos, prompts, fps)
    scores = score_videos([to_uint8_video(v) for v in videos], params)
    result = {
        "step": step,
        "metrics": scores["metrics"],
        "videos": [{"prompt": p, "path": os.path.relpath(q, run_dir), **s}
                   for p, q, s in zip(prompts, paths, scores["per_video"])],
        "contact_sheet": os.path.relpath(os.path.join(out_dir, "contact_sheet.png"), run_dir),
        "sampler": {"num_steps": e.num_steps, "cfg_scale": e.cfg_scale, "flow_shift": e.flow_shift,
                    "seed": e.seed, "weights": "ema" if e.use_ema else "raw"},
    }
    os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
    with open(os.path.join(run_dir, "eval", f"step-{step}.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    return result

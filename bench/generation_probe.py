"""Does a trained model generate what it was trained on? Probe a run's checkpoint.

Run (after a training run, e.g. ``make quickstart``):
    .venv/bin/python bench/generation_probe.py --run-dir runs/quickstart
    .venv/bin/python bench/generation_probe.py --run-dir runs/quickstart --samplers euler:20:3:1,heun:20:1:1

Prints, for the EMA weights:
1. the one-step clean estimate ``x0_hat = x_t - t v(x_t, t)`` against training clips (their own
   captions, fixed noise): MSE per t, including t near 1 where sampling starts; the per-clip
   mean-colour predictor's MSE is printed for scale;
   and the same estimate of procedural training scenes (re-rendered from their parameters at the
   training geometry) scored like samples: the fraction of frames whose ball is found and the
   background error per t. It separates "the model cannot draw the ball even when x_t shows it"
   (low at t = 0.3) from "the sampler never commits to one";
2. for each sampler ``solver:steps:cfg_scale:flow_shift``: the scene-fidelity means of the eval
   config's physics prompts (training captions and new colour combinations), i.e. background and
   floor colour errors (0-255) and the fraction of prompts whose ball is found in >= 80 % of frames.
Writes each sampler's videos and contact sheet under ``{run_dir}/probe/<sampler>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib

import numpy as np
import torch

from vdit.data.pipeline import ClipSpec, VideoPipeline
from vdit.data.synthetic import render
from vdit.data.transforms import to_model_range, to_uint8_video
from vdit.eval.fidelity import rescale_scene, scene_fidelity
from vdit.eval.hook import eval_prompts, score_videos, training_scenes, write_samples
from vdit.eval.sample import generate, load_run
from vdit.model import flow
from vdit.train.build import TextCache

T_PROBE = (0.999, 0.99, 0.97, 0.95, 0.9, 0.7, 0.5, 0.3, 0.1)
T_SCENE_PROBE = (0.9, 0.7, 0.5, 0.3, 0.1)


@torch.no_grad()
def one_step_errors(cfg, model, encode_text, vae, device, num_clips: int) -> dict[str, float]:
    """MSE of x0_hat vs the clip at each t of ``T_PROBE`` over ``num_clips`` training clips (fixed noise)."""
    d = cfg.data
    spec = ClipSpec(d.num_frames, d.height, d.width, d.target_fps, d.frame_stride, shuffle=False, seed=d.seed,
                    split="train" if d.val_fraction > 0 and not d.val_shards else "all",
                    held_out_fraction=d.val_fraction)
    batch = next(iter(VideoPipeline(d.shards, spec, num_clips)))
    x0 = vae.encode(batch["video"].to(device))  # (B, C, T', H', W')
    text, mask = encode_text(batch["caption"])
    g = torch.Generator().manual_seed(zlib.crc32(b"probe"))
    noise = torch.randn(x0.shape, generator=g).to(device)
    out = {"mean_colour_mse": float((x0 - x0.mean(dim=(2, 3, 4), keepdim=True)).square().mean())}
    for t in T_PROBE:
        tt = torch.full((x0.shape[0],), t, device=device)
        xt = flow.interpolate(x0, noise, tt)
        v = model(xt, tt, text, mask)
        out[f"x0_mse@t={t}"] = float((flow.x0_from_velocity(xt, v, tt) - x0).square().mean())
    return out


@torch.no_grad()
def one_step_scene_fidelity(model, encode_text, vae, device, scenes, height: int, width: int, num_frames: int,
                            fps: float) -> dict[str, float]:
    """Scene fidelity of the one-step ``x0_hat`` at each t of ``T_SCENE_PROBE`` for procedural scenes.

    Each ``(caption, SceneParams)`` of ``scenes`` is re-rendered at ``height x width`` pixels,
    ``num_frames`` frames at ``fps`` (:func:`vdit.eval.fidelity.rescale_scene`; no codec), encoded,
    noised with fixed noise, denoised in one step with its caption and scored like a sample
    (:func:`vdit.eval.fidelity.scene_fidelity`).

    Returns ``{"ball_found@t=0.3": mean fraction of frames (0-1), "bg_err@t=0.3": mean background
    error (0-255), ...}``; empty for no scenes.
    """
    if not scenes:
        return {}
    params = [rescale_scene(p, height, width, num_frames, fps) for _, p in scenes]
    frames = torch.from_numpy(np.stack([render(p) for p in params]))  # (B, T, H, W, 3) uint8
    x0 = vae.encode(to_model_range(frames.permute(0, 4, 1, 2, 3)).to(device))  # (B, C, T', H', W')
    text, mask = encode_text([c for c, _ in scenes])
    g = torch.Generator().manual_seed(zlib.crc32(b"probe-scenes"))
    noise = torch.randn(x0.shape, generator=g).to(device)
    out = {}
    for t in T_SCENE_PROBE:
        tt = torch.full((x0.shape[0],), t, device=device)
        xt = flow.interpolate(x0, noise, tt)
        videos = vae.decode(flow.x0_from_velocity(xt, model(xt, tt, text, mask), tt))  # (B, 3, T, H, W)
        scores = [scene_fidelity(to_uint8_video(v), p) for v, p in zip(videos, params)]
        out[f"ball_found@t={t}"] = float(np.mean([s["ball_found_frac"] for s in scores]))
        out[f"bg_err@t={t}"] = float(np.mean([s["bg_color_err"] for s in scores]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--clips", type=int, default=8, help="training clips for the one-step errors")
    ap.add_argument("--samplers", default=None,
                    help="comma list of solver:steps:cfg_scale:flow_shift[:lo-hi] (lo-hi: cfg_interval; default: the "
                         "run's eval config), or none (one-step numbers only)")
    args = ap.parse_args(argv)
    cfg, model, text_encoder, vae, step, dev = load_run(args.run_dir)
    d = cfg.data
    model.eval()
    encode_text = TextCache(text_encoder, cfg.text_encoder.max_length, dev)
    scenes = training_scenes(d.shards, 0.0 if d.val_shards else d.val_fraction)[:args.clips]
    report = {"step": step, "one_step": one_step_errors(cfg, model, encode_text, vae, dev, args.clips),
              "one_step_scenes": one_step_scene_fidelity(model, encode_text, vae, dev, scenes, d.height, d.width,
                                                         d.num_frames, d.target_fps or 8.0)}
    print(json.dumps(report["one_step"], indent=1))
    print(json.dumps({k: round(v, 3) for k, v in report["one_step_scenes"].items()}))
    e = cfg.eval
    samplers = args.samplers or f"{e.solver}:{e.num_steps}:{e.cfg_scale}:{e.flow_shift}"
    prompts, params, kinds = eval_prompts(cfg)
    report["samplers"] = {}
    for spec in [] if samplers == "none" else samplers.split(","):
        solver, steps, cfg_scale, shift, *interval = spec.split(":")
        cfg_interval = tuple(float(x) for x in interval[0].split("-")) if interval else (0.0, 1.0)
        videos = generate(model, encode_text, vae, prompts, d.num_frames, d.height, d.width, int(steps),
                          float(cfg_scale), float(shift), e.seed, dev, solver=solver, cfg_interval=cfg_interval)
        write_samples(os.path.join(args.run_dir, "probe", spec.replace(":", "_")), videos, prompts,
                      d.target_fps or 8.0)
        metrics = score_videos([to_uint8_video(v) for v in videos], params, d.target_fps, metrics=[], kinds=kinds)["metrics"]
        row = {k: None if m["mean"] is None else round(m["mean"], 3) for k, m in metrics.items() if k.startswith("gen/")}
        report["samplers"][spec] = row
        print(spec, json.dumps(row))
    os.makedirs(os.path.join(args.run_dir, "probe"), exist_ok=True)
    with open(os.path.join(args.run_dir, "probe", "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

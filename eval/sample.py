"""vdit-sample: generate videos from a checkpoint with the flow ODE and classifier-free guidance.

Run:
    vdit-sample --run-dir runs/quickstart --prompt "A red ball bounces on a gray floor." \
        --num-steps 20 --solver heun --cfg-scale 3 --flow-shift 1 --seed 0
    vdit-sample --run-dir runs/quickstart --checkpoint runs/quickstart/checkpoints/step-00000400 \
        --prompts-file prompts.txt --no-ema --out /tmp/samples
    vdit-sample --weights runs/quickstart/export/step-400 --prompt "..."     # a vdit-export folder

The model is rebuilt from the run's ``config.yaml``; EMA weights are used unless ``--no-ema``.
Sampler settings (steps, solver, guidance, shift) default to the run's ``eval`` config.
Writes one mp4 per prompt plus ``contact_sheet.png`` and ``prompts.json`` into ``--out``
(default ``{run_dir}/samples/step-N``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import numpy as np
import torch

from vdit.model import flow
from vdit.model.vae import Autoencoder

TextFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def prompt_noise(seed: int, index: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """The start noise of prompt number ``index``: float32 ``latent_shape`` ``(C, T', H', W')`` on CPU.

    Drawn from a CPU generator seeded by ``(seed, index)`` alone, so a prompt's video depends on its
    position in the prompt list and the seed, not on which rank samples it, how many prompts share
    its batch, or the device.
    """
    seq = np.random.SeedSequence([int(seed), int(index)])
    g = torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0] >> 1))
    return torch.randn(tuple(latent_shape), generator=g)


@torch.no_grad()
def sample_latents(model: torch.nn.Module, encode_text: TextFn, latent_shape: Sequence[int], prompts: list[str],
                   num_steps: int = 20, cfg_scale: float = 1.0, flow_shift: float = 1.0, seed: int = 0,
                   device: torch.device | str = "cpu", solver: str = "euler", indices: Sequence[int] | None = None,
                   dtype: torch.dtype = torch.float32, callback: Callable | None = None) -> torch.Tensor:
    """Sample one latent per prompt with the flow ODE (see :func:`generate`); no decoding.

    Args:
        latent_shape: ``(C, T', H', W')`` of one sample.
        indices: per prompt, its number in the whole prompt list (seeds its noise,
            :func:`prompt_noise`); default ``0 .. B-1``.
        dtype: autocast dtype of the network's forward (fp32: no autocast), e.g. the training
            precision when sampling with the training model (FSDP bf16 parameters need bf16 autocast).

    Returns:
        float32 ``(B, C, T', H', W')`` on ``device``.
    """
    model.eval()
    B = len(prompts)
    indices = list(range(B)) if indices is None else list(indices)
    if len(indices) != B:
        raise ValueError(f"got {len(indices)} noise indices for {B} prompts")
    noise = torch.stack([prompt_noise(seed, i, latent_shape) for i in indices]).to(device)  # (B, C, T', H', W')
    text, mask = encode_text(prompts)  # (B, L, D), (B, L)
    use_cfg = cfg_scale != 1.0
    if use_cfg:
        null_text, null_mask = encode_text([""] * B)
        text, mask = torch.cat([text, null_text]), torch.cat([mask, null_mask])
    device_type = torch.device(device).type

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            if not use_cfg:
                return model(x, t, text, mask).float()  # (B, C, T', H', W')
            v = model(torch.cat([x, x]), torch.cat([t, t]), text, mask).float()  # (2B, C, T', H', W')
        return flow.cfg_combine(*v.chunk(2), cfg_scale)

    return flow.sample_ode(velocity, noise, num_steps, shift=flow_shift, solver=solver, callback=callback)


@torch.no_grad()
def generate(model: torch.nn.Module, encode_text: TextFn, vae: Autoencoder, prompts: list[str], num_frames: int,
             height: int, width: int, num_steps: int = 20, cfg_scale: float = 1.0, flow_shift: float = 1.0,
             seed: int = 0, device: torch.device | str = "cpu", solver: str = "euler",
             callback: Callable | None = None, indices: Sequence[int] | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sample one video per prompt.

    Integrates the learned velocity from noise (t = 1) to data (t = 0) with ``num_steps`` steps of
    ``solver`` (``euler`` or ``heun``, :func:`vdit.model.flow.sample_ode`) on a schedule shifted by
    ``flow_shift``; with ``cfg_scale != 1`` each step also runs the
    empty caption and combines ``v_uncond + cfg_scale (v_cond - v_uncond)``. Each prompt's noise
    comes from a CPU generator seeded by ``(seed, its index)`` (:func:`prompt_noise`), so a prompt
    gives the same video on any device, in any batch and on any rank.

    Args:
        num_frames, height, width: pixel-space clip size (frames, pixels).
        callback: passed to :func:`vdit.model.flow.sample_ode` (``(i, x, t, v)`` before step ``i``,
            latents with the guided velocity), e.g. to look at ``x_t - t v`` along the trajectory.
        indices, dtype: see :func:`sample_latents`.

    Returns:
        float32 ``(B, 3, T, H, W)`` in [-1, 1] (decoded by ``vae``), on CPU.
    """
    latent = vae.latent_shape(num_frames, height, width)  # (C, T', H', W')
    x0 = sample_latents(model, encode_text, latent, prompts, num_steps, cfg_scale, flow_shift, seed, device, solver,
                        indices=indices, dtype=dtype, callback=callback)  # (B, C, T', H', W')
    return vae.decode(x0).float().clamp(-1, 1).cpu()


def load_run(run_dir: str | None = None, checkpoint: str | None = None, use_ema: bool = True,
             device: str = "auto", weights: str | None = None):
    """Rebuild the model, text encoder and autoencoder and load weights.

    Either from a run directory (its ``config.yaml`` and a DCP checkpoint: the latest complete one
    unless ``checkpoint`` is given; EMA weights unless ``use_ema=False``) or from an exported folder
    ``weights`` (``vdit-export``: model.safetensors + config.json), which needs no run directory.

    Returns ``(cfg, model, text_encoder, vae, step, device)``.

    Raises:
        FileNotFoundError: missing config.yaml, checkpoint or export files.
        vdit.train.checkpoint.CheckpointError: a checkpoint holding anything but tensors and plain data.
    """
    from vdit.train.checkpoint import CheckpointManager
    from vdit.train.export import load_checkpoint_weights, load_exported, load_run_config
    from vdit.train.build import build_frozen, resolve_device

    dev = resolve_device(device)
    if weights is not None:
        cfg, model, step = load_exported(weights, dev)
    else:
        if run_dir is None:
            raise FileNotFoundError("give a run directory or an exported weights folder")
        cfg = load_run_config(run_dir)
        path = checkpoint or CheckpointManager(os.path.join(run_dir, "checkpoints")).latest()
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {run_dir}/checkpoints")
        model, step = load_checkpoint_weights(cfg, path, "ema" if use_ema else "raw", dev)
    text_encoder, vae = build_frozen(cfg, dev)
    return cfg, model, text_encoder, vae, step, dev


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (``vdit-sample``); returns the exit status."""
    ap = argparse.ArgumentParser(prog="vdit-sample", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default=None, help="run directory with config.yaml and checkpoints/")
    ap.add_argument("--weights", default=None, help="an exported folder (vdit-export) instead of --run-dir")
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory (default: latest complete)")
    ap.add_argument("--prompt", action="append", default=[], help="a caption; repeatable")
    ap.add_argument("--prompts-file", default=None, help="text file, one caption per line")
    ap.add_argument("--num-steps", type=int, default=None, help="solver steps (default: the run's eval.num_steps)")
    ap.add_argument("--solver", choices=flow.SOLVERS, default=None,
                    help="ODE solver: euler (1 network call per step) or heun (2) (default: the run's eval.solver)")
    ap.add_argument("--cfg-scale", type=float, default=None,
                    help="classifier-free guidance scale, 1 = off (default: the run's eval.cfg_scale)")
    ap.add_argument("--flow-shift", type=float, default=None,
                    help="timestep shift of the sampling schedule (default: the run's eval.flow_shift)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-frames", type=int, default=None, help="frames (default: the run's data.num_frames)")
    ap.add_argument("--height", type=int, default=None, help="pixels (default: the run's data.height)")
    ap.add_argument("--width", type=int, default=None, help="pixels (default: the run's data.width)")
    ap.add_argument("--fps", type=float, default=None, help="fps of the written mp4 (default: data.target_fps or 8)")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    ap.add_argument("--out", default=None, help="output folder (default: {run_dir}/samples/step-N)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        ap.error("give at least one --prompt or a --prompts-file")
    if not args.run_dir and not args.weights:
        ap.error("give --run-dir or --weights")
    try:
        cfg, model, text_encoder, vae, step, dev = load_run(args.run_dir, args.checkpoint, not args.no_ema, args.device,
                                                            args.weights)
    except (FileNotFoundError, ValueError) as exn:  # incl. CheckpointError: a checkpoint that is not plain data
        print(f"vdit-sample: {exn}", file=sys.stderr)
        return 1
    from vdit.eval.hook import write_samples
    from vdit.train.build import TextCache

    d, e = cfg.data, cfg.eval

    def pick(value, default):
        return default if value is None else value

    videos = generate(model, TextCache(text_encoder, cfg.text_encoder.max_length, dev), vae, prompts,
                      args.num_frames or d.num_frames, args.height or d.height, args.width or d.width,
                      pick(args.num_steps, e.num_steps), pick(args.cfg_scale, e.cfg_scale),
                      pick(args.flow_shift, e.flow_shift), args.seed, dev, solver=pick(args.solver, e.solver))
    out = args.out or os.path.join(args.run_dir or args.weights, "samples", f"step-{step}")
    paths = write_samples(out, videos, prompts, args.fps or d.target_fps or 8.0)
    print(json.dumps({"step": step, "samples": paths, "contact_sheet": os.path.join(out, "contact_sheet.png")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

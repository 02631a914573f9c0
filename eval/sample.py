"""vdit-sample: generate videos from a checkpoint with the flow ODE and classifier-free guidance.

Run:
    vdit-sample --run-dir runs/quickstart --prompt "A red ball bounces on a gray floor." \
        --num-steps 20 --solver heun --cfg-scale 3 --flow-shift 1 --seed 0
    vdit-sample --run-dir runs/quickstart --checkpoint runs/quickstart/checkpoints/step-00000400 \
        --prompts-file prompts.txt --no-ema --out /tmp/samples
    vdit-sample --weights runs/quickstart/export/step-400 --prompt "..."     # a vdit-export folder
    vdit-sample --run-dir runs/cont --cond-video clip.mp4 --cond-frames 4 --prompt "..."   # continue a video
    vdit-sample --run-dir runs/cont --cond-clip 0 --cond-frames 1                # continue held-out clip 0

The model is rebuilt from the run's ``config.yaml``; EMA weights are used unless ``--no-ema``.
Sampler settings (steps, solver, guidance, shift) default to the run's ``eval`` config.
Writes one mp4 per prompt plus ``contact_sheet.png`` and ``prompts.json`` into ``--out``
(default ``{run_dir}/samples/step-N``).

Continuation (image-to-video, video-to-video; docs/continuation.md): ``--cond-video`` (a video file,
read at the run's fps and resized/cropped to its geometry) or ``--cond-clip I`` (held-out clip ``I``
of the run's data: ``data.val_shards`` or ``data.val_fraction``; its caption is the default prompt)
gives the first ``--cond-frames`` latent frames, which stay fixed while the rest is generated. It
needs a model trained with ``train.cond_frames_prob > 0``.
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

__all__ = ["prompt_noise", "sample_latents", "cond_pixel_frames", "generate", "load_run", "load_cond_video", "main"]

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
                   dtype: torch.dtype = torch.float32, callback: Callable | None = None,
                   cond_latents: torch.Tensor | None = None,
                   cfg_interval: Sequence[float] = (0.0, 1.0)) -> torch.Tensor:
    """Sample one latent per prompt with the flow ODE (see :func:`generate`); no decoding.

    Args:
        latent_shape: ``(C, T', H', W')`` of one sample.
        indices: per prompt, its number in the whole prompt list (seeds its noise,
            :func:`prompt_noise`); default ``0 .. B-1``.
        dtype: autocast dtype of the network's forward (fp32: no autocast), e.g. the training
            precision when sampling with the training model (FSDP bf16 parameters need bf16 autocast).
        cond_latents: ``(B, C, k, H', W')``, the first ``k < T'`` latent frames of every sample, given
            (continuation). They are held fixed: the model sees them clean at time 0 (per-frame
            ``t`` of shape ``(B, T')``), their velocity is set to 0 so the solver never moves them,
            and the result holds them exactly (bit for bit). None: plain text-to-video, ``t (B,)``.
        cfg_interval: ``(lo, hi)``, flow times at which guidance is applied (``lo <= t <= hi``); at
            other steps only the conditional pass runs (Kynkaanniemi et al. 2024, "Applying guidance
            in a limited interval", arXiv 2404.07724). Default ``(0, 1)``: every step.

    Returns:
        float32 ``(B, C, T', H', W')`` on ``device``.

    Raises:
        ValueError: a wrong number of ``indices``, a ``cfg_interval`` that is not ``0 <= lo <= hi <= 1``,
            or ``cond_latents`` not ``(B, C, k, H', W')`` with
            ``1 <= k < T'`` and ``k`` a multiple of the model's temporal patch.
    """
    model.eval()
    B = len(prompts)
    indices = list(range(B)) if indices is None else list(indices)
    if len(indices) != B:
        raise ValueError(f"got {len(indices)} noise indices for {B} prompts")
    noise = torch.stack([prompt_noise(seed, i, latent_shape) for i in indices]).to(device)  # (B, C, T', H', W')
    k = 0
    if cond_latents is not None:
        k = cond_latents.shape[2] if cond_latents.ndim == 5 else -1
        if cond_latents.ndim != 5 or tuple(cond_latents.shape[:2]) != (B, latent_shape[0]) or not 1 <= k < latent_shape[1] \
                or tuple(cond_latents.shape[3:]) != tuple(latent_shape[2:]):
            raise ValueError(f"cond_latents must be (B, C, k, H', W') = ({B}, {latent_shape[0]}, k, "
                             f"{latent_shape[2]}, {latent_shape[3]}) with 1 <= k < T'={latent_shape[1]}; "
                             f"got {tuple(cond_latents.shape)}")
        pt = getattr(model, "patch_size", (1,))[0]
        if k % pt:
            raise ValueError(f"cond_latents: k={k} frames is not a multiple of the model's temporal patch {pt}")
        cond_latents = cond_latents.to(device=device, dtype=noise.dtype)
        noise[:, :, :k] = cond_latents  # the given frames start (and stay) clean
    given = torch.arange(latent_shape[1], device=device) < k  # (T',) True = a conditioning frame
    text, mask = encode_text(prompts)  # (B, L, D), (B, L)
    lo, hi = (float(c) for c in cfg_interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval must be (lo, hi) with 0 <= lo <= hi <= 1; got {tuple(cfg_interval)}")
    use_cfg = cfg_scale != 1.0
    every_step = lo <= 0.0 and hi >= 1.0  # guidance at every step: no per-step check
    if use_cfg:
        null_text, null_mask = encode_text([""] * B)
        text, mask = torch.cat([text, null_text]), torch.cat([mask, null_mask])
    device_type = torch.device(device).type

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if k:  # per-frame times: 0 on the given frames
            t = torch.where(given, torch.zeros_like(t)[:, None], t[:, None])  # (B, T')
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            if not use_cfg or not (every_step or lo <= float(t.max()) <= hi):  # a host sync only with an interval
                v = model(x, t, text[:B], mask[:B]).float()  # (B, C, T', H', W')
            else:
                v = flow.cfg_combine(*model(torch.cat([x, x]), torch.cat([t, t]), text, mask).float().chunk(2),
                                     cfg_scale)  # (B, C, T', H', W')
        if k:
            v = v.masked_fill(given[None, None, :, None, None], 0.0)  # the given frames do not move
        return v

    out = flow.sample_ode(velocity, noise, num_steps, shift=flow_shift, solver=solver, callback=callback)
    if k:
        out[:, :, :k] = cond_latents  # exactly as given (x + dt * 0 keeps them; this also fixes -0.0)
    return out


def cond_pixel_frames(vae: Autoencoder, latent_frames: int) -> int:
    """Pixel frames that ``latent_frames`` latent frames encode: the same number without temporal
    compression, ``1 + tc (k - 1)`` for a causal video VAE of temporal compression ``tc`` (its first
    latent frame is the first pixel frame alone)."""
    tc = getattr(vae, "temporal_compression", 1)
    return latent_frames if tc == 1 else 1 + tc * (latent_frames - 1)


@torch.no_grad()
def generate(model: torch.nn.Module, encode_text: TextFn, vae: Autoencoder, prompts: list[str], num_frames: int,
             height: int, width: int, num_steps: int = 20, cfg_scale: float = 1.0, flow_shift: float = 1.0,
             seed: int = 0, device: torch.device | str = "cpu", solver: str = "euler",
             callback: Callable | None = None, indices: Sequence[int] | None = None,
             dtype: torch.dtype = torch.float32, cond_video: torch.Tensor | None = None,
             cond_frames: int | None = None, cfg_interval: Sequence[float] = (0.0, 1.0)) -> torch.Tensor:
    """Sample one video per prompt (or continue a given video).

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
        indices, dtype, cfg_interval: see :func:`sample_latents`.
        cond_video: float ``(B, 3, Tc, H, W)`` in [-1, 1], pixel frames to continue (one clip per
            prompt, at the sample's geometry). Its first ``cond_frames`` latent frames (the first
            :func:`cond_pixel_frames` pixel frames, encoded by ``vae``) condition the sample and are
            kept fixed (:func:`sample_latents`); in the returned video those pixel frames are the
            given ones, unchanged.
        cond_frames: latent conditioning frames ``k`` (default: as many as ``cond_video`` holds).

    Returns:
        float32 ``(B, 3, T, H, W)`` in [-1, 1] (decoded by ``vae``), on CPU.

    Raises:
        ValueError: ``cond_video`` not ``(B, 3, Tc, H, W)``, or shorter than ``cond_frames`` latent
            frames need (and see :func:`sample_latents`).
    """
    latent = vae.latent_shape(num_frames, height, width)  # (C, T', H', W')
    cond, n_pix = None, 0
    if cond_video is not None:
        if cond_video.ndim != 5 or cond_video.shape[0] != len(prompts) or tuple(cond_video.shape[3:]) != (height, width):
            raise ValueError(f"cond_video must be (B, 3, Tc, H, W) = ({len(prompts)}, 3, Tc, {height}, {width}); "
                             f"got {tuple(cond_video.shape)}")
        if cond_frames is None:
            cond_frames = vae.latent_shape(cond_video.shape[2], height, width)[1]
        n_pix = cond_pixel_frames(vae, cond_frames)
        if cond_video.shape[2] < n_pix:
            raise ValueError(f"{cond_frames} conditioning latent frames need {n_pix} pixel frames; cond_video has "
                             f"{cond_video.shape[2]}")
        cond_video = cond_video[:, :, :n_pix].float()  # (B, 3, n_pix, H, W)
        cond = vae.encode(cond_video.to(device))[:, :, :cond_frames]  # (B, C, k, H', W')
    x0 = sample_latents(model, encode_text, latent, prompts, num_steps, cfg_scale, flow_shift, seed, device, solver,
                        indices=indices, dtype=dtype, callback=callback, cond_latents=cond,
                        cfg_interval=cfg_interval)  # (B, C, T', H', W')
    video = vae.decode(x0).float().clamp(-1, 1).cpu()  # (B, 3, T, H, W)
    if n_pix:
        video[:, :, :n_pix] = cond_video.cpu().clamp(-1, 1)  # the given frames, not their VAE reconstruction
    return video


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
    ap.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="apply guidance only at flow times LO <= t <= HI (default: the run's eval.cfg_interval)")
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
    ap.add_argument("--cond-video", default=None, help="continue this video file: its first --cond-frames latent "
                    "frames are given and kept (read at the run's fps, resized and cropped to its geometry)")
    ap.add_argument("--cond-clip", type=int, default=None, help="continue held-out clip number I of the run's data "
                    "(data.val_shards or data.val_fraction); its caption is the default prompt")
    ap.add_argument("--cond-frames", type=int, default=None,
                    help="latent frames given (default: the run's train.max_cond_frames, at least the temporal patch)")
    args = ap.parse_args(argv)

    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if args.cond_video and args.cond_clip is not None:
        ap.error("give --cond-video or --cond-clip, not both")
    if not prompts and args.cond_clip is None:
        ap.error("give at least one --prompt or a --prompts-file")
    if not args.run_dir and not args.weights:
        ap.error("give --run-dir or --weights")
    try:
        cfg, model, text_encoder, vae, step, dev = load_run(args.run_dir, args.checkpoint, not args.no_ema, args.device,
                                                            args.weights)
    except (FileNotFoundError, ValueError) as exn:  # incl. CheckpointError: a checkpoint that is not plain data
        print(f"vdit-sample: {exn}", file=sys.stderr)
        return 1
    from vdit.data.decode import DecodeError
    from vdit.eval.hook import write_samples
    from vdit.train.build import TextCache

    d, e = cfg.data, cfg.eval

    def pick(value, default):
        return default if value is None else value

    num_frames, height, width = args.num_frames or d.num_frames, args.height or d.height, args.width or d.width
    cond_video, cond_frames, info = None, None, {}
    if args.cond_video or args.cond_clip is not None:
        cond_frames = args.cond_frames or max(cfg.model.patch_size[0], cfg.train.max_cond_frames)
        latent_t, pt = vae.latent_shape(num_frames, height, width)[1], cfg.model.patch_size[0]
        if not (1 <= cond_frames < latent_t and cond_frames % pt == 0):
            print(f"vdit-sample: --cond-frames {cond_frames} must be >= 1, < {latent_t} (the latent frames of "
                  f"{num_frames} frames) and a multiple of the temporal patch {pt}", file=sys.stderr)
            return 1
        try:
            clip, caption = load_cond_video(cfg, vae, args.cond_video, args.cond_clip,
                                            cond_pixel_frames(vae, cond_frames), height, width)
        except (OSError, ValueError, RuntimeError, DecodeError) as exn:  # unreadable, too short, no held-out clip
            print(f"vdit-sample: {exn}", file=sys.stderr)
            return 1
        prompts = prompts or [caption]
        cond_video = clip[None].expand(len(prompts), *clip.shape)  # (B, 3, Tc, H, W)
        info = {"cond": {"source": args.cond_video or f"held-out clip {args.cond_clip}",
                         "latent_frames": cond_frames, "pixel_frames": cond_pixel_frames(vae, cond_frames)}}
    videos = generate(model, TextCache(text_encoder, cfg.text_encoder.max_length, dev), vae, prompts,
                      num_frames, height, width,
                      pick(args.num_steps, e.num_steps), pick(args.cfg_scale, e.cfg_scale),
                      pick(args.flow_shift, e.flow_shift), args.seed, dev, solver=pick(args.solver, e.solver),
                      cond_video=cond_video, cond_frames=cond_frames,
                      cfg_interval=pick(args.cfg_interval, list(e.cfg_interval)))
    out = args.out or os.path.join(args.run_dir or args.weights, "samples", f"step-{step}")
    paths = write_samples(out, videos, prompts, args.fps or d.target_fps or 8.0)
    print(json.dumps({"step": step, "samples": paths, "contact_sheet": os.path.join(out, "contact_sheet.png"),
                      **info}, indent=2))
    return 0


def load_cond_video(cfg, vae: Autoencoder, path: str | None, clip: int | None, pixel_frames: int, height: int,
                    width: int) -> tuple[torch.Tensor, str]:
    """Conditioning frames for ``vdit-sample``: float32 ``(3, Tc, height, width)`` in [-1, 1] and a caption.

    From ``path`` (a video file; ``pixel_frames`` frames read at ``data.target_fps`` or every
    ``data.frame_stride``-th frame, resized to cover and centre-cropped; caption ``""``), or held-out
    clip number ``clip`` of the run's data (:func:`vdit.train.validation.load_val_clips`: pixel clips
    as they are, latent clips decoded by ``vae``; its caption).

    Raises:
        OSError: an unreadable file. vdit.data.decode.DecodeError: not a video, or too short.
        RuntimeError: no held-out clip. ValueError: fewer than ``clip + 1`` held-out clips.
    """
    from vdit.data.decode import decode_clip
    from vdit.data.transforms import clip_to_model_input, to_model_range

    d = cfg.data
    if path is not None:
        with open(path, "rb") as f:
            frames, _ = decode_clip(f.read(), pixel_frames, target_fps=d.target_fps,
                                    stride=None if d.target_fps else d.frame_stride, name=path)
        return clip_to_model_input(frames, height, width), ""
    from vdit.train.validation import load_val_clips

    clips = load_val_clips(cfg, clip + 1)
    if len(clips) <= clip:
        raise ValueError(f"--cond-clip {clip}: the run's data holds {len(clips)} held-out clips")
    c = clips[clip]
    video = to_model_range(c["video"]) if "video" in c else vae.decode(c["latent"][None].float())[0].float().cpu()
    return video, c["caption"]


if __name__ == "__main__":
    sys.exit(main())

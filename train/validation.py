"""Validation loss: the flow loss on held-out clips at fixed timesteps with fixed noise.

The number every run and every scaling-law fit needs. It is comparable across steps, runs and
parallel layouts because nothing about it is random per run:

- the clips: ``data.val_shards``, or the ``data.val_fraction`` of source videos held out by a fixed
  hash (:mod:`vdit.data.split`), read in one fixed order (one data slot, no shuffle) by every rank;
  at most ``eval.val_clips`` of them;
- the timesteps: ``eval.val_timesteps`` (default 0.05, 0.25, 0.5, 0.75, 0.95), no shift;
- the noise: one draw per clip from a generator seeded by the clip key alone, shared by its
  timesteps;
- the caption: always the clip's own (no dropout).

Each data-parallel rank scores clips ``i`` with ``i % dp_size == dp_rank``; sums are all-reduced over
the data-parallel group, and every rank makes the same number of forward calls (padding calls
carry weight 0) so FSDP's collectives and sequence-parallel all-to-alls always pair up. Ranks of one
sequence-parallel group score the same clips together.

Logged keys: ``loss/val`` (mean over clips and timesteps), ``loss/val@t=0.50`` (per timestep),
``val/x0_mse`` and ``val/x0_mse@t=0.50``: the mean squared error of the one-step clean estimate
``x0_hat = x_t - t v(x_t, t)`` against the clip (in latent units; pixels in [-1, 1] for the identity
autoencoder), the number that shows whether the network learned the data near pure noise.
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Any, Callable

import torch

from vdit.data.pipeline import ClipSpec, ShardReadSpec, VideoPipeline
from vdit.model import flow

log = logging.getLogger(__name__)

__all__ = ["load_val_clips", "Validator"]

TextFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def load_val_clips(cfg, max_clips: int) -> list[dict[str, Any]]:
    """The held-out clips, in a fixed order: ``[{"key", "caption", "video" uint8 (C, T, H, W)} | {"key",
    "caption", "latent" (C, T', H', W'), "text" (L, D), "text_mask" (L,)}]``, at most ``max_clips``.

    Reads ``cfg.data.val_shards`` (every clip) or ``cfg.data.shards`` (the clips whose source is held
    out by ``data.val_fraction``) through one unshuffled data slot at the fixed geometry
    ``data.num_frames x data.height x data.width``, until ``max_clips`` clips or the end of one pass.

    Raises:
        RuntimeError: no held-out clip exists (names the setting to change).
    """
    d = cfg.data
    split, shards = ("all", d.val_shards) if d.val_shards else ("val", d.shards)
    spec = ClipSpec(d.num_frames, d.height, d.width, d.target_fps, d.frame_stride, random_crop=False, shuffle=False,
                    seed=d.seed, split=split, held_out_fraction=d.val_fraction)
    pipe = VideoPipeline(shards, spec, 1, dp_rank=0, dp_size=1, num_workers=0, video_dtype="uint8",
                         read=ShardReadSpec(d.read_retries, d.read_backoff_s, d.read_timeout_s),
                         patch_size=tuple(cfg.model.patch_size))
    clips: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        for batch in pipe:
            if batch["item"][0][0] > 0 or len(clips) >= max_clips:  # the second pass begins: all clips seen
                break
            key = batch["key"][0]
            if key in seen:
                continue
            seen.add(key)
            clip = {"key": key, "caption": batch["caption"][0]}
            for name in ("video", "latent", "text", "text_mask"):
                if name in batch:
                    clip[name] = batch[name][0]
            clips.append(clip)
    except RuntimeError as exn:
        if "no usable clip" not in str(exn):
            raise
        where = f"data.val_shards={d.val_shards!r}" if d.val_shards else \
            f"data.val_fraction={d.val_fraction} of data.shards={d.shards!r}"
        raise RuntimeError(f"validation: no held-out clip in {where}; raise data.val_fraction or give "
                           f"data.val_shards ({exn})") from exn
    return clips


class Validator:
    """Computes the validation metrics for a model (see the module docstring).

    Args:
        cfg: the :class:`~vdit.train.config.TrainConfig`.
        encoders: ``() -> (text_encoder, vae, encode_text)``, called only when a clip is video (never
            for latent shards, so a Trainer on latent shards builds no encoder for validation); ``vae``
            is the frozen autoencoder, ``encode_text`` maps ``captions -> (text (B, L, D), mask (B, L))``.
        device: where the forward passes run.
        dtype: autocast dtype (fp32 disables autocast).
        dp_rank, dp_size, dp_group: this rank's data-parallel slot and the group to all-reduce over
            (``None`` when not distributed).
    """

    def __init__(self, cfg, encoders: Callable[[], tuple[Any, Any, TextFn]], device: torch.device,
                 dtype: torch.dtype, dp_rank: int = 0, dp_size: int = 1, dp_group=None):
        self.cfg, self.encoders, self.device, self.dtype = cfg, encoders, device, dtype
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group
        self.timesteps = [float(t) for t in cfg.eval.val_timesteps]
        self._clips: list[dict[str, Any]] | None = None  # encoded once: x0, text, mask, noise on the host

    def clips(self) -> list[dict[str, Any]]:
        """The encoded held-out clips (loaded and encoded on first use, then kept on the host)."""
        if self._clips is None:
            self._clips = [self._encode(c) for c in load_val_clips(self.cfg, self.cfg.eval.val_clips)]
            log.info("validation: %d held-out clips, timesteps %s", len(self._clips), self.timesteps)
        return self._clips

    @torch.no_grad()
    def _encode(self, clip: dict[str, Any]) -> dict[str, Any]:
        if "latent" in clip:
            x0, text, mask = clip["latent"].float(), clip["text"].float(), clip["text_mask"]
        else:
            _, vae, encode_text = self.encoders()
            video = clip["video"][None].to(self.device).float() / 127.5 - 1.0  # (1, 3, T, H, W) in [-1, 1]
            x0 = vae.encode(video)[0].float().cpu()  # (C, T', H', W')
            text, mask = encode_text([clip["caption"]])  # (1, L, D), (1, L)
            text, mask = text[0].float().cpu(), mask[0].cpu()
        g = torch.Generator().manual_seed(zlib.crc32(("val:" + clip["key"]).encode()))
        noise = torch.randn(x0.shape, generator=g)  # one fixed draw per clip
        return {"key": clip["key"], "x0": x0, "text": text, "mask": mask, "noise": noise}

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """Score ``model`` (sharded or not; every rank of the job must call this together).

        Returns ``{"loss/val", "loss/val@t=...", "val/x0_mse", "val/x0_mse@t=...", "val/num_clips"}``
        (the same on every rank).
        """
        clips = self.clips()
        ts = torch.tensor(self.timesteps, device=self.device)  # (K,)
        K = len(self.timesteps)
        sums = torch.zeros(3, K, dtype=torch.float64, device=self.device)  # loss, x0 mse, count
        mine = list(range(self.dp_rank, len(clips), self.dp_size))
        calls = math.ceil(len(clips) / self.dp_size)  # the same on every rank
        was_training = model.training
        model.eval()
        for j in range(calls):
            real = j < len(mine)
            c = clips[mine[j] if real else 0]
            x0 = c["x0"].to(self.device)[None].expand(K, *c["x0"].shape)  # (K, C, T', H', W')
            noise = c["noise"].to(self.device)[None].expand_as(x0)
            xt = flow.interpolate(x0, noise, ts)  # (K, C, T', H', W')
            text = c["text"].to(self.device)[None].expand(K, *c["text"].shape)  # (K, L, D)
            mask = c["mask"].to(self.device)[None].expand(K, *c["mask"].shape)  # (K, L)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                v = model(xt, ts, text, mask).float()  # (K, C, T', H', W')
            loss, _ = flow.flow_loss(v, flow.velocity_target(x0, noise))  # (K,)
            x0_err = (flow.x0_from_velocity(xt, v, ts) - x0).square().flatten(1).mean(1)  # (K,)
            w = 1.0 if real else 0.0
            sums[0] += w * loss.double()
            sums[1] += w * x0_err.double()
            sums[2] += w
        model.train(was_training)
        if self.dp_group is not None:
            torch.distributed.all_reduce(sums, group=self.dp_group)
        per_t = (sums[:2] / sums[2].clamp_min(1)).tolist()  # host sync: once per validation
        out: dict[str, float] = {"loss/val": sum(per_t[0]) / K, "val/x0_mse": sum(per_t[1]) / K,
                                 "val/num_clips": float(sums[2, 0])}
        for k, t in enumerate(self.timesteps):
            out[f"loss/val@t={t:.2f}"] = per_t[0][k]
            out[f"val/x0_mse@t={t:.2f}"] = per_t[1][k]
        return out

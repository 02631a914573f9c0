"""Per-sample training draws: flow time ``t``, noise and caption dropout, seeded by the sample.

Every draw of a training sample comes from generators seeded by ``(train.seed, step, clip key,
repeat)`` (``repeat`` counts a key's earlier occurrences in the same micro-batch), so the draws do
not depend on how the global batch is split over ranks or accumulation steps, nor on anything
before this step: a resumed run needs no generator state to continue exactly, and a 2-rank run
draws the same numbers for a sample as a 1-rank run.

Where the noise is drawn (``train.noise_device``):

- ``host``: from the sample's CPU generator after its dropout and ``t`` draws, then copied to
  the training device. The CPU default (no copy at all there).
- ``device``: from a generator on the training device, seeded by a second word of the sample's
  seed sequence. The CUDA default: a Wan 480p latent is about 8 MB per sample, which ``host``
  would draw on the CPU and copy every step. The numbers differ from ``host``'s (another
  stream, and CUDA's Philox generator) but keep both properties above.
- ``auto``: ``device`` on CUDA, ``host`` elsewhere.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from vdit.model import flow

__all__ = ["NOISE_DEVICES", "resolve_noise_device", "sample_draws"]

NOISE_DEVICES = ("auto", "host", "device")


def resolve_noise_device(mode: str, device: torch.device) -> torch.device | None:
    """``train.noise_device`` -> the device to draw noise on, or ``None`` for the host stream.

    Raises:
        ValueError: ``mode`` is not one of :data:`NOISE_DEVICES`.
    """
    if mode not in NOISE_DEVICES:
        raise ValueError(f"train.noise_device must be one of {NOISE_DEVICES}; got {mode!r}")
    if mode == "device" or (mode == "auto" and device.type == "cuda"):
        return device
    return None


def sample_draws(keys: list[str], latent_shape: tuple[int, ...], *, seed: int, step: int, caption_dropout: float,
                 flow_cfg: Any, shift: float, noise_device: torch.device | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Timesteps, noise and caption-dropout flags of one micro-batch.

    Args:
        keys: the samples' clip keys, ``B`` of them (a key may repeat: each occurrence gets fresh draws).
        latent_shape: ``(C, T', H', W')`` of one sample.
        seed, step: ``train.seed`` and the optimizer step being computed.
        caption_dropout: probability of replacing a caption by the empty one.
        flow_cfg: the ``flow`` config (``timestep_sampling``, ``logit_mean``, ``logit_std``).
        shift: the timestep shift for this latent shape (``flow.shift_timesteps``).
        noise_device: ``None`` draws the noise on the host stream; a device draws it there
            (:func:`resolve_noise_device`).

    Returns:
        ``t (B,)`` float32 on the host, ``noise (B, *latent_shape)`` float32 (host or
        ``noise_device``), and ``B`` dropout flags.
    """
    ts, noises, drops = [], [], []
    seen: dict[str, int] = {}
    for key in keys:
        n = seen[key] = seen.get(key, -1) + 1  # a clip twice in one step still gets fresh draws
        words = np.random.SeedSequence([seed, step, zlib.crc32(key.encode()), n]).generate_state(2, np.uint64)
        g = torch.Generator().manual_seed(int(words[0] >> 1))
        drops.append(bool(torch.rand((), generator=g) < caption_dropout))
        ts.append(flow.sample_timesteps(1, generator=g, mode=flow_cfg.timestep_sampling,
                                        logit_mean=flow_cfg.logit_mean, logit_std=flow_cfg.logit_std,
                                        uniform_frac=flow_cfg.uniform_frac, uniform_min=flow_cfg.uniform_min))
        if noise_device is None:
            noises.append(torch.randn(latent_shape, generator=g))
        else:
            gd = torch.Generator(device=noise_device).manual_seed(int(words[1] >> 1))
            noises.append(torch.randn(latent_shape, generator=gd, device=noise_device))
    t = flow.shift_timesteps(torch.cat(ts), shift)  # (B,)
    return t, torch.stack(noises), drops  # (B,), (B, C, T', H', W'), [B]

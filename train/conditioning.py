"""Frame-conditioned continuation in training: some samples are given their first k latent frames clean.

With probability ``train.cond_frames_prob`` a sample of a training step becomes a continuation
sample: its first ``k`` latent frames (``k`` uniform in ``pt, 2 pt, ..., max_cond_frames``, ``pt``
the temporal patch, and always fewer than the clip's latent frames) are given to the model clean,
at flow time 0, and are left out of its loss; the other frames are noised to the sample's ``t``
as usual. One model so learns text-to-video (``k = 0``) and image-/video-to-video continuation
(``k >= 1``), which :func:`vdit.eval.sample.sample_latents` samples by holding the given frames fixed.

What the model sees (:class:`FrameConditioning`)::

    x_t[:, :, f] = x0[:, :, f]                          f <  k   (clean)
                 = (1 - t) x0[:, :, f] + t noise[...]    f >= k
    model time   = (B, T) with 0 for f < k and t for f >= k   (per-token adaLN, vdit.model.dit)
    loss weight  = 0 for f < k, T / (T - k) for f >= k     (times any other per-element weight)

The rescaling keeps each sample's loss the mean squared error over the frames it predicts, so a
continuation sample weighs as much in the step as a text-to-video one.

Determinism: ``k`` comes from a generator seeded by ``(train.seed, step, sample key, repeat, tag)``,
the per-sample seeding of :func:`vdit.train.draws.sample_draws` plus a tag of its own,
so turning conditioning on changes no timestep, noise or caption-dropout draw, every rank of a
sequence-parallel group picks the same ``k`` for the same sample, and a resumed run picks the same
``k`` again.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["FrameConditioning", "choose_cond_frames", "frame_conditioning"]

_TAG = 0xC0DE  # separates these draws from the sample's timestep / noise stream


@dataclass(frozen=True)
class FrameConditioning:
    """Per-sample conditioning frame counts of one micro-batch and what follows from them.

    Attributes:
        frames: int64 ``(B,)`` conditioning latent frames per sample (0: a text-to-video sample).
        num_frames: latent frames ``T`` of the batch's clips.
    """

    frames: torch.Tensor
    num_frames: int

    def _cond(self, device: torch.device) -> torch.Tensor:
        f = torch.arange(self.num_frames, device=device)  # (T,)
        return f[None] < self.frames.to(device)[:, None]  # (B, T) True = a given (clean) frame

    def model_t(self, t: torch.Tensor) -> torch.Tensor:
        """The model's per-frame time: ``t (B,)`` -> ``(B, T)``, 0 on the conditioning frames."""
        return torch.where(self._cond(t.device), torch.zeros_like(t)[:, None], t[:, None])  # (B, T)

    def path_t(self, t: torch.Tensor) -> torch.Tensor:
        """The interpolation time for :func:`vdit.model.flow.interpolate`: ``t (B,)`` ->
        ``(B, 1, T, 1, 1)``, 0 on the conditioning frames (``x_t`` there is exactly ``x0``)."""
        return self.model_t(t)[:, None, :, None, None]  # (B, 1, T, 1, 1)

    def loss_weight(self, element_weight: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``(B, 1, T, 1, 1)`` loss weights: 0 on the conditioning frames, ``T / (T - k)``
        elsewhere, times ``element_weight`` (broadcastable, e.g. ``(B, 1, T, H, W)``) when given."""
        device = self.frames.device if element_weight is None else element_weight.device
        keep = (~self._cond(device)).float()  # (B, T)
        w = keep * (self.num_frames / keep.sum(1, keepdim=True).clamp_min(1.0))  # (B, T)
        w = w[:, None, :, None, None]  # (B, 1, T, 1, 1)
        return w if element_weight is None else w * element_weight.float()


def choose_cond_frames(seed: int, step: int, keys: list[str], prob: float, max_frames: int, num_frames: int,
                       patch_t: int = 1) -> torch.Tensor:
    """Conditioning latent frames per sample, int64 ``(B,)`` on CPU (module docstring).

    Args:
        seed, step: ``train.seed`` and the optimizer step.
        keys: the samples' keys (a key seen twice in one batch gets fresh draws, as its noise does).
        prob: probability that a sample is conditioned (``train.cond_frames_prob``).
        max_frames: most conditioning frames (``train.max_cond_frames``).
        num_frames: latent frames ``T`` of the clips; at least ``patch_t`` frames stay unconditioned.
        patch_t: temporal patch ``pt``; ``k`` is a multiple of it (a token has one time).

    Raises:
        ValueError: ``prob`` outside ``[0, 1]`` or negative ``max_frames``.
    """
    if not 0.0 <= prob <= 1.0 or max_frames < 0:
        raise ValueError(f"cond_frames_prob={prob} must be in [0, 1] and max_cond_frames={max_frames} >= 0")
    top = min(max_frames, num_frames - patch_t) // patch_t  # choices k = patch_t * (1 .. top)
    out, seen = [], {}
    for key in keys:
        n = seen[key] = seen.get(key, -1) + 1
        rng = np.random.default_rng(np.random.SeedSequence([seed, step, zlib.crc32(key.encode()), n, _TAG]))
        use, pick = rng.random(), rng.integers(1, top + 1) if top >= 1 else 0
        out.append(int(pick) * patch_t if top >= 1 and use < prob else 0)
    return torch.tensor(out, dtype=torch.int64)


def frame_conditioning(cfg, step: int, keys: list[str], num_frames: int) -> FrameConditioning | None:
    """The micro-batch's :class:`FrameConditioning`, or None when ``train.cond_frames_prob`` is 0
    (the plain text-to-video path, unchanged) or no sample of the batch drew conditioning frames.

    Args:
        cfg: the :class:`~vdit.train.config.TrainConfig` (``train.seed``, ``train.cond_frames_prob``,
            ``train.max_cond_frames``, ``model.patch_size``).
        step: the optimizer step; ``keys``: the samples' keys; ``num_frames``: latent frames ``T``.
    """
    loop = cfg.train
    if loop.cond_frames_prob <= 0 or loop.max_cond_frames <= 0:
        return None
    frames = choose_cond_frames(loop.seed, step, list(keys), loop.cond_frames_prob, loop.max_cond_frames,
                                num_frames, int(cfg.model.patch_size[0]))
    return FrameConditioning(frames, num_frames) if bool(frames.any()) else None

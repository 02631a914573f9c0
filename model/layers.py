"""Building blocks of the video DiT: 3D patch embedding, timestep and text embeddings, MLP, RMSNorm, modulate().

The timestep embedder and ``modulate`` follow DiT (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers"); the caption projection follows PixArt-alpha (Chen et al. 2023).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["patch_grid", "sincos_pos_embed_3d", "PatchEmbed3D", "TimestepEmbedding", "TextProjection", "Mlp", "RMSNorm",
           "TokenFrames", "modulate", "per_token", "per_frame_apply", "per_sample_term", "mlp_activation",
           "MLP_ACTIVATIONS"]


def patch_grid(patch_size: Sequence[int], num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Token grid ``(T', H', W') = (T/pt, H/ph, W/pw)`` of a latent video.

    Args:
        patch_size: ``(pt, ph, pw)``.
        num_frames, height, width: latent ``T, H, W`` (after the autoencoder, not pixels).

    Raises:
        ValueError: if a dim is not divisible by its patch size (names the dim and the patch).
    """
    pt, ph, pw = patch_size
    bad = [
        f"{name}={size} % {p} != 0"
        for name, size, p in (("T", num_frames, pt), ("H", height, ph), ("W", width, pw))
        if size % p != 0 or size <= 0
    ]
    if bad:
        raise ValueError(
            f"latent (T, H, W)=({num_frames}, {height}, {width}) is not divisible by "
            f"patch_size (pt, ph, pw)={tuple(patch_size)}: {', '.join(bad)}"
        )
    return num_frames // pt, height // ph, width // pw


def sincos_pos_embed_3d(grid: Sequence[int], dim: int, device: torch.device | str | None = None,
                        base: float = 10000.0) -> torch.Tensor:
    """Fixed absolute 3D sin-cos position embedding of a ``(T', H', W')`` token grid, ``(L, dim)`` fp32.

    The 1D embedding of Vaswani et al. 2017 (``[sin(p w_i), cos(p w_i)]``, ``w_i = base^(-i / half)``)
    of the integer token index along each axis, concatenated: the time axis takes
    ``2 * (dim // 8)`` channels and height and width split the rest evenly (even counts), like DiT's
    2D table (Peebles & Xie 2023) extended with a time axis. Rows are in (t, h, w) raster order,
    the order of :class:`PatchEmbed3D`'s tokens.

    Raises:
        ValueError: if ``dim < 8`` or not even.
    """
    if dim < 8 or dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even dim >= 8; got {dim}")
    d_t = 2 * (dim // 8)
    d_h = 2 * ((dim - d_t) // 4)
    d_w = dim - d_t - d_h
    tables = []
    for n, d in zip(grid, (d_t, d_h, d_w)):
        half = d // 2
        w = base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)  # (half,)
        ang = torch.arange(int(n), device=device, dtype=torch.float32)[:, None] * w[None]  # (n, half)
        tables.append(torch.cat([ang.sin(), ang.cos()], dim=-1))  # (n, d)
    T, H, W = (int(n) for n in grid)
    return torch.cat([
        tables[0][:, None, None].expand(T, H, W, d_t),
        tables[1][None, :, None].expand(T, H, W, d_h),
        tables[2][None, None, :].expand(T, H, W, d_w),
    ], dim=-1).reshape(T * H * W, dim)  # (L, dim)


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches -> tokens: ``Conv3d(kernel = stride = patch_size)``, optionally plus
    a fixed absolute sin-cos position embedding (:func:`sincos_pos_embed_3d`).

    The position embedding is added here, inside the module, so a sequence-parallel hook on this
    module's output splits tokens that already carry it.

    Args:
        patch_size: ``(pt, ph, pw)``.
        in_channels: latent channels ``C``.
        hidden_size: token width ``D``.
        pos_embed: ``"none"`` (RoPE alone carries positions) or ``"sincos"``.

    Raises:
        ValueError: a bad ``patch_size`` or ``pos_embed``.
    """

    def __init__(self, patch_size: Sequence[int], in_channels: int, hidden_size: int, pos_embed: str = "none"):
        super().__init__()
        if len(patch_size) != 3 or any(int(p) <= 0 for p in patch_size):
            raise ValueError(f"patch_size must be three positive ints (pt, ph, pw); got {patch_size}")
        if pos_embed not in ("none", "sincos"):
            raise ValueError(f"pos_embed must be 'none' or 'sincos'; got {pos_embed!r}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.pos_embed = pos_embed
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def grid_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """``(T', H', W')`` for a latent of ``(T, H, W)``; raises ValueError if indivisible."""
        return patch_grid(self.patch_size, num_frames, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a latent video.

        Args:
            x: ``(B, C, T, H, W)``.

        Returns:
            ``(B, L, D)`` with ``L = T' * H' * W'`` in (t, h, w) raster order (t slowest).

        Raises:
            ValueError: if ``T, H, W`` are not divisible by ``patch_size``.
        """
        grid = self.grid_size(*x.shape[2:])  # validates divisibility with a readable message
        x = self.proj(x)  # (B, D, T', H', W')
        # contiguous: the transposed view would set the layout of the whole residual stream (elementwise
        # ops keep their first input's strides), and every LayerNorm would copy it, forward and backward
        x = rearrange(x, "b d t h w -> b (t h w) d").contiguous()  # (B, L, D)
        if self.pos_embed == "sincos":
            x = x + sincos_pos_embed_3d(grid, self.hidden_size, x.device).to(x.dtype)  # (B, L, D)
        return x


class TimestepEmbedding(nn.Module):
    """Flow time ``t in [0, 1]`` -> ``(B, D)``: sinusoid of ``1000 t`` then Linear, SiLU, Linear (DiT).

    Scaling by ``time_scale = 1000`` puts the flow time on the 0..1000 range the DiT frequency
    embedding was designed for, so neighbouring timesteps get distinguishable features.

    Args:
        hidden_size: output width ``D``.
        frequency_embedding_size: sinusoid width (even).
        max_period: lowest frequency is ``1 / max_period``.
        time_scale: multiplier applied to ``t`` before the sinusoid.
    """

    def __init__(
        self,
        hidden_size: int,
        frequency_embedding_size: int = 256,
        max_period: float = 10000.0,
        time_scale: float = 1000.0,
    ):
        super().__init__()
        if frequency_embedding_size % 2:
            raise ValueError(f"frequency_embedding_size must be even; got {frequency_embedding_size}")
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.time_scale = time_scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """``(B,)`` times -> ``(B, frequency_embedding_size)`` fp32 features ``[cos(w t'), sin(w t')]``
        with ``t' = time_scale * t`` and ``w_i = max_period ** (-i / half)``."""
        half = self.frequency_embedding_size // 2
        i = torch.arange(half, device=t.device, dtype=torch.float32)  # (half,)
        freqs = torch.exp(-math.log(self.max_period) * i / half)  # (half,)
        args = (t.float() * self.time_scale)[:, None] * freqs[None, :]  # (B, half)
        return torch.cat([args.cos(), args.sin()], dim=-1)  # (B, 2 * half)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Args: t ``(B,)`` float flow time. Returns ``(B, D)``."""
        emb = self.sinusoid(t)  # (B, F)
        emb = emb.to(self.mlp[0].weight.dtype)  # (B, F) in the parameter dtype
        return self.mlp(emb)  # (B, D)


class TextProjection(nn.Module):
    """Caption projection (PixArt-alpha): ``(B, Lc, text_dim) -> (B, Lc, D)`` via Linear, GELU(tanh), Linear."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(text_dim, hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Args: y ``(B, Lc, text_dim)`` text-encoder hidden states. Returns ``(B, Lc, D)``."""
        y = self.fc1(y)  # (B, Lc, D)
        y = self.act(y)  # (B, Lc, D)
        return self.fc2(y)  # (B, Lc, D)


MLP_ACTIVATIONS = ("gelu_tanh", "gelu", "silu")


def mlp_activation(name: str) -> nn.Module:
    """The activation module named by ``DiTConfig.mlp_act``: ``gelu_tanh`` (GELU, tanh approximation: DiT,
    Wan), ``gelu`` (exact erf GELU) or ``silu``.

    Raises:
        ValueError: an unknown name (lists the valid ones).
    """
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"mlp_act={name!r} is not one of {list(MLP_ACTIVATIONS)}")


class Mlp(nn.Module):
    """Transformer feed-forward: Linear, activation (GELU(tanh) by default), Linear.

    Args:
        in_features: input width ``D``.
        hidden_features: inner width.
        out_features: output width (default ``in_features``).
        act: activation name, see :func:`mlp_activation`.

    Raises:
        ValueError: an unknown ``act``.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 act: str = "gelu_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = mlp_activation(act)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(..., D)``. Returns ``(..., out_features)``."""
        x = self.fc1(x)  # (B, L, Dm)
        x = self.act(x)  # (B, L, Dm)
        return self.fc2(x)  # (B, L, D)


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` whose gain is applied in the input's dtype, so mixed precision keeps the fused kernel.

    Under autocast the input is bf16 (a Linear's output) while the weight stays fp32; ``F.rms_norm``
    with mismatched dtypes cannot use the fused kernel and falls back to the composite one (a
    warning per call, about 2.4x slower on GPU). Casting the weight to the input dtype (a
    differentiable cast: the gradient still reaches the fp32 weight) lets the fused kernel run.
    The fused kernel accumulates the mean square in fp32 whatever the input dtype, so the
    normalisation statistics keep fp32 numerics; only the per-channel gain is rounded to bf16,
    which the bf16 output (fed to the attention kernel) is rounded to anyway. Computing the whole
    norm in fp32 and casting back was the alternative: same statistics, but fp32 reads and writes
    of the activation and two extra cast kernels, for a gain that stays bf16-rounded in the output.
    With fp32 inputs nothing changes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(..., D)``. Returns ``(..., D)`` in ``x.dtype``."""
        weight = self.weight
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)  # (D,) in the compute dtype
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)  # (..., D)


def per_token(v: torch.Tensor) -> torch.Tensor:
    """A modulation vector ready to broadcast over tokens: ``(B, D) -> (B, 1, D)``; ``(B, L, D)`` (one
    vector per token, per-frame timesteps) is returned as it is."""
    return v[:, None] if v.ndim == 2 else v


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation (DiT): ``x * (1 + scale) + shift`` broadcast over tokens.

    Args:
        x: ``(B, L, D)``.
        shift, scale: ``(B, D)`` (one per sample) or ``(B, L, D)`` (one per token).

    Returns:
        ``(B, L, D)``.
    """
    return x * (1 + per_token(scale)) + per_token(shift)


class TokenFrames(nn.Module):
    """Parameter-free: the temporal grid index of every patch token, for per-frame conditioning.

    A module (not a function) so that parallelism can shard its output like the tokens: sequence
    parallelism hooks it exactly as it hooks ``rope`` (:mod:`vdit.train.parallel.sequence`).
    """

    def forward(self, grid: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
        """Args: grid ``(T', H', W')`` token grid. Returns int64 ``(L,)``: token ``l`` (in ``(t h w)``
        order, the order of :class:`PatchEmbed3D`'s tokens) lies in temporal slice ``l // (H' W')``."""
        t, h, w = (int(g) for g in grid)
        return torch.arange(t, device=device).repeat_interleave(h * w)  # (L,)


def per_frame_apply(fn: Callable[[torch.Tensor], torch.Tensor], c: torch.Tensor, per_frame: bool) -> torch.Tensor:
    """``fn(c)`` for per-sample conditioning; for per-frame conditioning ``fn`` on each frame, stacked.

    Per frame, ``c`` has a frame dim 1 that ``fn`` does not take: ``(B, F)`` times for the timestep
    embedder, ``(B, F, D)`` embeddings for a modulation Linear. ``fn`` runs once per frame on
    ``c[:, f]`` (the batch shape of the per-sample path) and the results are stacked on dim 1, giving
    ``(B, F, ...)``: a matmul over ``B * F`` rows may round differently from one over ``B`` rows, and
    equal per-frame times must give bit-identically the per-sample result. The ``F`` small launches
    are negligible next to the blocks.
    """
    if not per_frame:
        return fn(c)  # (B,) times or (B, D): the per-sample path
    return torch.stack([fn(c[:, f].contiguous()) for f in range(c.shape[1])], dim=1)  # (B, F, ...)


def per_sample_term(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample ``(B, D)`` term broadcast to ``like``'s layout: ``(B, 1, D)`` when ``like`` is per
    frame ``(B, T', D)``, else unchanged."""
    return v[:, None] if like.ndim == 3 else v

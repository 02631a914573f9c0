"""Autoencoder interface between pixels and the latent space the DiT works in.

Pixels are ``(B, 3, T, H, W)`` float in ``[-1, 1]``; latents are ``(B, C, T', H', W')``. The
offline default is :class:`IdentityAutoencoder` (pixel-space diffusion). Pretrained video VAEs
(diffusers ``AutoencoderKLWan`` and friends, loaded from a local path) arrive in a later change.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Autoencoder", "IdentityAutoencoder", "build_autoencoder"]


class Autoencoder(nn.Module):
    """Base class of frozen autoencoders.

    Attributes:
        latent_channels: ``C`` of the latent (``DiTConfig.in_channels`` must equal it).
        temporal_compression: frames per latent frame (after the first one, for causal VAEs).
        spatial_compression: pixels per latent pixel along H and W.
    """

    latent_channels: int
    temporal_compression: int
    spatial_compression: int

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` in ``[-1, 1]`` -> ``(B, C, T', H', W')`` (scaled latents)."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, C, T', H', W')`` -> ``(B, 3, T, H, W)`` in ``[-1, 1]``."""
        raise NotImplementedError

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Latent ``(C, T', H', W')`` for a pixel clip of ``(T, H, W)``.

        With ``temporal_compression == 1``, ``T' = T``; otherwise the causal-VAE convention used by
        the Wan / HunyuanVideo / CogVideoX VAEs: the first frame is encoded alone, so
        ``T' = 1 + (T - 1) / temporal_compression`` (e.g. 81 -> 21 with compression 4).
        ``H' = H / spatial_compression``, ``W' = W / spatial_compression``.

        Raises:
            ValueError: if the sizes do not fit the compression factors.
        """
        tc, sc = self.temporal_compression, self.spatial_compression
        if num_frames < 1 or (tc > 1 and (num_frames - 1) % tc != 0):
            raise ValueError(f"num_frames={num_frames} must be 1 + k * {tc} for temporal_compression={tc}")
        if height % sc or width % sc:
            raise ValueError(f"height={height}, width={width} must be divisible by spatial_compression={sc}")
        t = num_frames if tc == 1 else 1 + (num_frames - 1) // tc
        return self.latent_channels, t, height // sc, width // sc

    def train(self, mode: bool = True) -> "Autoencoder":
        """Always eval: the autoencoder is frozen."""
        return super().train(False)


class IdentityAutoencoder(Autoencoder):
    """Pixel-space "autoencoder": ``latent = pixels * scaling_factor``; 3 channels, no compression.

    Args:
        scaling_factor: multiplier applied by ``encode`` and undone by ``decode``.
    """

    def __init__(self, scaling_factor: float = 1.0):
        super().__init__()
        if scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0; got {scaling_factor}")
        self.scaling_factor = float(scaling_factor)
        self.latent_channels = 3
        self.temporal_compression = 1
        self.spatial_compression = 1
        self.eval()

    @staticmethod
    def _check(x: torch.Tensor, what: str) -> None:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"{what} must be (B, 3, T, H, W); got {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` in ``[-1, 1]`` -> same shape, times ``scaling_factor``.

        Raises:
            ValueError: if ``x`` is not ``(B, 3, T, H, W)``.
        """
        self._check(x, "x")
        return x * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` latent -> pixels ``z / scaling_factor`` clamped to ``[-1, 1]``.

        Raises:
            ValueError: if ``z`` is not ``(B, 3, T, H, W)``.
        """
        self._check(z, "z")
        return (z / self.scaling_factor).clamp(-1.0, 1.0)


def build_autoencoder(name: str, path: str | None = None, **kwargs) -> Autoencoder:
    """Factory: ``'identity'`` -> :class:`IdentityAutoencoder` (``kwargs`` e.g. ``scaling_factor``).

    Raises:
        ValueError: for any other name. Diffusers video VAEs loaded from a local ``path`` are not
            implemented yet; they arrive with the data-at-scale change.
    """
    if name == "identity":
        return IdentityAutoencoder(**kwargs)
    raise ValueError(
        f"unknown autoencoder {name!r}; valid: ['identity']. Pretrained diffusers video VAEs "
        "(loaded from a local path) arrive in a later change (data-at-scale issue)."
    )

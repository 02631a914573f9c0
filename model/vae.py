"""Autoencoder interface between pixels and the latent space the DiT works in.

Pixels are ``(B, 3, T, H, W)`` float in ``[-1, 1]``; latents are ``(B, C, T', H', W')`` float32,
normalised to roughly zero mean and unit variance. Two families:

* :class:`IdentityAutoencoder`: pixel-space diffusion, the offline default (no weights).
* :class:`DiffusersVideoAutoencoder`: a pretrained causal video VAE from diffusers, loaded from a
  local directory (nothing downloads): Wan 2.1/2.2 ``AutoencoderKLWan`` (``'wan'``), HunyuanVideo
  ``AutoencoderKLHunyuanVideo`` (``'hunyuan'``), CogVideoX ``AutoencoderKLCogVideoX``
  (``'cogvideox'``).

Build either through :func:`build_autoencoder`::

    vae = build_autoencoder("wan", "/models/Wan2.1-T2V-1.3B-Diffusers", dtype="bfloat16", tiling=True)
    z = vae.encode(x)            # (B, 3, 81, 480, 832) -> (B, 16, 21, 60, 104)
    x_hat = vae.decode(z)        # back to (B, 3, 81, 480, 832) in [-1, 1]
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "Autoencoder",
    "IdentityAutoencoder",
    "DiffusersVideoAutoencoder",
    "AUTOENCODERS",
    "DIFFUSERS_VAE_CLASSES",
    "build_autoencoder",
    "resolve_dtype",
]

DIFFUSERS_VAE_CLASSES = {
    "wan": "AutoencoderKLWan",
    "hunyuan": "AutoencoderKLHunyuanVideo",
    "cogvideox": "AutoencoderKLCogVideoX",
}
"""``build_autoencoder`` name -> diffusers class it loads."""

AUTOENCODERS = ("identity", *DIFFUSERS_VAE_CLASSES)
"""Every name :func:`build_autoencoder` accepts."""

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """``'bf16'``/``'bfloat16'``/``'fp16'``/``'float16'``/``'fp32'``/``'float32'``/torch dtype/None -> torch dtype.

    Raises:
        ValueError: an unknown name (lists the valid ones).
    """
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(_DTYPES)}")
    return _DTYPES[key]


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
            ValueError: if the sizes do not fit the compression factors (the message names the
                nearest valid frame counts / sizes).
        """
        tc, sc = self.temporal_compression, self.spatial_compression
        if num_frames < 1 or (tc > 1 and (num_frames - 1) % tc != 0):
            k = max(0, (num_frames - 1) // tc)
            near = sorted({1 + k * tc, 1 + (k + 1) * tc})
            raise ValueError(
                f"num_frames={num_frames} does not fit temporal_compression={tc}: a causal video VAE needs "
                f"T = 1 + k * {tc} frames (1, {1 + tc}, {1 + 2 * tc}, ...); nearest valid: "
                + " or ".join(map(str, near)))
        if height % sc or width % sc:
            raise ValueError(f"height={height}, width={width} must be divisible by spatial_compression={sc} "
                             f"(e.g. {max(sc, height // sc * sc)}x{max(sc, width // sc * sc)})")
        t = num_frames if tc == 1 else 1 + (num_frames - 1) // tc
        return self.latent_channels, t, height // sc, width // sc

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (name, channels, compressions, normalisation) recorded with cached latents."""
        return {"name": getattr(self, "name", type(self).__name__), "latent_channels": self.latent_channels,
                "temporal_compression": self.temporal_compression, "spatial_compression": self.spatial_compression}

    def train(self, mode: bool = True) -> "Autoencoder":
        """Always eval: the autoencoder is frozen."""
        return super().train(False)


class IdentityAutoencoder(Autoencoder):
    """Pixel-space "autoencoder": ``latent = pixels * scaling_factor``; 3 channels, no compression.

    Args:
        scaling_factor: multiplier applied by ``encode`` and undone by ``decode``.
    """

    name = "identity"

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

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"scaling_factor": self.scaling_factor}


def _find_vae_dir(path: Path, subfolder: str | None) -> tuple[Path, str | None]:
    """``(root, subfolder)`` holding the VAE's ``config.json``: ``path`` itself, or ``path/vae`` of a
    diffusers pipeline folder.

    Raises:
        FileNotFoundError: ``path`` is missing or holds no VAE config.
    """
    if not path.exists():
        raise FileNotFoundError(f"VAE path does not exist: {path}")
    if subfolder is not None:
        if not (path / subfolder / "config.json").is_file():
            raise FileNotFoundError(f"no VAE config.json in {path / subfolder}")
        return path, subfolder
    if (path / "config.json").is_file():
        return path, None
    if (path / "vae" / "config.json").is_file():  # a whole diffusers pipeline folder
        return path, "vae"
    raise FileNotFoundError(f"no VAE config.json in {path} or {path / 'vae'} (expected a diffusers VAE folder "
                            "written by save_pretrained, or a pipeline folder with a vae/ subfolder)")


class DiffusersVideoAutoencoder(Autoencoder):
    """A pretrained diffusers causal video VAE loaded from a local folder, frozen.

    **Deterministic latents.** ``encode`` returns the posterior *mean* (``latent_dist.mode()``), not
    a sample: the same clip always gives the same latent, so cached latents are reproducible and
    equal to on-the-fly ones. (The posterior std of these VAEs is small; the DiT's own noise
    dominates. Sampling would make a latent cache a frozen single draw anyway.)

    **Normalisation** (applied by ``encode``, undone by ``decode``), from the model's own config:

    * ``wan``: per channel, ``z = (mu - latents_mean) / latents_std`` (the ``latents_mean`` /
      ``latents_std`` lists of the Wan VAE config, as the Wan pipelines do).
    * ``hunyuan``, ``cogvideox``: ``z = (mu - shift_factor) * scaling_factor`` with the config's
      ``scaling_factor`` (HunyuanVideo 0.476986, CogVideoX 1.15258426 / 0.7 for 5B) and
      ``shift_factor`` when the config has one (else 0).

    The arguments override the config values; they must match the normalisation family (a
    ``scaling_factor`` for ``wan`` is an error, so a stale default cannot silently rescale).

    **Frames.** All three are causal: ``T = 1 + k * temporal_compression`` (``encode`` raises a
    ValueError naming the nearest valid counts), ``T' = 1 + k``; CogVideoX further needs ``k`` even
    (``T = 1 + 8j``: 9, 17, ..., 49), because its decoder inverts only an odd number of latent
    frames. H and W must be divisible by ``spatial_compression``.

    **Memory.** ``dtype`` is the weights' dtype; ``encode`` casts its input to it (bf16 halves
    activations; the normalisation itself runs in float32). ``tiling=True`` encodes/decodes in
    overlapping spatial tiles (``enable_tiling``), ``slicing=True`` one clip of the batch at a
    time (``enable_slicing``); both trade speed for peak memory.

    Args:
        kind: ``'wan'``, ``'hunyuan'`` or ``'cogvideox'``.
        path: local folder with the VAE's ``config.json`` + weights, or a diffusers pipeline
            folder with a ``vae/`` subfolder.
        dtype: weights/compute dtype (``'float32'``, ``'bfloat16'``, ``'float16'`` or a torch dtype).
        subfolder: explicit subfolder of ``path`` (default: auto, ``vae/`` if ``path`` has no config).
        scaling_factor, shift_factor: override the config (hunyuan, cogvideox).
        latents_mean, latents_std: per-channel override lists (wan).
        tiling, slicing: enable the memory savers (``tiling_kwargs`` go to ``enable_tiling``).

    Raises:
        FileNotFoundError: ``path`` (or its VAE config) does not exist.
        ValueError: unknown ``kind``, the folder holds another VAE class, inconsistent normalisation.
    """

    def __init__(self, kind: str, path: str | os.PathLike, dtype: str | torch.dtype | None = torch.float32,
                 subfolder: str | None = None, scaling_factor: float | None = None,
                 shift_factor: float | None = None, latents_mean: list[float] | None = None,
                 latents_std: list[float] | None = None, tiling: bool = False, slicing: bool = False,
                 tiling_kwargs: dict[str, Any] | None = None):
        super().__init__()
        if kind not in DIFFUSERS_VAE_CLASSES:
            raise ValueError(f"unknown diffusers VAE kind {kind!r}; valid: {sorted(DIFFUSERS_VAE_CLASSES)}")
        root, subfolder = _find_vae_dir(Path(path), subfolder)
        cls_name = DIFFUSERS_VAE_CLASSES[kind]
        config_file = root / subfolder / "config.json" if subfolder else root / "config.json"
        with open(config_file) as f:
            found = json.load(f).get("_class_name")
        if found is not None and found != cls_name:
            raise ValueError(f"{config_file} is a {found}, not the {cls_name} that vae kind {kind!r} loads")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: local_files_only already forbids downloads
        import diffusers  # heavy; imported only when a real VAE is built

        # without accelerate diffusers falls back to a full-memory load anyway; saying so avoids its warning
        low_mem = {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}
        self.vae = getattr(diffusers, cls_name).from_pretrained(
            str(root), subfolder=subfolder, local_files_only=True, torch_dtype=resolve_dtype(dtype), **low_mem)
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.name, self.kind, self.path = kind, kind, str(path)
        cfg = self.vae.config
        if kind == "wan":
            self.latent_channels = int(cfg.z_dim)
            self.temporal_compression = 2 ** sum(bool(d) for d in cfg.temperal_downsample)
            self.spatial_compression = 2 ** (len(cfg.dim_mult) - 1) * int(cfg.patch_size or 1)
            if self.temporal_compression != 4:  # diffusers' Wan encoder walks the frames in chunks of 4
                raise ValueError(f"{config_file}: AutoencoderKLWan with temporal compression "
                                 f"{self.temporal_compression} is not supported (diffusers encodes 4 frames per step)")
            # diffusers' tiling uses the declared factors: they must agree with the architecture
            declared = (cfg.scale_factor_temporal, cfg.scale_factor_spatial)
            derived = (self.temporal_compression, self.spatial_compression)
            if any(d is not None and d != a for d, a in zip(declared, derived)):
                raise ValueError(f"{config_file}: scale_factor_temporal/spatial={declared} disagree with the "
                                 f"architecture ({self.temporal_compression}, {self.spatial_compression})")
        elif kind == "hunyuan":
            self.latent_channels = int(cfg.latent_channels)
            self.temporal_compression = int(cfg.temporal_compression_ratio)
            self.spatial_compression = int(cfg.spatial_compression_ratio)
        else:  # cogvideox
            self.latent_channels = int(cfg.latent_channels)
            self.temporal_compression = int(cfg.temporal_compression_ratio)
            self.spatial_compression = 2 ** (len(cfg.block_out_channels) - 1)
        shift, scale, self.normalization = self._normalization(
            kind, cfg, scaling_factor, shift_factor, latents_mean, latents_std)
        # float32 per-channel affine map; non-persistent buffers so .to(device) moves them
        self.register_buffer("_shift", shift, persistent=False)  # (C,)
        self.register_buffer("_scale", scale, persistent=False)  # (C,)
        self.tiling = self.slicing = False
        if tiling:
            self.enable_tiling(**(tiling_kwargs or {}))
        if slicing:
            self.enable_slicing()
        self.eval()

    def _normalization(self, kind, cfg, scaling_factor, shift_factor, latents_mean, latents_std):
        C = self.latent_channels
        if kind == "wan":
            if scaling_factor is not None or shift_factor is not None:
                raise ValueError("the wan VAE normalises per channel with latents_mean/latents_std; pass those "
                                 f"instead of scaling_factor={scaling_factor}/shift_factor={shift_factor} "
                                 "(vae.scaling_factor must be null for wan)")
            mean = list(latents_mean if latents_mean is not None else cfg.latents_mean)
            std = list(latents_std if latents_std is not None else cfg.latents_std)
            if len(mean) != C or len(std) != C:
                raise ValueError(f"wan VAE has {C} latent channels but latents_mean has {len(mean)} and "
                                 f"latents_std {len(std)} entries")
            if any(s <= 0 for s in std):
                raise ValueError(f"latents_std must be > 0; got {std}")
            shift = torch.tensor(mean, dtype=torch.float32)
            scale = 1.0 / torch.tensor(std, dtype=torch.float32)
            return shift, scale, {"type": "per_channel", "latents_mean": mean, "latents_std": std}
        if latents_mean is not None or latents_std is not None:
            raise ValueError(f"the {kind} VAE normalises with scaling_factor (+ shift_factor), not latents_mean/std")
        sf = float(scaling_factor if scaling_factor is not None else cfg.scaling_factor)
        sh = shift_factor if shift_factor is not None else getattr(cfg, "shift_factor", None)
        sh = float(sh or 0.0)
        if not (math.isfinite(sf) and sf > 0):
            raise ValueError(f"scaling_factor must be > 0; got {sf}")
        shift = torch.full((C,), sh, dtype=torch.float32)
        scale = torch.full((C,), sf, dtype=torch.float32)
        return shift, scale, {"type": "scalar", "scaling_factor": sf, "shift_factor": sh}

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """As :meth:`Autoencoder.latent_shape`; CogVideoX also needs an odd ``T'`` (``T = 1 + k * 8``):
        its decoder upsamples an even number of latent frames to ``4 T'`` frames, not ``1 + 4 (T' - 1)``.

        Raises:
            ValueError: naming the nearest valid frame counts.
        """
        shape = super().latent_shape(num_frames, height, width)
        if self.kind == "cogvideox" and shape[1] % 2 == 0:
            step = 2 * self.temporal_compression
            k = (num_frames - 1) // step
            raise ValueError(
                f"num_frames={num_frames} gives {shape[1]} latent frames; the CogVideoX VAE only decodes an odd "
                f"number of latent frames back to 1 + 4k frames: use T = 1 + k * {step} (1, {1 + step}, "
                f"{1 + 2 * step}, ..., 49); nearest valid: {1 + k * step} or {1 + (k + 1) * step}")
        return shape

    # ------------------------------------------------------------------ memory savers
    def enable_tiling(self, **kwargs) -> None:
        """Encode/decode in overlapping spatial tiles (``kwargs`` go to the diffusers ``enable_tiling``,
        e.g. ``tile_sample_min_height``). Lower peak memory at high resolution; tiny seams possible.

        Raises:
            NotImplementedError: the VAE class has no tiling.
        """
        if not hasattr(self.vae, "enable_tiling"):
            raise NotImplementedError(f"{type(self.vae).__name__} has no enable_tiling()")
        self.vae.enable_tiling(**kwargs)
        self.tiling = True

    def disable_tiling(self) -> None:
        if hasattr(self.vae, "disable_tiling"):
            self.vae.disable_tiling()
        self.tiling = False

    def enable_slicing(self) -> None:
        """Run the VAE one clip of the batch at a time (peak memory of batch size 1)."""
        if hasattr(self.vae, "enable_slicing"):
            self.vae.enable_slicing()
        else:
            self.vae.use_slicing = True
        self.slicing = True

    def disable_slicing(self) -> None:
        if hasattr(self.vae, "disable_slicing"):
            self.vae.disable_slicing()
        else:
            self.vae.use_slicing = False
        self.slicing = False

    # ------------------------------------------------------------------ encode / decode
    @property
    def device(self) -> torch.device:
        """Device of the VAE weights."""
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the VAE weights (inputs are cast to it)."""
        return self.vae.dtype

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        return self._shift.float().view(shape), self._scale.float().view(shape)  # (1, C, 1, 1, 1) each

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` in ``[-1, 1]`` -> normalised posterior mean ``(B, C, T', H', W')`` float32.

        The input is moved to the VAE's device and cast to its dtype.

        Raises:
            ValueError: not ``(B, 3, T, H, W)``, or T/H/W that do not fit the compressions.
        """
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"x must be (B, 3, T, H, W); got {tuple(x.shape)}")
        C, T, H, W = self.latent_shape(*x.shape[2:])
        x = x.to(device=self.device, dtype=self.dtype)
        mu = self.vae.encode(x).latent_dist.mode().float()  # (B, C, T', H', W')
        if tuple(mu.shape[1:]) != (C, T, H, W):  # a config whose compressions we derived wrongly
            raise RuntimeError(f"{self.kind} VAE returned latents {tuple(mu.shape)}; expected (B, {C}, {T}, {H}, {W})")
        shift, scale = self._affine()
        return (mu - shift) * scale  # (B, C, T', H', W')

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, C, T', H', W')`` -> pixels ``(B, 3, 1 + (T'-1) * tc, H' * sc, W' * sc)`` float32 in ``[-1, 1]``.

        Raises:
            ValueError: not ``(B, latent_channels, T', H', W')``.
        """
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"z must be (B, {self.latent_channels}, T', H', W'); got {tuple(z.shape)}")
        shift, scale = self._affine()
        mu = z.to(self.device).float() / scale + shift  # (B, C, T', H', W')
        x = self.vae.decode(mu.to(self.dtype)).sample  # (B, 3, T, H, W)
        return x.float().clamp(-1.0, 1.0)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"kind": self.kind, "class": type(self.vae).__name__, "path": self.path,
                                     "dtype": str(self.dtype).removeprefix("torch."), "tiling": self.tiling,
                                     "slicing": self.slicing, "normalization": self.normalization}


def build_autoencoder(name: str, path: str | None = None, **kwargs) -> Autoencoder:
    """Factory.

    Args:
        name: ``'identity'`` (:class:`IdentityAutoencoder`; ``kwargs``: ``scaling_factor``, where
            None means 1.0) or a diffusers kind ``'wan'``, ``'hunyuan'``, ``'cogvideox'``
            (:class:`DiffusersVideoAutoencoder`; ``path`` required; ``kwargs``: ``dtype``,
            ``scaling_factor``/``shift_factor`` (None: the model's config), ``latents_mean``/
            ``latents_std``, ``tiling``, ``slicing``, ``subfolder``).
        path: local VAE folder (ignored by ``identity``).

    Raises:
        ValueError: unknown name (lists the valid ones), or a diffusers kind without a path.
        FileNotFoundError: a missing ``path``.
    """
    if name == "identity":
        sf = kwargs.pop("scaling_factor", None)
        kwargs.pop("dtype", None)  # pixels need no weights dtype
        for k in ("tiling", "slicing"):
            kwargs.pop(k, None)
        return IdentityAutoencoder(scaling_factor=1.0 if sf is None else sf, **kwargs)
    if name in DIFFUSERS_VAE_CLASSES:
        if path is None:
            raise ValueError(f"autoencoder {name!r} needs a local path (vae.path) to its diffusers folder")
        return DiffusersVideoAutoencoder(name, path, **kwargs)
    raise ValueError(f"unknown autoencoder {name!r}; valid: {list(AUTOENCODERS)}")

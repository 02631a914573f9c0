"""Building a run's components from its config: device, precision, the DiT, the frozen encoders, the
per-caption text-feature cache. Used by the Trainer, vdit-sample and vdit-export."""

from __future__ import annotations

import torch

from vdit.model.dit import VideoDiT
from vdit.model.text import build_text_encoder
from vdit.model.vae import build_autoencoder
from vdit.train.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: ``auto`` is bf16 on CUDA and fp32 on CPU (no native bf16 on this class of CPU)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def build_model(cfg: TrainConfig, device: torch.device) -> VideoDiT:
    """Build the DiT on the meta device, materialize on ``device``, then run the model's own init.

    Building on meta first is the path parallel training takes (parallelize between the two
    steps), so single-rank and sharded runs start from the same weights for the same seed.
    """
    with torch.device("meta"):
        model = VideoDiT(cfg.model)
    model.to_empty(device="cpu")  # init on CPU: the same weights whatever the device or sharding
    model.init_weights(seed=cfg.train.seed)
    return model.to(device)


def build_frozen(cfg: TrainConfig, device: torch.device):
    """Build the frozen text encoder and autoencoder and check them against the model config.

    Returns ``(text_encoder, vae)`` on ``device``.

    Raises:
        ValueError: the encoder width differs from ``model.text_dim`` or the latent channels differ
            from ``model.in_channels`` (the message says which setting to change).
    """
    tc, vc = cfg.text_encoder, cfg.vae
    text_encoder = build_text_encoder(tc.name, tc.path, tc.max_length, dtype=tc.dtype, hidden_size=tc.hidden_size)
    if text_encoder.hidden_size != cfg.model.text_dim:
        raise ValueError(f"text encoder {tc.name!r} has width {text_encoder.hidden_size} but model.text_dim="
                         f"{cfg.model.text_dim}; set text_encoder.hidden_size={text_encoder.hidden_size}")
    vae = build_autoencoder(vc.name, vc.path, scaling_factor=vc.scaling_factor, dtype=vc.dtype, tiling=vc.tiling,
                            slicing=vc.slicing)
    if vae.latent_channels != cfg.model.in_channels:
        raise ValueError(f"autoencoder {cfg.vae.name!r} has {vae.latent_channels} latent channels but "
                         f"model.in_channels={cfg.model.in_channels}")
    return text_encoder.to(device), vae.to(device)


class TextCache:
    """Frozen text features per caption, cached: ``captions -> ((B, max_length, D) float, (B, max_length) bool)``.

    Each caption is encoded alone and padded to ``max_length`` tokens, so its features never depend
    on which other captions share its batch; captions repeat across clips of one video and across
    epochs, so the cache saves most text-encoder work.
    """

    def __init__(self, encoder, max_length: int, device: torch.device, max_entries: int = 100_000):
        self.encoder, self.max_length, self.device, self.max_entries = encoder, max_length, device, max_entries
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for c in captions:
            hit = self.cache.get(c)
            if hit is None:
                h, m = self.encoder.encode([c], device=self.device)  # (1, l, D), (1, l)
                L = self.max_length
                hp, mp = h.new_zeros(1, L, h.shape[-1]), m.new_zeros(1, L)
                hp[:, :min(L, h.shape[1])], mp[:, :min(L, m.shape[1])] = h[:, :L], m[:, :L]
                hit = (hp, mp)
                if len(self.cache) < self.max_entries:
                    self.cache[c] = hit
            out.append(hit)
        return torch.cat([h for h, _ in out]), torch.cat([m for _, m in out])

"""Building a run's components from its config: device, precision, the DiT, the frozen encoders, the
per-caption text-feature cache. Used by the Trainer, vdit-sample and vdit-export."""

from __future__ import annotations

from collections import OrderedDict

import torch

from vdit.model.dit import VideoDiT
from vdit.model.text import build_text_encoder
from vdit.model.vae import build_autoencoder
from vdit.train.config import TextEncoderConfig, TrainConfig


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


def resolve_video_dtype(name: str, device: torch.device) -> str:
    """``data.video_dtype``: ``auto`` ships uint8 frames to CUDA (normalised there: 4x fewer
    host-to-device bytes than float32) and float32 elsewhere (converted by the pipeline, where it
    overlaps with decoding); ``float32`` and ``uint8`` are taken as given. Both give bit-equal inputs."""
    if name == "auto":
        return "uint8" if device.type == "cuda" else "float32"
    return name


def build_model(cfg: TrainConfig, device: torch.device, init_from: bool = False) -> VideoDiT:
    """Build the DiT on the meta device, materialize on ``device``, then run the model's own init.

    Building on meta first is the path parallel training takes (parallelize between the two
    steps), so single-rank and sharded runs start from the same weights for the same seed.
    With ``init_from`` and ``cfg.train.init_from`` set, the weights come from that export folder
    instead (:func:`load_init_weights`). With ``cfg.lora.rank > 0`` LoRA adapters are injected
    afterwards (seeded by ``train.seed``) and the base is frozen (:func:`vdit.train.lora.apply_lora`).

    Raises:
        FileNotFoundError, ValueError: from :func:`load_init_weights`.
    """
    with torch.device("meta"):
        model = VideoDiT(cfg.model)
    model.to_empty(device="cpu")  # init on CPU: the same weights whatever the device or sharding
    if init_from and cfg.train.init_from:
        load_init_weights(model, cfg.train.init_from, cfg.model)
    else:
        model.init_weights(seed=cfg.train.seed)
    if cfg.lora.rank > 0:
        from vdit.train.lora import apply_lora

        apply_lora(model, cfg.lora, seed=cfg.train.seed)
    return model.to(device)


def load_init_weights(model: VideoDiT, path: str, model_cfg) -> VideoDiT:
    """Load an export folder's weights (``model.safetensors``, fp32 after loading) into a plain CPU ``model``.

    Args:
        model: a materialized plain ``VideoDiT`` of ``model_cfg``.
        path: a ``vdit-export`` / ``vdit-import`` folder.
        model_cfg: this run's :class:`~vdit.model.dit.DiTConfig`.

    Raises:
        FileNotFoundError: not an export folder.
        ValueError: the folder's ``model`` config differs from ``model_cfg`` (lists the settings),
            or its tensors do not fit (unknown / missing names, shapes naming the setting).
    """
    import dataclasses
    import json
    import os

    from safetensors.torch import load_file

    from vdit.model.wan import check_vdit_state

    weights, config = os.path.join(path, "model.safetensors"), os.path.join(path, "config.json")
    for f in (weights, config):
        if not os.path.exists(f):
            raise FileNotFoundError(f"train.init_from: {f} not found (expected a vdit-export or vdit-import folder)")
    with open(config) as f:
        saved = json.load(f).get("config", {}).get("model", {})
    ours = dataclasses.asdict(model_cfg)
    diff = [f"model.{k}: run {ours[k]!r}, {path} {saved[k]!r}" for k in ours
            if k in saved and k != "text_dim" and ours[k] != saved[k]
            and not (isinstance(ours[k], float) and abs(ours[k] - float(saved[k])) < 1e-12)]
    if diff:
        raise ValueError("train.init_from: the model config differs from the weights' (use the same model preset):\n  "
                         + "\n  ".join(diff))
    state = load_file(weights)
    check_vdit_state(state, model_cfg, f"train.init_from={path}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


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


DEFAULT_TEXT_CACHE_BYTES = TextEncoderConfig.cache_bytes
"""Default host bytes of :class:`TextCache` (``text_encoder.cache_bytes``, 2 GiB): 256 captions of a
4096-wide encoder at 512 tokens (8 MiB each in fp32), ~43,000 of MiniLM (384 wide) at 32 tokens."""


class TextCache:
    """Frozen text features per caption, cached on the host: ``captions -> ((B, L, D) float, (B, L) bool)``
    on ``device``, with ``L = max_length``.

    Each caption is encoded alone and padded to ``max_length`` tokens, so its features never depend
    on which other captions share its batch; captions repeat across clips of one video and across
    epochs, so the cache saves most text-encoder work.

    The features live in host (CPU) memory, in a least-recently-used cache bounded by bytes: a
    4096-wide T5 at 512 tokens is 8 MiB per caption in fp32, so a cache on the accelerator (or one
    bounded by a caption count) runs out of memory after a few thousand captions. A batch is
    assembled on the host and moved to ``device`` on use; on CUDA through pinned memory, so the
    copy is asynchronous (only the batch is pinned, never the whole cache).

    Args:
        encoder: a :class:`vdit.model.text.TextEncoder` (its ``encode(captions, device)``).
        max_length: padded tokens ``L`` per caption.
        device: where the returned batches live.
        max_bytes: host bytes the cached features and masks may take (``text_encoder.cache_bytes``);
            the least recently used captions are evicted beyond it; 0 caches nothing.

    Raises:
        ValueError: ``max_bytes < 0``.
    """

    def __init__(self, encoder, max_length: int, device: torch.device | str,
                 max_bytes: int = DEFAULT_TEXT_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"TextCache max_bytes={max_bytes} must be >= 0 (text_encoder.cache_bytes)")
        self.encoder, self.max_length, self.device, self.max_bytes = encoder, max_length, torch.device(device), max_bytes
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # oldest use first
        self.nbytes = 0  # host bytes held by ``cache``
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.cache)

    def features(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One caption's host features ``((1, L, D) float, (1, L) bool)`` on the CPU, from the cache or encoded."""
        hit = self.cache.get(caption)
        if hit is not None:
            self.hits += 1
            self.cache.move_to_end(caption)
            return hit
        self.misses += 1
        h, m = self.encoder.encode([caption], device=self.device)  # (1, l, D), (1, l)
        L = self.max_length
        hp, mp = h.new_zeros(1, L, h.shape[-1], device="cpu"), m.new_zeros(1, L, device="cpu")
        hp[:, :min(L, h.shape[1])], mp[:, :min(L, m.shape[1])] = h[:, :L].cpu(), m[:, :L].cpu()
        size = hp.nbytes + mp.nbytes
        if size <= self.max_bytes:
            while self.nbytes + size > self.max_bytes:  # evict the least recently used
                _, (oh, om) = self.cache.popitem(last=False)
                self.nbytes -= oh.nbytes + om.nbytes
            self.cache[caption] = (hp, mp)
            self.nbytes += size
        return hp, mp

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text (B, L, D) float, mask (B, L) bool)`` on ``device`` for ``B`` captions."""
        hits = [self.features(c) for c in captions]
        h, m = torch.cat([h for h, _ in hits]), torch.cat([m for _, m in hits])  # (B, L, D), (B, L) host
        if self.device.type == "cuda":
            h, m = h.pin_memory(), m.pin_memory()
        return h.to(self.device, non_blocking=True), m.to(self.device, non_blocking=True)

"""Latent shards: reading what ``vdit-encode`` wrote, and checking it against a training config.

A latent shard is a webdataset tar whose samples hold (see ``vdit.data.encode`` and docs/latents.md):

* ``{key}.latent.pt``: ``torch.save`` of the normalised VAE latent ``(C, T', H', W')``
  (float16 / bfloat16 / float32);
* ``{key}.text.pt``: ``torch.save`` of ``{"hidden": (n, D), "mask": (L,) bool}``: the text
  encoder's token features and padding mask. ``L`` is the encoder's ``max_length``; ``n <= L``
  rows are stored (the padding rows after the last real token are zero and are dropped on disk
  unless ``vdit-encode --no-text-trim``); :func:`read_latent_sample` restores ``(L, D)``;
* ``{key}.txt`` (caption) and ``{key}.json`` (the clip's source json plus an ``"encode"`` record).

The output folder also has ``index.json`` (shard list, as ``vdit-ingest`` writes it),
``encode_meta.json`` (what produced the latents: :func:`check_encode_meta` compares it with the
training config) and ``null_text.pt`` (the features of :data:`vdit.model.text.NULL_CAPTION`, used
for caption dropout without a text encoder: :func:`load_null_text`).
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import torch

__all__ = [
    "LATENT_FORMAT",
    "LATENT_FORMAT_VERSION",
    "META_CONFIG_KEYS",
    "LatentSampleError",
    "save_tensor_bytes",
    "text_record",
    "read_text_record",
    "read_latent_sample",
    "read_encode_meta",
    "check_encode_meta",
    "expected_meta_from_config",
    "load_null_text",
    "is_latent_dir",
    "is_latent_sample",
]

LATENT_FORMAT = "vdit-latents"
LATENT_FORMAT_VERSION = 1

META_CONFIG_KEYS = {
    "latent_channels": "model.in_channels",
    "text_hidden_size": "model.text_dim",
    "max_length": "text_encoder.max_length",
    "num_frames": "data.num_frames",
    "height": "data.height",
    "width": "data.width",
    "target_fps": "data.target_fps",
    "frame_stride": "data.frame_stride",
    "vae": "vae.name",
    "text_encoder": "text_encoder.name",
}
"""encode_meta.json field -> the training-config key it must agree with (used in error messages)."""


class LatentSampleError(Exception):
    """A latent-shard sample that cannot be used.

    Attributes:
        reason: short cause for skip counters: ``'no_latent'``, ``'corrupt_latent'``,
            ``'bad_latent'`` (not a finite ``(C, T', H', W')`` tensor), ``'latent_shape_mismatch'``,
            ``'no_text'``, ``'corrupt_text'``, ``'bad_text'``, ``'text_shape_mismatch'``.
        detail: human-readable explanation.
        key: the sample's ``__key__``.
    """

    def __init__(self, reason: str, detail: str = "", key: str | None = None):
        self.reason, self.detail, self.key = reason, detail, key
        super().__init__(f"{key or '?'}: {reason}" + (f" ({detail})" if detail else ""))


def save_tensor_bytes(obj: Any) -> bytes:
    """``torch.save`` into bytes (tensors must own their storage: save ``t.clone()`` of a view,
    or the whole underlying batch storage is written)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def text_record(hidden: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, trim: bool = True) -> dict[str, torch.Tensor]:
    """The ``text.pt`` payload of one caption: ``{"hidden": (n, D) dtype, "mask": (L,) bool}``.

    Args:
        hidden: ``(L, D)`` features (zero at padding).
        mask: ``(L,)`` bool, True on real tokens.
        dtype: storage dtype of ``hidden``.
        trim: keep only rows up to the last real token (``n = last True + 1``); else ``n = L``.
    """
    mask = mask.detach().to("cpu", torch.bool).clone()  # (L,)
    n = int(mask.nonzero().max()) + 1 if (trim and mask.any()) else (0 if trim else mask.numel())
    return {"hidden": hidden[:n].detach().to("cpu", dtype).clone(), "mask": mask}  # (n, D), (L,)


def _load(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_text_record(record: Any, key: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``{"hidden": (n, D), "mask": (L,)}`` -> ``(hidden (L, D) float32, mask (L,) bool)``, zero-padded.

    Raises:
        LatentSampleError: ``'bad_text'`` for a malformed record.
    """
    if not isinstance(record, dict) or not isinstance(record.get("hidden"), torch.Tensor) \
            or not isinstance(record.get("mask"), torch.Tensor):
        raise LatentSampleError("bad_text", "text.pt must hold {'hidden': tensor, 'mask': tensor}", key)
    hidden, mask = record["hidden"], record["mask"]
    if hidden.ndim != 2 or mask.ndim != 1 or mask.dtype != torch.bool or hidden.shape[0] > mask.shape[0]:
        raise LatentSampleError("bad_text", f"hidden {tuple(hidden.shape)} / mask {tuple(mask.shape)} {mask.dtype}; "
                                "expected (n, D) and (L,) bool with n <= L", key)
    if mask[hidden.shape[0]:].any():
        raise LatentSampleError("bad_text", "real tokens beyond the stored feature rows", key)
    if not torch.isfinite(hidden).all():
        raise LatentSampleError("bad_text", "non-finite text features", key)
    full = hidden.new_zeros(mask.shape[0], hidden.shape[1], dtype=torch.float32)  # (L, D)
    full[: hidden.shape[0]] = hidden.float()
    return full * mask[:, None], mask


def read_latent_sample(raw: dict[str, Any], latent_shape: tuple[int, ...] | None = None,
                       text_shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """Turn a webdataset sample of a latent shard into training tensors.

    Args:
        raw: ``{"__key__", "latent.pt": bytes, "text.pt": bytes, "txt": bytes (optional), ...}``.
        latent_shape: expected ``(C, T', H', W')`` (checked when given: batches need equal shapes).
        text_shape: expected ``(L, D)`` (checked when given).

    Returns:
        ``{"latent": (C, T', H', W') float32, "text": (L, D) float32 (zero at padding),
        "text_mask": (L,) bool, "caption": str ('' when the sample has no txt), "key": str}``.

    Raises:
        LatentSampleError: a missing, corrupt or malformed part (``reason`` says which).
    """
    key = str(raw.get("__key__", "?"))
    data = raw.get("latent.pt")
    if data is None:
        raise LatentSampleError("no_latent", "sample has no .latent.pt", key)
    try:
        latent = _load(data)
    except Exception as exn:  # noqa: BLE001 - any unpickling/zip failure means a corrupt part
        raise LatentSampleError("corrupt_latent", f"{type(exn).__name__}: {str(exn)[:120]}", key) from None
    if not isinstance(latent, torch.Tensor) or latent.ndim != 4 or not latent.is_floating_point():
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise LatentSampleError("bad_latent", f"expected a float (C, T', H', W') tensor; got {shape}", key)
    if latent_shape is not None and tuple(latent.shape) != tuple(latent_shape):
        raise LatentSampleError("latent_shape_mismatch", f"{tuple(latent.shape)} != expected {tuple(latent_shape)}", key)
    latent = latent.float()
    if not torch.isfinite(latent).all():
        raise LatentSampleError("bad_latent", "non-finite values", key)
    data = raw.get("text.pt")
    if data is None:
        raise LatentSampleError("no_text", "sample has no .text.pt", key)
    try:
        record = _load(data)
    except Exception as exn:  # noqa: BLE001
        raise LatentSampleError("corrupt_text", f"{type(exn).__name__}: {str(exn)[:120]}", key) from None
    text, mask = read_text_record(record, key)
    if text_shape is not None and tuple(text.shape) != tuple(text_shape):
        raise LatentSampleError("text_shape_mismatch", f"{tuple(text.shape)} != expected {tuple(text_shape)}", key)
    try:
        caption = raw["txt"].decode("utf-8").strip() if raw.get("txt") is not None else ""
    except (AttributeError, UnicodeDecodeError):
        caption = ""
    return {"latent": latent, "text": text, "text_mask": mask, "caption": caption, "key": key}


def is_latent_dir(path: str) -> bool:
    """True if ``path`` is a folder written by ``vdit-encode`` (it has ``encode_meta.json``)."""
    return os.path.isfile(os.path.join(path, "encode_meta.json"))


def read_encode_meta(path: str) -> dict[str, Any]:
    """Load ``encode_meta.json`` from a latent-shard folder (or the file itself).

    Raises:
        FileNotFoundError: naming the missing file. ValueError: not a vdit latent folder.
    """
    file = os.path.join(path, "encode_meta.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no encode_meta.json at {file}: not a vdit-encode output folder (or its "
                                "index was never merged: run vdit-encode --merge-index --output <dir>)")
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != LATENT_FORMAT:
        raise ValueError(f"{file}: format {meta.get('format')!r} is not {LATENT_FORMAT!r}")
    if int(meta.get("version", 0)) > LATENT_FORMAT_VERSION:
        raise ValueError(f"{file}: latent format version {meta['version']} is newer than this vdit reads "
                         f"({LATENT_FORMAT_VERSION})")
    return meta


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_encode_meta(meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Check that latent shards fit a training setup.

    Args:
        meta: ``encode_meta.json`` content (:func:`read_encode_meta`).
        expected: field -> value the training run needs, e.g. ``{"latent_channels":
            model.in_channels, "text_hidden_size": model.text_dim, "max_length": ..., "num_frames":
            ..., "height": ..., "width": ...}`` (see :func:`expected_meta_from_config`). Fields
            with value None in ``expected`` are not checked.

    Raises:
        ValueError: listing every mismatched (or missing) field with both values and, where
            known, the config key to change (:data:`META_CONFIG_KEYS`).
    """
    problems = []
    for field, want in expected.items():
        if want is None:
            continue
        hint = f" ({META_CONFIG_KEYS[field]})" if field in META_CONFIG_KEYS else ""
        if field not in meta:
            problems.append(f"{field}: missing from encode_meta.json; training expects {want!r}{hint}")
        elif not _same(meta[field], want):
            problems.append(f"{field}: latents were encoded with {meta[field]!r}, training expects {want!r}{hint}")
    if problems:
        raise ValueError("latent shards do not match the training config:\n  " + "\n  ".join(problems)
                         + "\nre-encode with vdit-encode, or change the config to the encoded values")


def expected_meta_from_config(cfg: Any) -> dict[str, Any]:
    """The :func:`check_encode_meta` expectations of a training config (duck-typed ``TrainConfig``:
    ``cfg.model``, ``cfg.data``, ``cfg.vae``, ``cfg.text_encoder``).

    ``frame_stride`` is checked only when ``data.target_fps`` is None (it is unused otherwise).
    """
    d = cfg.data
    return {
        "latent_channels": cfg.model.in_channels,
        "text_hidden_size": cfg.model.text_dim,
        "max_length": cfg.text_encoder.max_length,
        "num_frames": d.num_frames,
        "height": d.height,
        "width": d.width,
        "target_fps": d.target_fps,
        "frame_stride": d.frame_stride if d.target_fps is None else None,
        "vae": cfg.vae.name,
        "text_encoder": cfg.text_encoder.name,
    }


def load_null_text(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached features of the null caption: ``(hidden (L, D) float32, mask (L,) bool)``.

    Args:
        path: the latent-shard folder (holding ``null_text.pt``) or the file.

    Raises:
        FileNotFoundError: naming the missing file. LatentSampleError: a malformed file.
    """
    file = os.path.join(path, "null_text.pt") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no null_text.pt at {file} (vdit-encode writes it next to the shards)")
    with open(file, "rb") as f:
        record = _load(f.read())
    return read_text_record(record, "null_text")


def is_latent_sample(raw: dict[str, Any]) -> bool:
    """True if a webdataset sample is a latent-shard sample (it has a ``latent.pt`` part)."""
    return "latent.pt" in raw

"""Attention backends behind the model's one kernel interface, plus an attention-with-LSE primitive.

Every kernel here has the signature of :class:`vdit.model.attention.AttentionCore`, layout
``(B, L, H, D)``::

    core(q, k, v, attn_mask=None) -> out      # attn_mask: optional bool (B, Lk), True = keep

Backends (:func:`select_attention_backend`):

    flash  FlashAttention-3 (``flash_attn_interface``) if importable, else FlashAttention-2
           (``flash_attn``). CUDA and fp16/bf16 only. ``flash_attn_func`` has no key-padding mask, so a
           call *with* ``attn_mask`` falls back to SDPA (the model passes a mask only to text
           cross-attention, whose key count is small; sequence parallelism slices padded keys off
           instead of masking them, so SP self-attention stays on the flash kernel).
    sdpa   ``torch.nn.functional.scaled_dot_product_attention`` (the model's default); PyTorch picks
           its own fused kernel (flash / memory-efficient / math) underneath.
    math   :func:`vdit.model.attention.math_attention`, explicit fp32 softmax; a reference for tests.
    auto   flash when flash-attn is installed, the device is CUDA *and* the compute dtype is fp16/bf16
           (the autocast dtype, or the parameter dtype without autocast), else sdpa. An fp32 run on a
           GPU therefore gets SDPA (flash-attn refuses fp32), and so does Ulysses' inner kernel, which
           is the kernel chosen here.

Apply to a model from the outside (DESIGN.md 3.1)::

    from vdit.train.parallel.attention import apply_attention_backend
    name = apply_attention_backend(model, "auto", device, dtype)   # before apply_sequence_parallel

:func:`attention_with_lse` returns the per-row log-sum-exp next to the output; ring attention's
CPU/fp32 block kernel (``ring.py``) is built on it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from vdit.model.attention import Attention, math_attention, sdpa_attention

__all__ = [
    "BACKENDS",
    "call_flash",
    "flash_attention",
    "flash_attn_available",
    "select_attention_backend",
    "apply_attention_backend",
    "attention_with_lse",
]

log = logging.getLogger("vdit")

BACKENDS = ("auto", "flash", "sdpa", "math")
FLASH_DTYPES = (torch.float16, torch.bfloat16)
_INSTALL_HINT = "install FlashAttention with `pip install vdit[gpu]` (or `pip install flash-attn`)"
_logged: set[tuple[str, str, str]] = set()
# The resolved flash kernel, set by the first _flash_func() (select_attention_backend calls it before
# any block is compiled): flash_attention reads this global, so a compiled block traces no lru_cache
# or importlib call (they broke each block's graph 4 times, issue 14).
_FLASH: tuple[Callable | None, str] | None = None


@functools.lru_cache(maxsize=None)
def _flash_func() -> tuple[Callable | None, str]:
    """``(flash_attn_func, "fa3" | "fa2")``, or ``(None, reason)`` when neither package imports.

    Imported for real (not just ``find_spec``): a wheel built for another CUDA fails only at import.
    """
    global _FLASH
    errors = []
    for module, tag in (("flash_attn_interface", "fa3"), ("flash_attn", "fa2")):
        try:
            _FLASH = importlib.import_module(module).flash_attn_func, tag
            return _FLASH
        except Exception as e:  # ImportError, or an OSError/RuntimeError from a mismatched CUDA build
            errors.append(f"{module}: {type(e).__name__}: {e}")
    _FLASH = None, "; ".join(errors)
    return _FLASH


def flash_attn_available() -> bool:
    """True when FlashAttention 3 or 2 can be imported."""
    return _flash_func()[0] is not None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlashAttention core (FA3 if installed, else FA2), same contract as ``sdpa_attention``.

    Args:
        q: ``(B, Lq, H, D)``; k, v: ``(B, Lk, H, D)``; CUDA tensors in fp16 or bf16.
        attn_mask: optional bool ``(B, Lk)`` key-padding mask. ``flash_attn_func`` cannot take one,
            so masked calls are routed to :func:`~vdit.model.attention.sdpa_attention` (same result).

    Returns:
        ``(B, Lq, H, D)`` in ``q.dtype``; scale ``1/sqrt(D)``.

    Raises:
        ImportError: if neither flash-attn package is importable (with the install hint).
        ValueError: if the tensors are not on CUDA or not fp16/bf16.
    """
    if attn_mask is not None:
        return sdpa_attention(q, k, v, attn_mask=attn_mask)
    fn, tag = _FLASH if _FLASH is not None else _flash_func()
    if fn is None:
        raise ImportError(f"flash attention requested but flash-attn is not importable ({tag}); {_INSTALL_HINT}")
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"flash attention needs CUDA fp16/bf16 tensors; got device={q.device}, dtype={q.dtype} "
            "(use the 'sdpa' backend, or run under autocast / a bf16 model)"
        )
    return call_flash(fn, q, k, v)


def call_flash(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Call a ``flash_attn_func`` with the inputs it accepts and return only the output.

    ``k``/``v`` are cast to ``q``'s dtype; a tensor whose last dimension is strided (flash-attn
    requires ``stride(-1) == 1``; other strides, e.g. a slice of a fused KV tensor, are passed as
    they are) is made contiguous. FA3's ``flash_attn_func`` returns ``(out, softmax_lse)``, FA2's
    ``out``: both give ``out`` ``(B, Lq, H, D)``.
    """
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k.to(q.dtype), v.to(q.dtype)))
    out = fn(q, k, v)  # (B, Lq, H, D), or (out, lse) from FA3
    return out[0] if isinstance(out, tuple) else out


def select_attention_backend(
    name: str = "auto", device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[Callable, str]:
    """Resolve a backend name to a kernel for a compute device and dtype.

    Args:
        name: ``auto | flash | sdpa | math`` (see the module docstring).
        device: where the model runs; ``auto`` picks flash only for CUDA. ``None`` means CPU.
        dtype: the compute dtype the kernel will see (the autocast dtype, e.g. ``train.precision``
            resolved by ``vdit.train.build.resolve_precision``). ``auto`` picks flash only for
            fp16/bf16; ``None`` (unknown) is treated as fp32 by ``auto``. An explicit ``flash`` with
            a known non-fp16/bf16 dtype is refused here, not at the first forward.

    Returns:
        ``(core, resolved_name)`` where ``resolved_name`` is ``flash``, ``sdpa`` or ``math``. The
        choice is logged once per (name, resolved, reason) (logger ``vdit``, level INFO).

    Raises:
        ValueError: for an unknown name (lists the valid ones), or ``flash`` with an fp32 ``dtype``.
        ImportError: ``flash`` requested without flash-attn installed (with the install hint).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {list(BACKENDS)}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    dt = str(dtype).replace("torch.", "") if dtype is not None else "fp32 (unspecified)"
    reason = "requested"
    if name == "auto":
        if dev.type != "cuda":
            resolved, reason = "sdpa", f"auto: device {dev}"
        elif dtype not in FLASH_DTYPES:  # flash-attn has no fp32 kernel: SDPA picks its own fused one
            resolved, reason = "sdpa", f"auto: compute dtype {dt} (flash needs fp16/bf16)"
        elif not flash_attn_available():
            resolved, reason = "sdpa", "auto: flash-attn not installed"
        else:
            resolved, reason = "flash", f"auto: {_flash_func()[1]} installed, device {dev}, dtype {dt}"
    else:
        resolved = name
    if resolved == "flash" and dtype is not None and dtype not in FLASH_DTYPES:
        raise ValueError(f"attention backend 'flash' needs an fp16/bf16 compute dtype, got {dt}; set "
                         "train.precision=bf16, or parallel.attention_backend=sdpa (or auto)")
    if resolved == "flash" and not flash_attn_available():
        raise ImportError(f"attention backend 'flash' needs flash-attn, which is not importable; {_INSTALL_HINT}")
    core = {"flash": flash_attention, "sdpa": sdpa_attention, "math": math_attention}[resolved]
    if (name, resolved, reason) not in _logged:
        _logged.add((name, resolved, reason))
        log.info("attention backend: %s (%s)", resolved, reason)
    return core, resolved


def apply_attention_backend(model: nn.Module, name: str = "auto", device: torch.device | str | None = None,
                            dtype: torch.dtype | None = None) -> str:
    """Set ``core`` on every :class:`~vdit.model.attention.Attention` of ``model`` (self and cross).

    ``name``, ``device`` and ``dtype`` (the compute dtype) resolve as in :func:`select_attention_backend`.

    If sequence parallelism already wraps a core, the backend replaces the kernel *inside* the SP
    wrapper (its ``inner`` attribute) rather than the wrapper itself.

    Returns:
        The resolved backend name.
    """
    core, resolved = select_attention_backend(name, device, dtype)
    for module in model.modules():
        if isinstance(module, Attention):
            if hasattr(module.core, "inner"):  # an SP wrapper (vdit.train.parallel.sequence)
                module.core.inner = core
            else:
                module.core = core
    return resolved


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each score row.

    Plain torch, computed in fp32 outside autocast (materialises the ``(B, H, Lq, Lk)`` scores:
    intended for one chunk of a ring block at a time). A row whose keys are all masked gets
    ``out = 0`` and ``lse = -inf``, which is exactly the neutral element of the log-sum-exp merge
    ring attention does.

    Args:
        q: ``(B, Lq, H, D)``; k, v: ``(B, Lk, H, D)``.
        key_mask: optional bool ``(B, Lk)``, True = keep.
        scale: score scale; default ``1/sqrt(D)``.

    Returns:
        ``(out, lse)``: out ``(B, Lq, H, D)`` in ``q.dtype``; lse ``(B, H, Lq)`` float32 with
        ``lse = logsumexp_k(scale * q.k)`` over the kept keys.
    """
    out, lse = _attention_with_lse_fp32(q, k, v, key_mask, scale)
    return out.to(q.dtype), lse


def _attention_with_lse_fp32(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_with_lse` with the output left in fp32 (ring attention accumulates in fp32).

    Autocast is switched off around the math: under bf16 autocast ``einsum`` would run in bf16 and
    leave the scores, P.V and the LSE in bf16 despite the fp32 inputs.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with _no_autocast(q.device):
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale  # (B, H, Lq, Lk)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))  # (B, H, Lq, Lk)
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, Lq); -inf for fully masked rows
        lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # (B, H, Lq)
        probs = torch.exp(scores - lse_safe[..., None])  # (B, H, Lq, Lk); 0 at masked keys
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float())  # (B, Lq, H, D)
    return out, lse


def _no_autocast(device: torch.device):
    """A context with autocast disabled on ``device`` (a no-op context where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()

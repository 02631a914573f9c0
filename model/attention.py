"""Multi-head attention with a swappable kernel ("core").

Every attention kernel in vdit has one signature, in the layout ``(B, L, H, D)``
(batch, tokens, heads, head dim)::

    core(q, k, v, attn_mask=None) -> out      # q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D)

``attn_mask`` is an optional bool key-padding mask ``(B, Lk)``, True = keep.

:class:`Attention` calls its kernel only through the attribute ``self.core``, so code outside the
model can replace it without copying a ``forward`` (sequence parallelism, flash-attention)::

    block.attn.core = ulysses_wrapper(block.attn.core)

Nothing else in ``model/`` calls ``scaled_dot_product_attention`` directly.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import RMSNorm
from .rope import apply_rotary

__all__ = ["AttentionCore", "sdpa_attention", "math_attention", "Attention", "QK_NORM_SCOPES"]

QK_NORM_SCOPES = ("head", "across_heads")


class AttentionCore(Protocol):
    """Signature of an attention kernel.

    Args:
        q: ``(B, Lq, H, D)`` queries.
        k: ``(B, Lk, H, D)`` keys.
        v: ``(B, Lk, H, D)`` values.
        attn_mask: optional bool ``(B, Lk)`` key-padding mask, True = attend to this key. Every row
            must keep at least one key (:class:`Attention` guarantees this).

    Returns:
        ``(B, Lq, H, D)`` in the dtype of ``q``; scale is ``1/sqrt(D)``.
    """

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Default core: ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        q: ``(B, Lq, H, D)``; k, v: ``(B, Lk, H, D)``.
        attn_mask: optional bool ``(B, Lk)``, True = keep.

    Returns:
        ``(B, Lq, H, D)``. Transposes to SDPA's ``(B, H, L, D)`` and back.
    """
    mask = None if attn_mask is None else attn_mask[:, None, None, :]  # (B, 1, 1, Lk) broadcast over H, Lq
    q = rearrange(q, "b l h d -> b h l d")  # (B, H, Lq, D)
    k = rearrange(k, "b l h d -> b h l d")  # (B, H, Lk, D)
    v = rearrange(v, "b l h d -> b h l d")  # (B, H, Lk, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, D)
    return rearrange(out, "b h l d -> b l h d")  # (B, Lq, H, D)


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference core: ``softmax(Q K^T / sqrt(D)) V`` computed explicitly in fp32 (for tests).

    Args:
        q: ``(B, Lq, H, D)``; k, v: ``(B, Lk, H, D)``.
        attn_mask: optional bool ``(B, Lk)``, True = keep.

    Returns:
        ``(B, Lq, H, D)`` cast back to ``q.dtype``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale  # (B, H, Lq, Lk)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask[:, None, None, :], float("-inf"))  # (B, H, Lq, Lk)
    probs = scores.softmax(dim=-1)  # (B, H, Lq, Lk)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float())  # (B, Lq, H, D)
    return out.to(q.dtype)


class Attention(nn.Module):
    """Multi-head self- or cross-attention with optional per-head QK RMSNorm and 3D RoPE.

    Args:
        dim: model width ``D`` of the queries (and of the output).
        num_heads: number of heads ``H``; the head dim is ``dim // num_heads``.
        context_dim: width of the key/value source for cross-attention; ``None`` means ``dim``.
        qk_norm: apply :class:`~vdit.model.layers.RMSNorm` to q and k, which keeps attention logits
            bounded at scale (as in SD3 / Esser et al. 2024).
        qk_norm_scope: ``"head"`` (default): normalise each head's ``Dh`` channels, one ``(Dh,)`` gain
            shared by the heads. ``"across_heads"`` (Wan 2.1): normalise the whole projected ``(D,)``
            vector before it is split into heads, with a ``(D,)`` gain.

    Attributes:
        core: the attention kernel (:class:`AttentionCore`), default :func:`sdpa_attention`.
            Replace it to change the kernel or to add sequence parallelism around it.

    Raises:
        ValueError: if ``num_heads`` does not divide ``dim``, or an unknown ``qk_norm_scope``.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qk_norm: bool = True,
                 qk_norm_scope: str = "head"):
        super().__init__()
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be positive and divide dim={dim}")
        if qk_norm_scope not in QK_NORM_SCOPES:
            raise ValueError(f"qk_norm_scope={qk_norm_scope!r} is not one of {list(QK_NORM_SCOPES)}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        kv_dim = dim if context_dim is None else context_dim
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_across_heads = qk_norm_scope == "across_heads"
        norm_dim = dim if self.norm_across_heads else self.head_dim
        self.q_norm = RMSNorm(norm_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(norm_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.core: AttentionCore = sdpa_attention

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` to itself (self-attention) or to ``context`` (cross-attention).

        Args:
            x: ``(B, L, D)`` query tokens.
            context: ``(B, Lc, Dc)`` key/value tokens for cross-attention; ``None`` = self-attention.
            context_mask: bool ``(B, Lc)``, True = real token. A sample whose mask is all False
                attends to nothing and gets a zero output (no NaN).
            rope: ``(cos, sin)`` each ``(L, head_dim)`` from :class:`~vdit.model.rope.RotaryEmbedding3D`,
                applied to q and k; self-attention only.

        Returns:
            ``(B, L, D)``.

        Raises:
            ValueError: if ``rope`` is given together with ``context`` (text tokens have no 3D
                position), or ``context_mask`` without ``context``.
        """
        if context is None and context_mask is not None:
            raise ValueError("context_mask was given without context")
        if context is not None and rope is not None:
            raise ValueError("rope applies to self-attention only; got both context and rope")
        src = x if context is None else context  # (B, Lk, Dk)
        q, k = self.q_proj(x), self.k_proj(src)  # (B, L, D), (B, Lk, D)
        if self.norm_across_heads:
            q, k = self.q_norm(q), self.k_norm(k)  # (B, L, D), (B, Lk, D): one RMS over all heads
        q = rearrange(q, "b l (h d) -> b l h d", h=self.num_heads)  # (B, L, H, Dh)
        k = rearrange(k, "b l (h d) -> b l h d", h=self.num_heads)  # (B, Lk, H, Dh)
        v = rearrange(self.v_proj(src), "b l (h d) -> b l h d", h=self.num_heads)  # (B, Lk, H, Dh)
        if not self.norm_across_heads:
            q, k = self.q_norm(q), self.k_norm(k)  # (B, L, H, Dh), (B, Lk, H, Dh): one RMS per head
        if rope is not None:
            q = apply_rotary(q, *rope)  # (B, L, H, Dh)
            k = apply_rotary(k, *rope)  # (B, L, H, Dh)
        keep_any = None
        if context_mask is not None:
            # A fully padded row would make softmax NaN: let it attend everywhere, then zero it.
            keep_any = context_mask.any(dim=-1)  # (B,)
            context_mask = context_mask | ~keep_any[:, None]  # (B, Lk)
        out = self.core(q, k, v, attn_mask=context_mask)  # (B, L, H, Dh)
        if keep_any is not None:
            out = out * keep_any[:, None, None, None].to(out.dtype)  # (B, L, H, Dh)
        out = rearrange(out, "b l h d -> b l (h d)")  # (B, L, D)
        return self.out_proj(out)  # (B, L, D)

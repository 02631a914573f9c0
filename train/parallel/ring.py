"""Ring attention (Liu et al. 2023): exact softmax attention over a sequence split across ranks.

Rank ``r`` of the ring group holds segment ``r`` of the queries, keys and values. K/V blocks travel
around the ring; each rank attends its queries to the block in hand and merges the partial results
with an online log-sum-exp (LSE). No rank holds more than two K/V blocks. Used by
:mod:`vdit.train.parallel.sequence` for ``ring`` and, across Ulysses groups, ``hybrid``.

Block kernels
-------------
One block is ``(q (B, S, H, D), k/v (B, nk, H, D)) -> (out, lse (B, H, S) fp32)`` forward, and the
FlashAttention-2 backward of that block against the *final* merged ``out`` and ``lse``.
:func:`select_block_kernel` picks one per call:

    flash-attn  CUDA, fp16/bf16, no key mask, head dim a multiple of 8 up to 256, FlashAttention-2
                importable: ``flash_attn_func(return_attn_probs=True)`` forward (its LSE),
                ``_flash_attn_backward`` backward (what ring-flash-attention calls).
    aten-flash  the same without flash-attn: ``aten._scaled_dot_product_flash_attention`` and its
                backward, the ops PyTorch's own context parallelism rings over.
    math        everything else (CPU, fp32, key masks): explicit fp32 math, over query chunks so no
                score tensor exceeds ``_MATH_SCORES_BUDGET`` elements.

Precision
---------
Every kernel returns an fp32 LSE; blocks are merged, and dQ/dK/dV accumulated, in fp32; results
are cast back to the input dtype. The ring runs with autocast *disabled*: under bf16 autocast,
``einsum`` would otherwise run in bf16, leaving scores, P.V and the LSE in bf16 while the backward
assumes an exact LSE -- 10x SDPA-in-bf16's error (issue 14; ``tests/test_ring_precision.py``
measures it). Inputs are first brought to one dtype the way SDPA would see them: the autocast
dtype on CUDA under autocast (so they reach the fused kernels), else their promoted dtype.

Why not PyTorch's context parallelism (``torch.distributed.tensor.experimental.context_parallel``)?
It rings over the same aten kernels, but by patching SDPA on DTensor shards of whole buffers: it
needs the sequence divisible by the group, knows no padded keys or key masks, has no CPU/gloo path
and does not compose with Ulysses. Here the ring wraps the model's attention core (DESIGN.md 3.1),
drops padded keys, runs inside ``hybrid``, and is tested on CPU.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .attention import _attention_with_lse_fp32, _no_autocast
from .comm import _ring_exchange, _wait

__all__ = ["BlockKernel", "ring_attention", "select_block_kernel"]

log = logging.getLogger("vdit")

FUSED_DTYPES = (torch.float16, torch.bfloat16)
# Largest score-shaped fp32 tensor of the math kernel, in elements (64 MiB); queries are chunked to fit.
_MATH_SCORES_BUDGET = 1 << 24


# --------------------------------------------------------------------------------------------
# key layout shared by the wrappers of one forward
# --------------------------------------------------------------------------------------------


@dataclass
class _KeyLayout:
    """Which keys of the padded global sequence ``[0, padded_len)`` are real.

    ``real_len``: keys ``>= real_len`` are padding (always excluded). ``mask``: optional bool
    ``(B, padded_len)`` from a caller-supplied key mask, True = keep (already includes the padding).
    """

    real_len: int
    padded_len: int
    mask: torch.Tensor | None = None

    def block(self, start: int, length: int) -> tuple[int, torch.Tensor | None]:
        """Number of non-pad keys in ``[start, start+length)`` and their mask (``None`` = all kept)."""
        n = max(0, min(length, self.real_len - start))
        return n, None if self.mask is None else self.mask[:, start : start + n]


# --------------------------------------------------------------------------------------------
# block kernels: forward with an fp32 LSE, backward against the merged out / LSE
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockKernel:
    """One ring block's attention.

    ``forward(q, k, v, key_mask, scale) -> (out, lse, state)``: q ``(B, S, H, D)``, k/v
    ``(B, nk, H, D)``, key_mask bool ``(B, nk)`` or ``None``; out ``(B, S, H, D)`` (fp32 or the input
    dtype), lse ``(B, H, S)`` fp32, state: whatever the backward of this block needs.

    ``backward(dout, q, k, v, key_mask, out, lse, state, scale) -> (dq, dk, dv)``, with ``out`` and
    ``lse`` the final merged ones (so ``P = exp(scale q.k - lse)`` is this block's share of the
    global softmax), grads in fp32 or the input dtype.
    """

    name: str
    forward: Callable
    backward: Callable


def _query_chunk(b: int, h: int, s: int, nk: int) -> int:
    """Query rows per chunk so that a ``(B, H, rows, nk)`` fp32 tensor stays within the budget."""
    return max(1, min(s, _MATH_SCORES_BUDGET // max(1, b * h * nk)))


def _math_forward(q, k, v, key_mask, scale):
    b, s, h, _ = q.shape
    c = _query_chunk(b, h, s, k.shape[1])
    parts = [_attention_with_lse_fp32(q[:, i : i + c], k, v, key_mask, scale) for i in range(0, s, c)]
    out = torch.cat([o for o, _ in parts], dim=1)  # (B, S, H, D) fp32
    lse = torch.cat([l for _, l in parts], dim=2)  # (B, H, S) fp32
    return out, lse, None


def _math_backward(dout, q, k, v, key_mask, out, lse, state, scale):
    b, s, h, _ = q.shape
    c = _query_chunk(b, h, s, k.shape[1])
    with _no_autocast(q.device):
        kf, vf = k.float(), v.float()  # (B, nk, H, D)
        lse_safe = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))  # no keys -> P = 0
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # (B, S, H, D)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)  # (B, nk, H, D)
        dv = torch.zeros_like(dk)  # (B, nk, H, D)
        for i in range(0, s, c):
            qc, doc = q[:, i : i + c].float(), dout[:, i : i + c].float()  # (B, c, H, D)
            delta = (doc * out[:, i : i + c].float()).sum(-1).transpose(1, 2)  # (B, H, c): rowsum(dO * O)
            scores = torch.einsum("bqhd,bkhd->bhqk", qc, kf) * scale  # (B, H, c, nk)
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            p = torch.exp(scores - lse_safe[:, :, i : i + c, None])  # (B, H, c, nk)
            dv += torch.einsum("bhqk,bqhd->bkhd", p, doc)  # (B, nk, H, D)
            dp = torch.einsum("bqhd,bkhd->bhqk", doc, vf)  # (B, H, c, nk)
            ds = p * (dp - delta[..., None])  # (B, H, c, nk)
            dq[:, i : i + c] = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale  # (B, c, H, D)
            dk += torch.einsum("bhqk,bqhd->bkhd", ds, qc) * scale  # (B, nk, H, D)
    return dq, dk, dv


MATH_KERNEL = BlockKernel("math", _math_forward, _math_backward)


_FA2_BWD_ARGS = dict(dropout_p=0.0, causal=False, window_size=(-1, -1), window_size_left=-1, window_size_right=-1,
                     softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None)


@functools.lru_cache(maxsize=None)
def _flash_attn2() -> tuple[Callable, Callable, frozenset] | None:
    """``(flash_attn_func, _flash_attn_backward, backward parameter names)`` of FlashAttention-2, or None.

    Resolved once (cached; :func:`~vdit.train.parallel.sequence.apply_sequence_parallel` primes it),
    never inside a compiled region. ``_flash_attn_backward`` is private and its signature moved
    across 2.x releases (``window_size`` became ``window_size_left/right``, ``softcap`` appeared, 2.7
    made it a ``torch.library`` custom op), so it is called by keyword with the parameters it has;
    a version needing one we do not know is not used (aten-flash instead).
    """
    try:
        mod = importlib.import_module("flash_attn.flash_attn_interface")
        fwd, bwd = mod.flash_attn_func, mod._flash_attn_backward
        sig = inspect.signature(getattr(bwd, "_init_fn", bwd))  # a torch.library CustomOpDef wraps _init_fn
    except Exception:  # ImportError, or an OSError/RuntimeError from a wheel built for another CUDA
        return None
    known = {"dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "softmax_scale", *_FA2_BWD_ARGS}
    required = {n for n, p in sig.parameters.items() if p.default is inspect.Parameter.empty}
    if not required <= known:
        return None
    return fwd, bwd, frozenset(sig.parameters)


def _fa2_forward(q, k, v, key_mask, scale):
    fwd, _, _ = _flash_attn2()
    out, lse, _ = fwd(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False, return_attn_probs=True)
    return out, lse, None  # (B, S, H, D) input dtype, (B, H, S) fp32


def _fa2_backward(dout, q, k, v, key_mask, out, lse, state, scale):
    _, bwd, names = _flash_attn2()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = dict(_FA2_BWD_ARGS, dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv,
                softmax_scale=scale)
    bwd(**{n: a for n, a in args.items() if n in names})  # writes dq, dk, dv in place
    return dq, dk, dv


FLASH_ATTN_KERNEL = BlockKernel("flash-attn", _fa2_forward, _fa2_backward)


def _aten_flash_forward(q, k, v, key_mask, scale):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D) views, as SDPA passes them
    out, lse, *rest = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False, scale=scale)
    # rest: cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug mask -> the backward's arguments
    return out.transpose(1, 2), lse, tuple(rest[:6])  # (B, S, H, D), (B, H, S) fp32


def _aten_flash_backward(dout, q, k, v, key_mask, out, lse, state, scale):
    cum_q, cum_k, max_q, max_k, seed, offset = state
    qt, kt, vt, ot, dot = (t.transpose(1, 2) for t in (q, k, v, out, dout))  # (B, H, L, D)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dot, qt, kt, vt, ot, lse, cum_q, cum_k, max_q, max_k, 0.0, False, seed, offset, scale=scale)
    return tuple(g.transpose(1, 2) for g in grads)  # (B, S, H, D), (B, nk, H, D) x2


ATEN_FLASH_KERNEL = BlockKernel("aten-flash", _aten_flash_forward, _aten_flash_backward)

_logged: set[str] = set()


def select_block_kernel(device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool) -> BlockKernel:
    """The block kernel for one ring call (see the module docstring); logged once per choice."""
    if masked or device.type != "cuda" or dtype not in FUSED_DTYPES or head_dim % 8 or head_dim > 256:
        kernel = MATH_KERNEL
    else:
        kernel = FLASH_ATTN_KERNEL if _flash_attn2() is not None else ATEN_FLASH_KERNEL
    if kernel.name not in _logged:
        _logged.add(kernel.name)
        log.info("ring attention block kernel: %s (device %s, dtype %s, head dim %d, key mask %s)",
                 kernel.name, device, str(dtype).replace("torch.", ""), head_dim, masked)
    return kernel


# --------------------------------------------------------------------------------------------
# the ring
# --------------------------------------------------------------------------------------------


def _merge(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor):
    """Log-sum-exp merge of two partial softmax results; ``lse = -inf`` is the neutral element.

    out/blk_out ``(B, L, H, D)`` fp32, lse/blk_lse ``(B, H, L)`` fp32.
    """
    new = torch.logaddexp(lse, blk_lse)  # (B, H, L)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))  # (B, H, L)
    w_old = torch.exp(lse - safe).transpose(1, 2)[..., None]  # (B, L, H, 1)
    w_blk = torch.exp(blk_lse - safe).transpose(1, 2)[..., None]  # (B, L, H, 1)
    return out * w_old + blk_out * w_blk, new


class _RingAttention(torch.autograd.Function):
    """Ring attention over the segments held by the ranks of ``group``.

    Rank ``r`` holds segment ``r`` = global keys/queries ``[r*S, (r+1)*S)`` (``S`` = local length).
    Forward: at step ``s`` rank ``r`` attends to K/V block ``(r - s) mod R`` and merges by LSE while
    the block moves on to ``r+1``. Backward (FlashAttention-2's backward, blockwise): each block's
    kernel recomputes ``P = exp(scale q.k - lse)`` from the saved q and the final lse; dQ is
    accumulated locally, dK/dV accumulators (fp32) travel around the ring with their K/V block and
    reach their owner after ``R`` hops. No autograd through the P2P calls; autocast off throughout.
    """

    @staticmethod
    def forward(ctx, q, k, v, group: ProcessGroup, layout: _KeyLayout, scale: float, kernel: BlockKernel):
        n, r = dist.get_world_size(group), dist.get_rank(group)
        b, s, h, d = q.shape
        states = {}
        with _no_autocast(q.device):
            out = torch.zeros(b, s, h, d, dtype=torch.float32, device=q.device)  # (B, S, H, D)
            lse = torch.full((b, h, s), float("-inf"), dtype=torch.float32, device=q.device)  # (B, H, S)
            kv = torch.stack([k, v])  # (2, B, S, H, D): the block in hand
            for step in range(n):
                works = []
                if step < n - 1:
                    nxt, works = _ring_exchange(kv, group, "fwd", tag=0)  # overlaps with this block's math
                j = (r - step) % n
                nk, mask = layout.block(j * s, s)
                if nk > 0:  # a block of pure padding contributes nothing
                    blk_out, blk_lse, states[j] = kernel.forward(q, kv[0, :, :nk], kv[1, :, :nk], mask, scale)
                    out, lse = _merge(out, lse, blk_out.float(), blk_lse)  # (B, S, H, D), (B, H, S)
                if works:
                    _wait(works)
                    kv = nxt
            out = out.to(q.dtype)  # (B, S, H, D)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.layout, ctx.scale, ctx.kernel, ctx.states = group, layout, scale, kernel, states
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, layout, scale, kernel = ctx.group, ctx.layout, ctx.scale, ctx.kernel
        n, r = dist.get_world_size(group), dist.get_rank(group)
        s = q.shape[1]
        with _no_autocast(q.device):
            dout = dout.to(out.dtype).contiguous()  # (B, S, H, D)
            dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # (B, S, H, D)
            kv = torch.stack([k, v])  # (2, B, S, H, D)
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # (2, B, S, H, D) for the block in hand
            for step in range(n):
                kv_works = []
                if step < n - 1:
                    kv_next, kv_works = _ring_exchange(kv, group, "bwd", tag=0)
                j = (r - step) % n
                nk, mask = layout.block(j * s, s)
                if nk > 0:
                    dqb, dkb, dvb = kernel.backward(dout, q, kv[0, :, :nk], kv[1, :, :nk], mask, out, lse,
                                                    ctx.states[j], scale)
                    dq += dqb  # (B, S, H, D)
                    dkv[0, :, :nk] += dkb  # (B, nk, H, D)
                    dkv[1, :, :nk] += dvb  # (B, nk, H, D)
                if n > 1:  # the accumulator follows its block; after n hops it is home
                    dkv_next, dkv_works = _ring_exchange(dkv, group, "bwd", tag=1)
                    _wait(kv_works + dkv_works)
                    dkv = dkv_next
                    if kv_works:
                        kv = kv_next
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def _compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """The dtype the ring computes in: autocast's on CUDA under autocast (as SDPA would be cast),
    else the promoted input dtype (q/k may be fp32 after RoPE while v is bf16)."""
    if q.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


@torch.compiler.disable  # P2P exchanges and a hand-written backward: eager, a graph break in a compiled block
def ring_attention(q, k, v, group: ProcessGroup, layout: _KeyLayout, scale: float | None = None) -> torch.Tensor:
    """Ring attention of local segments ``(B, S, H, D)`` -> ``(B, S, H, D)`` (see :class:`_RingAttention`).

    The output has the compute dtype (:func:`_compute_dtype`): the input dtype, or autocast's on CUDA.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype = _compute_dtype(q, k, v)
    q, k, v = (t.to(dtype) for t in (q, k, v))  # (B, S, H, D) each; no-ops when already there
    kernel = select_block_kernel(q.device, dtype, q.shape[-1], layout.mask is not None)
    return _RingAttention.apply(q, k, v, group, layout, scale, kernel)

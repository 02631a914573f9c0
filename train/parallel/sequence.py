"""Sequence parallelism (SP) for :class:`~vdit.model.dit.VideoDiT`, applied from outside the model.

The video token sequence of one sample is split across the ``sp`` ranks of an SP group; every
self-attention exchanges data so that each query still sees every key. Three modes:

    ulysses  DeepSpeed-Ulysses (Jacobs et al. 2023): an all-to-all turns sequence-sharded
             q/k/v ``(B, L/sp, H, D)`` into head-sharded ``(B, L, H/sp, D)``, the ordinary kernel
             runs on the whole sequence for ``H/sp`` heads, a second all-to-all turns the output back.
             Needs ``num_heads % sp == 0``. Per layer and rank it sends 4 tensors of
             ``(B, L/sp, H, D)`` (q, k, v, out), each ``(sp-1)/sp`` of it, forward; the same backward.
    ring     Ring attention (Liu et al. 2023): K/V blocks travel around the group while each rank
             merges partial attention over them with an online log-sum-exp; no rank ever holds more
             than two K/V blocks. No head constraint. ``sp-1`` K/V passes forward; backward passes
             K/V ``sp-1`` times and the dK/dV accumulators ``sp`` times (fp32). Lives in ``ring.py``
             (block kernels with an fp32 LSE: flash-attn / PyTorch flash on CUDA, fp32 math on CPU).
    hybrid   USP (Fang & Zhao 2024): Ulysses inside groups of ``ulysses_size`` consecutive ranks,
             ring across ``ring_size`` such groups (``ulysses_size * ring_size == sp``). Only
             ``num_heads % ulysses_size == 0`` is needed.

How it attaches (DESIGN.md 3.1: hooks and core replacement only, never a copied ``forward``):

    patch_embed  forward hook: pad ``L`` with zero tokens up to a multiple of ``sp``, keep this
                 rank's contiguous chunk of ``L_pad / sp`` tokens.
    rope         forward hook: pad/shard ``cos`` and ``sin`` identically (positions match tokens).
    token_frames forward hook (per-frame timesteps only): pad/shard the per-token frame index ``(L,)``
                 identically, so each local token takes the adaLN modulation of its own latent frame,
                 wherever the frame boundaries fall between ranks (conditioning frames may live on
                 any rank). Padded tokens take frame 0's modulation; their outputs are dropped.
    block.attn   ``core`` replaced by an SP wrapper. Padded *keys* are excluded (sliced off or masked),
                 so pad tokens never change a real token's output; padded *queries* compute junk that
                 is dropped at the end.
    cross_attn   untouched: text tokens stay replicated, cross-attention is per query token.
    final_layer  forward hook: all-gather the ``(B, L/sp, P)`` outputs and drop the padding. The
                 gather's backward returns this rank's slice of the incoming gradient, NOT a sum,
                 because everything after it (unpatchify, loss) is replicated on every SP rank.

Contract (asserted by ``tests/test_sequence_parallel.py``, fp32, any ``L`` including ``L % sp != 0``):
with identical inputs on every rank of an SP group,

1. the model output ``(B, C, T, H, W)`` on every SP rank equals the single-device output, and
2. the **sum over the SP group** of each parameter's ``.grad`` equals the single-device gradient.

Rules for the trainer
---------------------
* **Data.** All ranks of one SP group must see the *same* batch, the same flow timesteps and the
  same noise: shard the dataset by data-parallel rank (``dp_rank``, ``dp_size``), not by global
  rank, and seed per-step randomness with the dp rank. Only the ``dp`` dimension sees different data.
* **Loss.** Every SP rank computes the same full loss over the full sequence (the output is
  gathered), so loss normalisation (per token, per sample, gradient accumulation) is independent
  of ``sp`` -- no division by ``sp`` anywhere.
* **Gradients.** All-reduce parameter gradients with SUM over the SP group, then AVERAGE over the
  dp group (:func:`reduce_sp_gradients` does the first). If instead a wrapper averages over all
  ``dp * sp`` ranks at once (DDP / FSDP on the flat world), multiply the loss by
  ``sp_loss_scale(sp, "world") == sp`` -- see :func:`sp_loss_scale`.
* **Groups.** :func:`build_sp_groups` puts consecutive ranks in one SP group
  (``rank = dp_idx * sp + sp_idx``) so SP traffic stays inside a node; inside an SP group, hybrid
  uses ``sp_idx = ring_idx * ulysses_size + ulysses_idx`` (Ulysses' all-to-alls on the closest
  ranks, ring's overlappable P2P across). A DeviceMesh works too: pass its sub-meshes' groups
  (``mesh["sp"].get_group()``; for hybrid a mesh ``("dp", "ring", "ulysses")`` and
  ``mesh["ulysses"].get_group()``, ``mesh["ring"].get_group()``); :func:`apply_sequence_parallel`
  checks that the layout is the one above.
* **Order.** attention backend -> sequence parallel -> activation checkpointing -> compile -> FSDP
  (SP wraps the kernel, so it comes after the backend is chosen; :func:`apply_attention_backend`
  also works afterwards, it swaps the kernel inside the SP wrapper).
* **Compile** (:func:`~vdit.train.parallel.fsdp.apply_compile`, per block): Ulysses' all-to-alls are
  functional collectives inside the block's graph (no graph break; :data:`COMM_STATS` counts eager
  calls only); ring attention runs eagerly (``@torch.compiler.disable``), a graph break around each
  call. A token count that needs padding (``L % sp != 0``) compiles one more graph than one that
  does not (the key slice differs); ``tests/test_compile.py`` bounds the count.
* The per-forward sequence length lives in the handle, set by the ``patch_embed`` hook; activation
  recomputation (checkpointing) is fine as long as forward/backward of different sequence lengths
  are not interleaved.

Typical use::

    groups = build_sp_groups(world_size, sp_size=4, mode="hybrid", ulysses_size=2, ring_size=2)
    handle = apply_sequence_parallel(model, groups.sp, "hybrid", groups.ulysses, groups.ring)
    loss = flow_loss(model(x, t, text, text_mask), target)      # same x, t, noise on all SP ranks
    loss.backward(); reduce_sp_gradients(model, groups.sp)      # then average over groups.dp
    handle.remove()                                              # back to the single-device model
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from vdit.model.attention import Attention

from .comm import COMM_STATS, CommStats, _nbytes, all_to_all_dim0, count_comm
from .ring import _flash_attn2, _KeyLayout, ring_attention

__all__ = [
    "MODES",
    "COMM_STATS",
    "CommStats",
    "SPGroups",
    "SequenceParallelHandle",
    "apply_sequence_parallel",
    "build_sp_groups",
    "reduce_sp_gradients",
    "ring_attention",
    "sp_loss_scale",
    "ulysses_attention",
]

MODES = ("ulysses", "ring", "hybrid")


# --------------------------------------------------------------------------------------------
# Ulysses (ring attention, also used inside hybrid, lives in ring.py)
# --------------------------------------------------------------------------------------------


def _seq_to_head(qkv: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``(S, B, Ls, H, D)`` sequence-sharded stack -> ``(S, B, n*Ls, H/n, D)`` head-sharded.

    The gathered sequence is ordered by group rank, so it is contiguous in the global sequence when
    group rank ``i`` holds the ``i``-th consecutive chunk (the layout of :func:`build_sp_groups`).
    """
    n = dist.get_world_size(group)
    s, b, ls, h, d = qkv.shape
    x = qkv.reshape(s, b, ls, n, h // n, d).permute(3, 0, 1, 2, 4, 5)  # (n, S, B, Ls, H/n, D): dim 0 = destination
    y = all_to_all_dim0(x, group)  # (n, S, B, Ls, H/n, D): dim 0 = source = sequence chunk
    return y.permute(1, 2, 0, 3, 4, 5).reshape(s, b, n * ls, h // n, d)  # (S, B, n*Ls, H/n, D)


def _head_to_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``(B, n*Ls, H/n, D)`` head-sharded -> ``(B, Ls, H, D)`` sequence-sharded (inverse of the above)."""
    n = dist.get_world_size(group)
    b, l, hn, d = x.shape
    ls = l // n
    x = x.reshape(b, n, ls, hn, d).permute(1, 0, 2, 3, 4)  # (n, B, Ls, H/n, D): dim 0 = destination chunk
    y = all_to_all_dim0(x, group)  # (n, B, Ls, H/n, D): dim 0 = source = head group
    return y.permute(1, 2, 0, 3, 4).reshape(b, ls, n * hn, d)  # (B, Ls, H, D)


def ulysses_attention(q, k, v, group: ProcessGroup, layout: _KeyLayout, inner, ring_group=None) -> torch.Tensor:
    """Ulysses attention of sequence shards ``(B, Ls, H, D)`` -> ``(B, Ls, H, D)``.

    After the all-to-all this rank holds ``H/n`` heads of ``n`` consecutive chunks. With
    ``ring_group=None`` those chunks are the whole (padded) sequence and ``inner`` runs on it, with
    padded keys sliced off (so unmasked flash kernels apply). With a ring group (hybrid), the chunks
    are this rank's ring segment and ring attention runs across the ring group.
    """
    qkv = _seq_to_head(torch.stack([q, k, v]), group)  # (3, B, n*Ls, H/n, D)
    q, k, v = qkv.unbind(0)  # (B, n*Ls, H/n, D) each
    if ring_group is not None:
        out = ring_attention(q, k, v, ring_group, layout)  # (B, n*Ls, H/n, D)
    elif layout.mask is None:
        nk = layout.real_len
        out = inner(q, k[:, :nk], v[:, :nk], attn_mask=None)  # (B, L_pad, H/n, D)
    else:
        out = inner(q, k, v, attn_mask=layout.mask)  # (B, L_pad, H/n, D)
    return _head_to_seq(out, group)  # (B, Ls, H, D)


# --------------------------------------------------------------------------------------------
# token split / gather
# --------------------------------------------------------------------------------------------


class _GatherSequence(torch.autograd.Function):
    """All-gather ``(B, Ls, P)`` chunks along dim 1 and keep the first ``real_len`` rows.

    Backward returns this rank's slice of the incoming gradient (no reduction): the computation
    after the gather is replicated on every SP rank, so every rank already holds the full gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup, real_len: int):
        n, r = dist.get_world_size(group), dist.get_rank(group)
        ctx.rank, ctx.local, ctx.padded = r, x.shape[1], x.shape[1] * n
        x = x.contiguous()
        if n == 1:
            return x[:, :real_len]
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x, group=group)
        count_comm("all_gather", "fwd", _nbytes(x) * (n - 1))
        return torch.cat(parts, dim=1)[:, :real_len]  # (B, L, P)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = F.pad(grad, (0, 0, 0, ctx.padded - grad.shape[1]))  # (B, L_pad, P)
        return grad[:, ctx.rank * ctx.local : (ctx.rank + 1) * ctx.local].contiguous(), None, None


def _pad_and_shard(x: torch.Tensor, dim: int, padded_len: int, rank: int, size: int) -> torch.Tensor:
    """Zero-pad ``dim`` to ``padded_len`` and keep chunk ``rank`` of ``size`` equal chunks."""
    pad = padded_len - x.shape[dim]
    if pad:
        widths = [0, 0] * (x.ndim - 1 - dim) + [0, pad]
        x = F.pad(x, widths)
    local = padded_len // size
    # clone: a view would keep the whole padded sequence alive for as long as the chunk is saved
    return x.narrow(dim, rank * local, local).clone()


# --------------------------------------------------------------------------------------------
# the attention-core wrapper and the handle
# --------------------------------------------------------------------------------------------


class SequenceParallelCore:
    """Replacement for ``block.attn.core``: sequence-parallel self-attention.

    Attributes:
        inner: the single-device kernel Ulysses runs on its head shard (the core it replaced; set by
            :func:`~vdit.train.parallel.attention.apply_attention_backend`). Ring blocks pick their own
            kernel, one that returns an fp32 log-sum-exp (:func:`~vdit.train.parallel.ring.select_block_kernel`).
    """

    def __init__(self, handle: SequenceParallelHandle, inner):
        self.handle = handle
        self.inner = inner

    def __call__(self, q, k, v, attn_mask=None):
        """q, k, v: this rank's ``(B, L_pad/sp, H, D)``; attn_mask: optional local bool ``(B, L_pad/sp)``."""
        hd = self.handle
        layout = hd._layout
        if layout is None or q.shape[1] * hd.sp_size != layout.padded_len:
            raise RuntimeError(
                "sequence-parallel attention called with "
                f"{q.shape[1]} local tokens but the patch_embed hook prepared "
                f"{None if layout is None else layout.padded_len // hd.sp_size}; the SP core only works "
                "inside VideoDiT.forward (self-attention on the patch tokens)"
            )
        if attn_mask is not None:  # a caller-supplied key mask: gather it (every SP rank passes one)
            layout = _KeyLayout(layout.real_len, layout.padded_len, _gather_mask(attn_mask, hd.sp_group, layout))
        if hd.mode == "ring":
            return ring_attention(q, k, v, hd.ring_group, layout)
        return ulysses_attention(q, k, v, hd.ulysses_group, layout, self.inner,
                                 hd.ring_group if hd.mode == "hybrid" else None)

    def __repr__(self) -> str:
        return f"SequenceParallelCore(mode={self.handle.mode}, sp={self.handle.sp_size}, inner={self.inner!r})"


def _gather_mask(mask: torch.Tensor, group: ProcessGroup, layout: _KeyLayout) -> torch.Tensor:
    n = dist.get_world_size(group)
    m = mask.to(torch.uint8).contiguous()  # gloo has no bool
    parts = [torch.empty_like(m) for _ in range(n)]
    dist.all_gather(parts, m, group=group)
    full = torch.cat(parts, dim=1).bool()  # (B, L_pad)
    pos = torch.arange(layout.padded_len, device=mask.device)
    return full & (pos < layout.real_len)[None]


class SequenceParallelHandle:
    """What :func:`apply_sequence_parallel` installed; ``remove()`` restores the single-device model.

    Attributes:
        mode, sp_group, ulysses_group, ring_group, sp_size, sp_rank: the configuration.
    """

    def __init__(self, model, sp_group, mode, ulysses_group, ring_group):
        self.model = model
        self.mode = mode
        self.sp_group = sp_group
        self.ulysses_group = ulysses_group
        self.ring_group = ring_group
        self.sp_size = dist.get_world_size(sp_group)
        self.sp_rank = dist.get_rank(sp_group)
        self._layout: _KeyLayout | None = None
        self._hooks: list = []
        self._cores: list[tuple[Attention, object]] = []

    # hooks -----------------------------------------------------------------------------------
    def _split_tokens(self, module, args, out: torch.Tensor) -> torch.Tensor:
        real = out.shape[1]  # (B, L, D)
        padded = -(-real // self.sp_size) * self.sp_size
        self._layout = _KeyLayout(real, padded)
        return _pad_and_shard(out, 1, padded, self.sp_rank, self.sp_size)  # (B, L_pad/sp, D)

    def _split_rope(self, module, args, out):
        cos, sin = out  # (L, Dh) each
        layout = self._layout
        if layout is None or cos.shape[0] != layout.real_len:
            raise RuntimeError(f"rope produced {cos.shape[0]} positions but patch_embed produced "
                               f"{None if layout is None else layout.real_len} tokens")
        return tuple(_pad_and_shard(t, 0, layout.padded_len, self.sp_rank, self.sp_size) for t in (cos, sin))

    def _split_token_frames(self, module, args, out: torch.Tensor) -> torch.Tensor:
        layout = self._layout  # out: (L,) int64 frame index per token
        if layout is None or out.shape[0] != layout.real_len:
            raise RuntimeError(f"token_frames produced {out.shape[0]} positions but patch_embed produced "
                               f"{None if layout is None else layout.real_len} tokens")
        return _pad_and_shard(out, 0, layout.padded_len, self.sp_rank, self.sp_size)  # (L_pad/sp,)

    def _gather_tokens(self, module, args, out: torch.Tensor) -> torch.Tensor:
        return _GatherSequence.apply(out, self.sp_group, self._layout.real_len)  # (B, L, P)

    def remove(self) -> None:
        """Remove the hooks and put the original attention cores back."""
        for h in self._hooks:
            h.remove()
        for attn, core in self._cores:
            attn.core = core.inner if isinstance(core, SequenceParallelCore) else core
        self._hooks.clear()
        self._cores.clear()
        self._layout = None


def apply_sequence_parallel(
    model: nn.Module,
    sp_group: ProcessGroup,
    mode: str = "ulysses",
    ulysses_group: ProcessGroup | None = None,
    ring_group: ProcessGroup | None = None,
) -> SequenceParallelHandle:
    """Make ``model`` (a :class:`~vdit.model.dit.VideoDiT`) sequence-parallel over ``sp_group``.

    Args:
        model: needs ``patch_embed``, ``rope``, ``final_layer`` and ``blocks[i].attn`` (and
            ``token_frames`` when it has one: per-frame timesteps).
        sp_group: the ranks sharing one sample's sequence (same inputs on all of them).
        mode: ``ulysses`` | ``ring`` | ``hybrid``.
        ulysses_group, ring_group: hybrid only (required there): the sub-groups of ``sp_group``
            with layout ``sp_rank = ring_rank * ulysses_size + ulysses_rank``.

    Returns:
        A :class:`SequenceParallelHandle`; ``handle.remove()`` undoes everything.

    Raises:
        ValueError: unknown mode; heads not divisible by the Ulysses degree (suggests ring/hybrid);
            hybrid groups missing, of the wrong sizes or in the wrong layout.
        RuntimeError: SP already applied to this model.
    """
    if mode not in MODES:
        raise ValueError(f"unknown sequence-parallel mode {mode!r}; valid: {list(MODES)}")
    attns = [block.attn for block in model.blocks]
    if any(isinstance(a.core, SequenceParallelCore) for a in attns):
        raise RuntimeError("sequence parallelism is already applied to this model; call handle.remove() first")
    sp_size = dist.get_world_size(sp_group)
    if mode == "ulysses":
        ulysses_group, ring_group = sp_group, None
    elif mode == "ring":
        ulysses_group, ring_group = None, sp_group
    else:
        if ulysses_group is None or ring_group is None:
            raise ValueError("hybrid sequence parallelism needs ulysses_group and ring_group (see build_sp_groups)")
        u, rg = dist.get_world_size(ulysses_group), dist.get_world_size(ring_group)
        if u * rg != sp_size:
            raise ValueError(f"ulysses_size * ring_size must equal sp_size: {u} * {rg} != {sp_size}")
        expect = dist.get_rank(ring_group) * u + dist.get_rank(ulysses_group)
        if dist.get_rank(sp_group) != expect:
            raise ValueError(
                f"hybrid layout mismatch: sp rank {dist.get_rank(sp_group)} != ring rank "
                f"{dist.get_rank(ring_group)} * ulysses_size {u} + ulysses rank {dist.get_rank(ulysses_group)}; "
                "Ulysses groups must be consecutive SP ranks (build_sp_groups makes them)"
            )
    if ulysses_group is not None:
        u = dist.get_world_size(ulysses_group)
        bad = sorted({a.num_heads for a in attns if a.num_heads % u})
        if bad:
            raise ValueError(
                f"Ulysses needs num_heads divisible by its degree {u}, but the model has num_heads={bad}; "
                "use mode='ring' (no head constraint) or mode='hybrid' with a ulysses_size that divides "
                "the heads"
            )
    if ring_group is not None:
        _flash_attn2()  # resolve ring attention's flash-attn kernel now, not inside a (compiled) forward
    handle = SequenceParallelHandle(model, sp_group, mode, ulysses_group, ring_group)
    handle._hooks += [
        model.patch_embed.register_forward_hook(handle._split_tokens),
        model.rope.register_forward_hook(handle._split_rope),
        model.final_layer.register_forward_hook(handle._gather_tokens),
    ]
    if hasattr(model, "token_frames"):
        handle._hooks.append(model.token_frames.register_forward_hook(handle._split_token_frames))
    for attn in attns:
        handle._cores.append((attn, attn.core))
        attn.core = SequenceParallelCore(handle, attn.core)
    return handle


# --------------------------------------------------------------------------------------------
# process groups, gradients, loss
# --------------------------------------------------------------------------------------------


@dataclass
class SPGroups:
    """This rank's groups. ``sp``: its SP group; ``dp``: ranks holding the same sequence shard of
    different samples; ``ulysses`` / ``ring``: hybrid sub-groups (``None`` otherwise)."""

    sp: ProcessGroup
    dp: ProcessGroup
    ulysses: ProcessGroup | None = None
    ring: ProcessGroup | None = None
    sp_rank: int = 0
    dp_rank: int = 0


def build_sp_groups(
    world_size: int,
    sp_size: int,
    mode: str = "ulysses",
    ulysses_size: int | None = None,
    ring_size: int | None = None,
) -> SPGroups:
    """Create the process groups for ``dp x sp`` with consecutive ranks per SP group.

    Layout: ``rank = dp_idx * sp_size + sp_idx``; for hybrid, ``sp_idx = ring_idx * ulysses_size +
    ulysses_idx``. Must be called by every rank in the same order (``new_group`` is collective).

    Raises:
        ValueError: if ``sp_size`` does not divide ``world_size`` or the hybrid sizes do not multiply.
    """
    if mode not in MODES:
        raise ValueError(f"unknown sequence-parallel mode {mode!r}; valid: {list(MODES)}")
    if sp_size <= 0 or world_size % sp_size:
        raise ValueError(f"sp_size={sp_size} must divide world_size={world_size}")
    if mode == "hybrid":
        if ulysses_size is None and ring_size is None:
            raise ValueError("hybrid needs ulysses_size and/or ring_size")
        ulysses_size = ulysses_size or sp_size // ring_size
        ring_size = ring_size or sp_size // ulysses_size
        if ulysses_size * ring_size != sp_size:
            raise ValueError(f"ulysses_size * ring_size must equal sp_size: {ulysses_size} * {ring_size} != {sp_size}")
    rank = dist.get_rank()
    dp_size = world_size // sp_size
    mine: dict[str, ProcessGroup | None] = {"ulysses": None, "ring": None}
    for d in range(dp_size):  # SP groups: consecutive ranks
        g = dist.new_group(list(range(d * sp_size, (d + 1) * sp_size)))
        if rank // sp_size == d:
            mine["sp"] = g
    for i in range(sp_size):  # DP groups: same SP index
        g = dist.new_group(list(range(i, world_size, sp_size)))
        if rank % sp_size == i:
            mine["dp"] = g
    if mode == "hybrid":
        for d in range(dp_size):
            base = d * sp_size
            for ri in range(ring_size):
                g = dist.new_group([base + ri * ulysses_size + ui for ui in range(ulysses_size)])
                if rank // ulysses_size == (base // ulysses_size) + ri:
                    mine["ulysses"] = g
            for ui in range(ulysses_size):
                g = dist.new_group([base + ri * ulysses_size + ui for ri in range(ring_size)])
                if rank // sp_size == d and rank % ulysses_size == ui:
                    mine["ring"] = g
    return SPGroups(mine["sp"], mine["dp"], mine["ulysses"], mine["ring"], rank % sp_size, rank // sp_size)


def reduce_sp_gradients(model: nn.Module, sp_group: ProcessGroup) -> None:
    """All-reduce (SUM) every parameter gradient over the SP group, one flat buffer per dtype/device.

    Call after ``backward`` and before the data-parallel average. A parameter with no gradient on
    this rank takes part with zeros, so every rank issues the same collectives.
    """
    from vdit.train.parallel.fsdp import sync_sp_gradients  # one implementation (handles DTensor grads too)

    sync_sp_gradients(model, sp_group)


def sp_loss_scale(sp_size: int, grad_reduction: str = "sp_sum") -> float:
    """Factor to multiply the (full, replicated) loss by, given how gradients are reduced.

    Every SP rank computes the same full loss, and each holds the gradient of its own tokens; the
    true gradient is the SUM over the SP group.

    Args:
        sp_size: SP degree.
        grad_reduction: ``"sp_sum"`` -- SUM over the SP group, then mean over dp (e.g.
            :func:`reduce_sp_gradients` + a dp all-reduce): scale 1. ``"world"`` -- a wrapper
            averages over all ``dp * sp`` ranks (DDP / FSDP on the flat world): scale ``sp_size``.

    Raises:
        ValueError: unknown ``grad_reduction``.
    """
    if grad_reduction == "sp_sum":
        return 1.0
    if grad_reduction == "world":
        return float(sp_size)
    raise ValueError(f"grad_reduction must be 'sp_sum' or 'world'; got {grad_reduction!r}")

"""Collectives of sequence parallelism, with byte counting: all-to-all (Ulysses) and ring P2P.

Shared by :mod:`vdit.train.parallel.sequence` (Ulysses, the token gather) and
:mod:`vdit.train.parallel.ring` (ring attention). Every eager call adds the bytes *this rank sends*
to :data:`COMM_STATS`, which ``bench/sp_bench.py`` reports next to the step time.

Under ``torch.compile`` (:func:`~vdit.train.parallel.fsdp.apply_compile` compiles each block, and
Ulysses' all-to-alls run inside the block) the statistics are **eager-only**: :func:`all_to_all_dim0`
switches to the functional collective ``all_to_all_single`` (traceable, differentiable, no graph
break), and nothing is counted for it. Counting inside traced code is a Python side effect: traced
through the autograd Function it was a graph break at every all-to-all ("HOP: unsafe side effect",
7 in the first compiled step of a 2-block model) and recompiled ``_AllToAll.forward`` until
Dynamo's recompile limit (8), after which it ran eagerly. Ring attention's P2P stays eager
(``@torch.compiler.disable``), so its bytes are counted either way.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed import ProcessGroup

__all__ = ["COMM_STATS", "CommStats", "all_to_all_dim0"]


class CommStats:
    """Bytes *sent by this rank* per ``(kind, phase)``; ``kind`` in all_to_all / p2p / all_gather,
    ``phase`` in fwd / bwd. An all-to-all of ``n`` bytes over ``g`` ranks sends ``n (g-1)/g``; an
    all-gather of a local ``n``-byte chunk sends ``n (g-1)`` (ring algorithm); a P2P send sends ``n``."""

    def __init__(self) -> None:
        self.bytes: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, kind: str, phase: str, nbytes: float) -> None:
        self.bytes[(kind, phase)] += nbytes
        self.calls[(kind, phase)] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def total(self, kind: str | None = None, phase: str | None = None) -> float:
        return sum(b for (k, p), b in self.bytes.items() if kind in (None, k) and phase in (None, p))


COMM_STATS = CommStats()


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def count_comm(kind: str, phase: str, nbytes: float) -> None:
    """``COMM_STATS.add``, skipped while ``torch.compile`` traces: a side effect in traced code would
    be a guard on Python state (recompiles) or a graph break; the statistics are eager-only."""
    if not torch.compiler.is_compiling():
        COMM_STATS.add(kind, phase, nbytes)


def _all_to_all_dim0(x: torch.Tensor, group: ProcessGroup, phase: str) -> torch.Tensor:
    """Chunk ``i`` of dim 0 goes to group rank ``i``; chunk ``i`` of the result came from rank ``i``."""
    n = dist.get_world_size(group)
    x = x.contiguous()
    if n == 1:
        return x
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    count_comm("all_to_all", phase, _nbytes(x) * (n - 1) / n)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable all-to-all over dim 0. The exchange is its own inverse (rank i's chunk j goes
    to rank j's slot i and back), so the backward is the same all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_to_all_dim0(x, group, "fwd")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all_dim0(grad, ctx.group, "bwd"), None


def all_to_all_dim0(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Differentiable all-to-all over dim 0 (chunk ``i`` goes to group rank ``i``).

    Eager: :class:`_AllToAll` (counted in :data:`COMM_STATS`, forward and backward). Under
    ``torch.compile``: the functional collective ``all_to_all_single``, which Dynamo traces into the
    graph (with its own backward, the same all-to-all) instead of tracing an autograd Function with a
    side effect; not counted.
    """
    if torch.compiler.is_compiling():
        if dist.get_world_size(group) == 1:
            return x
        return funcol.all_to_all_single(x.contiguous(), None, None, group)
    return _AllToAll.apply(x, group)


def _ring_exchange(send: torch.Tensor, group: ProcessGroup, phase: str, tag: int) -> tuple[torch.Tensor, list]:
    """Post ``send -> next rank`` and ``recv <- previous rank`` in the ring; returns (buffer, works)."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    recv = torch.empty_like(send)
    ops = [
        dist.P2POp(dist.isend, send, dist.get_global_rank(group, (r + 1) % n), group, tag),
        dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, (r - 1) % n), group, tag),
    ]
    works = dist.batch_isend_irecv(ops)
    count_comm("p2p", phase, _nbytes(send))
    return recv, works


def _wait(works: list) -> None:
    for w in works:
        w.wait()

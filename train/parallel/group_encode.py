"""Frozen-encoder work done once per sequence-parallel group instead of once per rank.

The ranks of one SP group train on the same batch (they share a data-parallel slot) and each
holds the whole batch until the model splits the sequence. Encoding that batch with the frozen
VAE on every rank repeats the same work ``sp_size`` times. :func:`encode_once_per_group` splits the
batch's samples into contiguous chunks, one per rank of the group, encodes only this rank's chunk
and broadcasts every chunk from its owner, so each sample is encoded once per group and every rank
ends with bit-identical latents (the SP ranks must agree on ``x0`` exactly).

With ``B`` samples and ``n`` ranks the chunks are ``ceil(B / n)`` long; with ``B < n`` the last
ranks encode nothing and the VAE time per step is one chunk's (the same as before for ``B = 1``,
``1/n`` of it for ``B >= n``). Communication is ``B`` latents per step, e.g. 16 x 21 x 60 x 104
float32 = 8.4 MB per 81 x 480 x 832 clip, small beside the pixels each rank already holds.

Not shared here:

* Video decoding is done once per group by :mod:`vdit.train.parallel.group_batches` (the group's
  rank 0 reads the batches and broadcasts them), not by this module.
* Text features come from each rank's host cache (:class:`vdit.train.build.TextCache`), where a
  hit (every repeat of a caption) is cheaper than a broadcast.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

__all__ = ["encode_once_per_group", "chunk_bounds"]


def chunk_bounds(num: int, group_size: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of the samples rank ``rank`` of a ``group_size``-rank group encodes, out of ``num``:
    contiguous chunks of ``ceil(num / group_size)`` (empty, ``start == end``, for the ranks past the end)."""
    k = -(-num // group_size)
    return min(num, rank * k), min(num, (rank + 1) * k)


@torch.no_grad()
def encode_once_per_group(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                          out_shape: tuple[int, ...], group) -> torch.Tensor:
    """``encode(x)`` for a batch every rank of ``group`` holds identically, computed once per group.

    Args:
        encode: ``(b, ...) -> (b, *out_shape)``, applied per sample (it must not mix samples, as a
            VAE's encoder does not); its result is cast to float32.
        x: ``(B, ...)`` the batch, the same on every rank of ``group`` (e.g. ``(B, 3, T, H, W)`` video).
        out_shape: one sample's encoding, e.g. the latent ``(C, T', H', W')``.
        group: the process group (an SP group); ``None`` or a 1-rank group encodes locally.

    Returns:
        ``(B, *out_shape)`` float32 on ``x``'s device, bit-identical on every rank of the group.
        A collective: every rank of ``group`` must call it with the same ``B`` and ``out_shape``.
    """
    n = 1 if group is None else dist.get_world_size(group)
    if n == 1:
        return encode(x).float()
    B, me = x.shape[0], dist.get_rank(group)
    out = torch.empty((B, *out_shape), dtype=torch.float32, device=x.device)  # (B, *out_shape)
    start, end = chunk_bounds(B, n, me)
    if end > start:
        out[start:end] = encode(x[start:end]).float()
    for r in range(n):
        s, e = chunk_bounds(B, n, r)
        if e > s:
            dist.broadcast(out[s:e], src=dist.get_global_rank(group, r), group=group)
    return out

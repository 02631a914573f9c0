"""Training batches read and decoded once per sequence-parallel group instead of once per rank.

The ranks of one SP group train on the same batch (they share a data-parallel slot). Letting each
of them iterate its own pipeline reads and decodes every clip ``sp_size`` times, in loader workers
that share the node's CPU cores. :func:`group_batches` has SP rank 0 alone iterate the pipeline and
broadcast each batch to the group: the tensors (uint8 frames on CUDA, 97 MB per 81 x 480 x 832
clip, sent over NVLink; float latents and text features of latent shards) with
``dist.broadcast`` on the training device, everything else (keys, captions, the data position of
the batch) with ``broadcast_object_list``.

The other ranks never iterate their pipeline, but they :meth:`~vdit.data.pipeline.VideoPipeline.commit`
each received batch like rank 0 does, so every rank of the group holds the same data position and
the checkpointed (merged) position is the one a per-rank read would have given. The fetch of a
batch becomes a group collective: an error of rank 0's pipeline (e.g. no usable clip at all) is
sent to the group and raised on every rank instead of leaving them waiting in a broadcast.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

__all__ = ["group_batches"]


def group_batches(pipeline: Iterable[dict[str, Any]], group, device: torch.device) -> Iterator[dict[str, Any]]:
    """Yield ``pipeline``'s batches on every rank of ``group``, reading them on its rank 0 only.

    Args:
        pipeline: the data pipeline (iterated on the group's rank 0 only; an endless iterable).
        group: the SP process group; every rank of it must consume the iterator in lockstep.
        device: where the batch tensors are put and broadcast (the training device; CPU with gloo).

    Yields:
        The batch dict of rank 0's pipeline on every rank: tensors on ``device`` with the same
        shapes, dtypes and values; other entries as broadcast objects (equal by value).

    Raises:
        RuntimeError: on ranks other than 0, when rank 0's pipeline raised (its message included);
            rank 0 re-raises its own exception.
    """
    me, src = dist.get_rank(group), dist.get_global_rank(group, 0)
    batches = iter(pipeline) if me == 0 else None
    while True:
        header: list[Any] = [None]
        tensors: dict[str, torch.Tensor] = {}
        error: BaseException | None = None
        if me == 0:
            try:
                batch = next(batches)
            except Exception as e:  # sent to the group first, then re-raised here
                error = e
                header[0] = {"error": f"{type(e).__name__}: {e}"}
            else:
                tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
                header[0] = {"meta": {k: v for k, v in batch.items() if k not in tensors},
                             "specs": {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}}
        dist.broadcast_object_list(header, src=src, group=group, device=device)
        if "error" in header[0]:
            if error is not None:
                raise error
            raise RuntimeError(f"the data pipeline of this SP group's rank 0 (global rank {src}) failed: "
                               f"{header[0]['error']}")
        out = dict(header[0]["meta"])
        for key, (shape, dtype) in header[0]["specs"].items():
            t = tensors[key].to(device, non_blocking=True).contiguous() if me == 0 else torch.empty(shape, dtype=dtype, device=device)
            # bool (text masks) travels as bytes: not every backend reduces/broadcasts bool
            dist.broadcast(t.view(torch.uint8) if t.dtype == torch.bool else t, src=src, group=group)
            out[key] = t
        yield out

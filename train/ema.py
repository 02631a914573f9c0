"""Exponential moving average of the trainable parameters."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor


class EMA:
    """Shadow copy of a model's trainable parameters, ``shadow = decay * shadow + (1 - decay) * param``.

    The shadow tensors are clones of the live parameters (fp32), so when the parameters are
    sharded (FSDP2 DTensors) the EMA is sharded the same way and never gathered on one rank.
    Stateful: ``state_dict()`` maps parameter names to shadow tensors.

    What it follows: the module's parameters after the optimizer step. Under FSDP2 those are the
    sharded fp32 parameters the optimizer updates (whatever ``param_dtype``), so the EMA follows the
    fp32 master weights exactly. Under DeepSpeed with ``bf16`` enabled the module holds bf16 copies
    (DeepSpeed's fp32 master weights live in its optimizer's flat partitions), so the EMA follows
    the bf16-rounded weights: its start value is the bf16-rounded init, and updates smaller than
    half a bf16 step (relative 2^-9) reach it only when they accumulate in the master and the
    rounded copy moves. With DeepSpeed in fp32 the module weights are the master weights. Reading
    the fp32 master would need either an all-gather of the fp32 partitions every step (4 bytes per
    parameter per step, twice DeepSpeed's own bf16 gather) or an EMA partitioned like ZeRO's
    flat groups with a gather at every save and evaluation; neither is done: use
    ``parallel.backend=fsdp`` for bf16 runs whose EMA matters.

    Args:
        model: the trained module.
        decay: ``ema_decay`` in [0, 1); 0 copies the parameters every update.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow toward the current parameters (call after each optimizer step).

        One ``torch._foreach_lerp_`` over every tensor (a few fused kernels on CUDA) instead of one
        ``lerp_`` per parameter, and on the local shards of DTensors: FSDP2 shards the shadow and the
        parameter the same way (the shadow is a clone of the parameter), so the element-wise update
        of the local shards is the update of the whole tensor without DTensor dispatch per tensor.
        The values are bit-identical to the per-parameter ``lerp_`` loop (tested).
        """
        shadows, params = [], []
        for n, p in model.named_parameters():
            s = self.shadow.get(n)
            if s is None:
                continue
            # no detach(): this runs under no_grad, and detach() on a DTensor costs a DTensor dispatch
            if isinstance(s, DTensor) or isinstance(p, DTensor):
                if not (isinstance(s, DTensor) and isinstance(p, DTensor) and s.device_mesh == p.device_mesh
                        and s.placements == p.placements and s.shape == p.shape):
                    s.lerp_(p.detach().float(), 1.0 - self.decay)  # layouts differ (not under FSDP2)
                    continue
                s, p = s.to_local(), p.to_local()
            shadows.append(s)
            params.append(p if p.dtype == s.dtype else p.to(s.dtype))
        if shadows:
            torch._foreach_lerp_(shadows, params, 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights into ``model``'s parameters (e.g. an eval copy).

        A sharded shadow (DTensor) copied into a plain model is gathered first: a collective, so
        every rank must call this together."""
        for n, p in model.named_parameters():
            if n in self.shadow:
                src = self.shadow[n]
                if isinstance(src, DTensor) and not isinstance(p, DTensor):
                    src = src.full_tensor()  # sharded EMA into a plain (eval) model: collective, every rank
                p.copy_(src.to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state is missing {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for n, t in self.shadow.items():
            t.copy_(state[n])

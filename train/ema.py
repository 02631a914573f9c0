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
        """Move the shadow toward the current parameters (call after each optimizer step)."""
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

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

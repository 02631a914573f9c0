"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from vdit.train.config import OptimConfig


def kernel_kwargs(implementation: str) -> dict[str, bool]:
    """``torch.optim.AdamW`` keyword arguments of ``OptimConfig.implementation``.

    Raises:
        ValueError: an unknown implementation.
    """
    kwargs = {"auto": {"fused": True}, "fused": {"fused": True}, "foreach": {"foreach": True},
              "for_loop": {"foreach": False}}
    if implementation not in kwargs:
        raise ValueError(f"optim.implementation={implementation!r} is not one of {list(kwargs)}")
    return kwargs[implementation]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases, norms and 1-D tensors.

    Its kernel is ``cfg.implementation`` (:func:`kernel_kwargs`); the fused kernel needs floating
    point parameters on one kind of device (CPU or CUDA, plain tensors or FSDP2 DTensors).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             **kernel_kwargs(cfg.implementation))


def lr_lambda(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warmup from 1/warmup, then constant or cosine to min_lr_ratio."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR implementing :func:`lr_lambda`; stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg, total_steps))

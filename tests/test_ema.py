"""EMA: the foreach update equals the per-parameter ``lerp_`` loop bit for bit (issue 14 #5).

The sharded (FSDP2 DTensor) case is checked in ``tests/test_fsdp.py`` (2 gloo ranks).
"""

from __future__ import annotations

import torch
from torch import nn

from vdit.train.ema import EMA


def _model(dtype=torch.float32) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(*(nn.Linear(7 + i, 8 + i) for i in range(5))).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    model[1].bias.requires_grad_(False)  # frozen: not tracked
    return model


def _loop_reference(shadow: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """The update before issue 14: one lerp_ per parameter."""
    for n, p in model.named_parameters():
        if n in shadow:
            shadow[n].lerp_(p.detach().float(), 1.0 - decay)


def _perturb(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


def test_foreach_update_is_bit_identical_to_the_loop():
    for dtype in (torch.float32, torch.bfloat16):  # bf16 parameters (DeepSpeed bf16 module) lerp as fp32
        model = _model(dtype)
        ema = EMA(model, 0.999)
        ref = {n: t.clone() for n, t in ema.shadow.items()}
        assert "1.bias" not in ema.shadow and all(t.dtype == torch.float32 for t in ema.shadow.values())
        for step in range(3):
            _perturb(model, step)
            ema.update(model)
            _loop_reference(ref, model, 0.999)
            for n, t in ema.shadow.items():
                assert torch.equal(t, ref[n]), (dtype, step, n)


def test_decay_zero_copies_the_parameters():
    model = _model()
    ema = EMA(model, 0.0)
    _perturb(model, 0)
    ema.update(model)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(ema.shadow[n], p.detach())

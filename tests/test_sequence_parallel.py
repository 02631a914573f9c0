"""Sequence parallelism (Ulysses, ring, hybrid) against the single-device VideoDiT, on gloo / CPU.

Contract (vdit.train.parallel.sequence): with identical inputs on every SP rank, the output on every
rank equals the single-device output, and the SUM over the SP group of each parameter's grad equals
the single-device grad, both within 1e-5 in fp32 -- including token counts that do not divide sp.

Two process groups are spawned per session (world 2 and world 4); each runs every check for its
world once, records pass/fail per check, and the tests below read those records. Run:

    .venv/bin/python -m pytest tests/test_sequence_parallel.py -v
"""

from __future__ import annotations

import math
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import spawn
from vdit.model.attention import math_attention
from vdit.model.dit import DiTConfig, VideoDiT
from vdit.train.parallel.sequence import (
    SequenceParallelCore,
    _KeyLayout,
    _pad_and_shard,
    apply_sequence_parallel,
    build_sp_groups,
    reduce_sp_gradients,
    sp_loss_scale,
)

pytestmark = pytest.mark.multiproc

TOL = 1e-5
TEXT_DIM = 16
# latent (T, H, W) with patch (1, 2, 2): 3x2x3 = 18 tokens (18 % 4 = 2), 3x1x3 = 9 (odd),
# 1x1x5 = 5 (on sp=4 the last rank holds only padding)
SHAPES = {"18": (3, 4, 6), "9": (3, 2, 6), "5": (1, 2, 10)}


def _cfg(**kw) -> DiTConfig:
    base = dict(in_channels=4, patch_size=[1, 2, 2], hidden_size=32, depth=2, num_heads=4, text_dim=TEXT_DIM)
    base.update(kw)
    return DiTConfig(**base)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * std)


def _inputs(latent_thw, seed: int, b: int = 2, lc: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, *latent_thw, generator=g)
    t = torch.rand(b, generator=g)
    text = torch.randn(b, lc, TEXT_DIM, generator=g)
    mask = torch.ones(b, lc, dtype=torch.bool)
    mask[0, 3:] = False  # 3 real text tokens
    mask[1, :] = False  # no text at all (cross-attention output must be 0, not NaN)
    w = torch.randn(b, 4, *latent_thw, generator=g) / (b * 4 * math.prod(latent_thw))  # loss = sum(out * w), a mean
    return x, t, text, mask, w


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _run_and_grads(model, x, t, text, mask, w):
    model.zero_grad(set_to_none=True)
    out = model(x, t, text, mask)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _check_matches_single_device(groups, mode: str, shapes=("18", "9", "5"), **cfg_kw) -> None:
    """Random weights: SP output == single-device output; SP grads summed over the group == single grads."""
    model = VideoDiT(_cfg(**cfg_kw))
    _randomize(model, seed=1)
    for key in shapes:
        x, t, text, mask, w = _inputs(SHAPES[key], seed=10 + groups.dp_rank)  # data differs only across dp
        ref_out, ref_grads = _run_and_grads(model, x, t, text, mask, w)
        handle = apply_sequence_parallel(model, groups.sp, mode, groups.ulysses, groups.ring)
        try:
            out, _ = _run_and_grads(model, x, t, text, mask, w)
            reduce_sp_gradients(model, groups.sp)
        finally:
            handle.remove()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert out.shape == ref_out.shape
        d = _max_diff(out, ref_out)
        assert d <= TOL, f"{mode} L={key}: output differs by {d}"
        bad = {n: _max_diff(grads[n], g) for n, g in ref_grads.items() if _max_diff(grads[n], g) > TOL}
        assert not bad, f"{mode} L={key}: grads differ {bad}"
        assert any(g.abs().max() > 1e-3 for g in ref_grads.values())  # the check is not vacuous
        # remove() restores the single-device model exactly
        with torch.no_grad():
            assert torch.equal(model(x, t, text, mask), ref_out)


def _check_seeded_training(groups, mode: str) -> None:
    """Models built from init_weights(seed) (adaLN-Zero: output 0 at first), cross-attention + text
    mask: two SGD steps with SP (grads SUM-reduced over the group) track two single-device steps."""
    cfg = _cfg(depth=2, cross_attention=True)
    ref, spm = VideoDiT(cfg), VideoDiT(cfg)
    ref.init_weights(seed=3)
    spm.init_weights(seed=3)
    handle = apply_sequence_parallel(spm, groups.sp, mode, groups.ulysses, groups.ring)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt_sp = torch.optim.SGD(spm.parameters(), lr=0.5)
    x, t, text, mask, w = _inputs(SHAPES["18"], seed=20)
    mask[1, :2] = True  # both samples have some text here
    scale = sp_loss_scale(groups.sp.size(), "sp_sum")
    assert scale == 1.0
    for step in range(3):
        ref_out, ref_grads = _run_and_grads(ref, x, t, text, mask, w)
        out, _ = _run_and_grads(spm, x, t, text, mask, w * scale)
        reduce_sp_gradients(spm, groups.sp)
        d = _max_diff(out, ref_out)
        assert d <= TOL, f"step {step}: output differs by {d}"
        for n, p in spm.named_parameters():
            assert _max_diff(p.grad, ref_grads[n]) <= TOL, f"step {step}: grad {n}"
        opt_ref.step()
        opt_sp.step()
    assert ref_out.abs().max() > 1e-3  # training moved the model off its all-zero init
    handle.remove()


def _check_masked_core(groups, mode: str) -> None:
    """The SP core with a caller-supplied key mask (gathered across the group), incl. fully masked
    ring blocks, forward and backward, against math_attention on the whole sequence."""
    sp, rank = groups.sp.size(), groups.sp.rank()
    model = VideoDiT(_cfg(depth=1))
    handle = apply_sequence_parallel(model, groups.sp, mode, groups.ulysses, groups.ring)
    core = model.blocks[0].attn.core
    assert isinstance(core, SequenceParallelCore)
    g = torch.Generator().manual_seed(5)
    b, L, h, d = 2, 7, 4, 8
    q, k, v = (torch.randn(b, L, h, d, generator=g, requires_grad=True) for _ in range(3))
    keep = torch.rand(b, L, generator=g) > 0.5
    keep[:, 0] = True
    keep[1, 4:] = False  # with sp=4 (L_pad=8): the last two blocks of sample 1 are fully masked
    dout = torch.randn(b, L, h, d, generator=g)
    ref = math_attention(q, k, v, attn_mask=keep)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)

    padded = -(-L // sp) * sp
    handle._layout = _KeyLayout(L, padded)  # what the patch_embed hook would record
    local = [_pad_and_shard(z.detach(), 1, padded, rank, sp).requires_grad_() for z in (q, k, v)]
    out = core(*local, attn_mask=_pad_and_shard(keep, 1, padded, rank, sp))
    grads = torch.autograd.grad(out, local, _pad_and_shard(dout, 1, padded, rank, sp))
    handle.remove()
    exp_out = _pad_and_shard(ref.detach(), 1, padded, rank, sp)
    real = max(0, min(padded // sp, L - rank * (padded // sp)))  # real rows of this rank's chunk
    assert _max_diff(out[:, :real], exp_out[:, :real]) <= TOL
    for gl, gr in zip(grads, ref_grads):
        assert _max_diff(gl[:, :real], _pad_and_shard(gr, 1, padded, rank, sp)[:, :real]) <= TOL


def _check_heads_not_divisible(groups, heads: int) -> None:
    model = VideoDiT(_cfg(hidden_size=heads * 8, num_heads=heads))
    with pytest.raises(ValueError, match="ring"):
        apply_sequence_parallel(model, groups.sp, "ulysses")
    handle = apply_sequence_parallel(model, groups.sp, "ring")  # ring has no head constraint
    handle.remove()
    with pytest.raises(ValueError, match="mode"):
        apply_sequence_parallel(model, groups.sp, "zigzag")


def _checks(world: int):
    """name -> callable(). Group construction is collective, so every rank builds them in this order."""
    if world == 2:
        g = build_sp_groups(2, 2, "ulysses")
        assert g.sp.size() == 2 and g.dp.size() == 1
        return {
            "ulysses2": lambda: _check_matches_single_device(g, "ulysses"),
            "ring2": lambda: _check_matches_single_device(g, "ring", modulation="shared"),
            "ring2_no_cross": lambda: _check_matches_single_device(g, "ring", shapes=("9",), cross_attention=False),
            "ulysses2_masked_core": lambda: _check_masked_core(g, "ulysses"),
            "ring2_masked_core": lambda: _check_masked_core(g, "ring"),
            "ulysses2_seeded_training": lambda: _check_seeded_training(g, "ulysses"),
            "ulysses2_heads3": lambda: _check_heads_not_divisible(g, 3),
        }
    hy = build_sp_groups(4, 4, "hybrid", ulysses_size=2, ring_size=2)
    dp2 = build_sp_groups(4, 2, "ring")  # 2 dp x 2 sp: SP groups {0,1} {2,3}, dp groups {0,2} {1,3}
    assert hy.ulysses.size() == 2 and hy.ring.size() == 2 and dp2.dp.size() == 2
    return {
        "ulysses4": lambda: _check_matches_single_device(hy, "ulysses", shapes=("18", "5")),
        "ring4": lambda: _check_matches_single_device(hy, "ring", shapes=("18", "5")),
        "hybrid2x2": lambda: _check_matches_single_device(hy, "hybrid", shapes=("18", "5")),
        "ring4_masked_core": lambda: _check_masked_core(hy, "ring"),
        "hybrid2x2_masked_core": lambda: _check_masked_core(hy, "hybrid"),
        "hybrid2x2_seeded_training": lambda: _check_seeded_training(hy, "hybrid"),
        "dp2_sp2_ring": lambda: _check_matches_single_device(dp2, "ring", shapes=("9",)),
        "dp2_sp2_ulysses": lambda: _check_matches_single_device(dp2, "ulysses", shapes=("9",)),
        "ulysses4_heads6": lambda: _check_heads_not_divisible(hy, 6),
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    for name, check in _checks(world).items():
        try:
            check()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    return results


def _spawn(world: int, tmp_path_factory) -> list[dict]:
    return spawn(_worker, world, tmp_path_factory.mktemp(f"sp_world{world}"))


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _spawn(2, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _spawn(4, tmp_path_factory)


def _assert_ok(results: list[dict], name: str) -> None:
    failures = {r: res.get(name, "did not run") for r, res in enumerate(results) if res.get(name) != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{msg}" for r, msg in failures.items())


@pytest.mark.parametrize("name", ["ulysses2", "ring2", "ring2_no_cross", "ulysses2_masked_core",
                                  "ring2_masked_core", "ulysses2_seeded_training", "ulysses2_heads3"])
def test_world2(world2, name):
    _assert_ok(world2, name)


@pytest.mark.parametrize("name", ["ulysses4", "ring4", "hybrid2x2", "ring4_masked_core", "hybrid2x2_masked_core",
                                  "hybrid2x2_seeded_training", "dp2_sp2_ring", "dp2_sp2_ulysses",
                                  "ulysses4_heads6"])
def test_world4(world4, name):
    _assert_ok(world4, name)


def test_sp_loss_scale():
    assert sp_loss_scale(4) == 1.0
    assert sp_loss_scale(4, "world") == 4.0
    with pytest.raises(ValueError):
        sp_loss_scale(4, "mean")

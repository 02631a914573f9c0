"""3D RoPE: relative-position property, identity at 0, positions vs grid, validation."""

from __future__ import annotations

import pytest
import torch

from vdit.model.rope import RotaryEmbedding3D, apply_rotary, default_axes_dim, grid_positions

HEAD_DIM = 32


def rotated_dot(rope: RotaryEmbedding3D, q, k, p1, p2) -> torch.Tensor:
    """<R(p1) q, R(p2) k> for single vectors q, k of shape (D,), positions (3,)."""
    cos, sin = rope(positions=torch.tensor([p1, p2], dtype=torch.float32))  # (2, D)
    qr = apply_rotary(q.view(1, 1, 1, -1), cos[:1], sin[:1])
    kr = apply_rotary(k.view(1, 1, 1, -1), cos[1:], sin[1:])
    return (qr * kr).sum()


def test_relative_position_property_per_axis():
    rope = RotaryEmbedding3D(HEAD_DIM)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(HEAD_DIM, generator=g), torch.randn(HEAD_DIM, generator=g)
    p1, p2 = (1.0, 2.0, 3.0), (4.0, 0.0, 5.0)
    base = rotated_dot(rope, q, k, p1, p2)
    for axis in range(3):
        for s in (1.0, 7.0):
            shift = [0.0, 0.0, 0.0]
            shift[axis] = s
            s1 = tuple(a + b for a, b in zip(p1, shift))
            s2 = tuple(a + b for a, b in zip(p2, shift))
            assert torch.allclose(rotated_dot(rope, q, k, s1, s2), base, atol=1e-5)
        # moving only one side changes the offset, which must change the score
        moved = tuple(a + (1.0 if i == axis else 0.0) for i, a in enumerate(p1))
        assert not torch.allclose(rotated_dot(rope, q, k, moved, p2), base, atol=1e-4)


def test_position_zero_is_identity_and_norm_is_preserved():
    rope = RotaryEmbedding3D(HEAD_DIM)
    x = torch.randn(2, 4, 3, HEAD_DIM)
    cos, sin = rope(positions=torch.zeros(4, 3))
    assert torch.equal(apply_rotary(x, cos, sin), x)
    cos, sin = rope((1, 2, 2))
    y = apply_rotary(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_positions_equal_to_raster_match_grid():
    rope = RotaryEmbedding3D(HEAD_DIM)
    grid = (2, 3, 4)
    pos = torch.stack(
        torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(4), indexing="ij"), dim=-1
    ).reshape(-1, 3)  # (24, 3) integers, t slowest
    cos_g, sin_g = rope(grid)
    cos_p, sin_p = rope(positions=pos)
    assert cos_g.shape == (24, HEAD_DIM)
    assert torch.equal(cos_g, cos_p) and torch.equal(sin_g, sin_p)
    assert torch.equal(grid_positions(grid), pos.float())
    # a shard of positions gives the matching rows (what sequence parallelism relies on)
    cos_s, _ = rope(positions=pos[8:16])
    assert torch.equal(cos_s, cos_g[8:16])


def test_axis_split_and_invalid_head_dim():
    assert default_axes_dim(64) == (16, 24, 24)
    assert default_axes_dim(32) == (8, 12, 12)
    assert sum(default_axes_dim(128)) == 128
    for bad in (7, 4, 0):
        with pytest.raises(ValueError):
            RotaryEmbedding3D(bad)
    with pytest.raises(ValueError):
        RotaryEmbedding3D(32, axes_dim=(8, 8, 8))  # does not sum to 32
    with pytest.raises(ValueError):
        RotaryEmbedding3D(30, axes_dim=(9, 11, 10))  # odd chunks
    with pytest.raises(ValueError):
        apply_rotary(torch.randn(1, 5, 1, 32), *RotaryEmbedding3D(32)((1, 2, 2)))  # L mismatch


def test_tables_stay_fp32_under_autocast():
    """Issue 14 #2: the angles were a matmul, which bf16 autocast ran in bf16 (cos off by up to 0.08 on
    this grid). Now element-wise: fp32 under autocast, equal to the fp32 matmul bit for bit."""
    rope = RotaryEmbedding3D(64)
    grid = (16, 30, 52)
    ref = (grid_positions(grid) @ rope.inv_freq()).repeat_interleave(2, dim=-1)  # (L, D) fp32 matmul
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = rope(grid)
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos, ref.cos()) and torch.equal(sin, ref.sin())

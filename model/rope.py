"""3D rotary position embeddings (RoPE, Su et al. 2021, "RoFormer") split across (t, h, w).

The head dim ``D`` is cut into three contiguous, even chunks ``(d_t, d_h, d_w)``; channels
``[0, d_t)`` rotate with the frame index, ``[d_t, d_t + d_h)`` with the row, the rest with the
column. Inside each chunk we use the **interleaved-pairs** convention: channels ``(2i, 2i + 1)`` form
one 2D pair rotated by ``pos * theta ** (-2j / d_axis)`` (``j`` the pair index within the axis). So
``cos``/``sin`` of shape ``(L, D)`` hold every angle twice: ``cos[:, 2i] == cos[:, 2i + 1]``.

Because each pair is a 2D rotation by an angle linear in the position, for query position ``p1``
and key position ``p2`` the score ``<R(p1) q, R(p2) k> = <q, R(p2 - p1) k>`` depends only on the
per-axis offset (RoFormer, eq. 16).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

__all__ = ["default_axes_dim", "wan_axes_dim", "rope_axes_dim", "ROPE_SPLITS", "RotaryEmbedding3D", "apply_rotary",
           "grid_positions"]

ROPE_SPLITS = ("default", "wan")


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """Default split of ``head_dim`` into ``(d_t, d_h, d_w)``.

    ``d_h = d_w = 2 * floor(3 * head_dim / 16)`` (about 3/8 of the channels each) and
    ``d_t = head_dim - 2 * d_h`` (the remaining ~1/4). Examples: 32 -> (8, 12, 12),
    64 -> (16, 24, 24), 128 -> (32, 48, 48).

    Raises:
        ValueError: if ``head_dim`` is odd or smaller than 6 (each axis needs at least one pair).
    """
    if head_dim % 2 != 0 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head_dim >= 6 (one rotation pair per axis); got {head_dim}")
    d_hw = 2 * ((head_dim * 3) // 16)
    return head_dim - 2 * d_hw, d_hw, d_hw


def wan_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """Wan 2.1's split of ``head_dim`` into ``(d_t, d_h, d_w)``: ``d_h = d_w = 2 * floor(head_dim / 6)``
    and ``d_t`` takes the rest (128 -> (44, 42, 42); the time axis gets the most channels).

    Raises:
        ValueError: if ``head_dim`` is odd or smaller than 6.
    """
    if head_dim % 2 != 0 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head_dim >= 6 (one rotation pair per axis); got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_axes_dim(head_dim: int, split: str = "default") -> tuple[int, int, int]:
    """``(d_t, d_h, d_w)`` for ``DiTConfig.rope_split``: ``"default"`` (:func:`default_axes_dim`) or
    ``"wan"`` (:func:`wan_axes_dim`).

    Raises:
        ValueError: an unknown ``split`` or an impossible ``head_dim``.
    """
    if split == "default":
        return default_axes_dim(head_dim)
    if split == "wan":
        return wan_axes_dim(head_dim)
    raise ValueError(f"rope_split={split!r} is not one of {list(ROPE_SPLITS)}")


def grid_positions(grid_size: tuple[int, int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Integer (t, h, w) coordinates of a ``T' x H' x W'`` token grid in raster order (t slowest).

    Returns:
        ``(L, 3)`` float32 with ``L = T' * H' * W'``; row ``i`` is the position of token ``i`` of
        :class:`~vdit.model.layers.PatchEmbed3D`'s output.
    """
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in grid_size]
    grid = torch.meshgrid(*axes, indexing="ij")  # 3 x (T', H', W')
    return torch.stack([g.reshape(-1) for g in grid], dim=-1)  # (L, 3)


class RotaryEmbedding3D(nn.Module):
    """Produces the RoPE ``(cos, sin)`` tables for a video token grid.

    No learnable parameters and no buffers (so building on the meta device and ``to_empty`` needs no
    special care); frequencies are recomputed in fp32 on every call, which costs ``O(L * D)``.
    Kept as a module so sequence parallelism can shard its output with a forward hook.

    Args:
        head_dim: per-head channel count ``D``.
        theta: RoPE base (10000 as in RoFormer).
        axes_dim: ``(d_t, d_h, d_w)``, each positive and even, summing to ``head_dim``; ``None`` uses
            :func:`default_axes_dim`.
        fp64: compute frequencies and angles in float64 and round only ``cos``/``sin`` to float32, as
            Wan 2.1 does (``1 / theta ** (2j / d)`` per axis, positions times frequencies in float64).
            The fp32 default differs from it by up to ~1e-4 in the angle at positions near 1000.

    Raises:
        ValueError: if the split is impossible or invalid.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, axes_dim: tuple[int, int, int] | list[int] | None = None,
                 fp64: bool = False):
        super().__init__()
        axes = default_axes_dim(head_dim) if axes_dim is None else tuple(int(a) for a in axes_dim)
        if len(axes) != 3 or any(a <= 0 or a % 2 for a in axes) or sum(axes) != head_dim:
            raise ValueError(
                f"axes_dim must be three positive even ints summing to head_dim={head_dim}; got {axes_dim}"
            )
        self.head_dim = head_dim
        self.theta = float(theta)
        self.axes_dim = axes
        self.fp64 = bool(fp64)

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Per-pair angular frequencies, ``(3, D/2)`` laid out per axis chunk: each column has one non-zero
        row (its axis), so ``angles = positions @ inv_freq`` gives ``(L, D/2)`` (computed element-wise in fp32)."""
        table = torch.zeros(3, self.head_dim // 2, device=device, dtype=torch.float32)
        start = 0
        for axis, d in enumerate(self.axes_dim):
            j = torch.arange(d // 2, device=device, dtype=torch.float32)
            table[axis, start : start + d // 2] = self.theta ** (-2.0 * j / d)
            start += d // 2
        return table

    def forward(
        self,
        grid_size: tuple[int, int, int] | None = None,
        positions: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute ``(cos, sin)`` for a token grid or for explicit positions.

        Args:
            grid_size: ``(T', H', W')`` token grid; tokens in raster order (t slowest).
            positions: optional ``(L, 3)`` (t, h, w) coordinates (int or float), e.g. one sequence
                shard's positions; takes precedence over ``grid_size``.
            device: where to build the tables when ``positions`` is not given.

        Returns:
            ``(cos, sin)``, each ``(L, head_dim)`` float32, interleaved (every angle twice).

        Raises:
            ValueError: if neither argument is given or shapes are wrong.
        """
        if positions is None:
            if grid_size is None or len(grid_size) != 3:
                raise ValueError(f"need grid_size=(T', H', W') or positions (L, 3); got grid_size={grid_size}")
            positions = grid_positions(tuple(grid_size), device=device)  # (L, 3)
        elif positions.ndim != 2 or positions.shape[-1] != 3:
            raise ValueError(f"positions must be (L, 3); got {tuple(positions.shape)}")
        if self.fp64:
            return self._tables_fp64(positions)
        pos = positions.to(torch.float32)  # (L, 3)
        # Element-wise, not ``pos @ inv_freq``: autocast runs a matmul in bf16 (cos off by up to 0.08 on
        # a 16x30x52 grid) and CUDA may run an fp32 matmul in TF32. Each row of inv_freq has one
        # non-zero per column, so the sum is exact: the same fp32 angles as an fp32 matmul.
        angles = (pos[:, :, None] * self.inv_freq(pos.device)[None]).sum(dim=1)  # (L, D/2)
        angles = angles.repeat_interleave(2, dim=-1)  # (L, D)
        return angles.cos(), angles.sin()  # (L, D), (L, D)

    def _tables_fp64(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``(L, head_dim)`` float32 from float64 frequencies and angles (Wan's numerics)."""
        pos = positions.to(torch.float64)  # (L, 3)
        chunks = []
        for axis, d in enumerate(self.axes_dim):
            freqs = 1.0 / self.theta ** (torch.arange(0, d, 2, device=pos.device, dtype=torch.float64) / d)  # (d/2,)
            chunks.append(pos[:, axis, None] * freqs[None])  # (L, d/2)
        angles = torch.cat(chunks, dim=-1).repeat_interleave(2, dim=-1)  # (L, D) float64
        return angles.cos().float(), angles.sin().float()  # (L, D), (L, D)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, axes_dim={self.axes_dim}, theta={self.theta}, fp64={self.fp64}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2i, 2i+1)`` of ``x`` (interleaved convention), in fp32.

    Args:
        x: ``(B, L, H, D)`` queries or keys.
        cos, sin: ``(L, D)`` tables from :class:`RotaryEmbedding3D`.

    Returns:
        ``(B, L, H, D)`` in ``x.dtype``.

    Raises:
        ValueError: if the tables do not match ``x``'s ``(L, D)``.
    """
    if cos.shape != (x.shape[1], x.shape[3]) or sin.shape != cos.shape:
        raise ValueError(f"rope tables {tuple(cos.shape)} do not match x (B, L, H, D)={tuple(x.shape)}")
    xf = x.float()  # (B, L, H, D)
    pairs = rearrange(xf, "b l h (d two) -> b l h d two", two=2)  # (B, L, H, D/2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1)  # (B, L, H, D/2, 2): (x1, x2) -> (-x2, x1)
    rotated = rearrange(rotated, "b l h d two -> b l h (d two)")  # (B, L, H, D)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]  # (B, L, H, D)
    return out.to(x.dtype)

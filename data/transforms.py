"""Pure clip transforms on ``(T, C, H, W)`` tensors."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` RGB -> float32 ``(T, 3, H, W)`` in [0, 255].

    Raises:
        ValueError: not a uint8 ``(T, H, W, 3)`` array.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 (T, H, W, 3) frames; got {frames.dtype} {frames.shape}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()


def resize_cover(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``(T, C, H, W)`` so that it covers ``(height, width)`` keeping the aspect ratio.

    The smaller scale factor that still covers both sides is used, so no distortion; a
    subsequent crop removes the overflow. Uses antialiased bilinear filtering when shrinking.
    """
    _, _, h, w = x.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) == (h, w):
        return x
    return F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)


def crop(x: torch.Tensor, height: int, width: int, rng: np.random.Generator | None = None) -> torch.Tensor:
    """Crop ``(T, C, H, W)`` to ``(height, width)``: centered, or at a random offset drawn from ``rng``.

    Raises:
        ValueError: the input is smaller than the crop.
    """
    _, _, h, w = x.shape
    if h < height or w < width:
        raise ValueError(f"cannot crop {h}x{w} to {height}x{width}")
    if rng is None:
        top, left = (h - height) // 2, (w - width) // 2
    else:
        top, left = int(rng.integers(0, h - height + 1)), int(rng.integers(0, w - width + 1))
    return x[:, :, top:top + height, left:left + width]


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 255] -> [-1, 1]."""
    return x / 127.5 - 1.0


def clip_to_model_input(frames: np.ndarray, height: int, width: int,
                        rng: np.random.Generator | None = None) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float32 ``(C, T, height, width)`` in [-1, 1] (resize-cover, crop, scale)."""
    x = crop(resize_cover(to_tensor(frames), height, width), height, width, rng)
    return normalize(x).permute(1, 0, 2, 3).contiguous()


def to_uint8_video(x: torch.Tensor) -> np.ndarray:
    """float ``(C, T, H, W)`` in [-1, 1] -> uint8 ``(T, H, W, 3)`` (clamped, rounded)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()

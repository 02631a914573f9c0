"""Pure clip transforms on ``(T, C, H, W)`` tensors."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` RGB -> float32 ``(T, 3, H, W)`` in [0, 255].

    Gray frames, ``(T, H, W)`` or ``(T, H, W, 1)``, are replicated to RGB; an alpha channel
    ``(T, H, W, 4)`` is dropped.

    Raises:
        ValueError: not a uint8 array of one of those shapes.
    """
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"expected uint8 (T, H, W, 3) frames; got {frames.dtype} {frames.shape}")
    x = torch.from_numpy(np.ascontiguousarray(frames))
    if x.ndim == 3:
        x = x[..., None]
    x = x.permute(0, 3, 1, 2)  # (T, C, H, W)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3]
    return x.float()


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


def _rgb(frames: np.ndarray) -> np.ndarray:
    """uint8 ``(T, H, W[, 1|3|4])`` -> ``(T, H, W, 3)`` (gray replicated, alpha dropped; a view when already RGB)."""
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"expected uint8 (T, H, W, 3) frames; got {frames.dtype} {frames.shape}")
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.shape[-1] == 1:
        return np.broadcast_to(frames, frames.shape[:3] + (3,))
    return frames[..., :3]


def clip_to_uint8(frames: np.ndarray, height: int, width: int, rng: np.random.Generator | None = None) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> uint8 ``(C, T, height, width)``: resize-cover, crop (centred or drawn from ``rng``).

    When no resize is needed (one side already matches, the other covers) the crop is taken from the
    uint8 frames directly, one copy, no float pass; otherwise frames are resized in float
    (antialiased bilinear) and rounded back to uint8. The crop offsets are drawn exactly as in
    :func:`crop`, so both paths use ``rng`` the same way.
    """
    frames = _rgb(frames)
    t, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) == (h, w):
        if rng is None:
            top, left = (h - height) // 2, (w - width) // 2
        else:
            top, left = int(rng.integers(0, h - height + 1)), int(rng.integers(0, w - width + 1))
        view = frames[:, top:top + height, left:left + width].transpose(3, 0, 1, 2)  # (C, T, H, W)
        return torch.from_numpy(np.ascontiguousarray(view))
    x = crop(resize_cover(to_tensor(np.ascontiguousarray(frames)), height, width), height, width, rng)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous()


def to_model_range(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (into ``out`` when given, e.g. a slot of a batch tensor)."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device) if out is None else out
    if x.device.type == "cpu" and out.device.type == "cpu" and out.is_contiguous():
        # numpy: single-threaded, no OpenMP spin in the consuming process; about half torch's CPU time here
        o = out.numpy()
        np.multiply(x.numpy(), np.float32(1.0 / 127.5), out=o, dtype=np.float32)
        np.subtract(o, np.float32(1.0), out=o)
        return out
    out.copy_(x)
    return out.mul_(1.0 / 127.5).sub_(1.0)


def clip_to_model_input(frames: np.ndarray, height: int, width: int,
                        rng: np.random.Generator | None = None) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float32 ``(C, T, height, width)`` in [-1, 1] (resize-cover, crop, scale)."""
    return to_model_range(clip_to_uint8(frames, height, width, rng))


def to_uint8_video(x: torch.Tensor) -> np.ndarray:
    """float ``(C, T, H, W)`` in [-1, 1] -> uint8 ``(T, H, W, 3)`` (clamped, rounded)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()

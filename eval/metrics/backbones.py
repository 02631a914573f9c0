"""Feature backbones for the consistency / quality / text metrics, and VBench's preprocessing.

A backbone maps a preprocessed float batch ``(N, 3, h, w)`` to features ``(N, D)`` and says
whether it is the network VBench uses (``exact``). Weight-free default: :class:`PixelBackbone`.
Optional, from local paths through ``transformers`` (never downloaded):

    DinoBackbone("/models/dino-vitb16")       # subject_consistency (VBench: DINO ViT-B/16)
    ClipBackbone("/models/clip-vit-base-patch32")   # background_consistency (CLIP ViT-B/32)
    ClipBackbone("/models/clip-vit-large-patch14")  # aesthetic_quality / clipsim (ViT-L/14)

Preprocessing follows VBench (``vbench/utils.py``: ``dino_transform``, ``clip_transform``), as
torchvision applies it to uint8 tensors (resize in float, rounded back to uint8, then / 255):

- :func:`dino_preprocess`: short side to 224 (long side ``int(224 * long / short)``), bilinear,
  no antialias, no crop; / 255; ImageNet mean/std.
- :func:`clip_preprocess`: short side to 224, bicubic, no antialias; centre crop 224 x 224;
  / 255; CLIP mean/std.

``exact`` of a transformers backbone is True when its config has the shape of VBench's network
(ViT-B/16 for DINO, ViT-B/32 or ViT-L/14 for CLIP); whether the weights are VBench's checkpoint
is the user's to ensure (e.g. ``facebook/dino-vitb16``, ``openai/clip-vit-base-patch32``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vdit.eval.metrics.base import require_path

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD", "dino_preprocess", "clip_preprocess",
           "PixelBackbone", "DinoBackbone", "ClipBackbone", "embed_frames"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resize_short(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(N, 3, H, W) float 0-255 -> short side ``size`` like torchvision Resize(int) on uint8."""
    H, W = x.shape[-2:]
    if H <= W:
        h, w = size, int(size * W / H)
    else:
        h, w = int(size * H / W), size
    if (h, w) == (H, W):
        return x
    y = F.interpolate(x, size=(h, w), mode=mode, align_corners=False)
    return y.round().clamp(0, 255)  # torchvision casts a resized uint8 tensor back to uint8


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x / 255.0 - m) / s


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (N, 3, H, W)


def dino_preprocess(frames: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, h, w): VBench ``dino_transform`` (see module doc)."""
    return _normalize(_resize_short(_to_tensor(frames), size, "bilinear"), IMAGENET_MEAN, IMAGENET_STD)


def clip_preprocess(frames: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, size, size): VBench ``clip_transform`` (module doc)."""
    x = _resize_short(_to_tensor(frames), size, "bicubic")
    H, W = x.shape[-2:]
    top, left = int(round((H - size) / 2.0)), int(round((W - size) / 2.0))
    return _normalize(x[..., top:top + size, left:left + size], CLIP_MEAN, CLIP_STD)


class PixelBackbone:
    """Weight-free features, half layout and half colour, so a cosine similarity reads as
    (cos_layout + cos_colour) / 2:

    - layout: ``grid x grid`` average-pooled RGB of the preprocessed frame, standardised per frame
      (zero mean, unit variance): ignores global brightness and contrast;
    - colour: per-channel 16-bin histograms of the preprocessed values over [-2.2, 2.7]
      (normalised, square-rooted: the Hellinger embedding), robust to motion inside the frame.

    A scene cut changes both; a pan changes mostly the layout. Not VBench's network
    (``exact = False``); numbers are comparable only between runs of this backbone.
    """

    name = "pixel_layout8_colour16"
    exact = False

    def __init__(self, grid: int = 8, bins: int = 16) -> None:
        self.grid, self.bins = int(grid), int(bins)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        g = F.adaptive_avg_pool2d(x, self.grid).flatten(1)  # (N, 3 * grid * grid)
        g = g - g.mean(dim=1, keepdim=True)
        g = F.normalize(g / g.std(dim=1, keepdim=True).clamp_min(1e-12), dim=1)
        h = torch.stack([torch.cat([torch.histc(frame[c], self.bins, -2.2, 2.7) for c in range(3)])
                         for frame in x])  # (N, 3 * bins)
        h = F.normalize((h / h.sum(dim=1, keepdim=True).clamp_min(1e-12)).sqrt(), dim=1)
        return torch.cat([g, h], dim=1) / 2 ** 0.5


def _shape_is(cfg, hidden: int, patch: int, layers: int) -> bool:
    return (getattr(cfg, "hidden_size", None), getattr(cfg, "patch_size", None),
            getattr(cfg, "num_hidden_layers", None)) == (hidden, patch, layers)


class DinoBackbone:
    """DINO ViT from a local ``transformers`` folder; features = final-layernormed CLS token
    (what ``torch.hub`` ``dino_vitb16`` returns), positional embeddings interpolated for non-square
    inputs. Raises MissingWeightsError for a missing path."""

    name = "dino_vit"

    def __init__(self, path: str | None, device: str = "cpu", metric: str = "subject_consistency",
                 setting: str = "weights.dino (--weights dino=PATH)") -> None:
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(require_path(path, metric, setting)).eval().to(device)
        self.device = device
        self.exact = _shape_is(self.model.config, 768, 16, 12)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(pixel_values=x.to(self.device), interpolate_pos_encoding=True)
        return out.last_hidden_state[:, 0].double().cpu()  # (N, D)


class ClipBackbone:
    """CLIP from a local ``transformers`` folder: image features (``get_image_features``, the
    projected embedding, as ``clip.encode_image``) and text features. ``exact`` is True for a
    ViT-B/32 or ViT-L/14 vision tower. Raises MissingWeightsError for a missing path."""

    name = "clip"

    def __init__(self, path: str | None, device: str = "cpu", metric: str = "background_consistency",
                 setting: str = "weights.clip (--weights clip=PATH)") -> None:
        from transformers import CLIPModel

        self.path = require_path(path, metric, setting)
        self.model = CLIPModel.from_pretrained(self.path).eval().to(device)
        self.device = device
        v = self.model.config.vision_config
        self.exact = _shape_is(v, 768, 32, 12) or _shape_is(v, 1024, 14, 24)
        self.input_size = int(v.image_size)

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers >= 5 returns an output object

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._tensor(self.model.get_image_features(pixel_values=x.to(self.device))).double().cpu()

    def text(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), D) projected text features (CLIP tokenizer from the same folder, 77 tokens)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.path)
        batch = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            return self._tensor(self.model.get_text_features(**{k: v.to(self.device) for k, v in batch.items()})
                                ).double().cpu()


def embed_frames(video: np.ndarray, preprocess, backbone, batch: int = 16) -> torch.Tensor:
    """Features of every frame: uint8 (T, H, W, 3) -> float64 (T, D), in batches of ``batch``."""
    return torch.cat([backbone(preprocess(video[i:i + batch])) for i in range(0, len(video), batch)])

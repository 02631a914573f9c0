"""Subject and background consistency (VBench), over a pluggable feature backbone.

Source (Vchitect/VBench, ``vbench/subject_consistency.py``, ``vbench/background_consistency.py``,
Apache-2.0; independent implementation): frame features are L2-normalised; for every frame
i >= 1 the similarity is ``(max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i))) / 2``; a video's
score is the mean over its T - 1 frames. VBench's dimension divides the sum over all videos by
the total number of such frames (a frame-weighted mean; equal to the mean over videos when all
videos have the same length), which is how the registry aggregates these two metrics.

- subject_consistency: VBench uses DINO ViT-B/16 with :func:`~vdit.eval.metrics.backbones.dino_preprocess`.
- background_consistency: VBench uses CLIP ViT-B/32 with :func:`~vdit.eval.metrics.backbones.clip_preprocess`.

Each keeps its own preprocessing whatever the backbone; the weight-free default backbone is
:class:`~vdit.eval.metrics.backbones.PixelBackbone` (inexact). ``exact`` is the backbone's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vdit.eval.metrics.backbones import PixelBackbone, clip_preprocess, dino_preprocess, embed_frames
from vdit.eval.metrics.base import MetricResult, check_video

__all__ = ["consistency_from_features", "subject_consistency", "background_consistency"]


def consistency_from_features(features: torch.Tensor | np.ndarray) -> tuple[float, list[float]]:
    """VBench's consistency of one video from per-frame features ``(T, D)``, T >= 2.

    Returns (score, per-frame similarities for frames 1..T-1).
    """
    f = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float64), dim=-1, p=2)
    prev = (f[1:] * f[:-1]).sum(-1).clamp_min(0.0)  # max(0, cos(f_{i-1}, f_i))
    first = (f[1:] * f[0:1]).sum(-1).clamp_min(0.0)  # max(0, cos(f_0, f_i))
    sims = ((prev + first) / 2.0).tolist()
    return float(np.mean(sims)), sims


def _consistency(name: str, video: np.ndarray, backbone, preprocess, original: str) -> MetricResult:
    video = check_video(video)
    backbone = backbone if backbone is not None else PixelBackbone()
    score, sims = consistency_from_features(embed_frames(video, preprocess, backbone))
    return MetricResult(
        name=name, value=score, implementation=f"vdit.eval.metrics.consistency.{name}", original=original,
        exact=bool(getattr(backbone, "exact", False)),
        details={"frame_sims": sims, "num_pairs": len(sims),
                 "backbone": getattr(backbone, "name", type(backbone).__name__)},
    )


def subject_consistency(video: np.ndarray, fps: float | None = None, *, backbone=None) -> MetricResult:
    """VBench subject consistency of uint8 (T, H, W, 3): DINO-style preprocessing, then the formula.

    Args:
        backbone: features ``(N, 3, h, w) -> (N, D)``; default the weight-free PixelBackbone; a
            :class:`~vdit.eval.metrics.backbones.DinoBackbone` for VBench's number.

    Returns:
        MetricResult(name="subject_consistency", exact = backbone.exact) with details
        ``frame_sims``, ``num_pairs`` (weight in the set aggregate), ``backbone``.
    """
    return _consistency("subject_consistency", video, backbone, dino_preprocess,
                        "VBench subject_consistency (DINO ViT-B/16)")


def background_consistency(video: np.ndarray, fps: float | None = None, *, backbone=None) -> MetricResult:
    """VBench background consistency: CLIP preprocessing (resize, centre crop), then the formula.

    Same contract as :func:`subject_consistency`; VBench's backbone is CLIP ViT-B/32
    (:class:`~vdit.eval.metrics.backbones.ClipBackbone`).
    """
    return _consistency("background_consistency", video, backbone, clip_preprocess,
                        "VBench background_consistency (CLIP ViT-B/32)")

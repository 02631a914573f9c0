"""Per-frame quality dimensions (VBench) and CLIP text-video similarity; all need local weights.

Sources (Vchitect/VBench, Apache-2.0; independent implementations):

- aesthetic_quality (``vbench/aesthetic_quality.py``): CLIP ViT-L/14 image features of each frame
  (:func:`~vdit.eval.metrics.backbones.clip_preprocess`), L2-normalised, through the LAION
  aesthetic linear head (``sa_0_4_vit_l_14_linear.pth``: 768 -> 1), divided by 10; mean per video.
- imaging_quality (``vbench/imaging_quality.py``): each frame scaled so that its longer side is
  at most 512 (no antialias), / 255, MUSIQ (SPAQ-trained) score, mean per video, / 100. MUSIQ is
  provided by ``pyiqa`` (optional extra ``iqa``), weights from a local path.
- clipsim (CLIPSIM, Wu et al. 2021, "GODIVA"): mean over frames of the cosine similarity between
  CLIP image features (CLIP preprocessing) and the prompt's CLIP text features; raw cosine, not
  the x100 some papers print. Implementations differ in the CLIP variant, so ``exact = False``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vdit.eval.metrics.backbones import ClipBackbone, clip_preprocess, embed_frames
from vdit.eval.metrics.base import MetricResult, check_video, require_path

__all__ = ["AestheticHead", "aesthetic_quality", "MusiqScorer", "imaging_quality", "clipsim"]


class AestheticHead:
    """LAION aesthetic predictor: ``torch.nn.Linear(D, 1)`` loaded from a local state dict
    (keys ``weight`` (1, D) and ``bias`` (1,)); applied to L2-normalised CLIP features."""

    def __init__(self, path: str | None, setting: str = "weights.aesthetic_head (--weights aesthetic_head=PATH)"):
        state = torch.load(require_path(path, "aesthetic_quality", setting), map_location="cpu", weights_only=True)
        w = state["weight"]
        self.linear = torch.nn.Linear(w.shape[1], w.shape[0]).double()
        self.linear.load_state_dict({k: v.double() for k, v in state.items()})

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.linear(F.normalize(features.double(), dim=-1)).squeeze(-1)  # (N,)


def aesthetic_quality(video: np.ndarray, fps: float | None = None, *, clip: ClipBackbone, head: AestheticHead
                      ) -> MetricResult:
    """VBench aesthetic quality of uint8 (T, H, W, 3): mean over frames of head(CLIP) / 10.

    exact when ``clip`` is a ViT-L/14 (``clip.exact`` and 768-d features) and the head is LAION's
    (the user's to ensure). Details: ``frame_scores``.
    """
    video = check_video(video)
    scores = head(embed_frames(video, clip_preprocess, clip)) / 10.0
    exact = bool(clip.exact and head.linear.in_features == 768)
    return MetricResult(name="aesthetic_quality", value=float(scores.mean()),
                        implementation="vdit.eval.metrics.quality.aesthetic_quality",
                        original="VBench aesthetic_quality (CLIP ViT-L/14 + LAION sa_0_4 linear head)", exact=exact,
                        details={"frame_scores": scores.tolist()})


class MusiqScorer:
    """MUSIQ through ``pyiqa`` with weights from a local file (never downloaded).

    Raises:
        MissingWeightsError: no or missing path. ImportError: pyiqa not installed
        (``pip install 'vdit[iqa]'``).
    """

    def __init__(self, path: str | None, device: str = "cpu",
                 setting: str = "weights.musiq (--weights musiq=PATH)") -> None:
        require_path(path, "imaging_quality", setting)
        try:
            import pyiqa
        except ImportError as exn:  # pragma: no cover - optional dependency
            raise ImportError("imaging_quality needs pyiqa: pip install 'vdit[iqa]'") from exn
        self.model = pyiqa.create_metric("musiq", device=torch.device(device), as_loss=False,
                                         pretrained_model_path=path)  # pragma: no cover
        self.device = device  # pragma: no cover

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - needs pyiqa weights
        with torch.no_grad():
            return self.model(x.to(self.device)).reshape(-1).double().cpu()


def imaging_quality(video: np.ndarray, fps: float | None = None, *, musiq) -> MetricResult:
    """VBench imaging quality: per frame MUSIQ on the frame scaled to longer side <= 512, / 255;
    mean over frames / 100. ``musiq``: callable (1, 3, h, w) in [0, 1] -> score (0-100)."""
    video = check_video(video)
    H, W = video.shape[1:3]
    scale = min(1.0, 512.0 / max(H, W))
    scores = []
    for frame in video:
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
        if scale < 1.0:
            x = F.interpolate(x, size=(int(scale * H), int(scale * W)), mode="bilinear",
                              align_corners=False).round().clamp(0, 255)
        scores.append(float(musiq(x / 255.0).mean()))
    return MetricResult(name="imaging_quality", value=float(np.mean(scores)) / 100.0,
                        implementation="vdit.eval.metrics.quality.imaging_quality",
                        original="VBench imaging_quality (MUSIQ-SPAQ)", exact=isinstance(musiq, MusiqScorer),
                        details={"frame_scores": scores})


def clipsim(video: np.ndarray, fps: float | None = None, *, prompt: str, clip: ClipBackbone) -> MetricResult:
    """CLIPSIM: mean over frames of cos(CLIP image(frame), CLIP text(prompt)); raw cosine in [-1, 1]."""
    video = check_video(video)
    img = F.normalize(embed_frames(video, clip_preprocess, clip), dim=-1)  # (T, D)
    txt = F.normalize(clip.text([prompt]), dim=-1)  # (1, D)
    sims = (img @ txt.T).squeeze(-1)
    return MetricResult(name="clipsim", value=float(sims.mean()), implementation="vdit.eval.metrics.quality.clipsim",
                        original="CLIPSIM (Wu et al. 2021): CLIP image-text cosine averaged over frames", exact=False,
                        details={"frame_sims": sims.tolist()})

"""Distribution metrics (EVAL.md C): Frechet distance, MMD (KID/KVD), and FVD with a local I3D.

Set-level metrics: they compare the feature distributions of two sets of videos, so they have
no per-video value.

- :func:`frechet_distance`: ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) (Heusel et al.
  2017, FID; Unterthiner et al. 2018, FVD on I3D features). The matrix square root is
  ``scipy.linalg.sqrtm``; a tiny imaginary part from round-off is dropped.
- :func:`mmd2_polynomial`: unbiased squared MMD with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018, KID; KVD applies it to I3D video features).
- :func:`i3d_features` / :func:`fvd`: I3D from a local TorchScript file (e.g. the
  ``i3d_torchscript.pt`` used by StyleGAN-V / common FVD code). Videos are resized to 224 x 224
  (bilinear), scaled to [-1, 1], fed as (N, 3, T, 224, 224) and called with
  ``rescale=False, resize=False, return_features=True`` (falling back to a plain call for a
  module without those keywords). FVD numbers depend on clip length, fps and sample count, so
  ``exact`` is False: compare only numbers computed the same way.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from vdit.eval.metrics.base import MetricResult, check_video, require_path

__all__ = ["gaussian_stats", "frechet_distance", "mmd2_polynomial", "load_i3d", "i3d_features", "fvd", "kvd"]


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D), unbiased) of features (N, D), N >= 2, float64."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D); got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians (means (D,), covariances (D, D)); >= 0 up to round-off."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: regularise as FID code commonly does
        eps = 1e-6 * np.eye(s1.shape[0])
        covmean = scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def mmd2_polynomial(x: np.ndarray, y: np.ndarray, degree: int = 3) -> float:
    """Unbiased MMD^2 between samples x (m, D) and y (n, D), m, n >= 2, kernel (x.y / D + 1)^degree."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1.0) ** degree for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def load_i3d(path: str | None, device: str = "cpu") -> torch.jit.ScriptModule:
    """Load a TorchScript I3D from a local file; MissingWeightsError names the setting."""
    return torch.jit.load(require_path(path, "fvd", "weights.i3d (--weights i3d=PATH)"), map_location=device).eval()


def i3d_features(videos: list[np.ndarray], model, device: str = "cpu", size: int = 224) -> np.ndarray:
    """(N, D) I3D features of uint8 (T, H, W, 3) videos (resized to size x size, [-1, 1])."""
    feats = []
    for v in videos:
        x = torch.from_numpy(np.ascontiguousarray(check_video(v))).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = (x / 127.5 - 1.0).permute(1, 0, 2, 3)[None].to(device)  # (1, 3, T, size, size)
        with torch.no_grad():
            try:
                f = model(x, rescale=False, resize=False, return_features=True)
            except (RuntimeError, TypeError):
                f = model(x)
        feats.append(f.reshape(1, -1).double().cpu().numpy())
    return np.concatenate(feats)


def _set_result(name: str, value: float, original: str, n_real: int, n_gen: int) -> MetricResult:
    return MetricResult(name=name, value=value, implementation=f"vdit.eval.metrics.distribution.{name}",
                        original=original, exact=False, details={"num_real": n_real, "num_generated": n_gen})


def fvd(real: list[np.ndarray], generated: list[np.ndarray], model) -> MetricResult:
    """FVD between two sets of videos (>= 2 each) with an I3D TorchScript ``model`` (see module doc)."""
    fr, fg = i3d_features(real, model), i3d_features(generated, model)
    value = frechet_distance(*gaussian_stats(fr), *gaussian_stats(fg))
    return _set_result("fvd", value, "FVD (Unterthiner et al. 2018), I3D features", len(real), len(generated))


def kvd(real: list[np.ndarray], generated: list[np.ndarray], model) -> MetricResult:
    """KVD: unbiased polynomial-kernel MMD^2 of I3D features (>= 2 videos per set)."""
    value = mmd2_polynomial(i3d_features(real, model), i3d_features(generated, model))
    return _set_result("kvd", value, "KVD (Unterthiner et al. 2018), I3D features", len(real), len(generated))

"""Optical flow backends for the motion metrics: OpenCV Farneback (default) and RAFT (optional).

A backend is a callable ``flow(frame_a, frame_b) -> float32 (H, W, 2)`` giving, for each pixel of
``frame_a``, its displacement ``(dx, dy)`` in pixels towards ``frame_b`` (x right, y down). Frames
are uint8 (H, W, 3) RGB. ``backend.exact`` tells whether metrics computed with it can equal
VBench's numbers (VBench uses RAFT ``raft-things``, 20 iterations, at native resolution).

    from vdit.eval.metrics.flow import FarnebackFlow, RaftFlow, FlowCache
    flow = FarnebackFlow()                                   # weight-free
    flow = RaftFlow("/models/raft_large_C_T_V1.pth")         # torchvision RAFT-large state dict
    cache = FlowCache(video, flow)                           # one per video, shared by metrics
    f01 = cache(0, 1)                                        # (H, W, 2), computed once

RAFT: ``torchvision.models.optical_flow.raft_large`` with weights loaded from a local file
(``torchvision``'s ``Raft_Large_Weights.C_T_V1`` are ported from the original ``raft-things``
checkpoint, which is what VBench loads). Like VBench's ``InputPadder`` the frames are padded with
edge replication to a multiple of 8, split evenly on both sides, and the flow VBench scores is the
padded one (``padded=True``). torchvision is an optional dependency (extra ``raft``).
"""

from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np

from vdit.eval.metrics.base import require_path

__all__ = ["FarnebackFlow", "RaftFlow", "FlowCache", "top_fraction_mean", "flow_magnitude"]


def flow_magnitude(flow: np.ndarray) -> np.ndarray:
    """Per-pixel Euclidean length of a (H, W, 2) flow, pixels/frame."""
    return np.sqrt(flow[..., 0].astype(np.float64) ** 2 + flow[..., 1].astype(np.float64) ** 2)


def top_fraction_mean(flow: np.ndarray, fraction: float) -> float:
    """Mean of the largest ``int(H * W * fraction)`` flow magnitudes (VBench ``get_score``:
    2 % in the static filter, 5 % in dynamic degree). Pixels/frame; 0.0 when that count is 0."""
    rad = flow_magnitude(flow).ravel()
    k = int(rad.size * fraction)
    if k <= 0:
        return 0.0
    return float(np.partition(rad, rad.size - k)[rad.size - k:].mean())


class FarnebackFlow:
    """OpenCV dense Farneback flow on grayscale frames (weight-free; not VBench's RAFT: inexact).

    Pyramid levels grow with the frame size (``levels = clip(log2(min(H, W) / 16), 1, 5)``) so
    that motions of tens of pixels are found at 480p; window 15, 3 iterations, poly_n 5, sigma 1.2.
    """

    name = "opencv_farneback"
    exact = False
    pads = False

    def __init__(self, winsize: int = 15, iterations: int = 3) -> None:
        self.winsize, self.iterations = int(winsize), int(iterations)

    def __call__(self, a: np.ndarray, b: np.ndarray, padded: bool = False) -> np.ndarray:
        if np.array_equal(a, b):  # identical frames: exactly no motion (Farneback leaves ~0.04 px noise)
            return np.zeros(a.shape[:2] + (2,), np.float32)
        ga = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY)
        gb = cv2.cvtColor(np.ascontiguousarray(b), cv2.COLOR_RGB2GRAY)
        levels = int(np.clip(math.floor(math.log2(max(min(ga.shape) / 16.0, 1.0))), 1, 5))
        return cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, levels, self.winsize, self.iterations, 5, 1.2, 0)


class RaftFlow:
    """torchvision RAFT-large from a local state-dict file (exact with the ``raft-things`` weights).

    Args:
        path: local ``.pth`` state dict for ``torchvision.models.optical_flow.raft_large``.
        iters: flow updates (VBench: 20). device: torch device string.
        small: use ``raft_small`` instead (not VBench's model; marks results inexact).

    Raises:
        MissingWeightsError: ``path`` missing. ImportError: torchvision not installed
        (``pip install 'vdit[raft]'``).
    """

    name = "torchvision_raft"
    pads = True

    def __init__(self, path: str | None, iters: int = 20, device: str = "cpu", small: bool = False,
                 metric: str = "static_filter/dynamic_degree") -> None:
        import torch
        try:
            from torchvision.models.optical_flow import raft_large, raft_small
        except ImportError as exn:  # pragma: no cover - depends on the environment
            raise ImportError("RAFT flow needs torchvision: pip install 'vdit[raft]'") from exn
        require_path(path, metric, "weights.raft (--weights raft=PATH)")
        self.model = (raft_small if small else raft_large)(weights=None, progress=False)
        self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.model.eval().to(device)
        self.iters, self.device, self.exact = int(iters), device, not small

    def __call__(self, a: np.ndarray, b: np.ndarray, padded: bool = False) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        H, W = a.shape[:2]
        ph, pw = (-H) % 8, (-W) % 8
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # left, right, top, bottom

        def prep(x: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float().to(self.device)
            t = F.pad(t, pad, mode="replicate")  # (1, 3, H', W')
            return 2.0 * (t / 255.0) - 1.0  # RAFT's own input normalisation

        with torch.no_grad():
            flow = self.model(prep(a), prep(b), num_flow_updates=self.iters)[-1][0]  # (2, H', W')
        flow = flow.permute(1, 2, 0).cpu().numpy().astype(np.float32)
        if padded:
            return flow
        return flow[pad[2]:pad[2] + H, pad[0]:pad[0] + W]


class FlowCache:
    """Flows of one video memoised by (i, j, padded): metrics sharing a video share its flows.

    Args:
        video: uint8 (T, H, W, 3). backend: a flow callable (default :class:`FarnebackFlow`).
    """

    def __init__(self, video: np.ndarray, backend: Callable | None = None) -> None:
        self.video = video
        self.backend = backend if backend is not None else FarnebackFlow()
        self._flows: dict[tuple[int, int, bool], np.ndarray] = {}

    def __call__(self, i: int, j: int, padded: bool = False) -> np.ndarray:
        padded = bool(padded and getattr(self.backend, "pads", False))
        key = (i, j, padded)
        if key not in self._flows:
            self._flows[key] = self.backend(self.video[i], self.video[j], padded=padded)
        return self._flows[key]

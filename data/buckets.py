"""``(T, H, W)`` buckets: variable duration, resolution and aspect ratio under a token budget.

A bucket is a clip shape ``(num_frames, height, width)`` with a sampling weight. Its batch size
comes from a token budget, the number of transformer tokens one micro-batch may hold::

    batch_size = max(1, floor(token_budget / tokens(T, H, W)))

with ``tokens`` counted on the latent/patch grid (``patch_size`` over the VAE's compressed
``(T', H', W')``; the trainer may pass its own ``tokens_fn``). A budget keeps the work per step
about equal across buckets, which fixed per-resolution batch sizes do not (the reason Open-Sora's
hand-tuned bucket tables OOM or unbalance ranks; Open-Sora-Plan moved to token budgets).

Each clip goes to the nearest bucket it fills *without distortion*:

1. eligible buckets: weight > 0, the clip has enough source frames for ``T`` frames at the clip
   sampling (target fps or stride; decided by the decoder on the frames that really decode), and,
   unless ``allow_upscale``, the clip is at least ``H x W`` (resize-cover never enlarges it);
2. of those, the ones whose aspect ratio is nearest the clip's (``|log(w/h) - log(W/H)|`` within
   ``ar_tolerance`` of the best), so resize-cover then centre/random crop loses the least;
3. one of them is drawn in proportion to ``weight`` with the sample's own generator (seeded by
   the sample's position, so the choice is reproducible on resume).

Batching happens per bucket inside a data slot (see :mod:`vdit.data.pipeline`).

Schema (plain lists and numbers, for Hydra)::

    data:
      buckets:
        token_budget: 65536
        patch_size: [1, 2, 2]
        compression: [4, 8, 8]
        causal_time: true
        buckets:
          - {num_frames: 33, height: 256, width: 256, weight: 1.0}
          - {num_frames: 33, height: 192, width: 336, weight: 1.0}
          - {num_frames: 65, height: 256, width: 256, weight: 0.5}
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

log = logging.getLogger(__name__)

TokensFn = Callable[[int, int, int], int]


@dataclass
class BucketSpec:
    """One clip shape: frames (T), pixels (H x W), sampling weight, optional fixed batch size."""

    num_frames: int = 16
    height: int = 32
    width: int = 32
    weight: float = 1.0
    batch_size: Optional[int] = None  # overrides the token-budget batch size


@dataclass
class BucketConfig:
    """Bucket table and token budget (Hydra-friendly: lists of plain fields).

    ``token_budget`` is tokens per micro-batch (0: every bucket must set ``batch_size``).
    Tokens of a clip: ``T' = 1 + (T - 1) // ct`` (``causal_time``) or ``T // ct``, ``H' = H // ch``,
    ``W' = W // cw`` with ``compression = [ct, ch, cw]``, then ``(T' // pt) (H' // ph) (W' // pw)``
    with ``patch_size = [pt, ph, pw]``. ``ar_tolerance`` (in log aspect ratio) groups buckets of
    the same shape family as equally near. ``allow_upscale`` lets clips smaller than a bucket in.
    """

    buckets: List[BucketSpec] = field(default_factory=list)
    token_budget: int = 0
    patch_size: List[int] = field(default_factory=lambda: [1, 2, 2])
    compression: List[int] = field(default_factory=lambda: [1, 1, 1])
    causal_time: bool = False
    ar_tolerance: float = 0.05
    allow_upscale: bool = False


def latent_tokens(num_frames: int, height: int, width: int, patch_size=(1, 2, 2), compression=(1, 1, 1),
                  causal_time: bool = False) -> int:
    """Transformer tokens of one ``(T, H, W)`` pixel clip on the latent/patch grid (see :class:`BucketConfig`)."""
    ct, ch, cw = (int(c) for c in compression)
    pt, ph, pw = (int(p) for p in patch_size)
    t = 1 + (num_frames - 1) // ct if causal_time else num_frames // ct
    return (t // pt) * ((height // ch) // ph) * ((width // cw) // pw)


@dataclass(frozen=True)
class Bucket:
    """A resolved bucket: shape, weight, tokens per clip and clips per batch."""

    num_frames: int
    height: int
    width: int
    weight: float
    tokens: int
    batch_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_frames, self.height, self.width)


class Buckets:
    """The resolved bucket table and the clip -> bucket rule.

    Args:
        config: :class:`BucketConfig` (or a plain dict with its fields, e.g. from OmegaConf).
        tokens_fn: ``(T, H, W) -> tokens``; defaults to :func:`latent_tokens` with the config's
            patch size and compression.

    Raises:
        ValueError: no bucket, a non-positive size, a negative weight, no positive weight, a
            duplicate shape, zero tokens, or neither ``token_budget`` nor ``batch_size``.
    """

    def __init__(self, config: BucketConfig | dict, tokens_fn: TokensFn | None = None):
        if isinstance(config, dict):
            config = BucketConfig(**{k: v for k, v in config.items() if k != "buckets"},
                                  buckets=[BucketSpec(**dict(b)) for b in config.get("buckets", [])])
        specs = [b if isinstance(b, BucketSpec) else BucketSpec(**dict(b)) for b in config.buckets]
        if not specs:
            raise ValueError("data.buckets.buckets is empty: give at least one {num_frames, height, width}")
        self.config = config
        self.match_aspect = True
        self.allow_upscale = bool(config.allow_upscale)
        self.ar_tolerance = float(config.ar_tolerance)
        fn = tokens_fn or (lambda t, h, w: latent_tokens(t, h, w, config.patch_size, config.compression,
                                                         config.causal_time))
        seen, out = set(), []
        for b in specs:
            shape = (int(b.num_frames), int(b.height), int(b.width))
            if min(shape) < 1:
                raise ValueError(f"bucket {shape}: num_frames, height, width must be >= 1")
            if b.weight < 0:
                raise ValueError(f"bucket {shape}: weight must be >= 0; got {b.weight}")
            if shape in seen:
                raise ValueError(f"bucket {shape} listed twice")
            seen.add(shape)
            tokens = int(fn(*shape))
            if tokens < 1:
                raise ValueError(f"bucket {shape} has {tokens} tokens: sizes too small for the patch/compression")
            if b.batch_size is not None:
                bs = int(b.batch_size)
            elif config.token_budget > 0:
                bs = max(1, config.token_budget // tokens)
                if tokens > config.token_budget:
                    log.warning("data: bucket %s has %d tokens, more than token_budget %d: batch size 1",
                                shape, tokens, config.token_budget)
            else:
                raise ValueError(f"bucket {shape}: set data.buckets.token_budget or the bucket's batch_size")
            if bs < 1:
                raise ValueError(f"bucket {shape}: batch_size must be >= 1")
            out.append(Bucket(*shape, float(b.weight), tokens, bs))
        if not any(b.weight > 0 for b in out):
            raise ValueError("every bucket has weight 0")
        self.buckets: list[Bucket] = out

    @classmethod
    def fixed(cls, num_frames: int, height: int, width: int, batch_size: int) -> "Buckets":
        """One bucket and no aspect/size matching: the fixed-shape pipeline (every clip is cropped to it)."""
        self = cls(BucketConfig(buckets=[BucketSpec(num_frames, height, width, 1.0, batch_size)]),
                   tokens_fn=lambda t, h, w: t * h * w)
        self.match_aspect = False
        self.allow_upscale = True
        return self

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, i: int) -> Bucket:
        return self.buckets[i]

    def assign(self, height: int, width: int, fits_frames: Callable[[int], bool],
               rng: np.random.Generator | None) -> tuple[int | None, str]:
        """The bucket of a clip of ``height x width`` pixels, or ``(None, reason)``.

        Args:
            height, width: displayed clip size in pixels.
            fits_frames: ``T -> bool``, whether the clip has frames for ``T`` at the clip sampling.
            rng: draws among equally near buckets by weight (no draw when only one is eligible).

        Returns:
            ``(index, "")`` or ``(None, "too_short" | "too_small")``.
        """
        fits: dict[int, bool] = {}
        eligible = []
        size_ok_any = False
        for i, b in enumerate(self.buckets):
            if b.weight <= 0:
                continue
            if not self.allow_upscale and (b.height > height or b.width > width):
                continue
            size_ok_any = True
            if b.num_frames not in fits:
                fits[b.num_frames] = bool(fits_frames(b.num_frames))
            if fits[b.num_frames]:
                eligible.append(i)
        if not eligible:
            return None, "too_short" if size_ok_any else "too_small"
        if self.match_aspect and len(eligible) > 1:
            ar = math.log(width / height)
            dist = {i: abs(math.log(self.buckets[i].width / self.buckets[i].height) - ar) for i in eligible}
            best = min(dist.values())
            eligible = [i for i in eligible if dist[i] <= best + self.ar_tolerance]
        if len(eligible) == 1 or rng is None:
            return eligible[0], ""
        w = np.array([self.buckets[i].weight for i in eligible], dtype=np.float64)
        return eligible[int(rng.choice(len(eligible), p=w / w.sum()))], ""

    def describe(self) -> str:
        """A table of buckets: shape, weight, tokens per clip, batch size, tokens per batch."""
        lines = [f"{'T x H x W':>16} {'weight':>6} {'tokens':>8} {'batch':>5} {'tokens/batch':>12}"]
        for b in self.buckets:
            lines.append(f"{b.num_frames:>4} x {b.height:>4} x {b.width:>4} {b.weight:>6.2f} {b.tokens:>8} "
                         f"{b.batch_size:>5} {b.tokens * b.batch_size:>12}")
        return "\n".join(lines)

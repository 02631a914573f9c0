"""``DiTConfig``: the hyper-parameters of :class:`vdit.model.dit.VideoDiT` (the ``model/`` Hydra group),
their allowed values and checks, and ``num_tokens`` (patch tokens of a latent shape).

Kept apart from the modules so that configs, FLOP counts and planners can be handled without the
model code; :mod:`vdit.model.dit` re-exports every name here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .attention import QK_NORM_SCOPES
from .flow import PREDICTIONS
from .layers import MLP_ACTIVATIONS, patch_grid
from .rope import ROPE_SPLITS

__all__ = ["DiTConfig", "num_tokens", "MODULATIONS", "FINAL_MODULATIONS", "TEXT_PADDINGS", "POS_EMBEDS"]

MODULATIONS = ("per_block", "shared")
FINAL_MODULATIONS = ("linear", "table")
TEXT_PADDINGS = ("mask", "zeros")


POS_EMBEDS = ("none", "sincos")


def _check_modulation(value: str) -> None:
    if value not in MODULATIONS:
        raise ValueError(f"modulation={value!r} is not one of {list(MODULATIONS)}")


def _check_options(cfg: "DiTConfig") -> None:
    _check_modulation(cfg.modulation)
    if cfg.prediction not in PREDICTIONS:
        raise ValueError(f"prediction={cfg.prediction!r} is not one of {list(PREDICTIONS)}")
    if cfg.pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed={cfg.pos_embed!r} is not one of {list(POS_EMBEDS)}")
    if not 0.0 < cfg.x0_t_min <= 1.0:
        raise ValueError(f"x0_t_min={cfg.x0_t_min} must be in (0, 1]")
    if not cfg.sigma_data > 0:
        raise ValueError(f"sigma_data={cfg.sigma_data} must be > 0")
    for name, allowed in (("qk_norm_scope", QK_NORM_SCOPES), ("mlp_act", MLP_ACTIVATIONS),
                          ("final_modulation", FINAL_MODULATIONS), ("rope_split", ROPE_SPLITS),
                          ("text_padding", TEXT_PADDINGS)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}={getattr(cfg, name)!r} is not one of {list(allowed)}")
    if cfg.time_freq_dim < 2 or cfg.time_freq_dim % 2:
        raise ValueError(f"time_freq_dim={cfg.time_freq_dim} must be even and >= 2")


@dataclass
class DiTConfig:
    """Hyper-parameters of :class:`VideoDiT` (the ``model/`` Hydra group).

    Attributes:
        in_channels: latent channels ``C`` (= the autoencoder's ``latent_channels``); the model
            predicts a velocity with the same channel count.
        patch_size: ``[pt, ph, pw]`` in latent frames / latent pixels.
        hidden_size: token width ``D``.
        depth: number of DiT blocks.
        num_heads: attention heads; must divide ``hidden_size``.
        mlp_ratio: MLP inner width is ``round(hidden_size * mlp_ratio)``.
        text_dim: width of the text encoder's hidden states (384 for MiniLM).
        qk_norm: RMSNorm on q and k per head.
        rope_theta: RoPE base.
        cross_attention: read text through cross-attention in every block. If False the text is
            mean-pooled over its mask and added to the timestep embedding instead (adaLN only).
        modulation: how the conditioning becomes each block's shift/scale/gate.
            ``"per_block"``: DiT adaLN-Zero, a ``Linear(D, 6D)`` in every block.
            ``"shared"``: adaLN-single (PixArt-alpha, Wan 2.1), one ``Linear(D, 6D)`` for the whole
            model plus a learned ``(6, D)`` table per block added to its output. Both are zero at
            init, so adaLN-Zero's identity blocks are kept. The final layer keeps its own
            ``Linear(D, 2D)`` modulation in both modes.
        prediction: what the network's last layer predicts. ``"velocity"``: the flow velocity
            ``noise - x0`` directly (SD3, Wan). ``"x0"``: the clean latent, converted inside
            :meth:`VideoDiT.forward` to ``(x_t - x0_pred) / max(t, x0_t_min)``, so the model's output,
            the loss and every sampler stay in velocity ("x-prediction, v-loss", Li & He 2025,
            arXiv 2511.13720). x0 suits small models in pixel space: near ``t = 1`` a velocity net
            must reproduce its input through LayerNorms, an x0 net only outputs ``E[x0 | text]``.
            ``"edm"``: EDM's preconditioning (:func:`vdit.model.flow.edm_preconditioning`): the net
            sees ``x_t / D(t)`` and its output is mixed with ``x_t`` so that it is an x0 prediction at
            ``t = 1`` and a small correction of ``x_t`` near data, where x0 prediction must carry every
            pixel of detail through the network. Output, loss and samplers stay in velocity.
        x0_t_min: lower clamp of ``t`` in the x0 -> velocity conversion.
        sigma_data: the data's standard deviation for ``prediction="edm"`` (0.5 for pixels in [-1, 1]).
        pos_embed: ``"none"`` (3D RoPE only: relative positions, what Wan does) or ``"sincos"`` (add a
            fixed absolute 3D sin-cos table after the patch embedding, as DiT does). From pure noise
            a RoPE-only model has no absolute cue for where a token is (the floor is at the bottom);
            large models infer it, tiny ones trained for minutes do not.
        pooled_text: add an MLP of the mask-averaged text features to the timestep embedding, so
            the caption also reaches every block's adaLN modulation (SD3 and PixArt feed a pooled text
            vector this way) and global properties (colours) become an easy function of the text.
        qk_norm_scope: ``"head"`` (RMSNorm over each head's channels, a ``(Dh,)`` gain) or
            ``"across_heads"`` (Wan: RMSNorm over all ``D`` channels of q and k before the head
            split, a ``(D,)`` gain); in self- and cross-attention.
        cross_attn_norm: affine LayerNorm before cross-attention (True, as Wan) or none.
        cross_attn_zero_init: zero the cross-attention output projection at init (PixArt-alpha), so
            the text enters as an identity; ``False`` keeps the default Linear init there, so the
            query/key/value projections get gradients from the first step and a small model learns
            to use the caption sooner (docs/training-recipe.md). The model output is zero at init
            either way (the final layer is zeroed).
        mlp_act: the MLP's activation: ``"gelu_tanh"`` (DiT, Wan), ``"gelu"`` or ``"silu"``.
        final_modulation: the final layer's (shift, scale): ``"linear"`` (DiT: ``Linear(SiLU(c))
            -> (B, 2D)``) or ``"table"`` (Wan: ``c + table`` with a learned ``(2, D)`` table and the
            timestep embedding ``c`` itself, no projection).
        rope_split: how the head dim is split over (t, h, w) in RoPE: ``"default"``
            (:func:`vdit.model.rope.default_axes_dim`: 128 -> (32, 48, 48)) or ``"wan"``
            (:func:`vdit.model.rope.wan_axes_dim`: 128 -> (44, 42, 42)).
        rope_fp64: RoPE angles in float64, rounded to float32 only in ``cos``/``sin`` (Wan's numerics).
        text_padding: how padded caption tokens are hidden from cross-attention: ``"mask"``
            (excluded as keys) or ``"zeros"`` (Wan: their features are set to zero and they are attended
            like real tokens; the mask is not passed to attention).
        time_freq_dim: width of the timestep sinusoid (256 in DiT and Wan).

    Raises:
        ValueError: if ``modulation``, ``prediction``, ``pos_embed`` or one of the string options
            above is not a known value.
    """

    in_channels: int = 3
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    hidden_size: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 384
    qk_norm: bool = True
    rope_theta: float = 10000.0
    cross_attention: bool = True
    modulation: str = "per_block"
    prediction: str = "velocity"
    x0_t_min: float = 0.05
    sigma_data: float = 0.5
    pos_embed: str = "none"
    pooled_text: bool = False
    qk_norm_scope: str = "head"
    cross_attn_norm: bool = True
    cross_attn_zero_init: bool = True
    mlp_act: str = "gelu_tanh"
    final_modulation: str = "linear"
    rope_split: str = "default"
    rope_fp64: bool = False
    text_padding: str = "mask"
    time_freq_dim: int = 256

    def __post_init__(self) -> None:
        _check_options(self)

    @property
    def head_dim(self) -> int:
        """Per-head width ``hidden_size // num_heads``."""
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """MLP inner width, rounded (so ``mlp_ratio=8960/1536`` gives exactly 8960)."""
        return int(round(self.hidden_size * self.mlp_ratio))

    def num_params(self) -> int:
        """Exact parameter count, by building the model on the meta device (no memory, no init cost)."""
        from .dit import VideoDiT  # the module imports this one

        with torch.device("meta"):
            model = VideoDiT(self)
        return sum(p.numel() for p in model.parameters())

    def flops_per_token(self, seq_len: int, text_len: int = 0) -> float:
        """Forward-pass FLOPs per video token (one multiply-add = 2 FLOPs).

        Counts all matmuls (patch embed, q/k/v/out projections, attention scores and values, MLP,
        final linear). Per-sample work (text K/V projections, adaLN modulation -- per block, or once
        when shared --, timestep and text MLPs) is amortised over ``seq_len`` tokens. Norms,
        activations and RoPE are ignored.
        A training step (forward + backward) costs about 3x this.

        Args:
            seq_len: video tokens per sample ``L``.
            text_len: text tokens per sample ``Lc`` (0 ignores cross-attention's attention cost).
        """
        d, dm = self.hidden_size, self.mlp_hidden
        patch = math.prod(self.patch_size) * self.in_channels
        per_block = 4 * d * d + 2 * seq_len * d + 2 * d * dm  # self-attn projections + attention + MLP (MACs)
        if self.modulation == "per_block":
            per_block += 6 * d * d / seq_len  # adaLN modulation, once per sample
        if self.cross_attention:
            per_block += 2 * d * d + 2 * text_len * d + 2 * text_len * d * d / seq_len  # q/out, attention, k/v
        per_sample = (self.time_freq_dim * d + d * d) + (self.text_dim * d + d * d) * text_len  # t/text MLPs
        if self.final_modulation == "linear":
            per_sample += 2 * d * d  # the final layer's adaLN projection
        if self.pooled_text:
            per_sample += self.text_dim * d + d * d  # the pooled-text MLP
        if self.modulation == "shared":
            per_sample += 6 * d * d  # the one shared adaLN projection
        macs = patch * d + self.depth * per_block + d * patch + per_sample / seq_len
        return 2.0 * macs


def num_tokens(cfg: DiTConfig, latent_shape: Sequence[int]) -> int:
    """Tokens ``L`` for a latent of shape ``(C, T, H, W)`` or ``(T, H, W)``; ValueError if indivisible."""
    t, h, w = latent_shape[-3:]
    tp, hp, wp = patch_grid(cfg.patch_size, t, h, w)
    return tp * hp * wp

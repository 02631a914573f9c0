"""The video diffusion transformer: adaLN-Zero blocks, final layer, VideoDiT (its config: :mod:`vdit.model.config`).

Architecture (DiT, Peebles & Xie 2023, extended to video and text):

    x (B, C, T, H, W) --patch_embed--> tokens (B, L, D) --blocks--> final_layer --> unpatchify
    t (B,)            --t_embedder---> c (B, D)   conditions every block by adaLN-Zero
    t (B, T)          --t_embedder---> c (B, T', D) per latent frame; token l takes row token_frames[l]
    text (B, Lc, E)   --text_proj----> y (B, Lc, D) read by cross-attention in every block
    rope(grid_size)   --> (cos, sin) (L, Dh) rotates q/k of every self-attention

Two ways to turn ``c`` into each block's 6 modulation vectors (``DiTConfig.modulation``):

    "per_block"  DiT adaLN-Zero: every block owns Linear(SiLU(c)) -> (B, 6D); blocks receive c (B, D).
    "shared"     adaLN-single (PixArt-alpha; Wan 2.1): one Linear(SiLU(c)) -> (B, 6D) computed once per
                 forward in VideoDiT; every block receives it and adds its own learned (6, D)
                 ``scale_shift_table``. Saves (depth - 1) * 6 D^2 parameters (~0.4B at Wan-1.3B size).

Options that express Wan 2.1's transformer exactly (all off by default; ``conf/model/wan2.1-t2v-*.yaml``
turn them on, :mod:`vdit.model.wan` converts weights): ``qk_norm_scope="across_heads"``,
``final_modulation="table"``, ``rope_split="wan"`` with ``rope_fp64``, ``text_padding="zeros"``.
Wan's timestep embedding (sinusoid of ``1000 t``, cos first, 256 wide), text MLP (Linear, GELU(tanh),
Linear), shared modulation with per-block ``(6, D)`` tables, affine cross-attention LayerNorm and
GELU(tanh) MLP are what vdit already does with ``modulation="shared"``.

Per-frame timesteps (frame-conditioned continuation, :mod:`vdit.train.conditioning`): with ``t`` of
shape ``(B, T)`` the conditioning is computed once per temporal token slice, ``(B, T', D)``, and each
block turns it into its modulation ``(B, T', 6D)`` and then picks one row per token through the
index ``token_frames`` ``(L,)`` (a parameter-free module), so tokens of frame ``f`` are modulated with
``t[:, f]``. ``t`` of shape ``(B,)`` takes the original path, unchanged.

Forward hooks are the extension points for parallelism (see vdit.train.parallel): ``patch_embed``'s
output (tokens), ``rope``'s output (cos/sin), ``token_frames``' output (the per-token frame index, sharded
like the tokens) and ``final_layer``'s output (per-token patches, gathered there: P wide instead of D wide).
The model itself is single-device code.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from .attention import Attention
from .config import (FINAL_MODULATIONS, MODULATIONS, POS_EMBEDS, TEXT_PADDINGS, DiTConfig,
                     _check_modulation, _check_options, num_tokens)
from .flow import edm_preconditioning, velocity_from_x0
from .layers import (Mlp, PatchEmbed3D, TextProjection, TimestepEmbedding, TokenFrames, modulate, per_frame_apply,
                     per_sample_term, per_token)
from .rope import RotaryEmbedding3D, rope_axes_dim

__all__ = ["DiTConfig", "DiTBlock", "FinalLayer", "VideoDiT", "num_tokens", "MODULATIONS", "FINAL_MODULATIONS",
           "TEXT_PADDINGS", "POS_EMBEDS"]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT, Peebles & Xie 2023, Sec. 3.2).

    ``x += gate_msa * SelfAttn(modulate(LN(x)))`` with RoPE; ``x += CrossAttn(LN'(x), text)``
    (plain pre-LN with affine, no modulation; the cross-attention output projection is zero-initialised,
    as PixArt-alpha does, so the block is the identity at init); ``x += gate_mlp * MLP(modulate(LN(x)))``.

    The ``6 D`` shift/scale/gate values come from, depending on ``modulation``:

    - ``"per_block"``: this block's ``adaLN_modulation = Linear(SiLU(c))``, zeroed at init; the block
      is called with ``c`` of shape ``(B, D)``.
    - ``"shared"``: ``c + scale_shift_table``, where ``c`` is the model's shared projection
      ``(B, 6 D)`` and ``scale_shift_table`` is this block's learned ``(6, D)`` table (zero at init).

    Args:
        hidden_size: ``D``.
        num_heads: heads of both attentions.
        mlp_ratio: MLP inner width ratio (rounded).
        qk_norm: RMSNorm on q/k.
        cross_attention: include the text cross-attention sub-layer.
        modulation: ``"per_block"`` or ``"shared"`` (see :class:`DiTConfig`).
        qk_norm_scope: ``"head"`` or ``"across_heads"`` (see :class:`DiTConfig`).
        cross_attn_norm: affine LayerNorm before cross-attention (else none).
        mlp_act: MLP activation name.

    Raises:
        ValueError: an unknown ``modulation``, ``qk_norm_scope`` or ``mlp_act``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        cross_attention: bool = True,
        modulation: str = "per_block",
        *,
        qk_norm_scope: str = "head",
        cross_attn_norm: bool = True,
        mlp_act: str = "gelu_tanh",
    ):
        super().__init__()
        _check_modulation(modulation)
        self.hidden_size = hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, qk_norm_scope=qk_norm_scope)
        if cross_attention:
            self.norm_cross = (nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6) if cross_attn_norm
                               else nn.Identity())
            self.cross_attn = Attention(hidden_size, num_heads, context_dim=hidden_size, qk_norm=qk_norm,
                                        qk_norm_scope=qk_norm_scope)
        else:
            self.norm_cross = None
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(round(hidden_size * mlp_ratio)), act=mlp_act)
        if modulation == "per_block":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
            self.register_parameter("scale_shift_table", None)
        else:
            self.adaLN_modulation = None
            # rows: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (the chunk order below)
            self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_frames: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            x: ``(B, L, D)`` video tokens.
            c: per-sample conditioning: ``(B, D)`` (timestep embedding) with per-block modulation, or
                ``(B, 6D)`` (the model's shared adaLN projection) with shared modulation; per frame
                (per-frame timesteps): ``(B, F, D)`` or ``(B, F, 6D)``.
            context: ``(B, Lc, D)`` projected text tokens (required when the block has cross-attention).
            context_mask: bool ``(B, Lc)``, True = real token.
            rope: ``(cos, sin)`` each ``(L, D / num_heads)``.
            token_frames: int64 ``(L,)``, the row of a per-frame ``c`` each token takes (required
                when ``c`` is per frame, ignored otherwise).

        Returns:
            ``(B, L, D)``.

        Raises:
            ValueError: if the block has cross-attention and ``context`` is None, ``c`` is not
                ``(B, 6D)`` for a block with shared modulation, or ``c`` is per frame without
                ``token_frames``.
        """
        if self.scale_shift_table is None:
            mod = per_frame_apply(self.adaLN_modulation, c, c.ndim == 3)  # (B, 6D) or (B, F, 6D)
        else:
            if c.shape[-1] != 6 * self.hidden_size:
                raise ValueError(f"this DiTBlock uses shared modulation: pass c (B, 6D)=(B, {6 * self.hidden_size}),"
                                 f" the model's shared adaLN projection; got {tuple(c.shape)}")
            mod = c + self.scale_shift_table.reshape(-1)  # (B, 6D) or (B, F, 6D); row i of the table is chunk i
        if mod.ndim == 3:  # per frame: one modulation per token
            if token_frames is None:
                raise ValueError("a per-frame conditioning c (B, F, D) needs token_frames (L,)")
            mod = mod[:, token_frames]  # (B, L, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)  # 6 x (B, [L,] D)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, L, D)
        x = x + per_token(gate_msa) * self.attn(h, rope=rope)  # (B, L, D)
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this DiTBlock has cross-attention: pass context (B, Lc, D)")
            x = x + self.cross_attn(self.norm_cross(x), context=context, context_mask=context_mask)  # (B, L, D)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)  # (B, L, D)
        x = x + per_token(gate_mlp) * self.mlp(h)  # (B, L, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + Linear to patch values (DiT). The modulation and the Linear are zeroed at init.

    Args:
        hidden_size: ``D``.
        patch_volume: ``pt * ph * pw``.
        out_channels: ``C_out``.
        modulation: ``"linear"``: ``(shift, scale) = Linear(SiLU(c))`` (DiT); ``"table"``:
            ``(shift, scale) = c + scale_shift_table``, a learned ``(2, D)`` table (Wan 2.1).

    Raises:
        ValueError: an unknown ``modulation``.
    """

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int, modulation: str = "linear"):
        super().__init__()
        if modulation not in FINAL_MODULATIONS:
            raise ValueError(f"final_modulation={modulation!r} is not one of {list(FINAL_MODULATIONS)}")
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        if modulation == "linear":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
            self.register_parameter("scale_shift_table", None)
        else:
            self.adaLN_modulation = None
            self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))  # rows: shift, scale
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor, token_frames: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x ``(B, L, D)``, c ``(B, D)`` or per frame ``(B, F, D)`` with ``token_frames`` int64
        ``(L,)`` (see :meth:`DiTBlock.forward`). Returns ``(B, L, pt*ph*pw*C_out)``."""
        if self.adaLN_modulation is not None:
            shift, scale = per_frame_apply(self.adaLN_modulation, c, c.ndim == 3).chunk(2, dim=-1)  # 2 x (B, [F,] D)
        else:
            shift, scale = (c.unsqueeze(-2) + self.scale_shift_table).unbind(-2)  # 2 x (B, [F,] D)
        if c.ndim == 3:  # per frame: one (shift, scale) per token
            if token_frames is None:
                raise ValueError("a per-frame conditioning c (B, F, D) needs token_frames (L,)")
            shift, scale = shift[:, token_frames], scale[:, token_frames]  # 2 x (B, L, D)
        x = modulate(self.norm_final(x), shift, scale)  # (B, L, D)
        return self.linear(x)  # (B, L, P*C)


class VideoDiT(nn.Module):
    """Text-conditioned video DiT predicting the rectified-flow velocity.

    Build, then initialise (``__init__`` already calls :meth:`init_weights`; call it again after
    ``to_empty`` when the model was built on the meta device)::

        with torch.device("meta"):
            model = VideoDiT(cfg)
        ...  # parallelize
        model.to_empty(device="cuda"); model.init_weights(seed=0)

    Args:
        cfg: :class:`DiTConfig`.

    Raises:
        ValueError: on an invalid config (heads not dividing width, bad patch size, head dim too
            small for 3D RoPE, unknown modulation).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        _check_options(cfg)  # the config may have been mutated after construction
        if len(cfg.patch_size) != 3:
            raise ValueError(f"patch_size must be [pt, ph, pw]; got {list(cfg.patch_size)}")
        if cfg.num_heads <= 0 or cfg.hidden_size % cfg.num_heads != 0:
            raise ValueError(f"num_heads={cfg.num_heads} must divide hidden_size={cfg.hidden_size}")
        self.cfg = cfg
        self.patch_size = tuple(int(p) for p in cfg.patch_size)
        self.in_channels = cfg.in_channels
        self.cross_attention = bool(cfg.cross_attention)
        self.prediction, self.x0_t_min, self.sigma_data = cfg.prediction, float(cfg.x0_t_min), float(cfg.sigma_data)
        self.patch_embed = PatchEmbed3D(self.patch_size, cfg.in_channels, cfg.hidden_size, cfg.pos_embed)
        head_dim = cfg.hidden_size // cfg.num_heads
        self.rope = RotaryEmbedding3D(head_dim, theta=cfg.rope_theta, axes_dim=rope_axes_dim(head_dim, cfg.rope_split),
                                      fp64=cfg.rope_fp64)
        self.t_embedder = TimestepEmbedding(cfg.hidden_size, frequency_embedding_size=cfg.time_freq_dim)
        self.token_frames = TokenFrames()  # per-frame timesteps: token -> temporal slice (a hook point for SP)
        self.text_proj = TextProjection(cfg.text_dim, cfg.hidden_size)
        # pooled caption -> (B, D), added to the timestep embedding (SD3 / PixArt style)
        self.text_pool = nn.Sequential(nn.Linear(cfg.text_dim, cfg.hidden_size), nn.SiLU(),
                                       nn.Linear(cfg.hidden_size, cfg.hidden_size)) if cfg.pooled_text else None
        if cfg.modulation == "shared":  # adaLN-single: one projection, each block adds its own table
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size))
        else:
            self.adaLN_modulation = None
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, cfg.cross_attention,
                     cfg.modulation, qk_norm_scope=cfg.qk_norm_scope, cross_attn_norm=cfg.cross_attn_norm,
                     mlp_act=cfg.mlp_act)
            for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(cfg.hidden_size, math.prod(self.patch_size), cfg.in_channels,
                                      cfg.final_modulation)
        self.init_weights()

    def num_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Tokens ``L`` for a latent of ``(T, H, W)``; ValueError if not divisible by the patch size."""
        return num_tokens(self.cfg, (num_frames, height, width))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity ``noise - x0`` at ``x_t`` (converted from an x0 prediction when
        ``cfg.prediction == "x0"``, from EDM's preconditioned output when ``"edm"``).

        Args:
            x: ``(B, C, T, H, W)`` noisy latent ``x_t``.
            t: ``(B,)`` float flow time in ``[0, 1]`` (0 = data, 1 = noise), or ``(B, T)``: one time per
                latent frame (frame-conditioned continuation gives the conditioning frames ``t = 0``);
                the tokens of frame ``f`` are modulated with ``t[:, f]`` and the x0 -> velocity
                conversion divides frame ``f`` by ``max(t[:, f], x0_t_min)``. With a temporal patch
                ``pt > 1`` the frames of one patch must share their time. Equal times across the
                frames give the same output as ``t[:, 0]`` of shape ``(B,)``.
            text: ``(B, Lc, text_dim)`` text-encoder hidden states.
            text_mask: bool ``(B, Lc)``, True = real token; ``None`` = all tokens real. With
                ``text_padding="zeros"`` padded tokens' features are zeroed and attended (Wan).

        Returns:
            ``(B, C, T, H, W)`` velocity, same dtype as the model.

        Raises:
            ValueError: on wrong ranks/channels, ``t`` neither ``(B,)`` nor ``(B, T)``, per-frame times
                that differ inside a temporal patch, or ``T, H, W`` not divisible by ``patch_size``.
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, T, H, W); got {tuple(x.shape)}")
        if t.shape not in ((x.shape[0],), tuple(x.shape[:1] + x.shape[2:3])):
            raise ValueError(f"t must be (B,)=({x.shape[0]},) or (B, T)=({x.shape[0]}, {x.shape[2]}); "
                             f"got {tuple(t.shape)}")
        if text.ndim != 3 or text.shape[0] != x.shape[0]:
            raise ValueError(f"text must be (B, Lc, text_dim) with B={x.shape[0]}; got {tuple(text.shape)}")
        _, _, T, H, W = x.shape
        grid = self.patch_embed.grid_size(T, H, W)  # (T', H', W'); raises if indivisible
        if self.prediction == "edm":  # EDM preconditioning, in fp32 like t
            t_x = t.float()[:, None, None, None, None] if t.ndim == 1 else t.float()[:, None, :, None, None]
            c_in, c_vx, c_vf = edm_preconditioning(t_x, self.sigma_data)  # (B, 1, T or 1, 1, 1) each
            h = self.patch_embed((x * c_in).to(x.dtype))  # (B, L, D)
        else:
            h = self.patch_embed(x)  # (B, L, D)
        rope = self.rope(grid, device=x.device)  # (cos, sin), each (L, Dh)
        token_frames = None
        if t.ndim == 2:  # per-frame times: conditioning per temporal token slice, picked per token in the blocks
            t_grid = self._grid_times(t)  # (B, T')
            c = per_frame_apply(self.t_embedder, t_grid, True)  # (B, T', D)
            token_frames = self.token_frames(grid, x.device)  # (L,); under SP this rank's tokens
        else:
            c = self.t_embedder(t)  # (B, D)
        if self.text_pool is not None:
            m = torch.ones(text.shape[:2], device=text.device) if text_mask is None else text_mask.to(text.dtype)
            pooled_text = (text * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)  # (B, text_dim)
            c = c + per_sample_term(self.text_pool(pooled_text.to(c.dtype)), c)  # (B, [T',] D)
        if self.cfg.text_padding == "zeros" and self.cross_attention and text_mask is not None:
            text = text * text_mask[..., None].to(text.dtype)  # (B, Lc, text_dim): zero features at padding
            text_mask = None  # every token is attended, as Wan does
        y = self.text_proj(text)  # (B, Lc, D)
        if not self.cross_attention:
            if text_mask is None:
                text_mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)  # (B, Lc)
            w = text_mask.to(y.dtype)  # (B, Lc)
            pooled = (y * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)  # (B, D)
            c = c + per_sample_term(pooled, c)  # (B, [T',] D)
            y, text_mask = None, None
        # per-block modulation: every block gets c; shared: the one projection, computed once here
        block_c = c if self.adaLN_modulation is None else \
            per_frame_apply(self.adaLN_modulation, c, c.ndim == 3)  # (B, [T',] D or 6D)
        for block in self.blocks:
            if token_frames is None:
                h = block(h, block_c, y, text_mask, rope)  # (B, L, D)
            else:
                h = block(h, block_c, y, text_mask, rope, token_frames)  # (B, L, D)
        h = self.final_layer(h, c) if token_frames is None else self.final_layer(h, c, token_frames)  # (B, L, P*C)
        pt, ph, pw = self.patch_size
        out = rearrange(
            h,
            "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
            t=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw,
        )  # (B, C, T, H, W)
        if self.prediction == "x0":
            t_x = t if t.ndim == 1 else t.to(out.dtype)[:, None, :, None, None]  # (B,) or (B, 1, T, 1, 1)
            out = velocity_from_x0(out, x.to(out.dtype), t_x, self.x0_t_min)  # (B, C, T, H, W) velocity
        elif self.prediction == "edm":
            out = (c_vx * x + c_vf * out).to(out.dtype)  # (B, C, T, H, W) velocity
        return out

    def _grid_times(self, t: torch.Tensor) -> torch.Tensor:
        """Per-latent-frame times ``(B, T)`` -> one per temporal token slice ``(B, T')`` (``T' = T / pt``).

        Raises:
            ValueError: frames of one temporal patch with different times (a patch token has one time).
        """
        pt = self.patch_size[0]
        if pt == 1:
            return t
        grouped = t.unflatten(1, (-1, pt))  # (B, T', pt)
        if not torch.equal(grouped, grouped[..., :1].expand_as(grouped)):
            raise ValueError(f"per-frame t must be equal within each temporal patch of {pt} frames; got {t.tolist()}")
        return grouped[..., 0]  # (B, T')

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter in place (works after meta-device build + ``to_empty``).

        Scheme (DiT): xavier-uniform for every Linear and for the patch-embed Conv3d viewed as a
        Linear of fan-in ``C*pt*ph*pw``; normal(0, 0.02) for the timestep MLP; zero biases; norms'
        weights 1 and biases 0. Then adaLN-Zero: every block's ``adaLN_modulation`` Linear (with
        shared modulation: the shared Linear and every block's ``scale_shift_table``), every
        block's cross-attention ``out_proj``, and the final layer's modulation and output Linears
        are zeroed, so each block is the identity on its residual stream and the model outputs
        exactly 0 at init.

        Modules are visited in registration order and random numbers drawn in that order, so the
        result depends only on the RNG state: with ``seed`` the global RNG is forked (not
        disturbed) and seeded; without it the current global RNG is used.

        Raises:
            RuntimeError: if a parameter is not covered by the scheme (a new module type was added
                without extending ``init_weights``), since after ``to_empty`` it would hold garbage.
        """
        if seed is None:
            self._init_weights()
            return
        devices = sorted({p.device.index or 0 for p in self.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            self._init_weights()

    def _init_weights(self) -> None:
        done: set[int] = set()

        def mark(*params: torch.Tensor | None) -> None:
            done.update(id(p) for p in params if p is not None)

        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name.startswith("t_embedder."):
                    nn.init.normal_(module.weight, std=0.02)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                mark(module.weight, module.bias)
            elif isinstance(module, nn.Conv3d):
                fan_in = module.weight[0].numel()  # C * pt * ph * pw
                bound = math.sqrt(6.0 / (fan_in + module.weight.shape[0]))  # xavier on the (D, C*pt*ph*pw) view
                nn.init.uniform_(module.weight, -bound, bound)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                mark(module.weight, module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
                mark(module.weight, getattr(module, "bias", None))

        # adaLN-Zero (DiT Sec. 3.2) plus the zero cross-attention output (PixArt-alpha).
        zeroed = [self.final_layer.linear]
        if self.final_layer.adaLN_modulation is not None:
            zeroed.append(self.final_layer.adaLN_modulation[-1])
        if self.final_layer.scale_shift_table is not None:
            nn.init.zeros_(self.final_layer.scale_shift_table)
            mark(self.final_layer.scale_shift_table)
        if self.adaLN_modulation is not None:
            zeroed.append(self.adaLN_modulation[-1])
        for block in self.blocks:
            if block.adaLN_modulation is not None:
                zeroed.append(block.adaLN_modulation[-1])
            if block.scale_shift_table is not None:
                nn.init.zeros_(block.scale_shift_table)
                mark(block.scale_shift_table)
            if block.cross_attn is not None and self.cfg.cross_attn_zero_init:
                zeroed.append(block.cross_attn.out_proj)
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

        missing = [n for n, p in self.named_parameters() if id(p) not in done]
        if missing:
            raise RuntimeError(f"init_weights does not cover parameters: {missing}")

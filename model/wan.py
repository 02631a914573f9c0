"""Wan 2.1 text-to-video transformer <-> VideoDiT: configs, tensor names, diffusers folders.

diffusers' ``WanTransformer3DModel`` and a :class:`~vdit.model.dit.VideoDiT` built with
:data:`WAN_OPTIONS` compute the same function; this module only renames and reshapes tensors::

    diffusers (WanTransformer3DModel)              vdit (VideoDiT)
    patch_embedding                                patch_embed.proj
    condition_embedder.time_embedder.linear_1/2    t_embedder.mlp.0 / .2
    condition_embedder.time_proj                   adaLN_modulation.1          (shared (B, 6D) projection)
    condition_embedder.text_embedder.linear_1/2    text_proj.fc1 / .fc2
    blocks.i.attn1.{to_q,to_k,to_v,to_out.0}       blocks.i.attn.{q,k,v,out}_proj
    blocks.i.attn1.norm_q / norm_k                 blocks.i.attn.q_norm / k_norm  (RMSNorm across heads, (D,))
    blocks.i.attn2.*                               blocks.i.cross_attn.*
    blocks.i.norm2                                 blocks.i.norm_cross          (cross_attn_norm)
    blocks.i.ffn.net.0.proj / ffn.net.2            blocks.i.mlp.fc1 / fc2
    blocks.i.scale_shift_table (1, 6, D)           blocks.i.scale_shift_table (6, D)
    proj_out                                       final_layer.linear
    scale_shift_table (1, 2, D)                    final_layer.scale_shift_table (2, D)

Inputs: diffusers takes the timestep on its 0..1000 scale, vdit the flow time ``t in [0, 1]``
(``timestep = 1000 t``; vdit's sinusoid multiplies by 1000 itself, so the fp32 features are
identical). Wan attends to all text tokens with zero features at padding; vdit does the same with
``text_padding="zeros"`` given the mask. Only the text-to-video variant is covered (no image
embedder, no added K/V projections of I2V / FLF2V).

Nothing here downloads; every path is local. No ``torch.distributed`` (model/ rule).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .dit import DiTConfig, VideoDiT

__all__ = ["WAN_OPTIONS", "WanConversionError", "dit_config_from_diffusers", "diffusers_config_from_dit",
           "wan_to_vdit", "vdit_to_wan", "read_diffusers_folder", "write_diffusers_folder", "check_vdit_state",
           "setting_for"]

WAN_OPTIONS: dict[str, object] = {
    "modulation": "shared", "qk_norm": True, "qk_norm_scope": "across_heads", "mlp_act": "gelu_tanh",
    "final_modulation": "table", "rope_split": "wan", "rope_fp64": True, "text_padding": "zeros",
    "cross_attention": True, "prediction": "velocity", "pos_embed": "none", "pooled_text": False,
    "rope_theta": 10000.0,
}
"""The DiTConfig settings every Wan 2.1 transformer has (sizes and ``cross_attn_norm`` vary)."""

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CLASS_NAME = "WanTransformer3DModel"


class WanConversionError(ValueError):
    """A diffusers Wan folder or state that does not fit the vdit model (names, shapes, unsupported options)."""


# ------------------------------------------------------------------------------------------ configs
def dit_config_from_diffusers(config: Mapping) -> DiTConfig:
    """The :class:`DiTConfig` of a diffusers ``WanTransformer3DModel`` ``config.json``.

    Raises:
        WanConversionError: a variant vdit does not express (image conditioning, another q/k norm or
            eps, ``out_channels != in_channels``), or a non-integer mlp width.
    """
    c = dict(config)
    if c.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise WanConversionError(f"config _class_name={c['_class_name']!r}; expected {CLASS_NAME!r}")
    unsupported = {k: c.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len") if c.get(k) is not None}
    if unsupported:
        raise WanConversionError(f"image-conditioned Wan (I2V/FLF2V) is not supported: {unsupported}; "
                                 "only text-to-video transformers convert")
    if c.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise WanConversionError(f"qk_norm={c['qk_norm']!r}: only 'rms_norm_across_heads' is supported")
    if float(c.get("eps", 1e-6)) != 1e-6:
        raise WanConversionError(f"eps={c['eps']}: vdit's norms use 1e-6")
    in_ch = int(c.get("in_channels", 16))
    if c.get("out_channels") not in (None, in_ch):
        raise WanConversionError(f"out_channels={c['out_channels']} != in_channels={in_ch}: vdit predicts a "
                                 "velocity of the input's channels")
    heads, head_dim = int(c.get("num_attention_heads", 40)), int(c.get("attention_head_dim", 128))
    hidden, ffn = heads * head_dim, int(c.get("ffn_dim", 13824))
    cfg = DiTConfig(in_channels=in_ch, patch_size=[int(p) for p in c.get("patch_size", (1, 2, 2))],
                    hidden_size=hidden, depth=int(c.get("num_layers", 40)), num_heads=heads,
                    mlp_ratio=ffn / hidden, text_dim=int(c.get("text_dim", 4096)),
                    cross_attn_norm=bool(c.get("cross_attn_norm", True)), time_freq_dim=int(c.get("freq_dim", 256)),
                    **WAN_OPTIONS)
    if cfg.mlp_hidden != ffn:
        raise WanConversionError(f"ffn_dim={ffn} is not reproduced by mlp_ratio={cfg.mlp_ratio}")
    return cfg


def diffusers_config_from_dit(cfg: DiTConfig) -> dict:
    """A diffusers ``WanTransformer3DModel`` config dict for a Wan-style :class:`DiTConfig`.

    Raises:
        WanConversionError: naming each ``model.<setting>`` that differs from :data:`WAN_OPTIONS`.
    """
    bad = [f"model.{k}={getattr(cfg, k)!r} (Wan needs {v!r})" for k, v in WAN_OPTIONS.items() if getattr(cfg, k) != v]
    if bad:
        raise WanConversionError("this model is not a Wan 2.1 transformer: " + "; ".join(bad))
    import diffusers

    return {"_class_name": CLASS_NAME, "_diffusers_version": diffusers.__version__,
            "patch_size": [int(p) for p in cfg.patch_size], "num_attention_heads": cfg.num_heads,
            "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "text_dim": cfg.text_dim, "freq_dim": cfg.time_freq_dim, "ffn_dim": cfg.mlp_hidden,
            "num_layers": cfg.depth, "cross_attn_norm": bool(cfg.cross_attn_norm),
            "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None,
            "rope_max_seq_len": 1024, "pos_embed_seq_len": None}


# -------------------------------------------------------------------------------------- tensor names
_TOP = {
    "patch_embedding": "patch_embed.proj",
    "condition_embedder.time_embedder.linear_1": "t_embedder.mlp.0",
    "condition_embedder.time_embedder.linear_2": "t_embedder.mlp.2",
    "condition_embedder.time_proj": "adaLN_modulation.1",
    "condition_embedder.text_embedder.linear_1": "text_proj.fc1",
    "condition_embedder.text_embedder.linear_2": "text_proj.fc2",
    "proj_out": "final_layer.linear",
}
_BLOCK = {
    "attn1.to_q": "attn.q_proj", "attn1.to_k": "attn.k_proj", "attn1.to_v": "attn.v_proj",
    "attn1.to_out.0": "attn.out_proj",
    "attn2.to_q": "cross_attn.q_proj", "attn2.to_k": "cross_attn.k_proj", "attn2.to_v": "cross_attn.v_proj",
    "attn2.to_out.0": "cross_attn.out_proj",
    "ffn.net.0.proj": "mlp.fc1", "ffn.net.2": "mlp.fc2",
}
_BLOCK_NORMS = {"attn1.norm_q": "attn.q_norm", "attn1.norm_k": "attn.k_norm",
                "attn2.norm_q": "cross_attn.q_norm", "attn2.norm_k": "cross_attn.k_norm"}


def _name_map(cfg: DiTConfig) -> dict[str, str]:
    """diffusers tensor name -> vdit tensor name for ``cfg`` (every parameter of both models)."""
    m = {f"{d}.{s}": f"{v}.{s}" for d, v in _TOP.items() for s in ("weight", "bias")}
    m["scale_shift_table"] = "final_layer.scale_shift_table"
    for i in range(cfg.depth):
        for d, v in _BLOCK.items():
            for s in ("weight", "bias"):
                m[f"blocks.{i}.{d}.{s}"] = f"blocks.{i}.{v}.{s}"
        for d, v in _BLOCK_NORMS.items():
            m[f"blocks.{i}.{d}.weight"] = f"blocks.{i}.{v}.weight"
        if cfg.cross_attn_norm:
            for s in ("weight", "bias"):
                m[f"blocks.{i}.norm2.{s}"] = f"blocks.{i}.norm_cross.{s}"
        m[f"blocks.{i}.scale_shift_table"] = f"blocks.{i}.scale_shift_table"
    return m


_SETTINGS = [  # (regex on the vdit name, the config settings its shape depends on)
    (r"patch_embed\.proj\.weight", "model.in_channels, model.patch_size, model.hidden_size"),
    (r"final_layer\.linear\.", "model.in_channels, model.patch_size, model.hidden_size"),
    (r"t_embedder\.mlp\.0\.weight", "model.time_freq_dim, model.hidden_size"),
    (r"text_proj\.fc1\.weight", "model.text_dim (= text_encoder.hidden_size; 4096 for UMT5-XXL)"),
    (r"blocks\.\d+\.mlp\.", "model.mlp_ratio (ffn_dim / hidden_size), model.hidden_size"),
    (r"blocks\.\d+\.(attn|cross_attn)\.[qk]_norm", "model.qk_norm_scope ('across_heads' for Wan), model.num_heads"),
    (r"scale_shift_table", "model.modulation / model.final_modulation, model.hidden_size"),
    (r"adaLN_modulation", "model.modulation ('shared' for Wan), model.hidden_size"),
]


def setting_for(name: str) -> str:
    """The config setting(s) that decide the shape of vdit tensor ``name`` (for error messages)."""
    for pattern, settings in _SETTINGS:
        if re.search(pattern, name):
            return settings
    return "model.hidden_size, model.num_heads"


def _expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = VideoDiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_vdit_state(state: Mapping[str, torch.Tensor], cfg: DiTConfig, source: str = "weights") -> None:
    """Check that ``state`` holds exactly the tensors of ``VideoDiT(cfg)`` with the right shapes.

    Raises:
        WanConversionError: listing unknown and missing names, or each shape mismatch with the
            config setting to change (``model.depth`` for missing or unknown blocks).
    """
    expected = _expected_shapes(cfg)
    unknown, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if unknown or missing:
        hint = ""
        if any(n.startswith("blocks.") for n in unknown + missing):
            hint = f" (blocks differ: check model.depth={cfg.depth})"
        raise WanConversionError(f"{source} do not match the model config{hint}: {len(unknown)} unknown tensors "
                                 f"{unknown}; {len(missing)} missing tensors {missing}")
    bad = [f"{n}: {tuple(state[n].shape)} vs model {shape} -> check {setting_for(n)}"
           for n, shape in expected.items() if tuple(state[n].shape) != shape]
    if bad:
        raise WanConversionError(f"{source}: {len(bad)} shapes differ from the model config:\n  " + "\n  ".join(bad))


def wan_to_vdit(tensors: Mapping[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers Wan state dict to vdit names (tables squeezed to ``(6, D)`` / ``(2, D)``).

    Args:
        tensors: diffusers ``WanTransformer3DModel`` tensors by name, any dtype.
        cfg: the vdit config they must fit (e.g. :func:`dit_config_from_diffusers` or a preset).

    Returns:
        vdit name -> tensor (same dtypes, views where possible).

    Raises:
        WanConversionError: unknown or missing diffusers names (listed), or shapes that do not fit
            ``cfg`` (naming the setting).
    """
    names = _name_map(cfg)
    unknown, missing = sorted(set(tensors) - set(names)), sorted(set(names) - set(tensors))
    if unknown or missing:
        raise WanConversionError(f"diffusers Wan tensors do not match the config (model.depth={cfg.depth}, "
                                 f"model.cross_attn_norm={cfg.cross_attn_norm}): {len(unknown)} unknown {unknown}; "
                                 f"{len(missing)} missing {missing}")
    out = {}
    for d, v in names.items():
        t = tensors[d]
        if v.endswith("scale_shift_table") and t.ndim == 3 and t.shape[0] == 1:
            t = t[0]  # (1, k, D) -> (k, D)
        out[v] = t
    check_vdit_state(out, cfg, "diffusers Wan weights")
    return out


def vdit_to_wan(state: Mapping[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Rename a vdit state dict of a Wan-style model to diffusers names (tables as ``(1, k, D)``).

    Raises:
        WanConversionError: ``cfg`` is not Wan-style (:func:`diffusers_config_from_dit`), or the
            state does not fit it.
    """
    diffusers_config_from_dit(cfg)  # raises for a non-Wan model
    check_vdit_state(state, cfg, "vdit weights")
    out = {}
    for d, v in _name_map(cfg).items():
        t = state[v]
        out[d] = t[None] if v.endswith("scale_shift_table") else t
    return out


# ------------------------------------------------------------------------------------------- folders
def _transformer_dir(path: Path) -> Path:
    if (path / "config.json").is_file() and ((path / WEIGHTS_NAME).is_file() or (path / INDEX_NAME).is_file()):
        return path
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    raise FileNotFoundError(f"no diffusers transformer in {path}: expected config.json with {WEIGHTS_NAME} (or "
                            f"{INDEX_NAME}), or a pipeline folder with a transformer/ subfolder")


def read_diffusers_folder(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a local diffusers Wan transformer: the ``transformer/`` folder or the
    pipeline folder above it, weights in one safetensors file or sharded with an index.

    Raises:
        FileNotFoundError: no transformer there, or a shard the index names is missing.
        WanConversionError: a tensor name found in two shards.
    """
    from safetensors import safe_open

    tdir = _transformer_dir(Path(path))
    config = json.loads((tdir / "config.json").read_text())
    if (tdir / INDEX_NAME).is_file():
        files = sorted(set(json.loads((tdir / INDEX_NAME).read_text())["weight_map"].values()))
    else:
        files = [WEIGHTS_NAME]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        f = tdir / name
        if not f.is_file():
            raise FileNotFoundError(f"{f} (named by {INDEX_NAME}) is missing")
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                if key in tensors:
                    raise WanConversionError(f"tensor {key} appears in two shards")
                tensors[key] = fh.get_tensor(key)
    return config, tensors


def write_diffusers_folder(out: str | os.PathLike, cfg: DiTConfig, state: Mapping[str, torch.Tensor],
                           dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 1024 ** 3) -> Path:
    """Write a folder ``WanTransformer3DModel.from_pretrained(out)`` loads: ``config.json`` and
    ``diffusion_pytorch_model.safetensors`` (sharded with an index above ``max_shard_bytes``).

    Args:
        out: the folder (created).
        cfg: the Wan-style vdit config of ``state``.
        state: vdit tensors by name (a plain ``VideoDiT.state_dict()``).
        dtype: cast to this dtype (None keeps each tensor's dtype).
        max_shard_bytes: shard size limit (diffusers' default is 5 GB too).

    Raises:
        WanConversionError: see :func:`vdit_to_wan`.
    """
    from safetensors.torch import save_file

    tensors = {k: (v if dtype is None else v.to(dtype)).detach().cpu().contiguous()
               for k, v in vdit_to_wan(state, cfg).items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(diffusers_config_from_dit(cfg), indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_NAME), metadata=meta)
        return out
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out

"""vdit-import: convert a published model's weights into a vdit export folder.

Run:
    vdit-import wan /models/Wan2.1-T2V-1.3B-Diffusers /models/wan2.1-t2v-1.3b-vdit
    vdit-import wan /models/Wan2.1-T2V-14B-Diffusers/transformer /models/wan14b-vdit --model wan2.1-t2v-14b

``<src>`` is a diffusers pipeline folder (its ``transformer/`` is read) or the transformer folder
itself, weights in one safetensors file or sharded with an index. ``<out>`` receives what
``vdit-export`` writes (``model.safetensors`` + ``config.json``: ``vdit-sample --weights``,
``vdit.train.export.load_exported`` and ``train.init_from`` read it) plus ``model.yaml``, the
matching ``model`` config. When ``<src>`` is a pipeline folder holding ``text_encoder/`` and ``vae/``
the exported config points ``text_encoder.path`` / ``vae.path`` at it, with Wan's text settings
(UMT5, 512 tokens). ``--model <preset>`` checks the weights against ``conf/model/<preset>.yaml``
(differences name the setting). Nothing is downloaded. Exit status 1 with the reason on a
mismatch (unknown or missing tensors listed, shapes naming the config setting).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import yaml

from vdit.model.dit import DiTConfig, VideoDiT
from vdit.model.wan import WanConversionError, dit_config_from_diffusers, read_diffusers_folder, wan_to_vdit
from vdit.train.config import AutoencoderConfig, DataConfig, TextEncoderConfig, TrainConfig
from vdit.train.export import export

WAN_TEXT_MAX_LENGTH = 512  # UMT5-XXL tokens per caption in Wan 2.1's pipeline


def preset_config(name: str, text_dim: int) -> DiTConfig:
    """``conf/model/<name>.yaml`` merged onto :class:`DiTConfig` (``text_dim`` given: the run config
    interpolates it from ``text_encoder.hidden_size``).

    Raises:
        FileNotFoundError: no such preset (lists the presets).
    """
    conf = Path(__file__).resolve().parent.parent / "conf" / "model"
    path = conf / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no model preset {name!r}; presets: {sorted(p.stem for p in conf.glob('*.yaml'))}")
    values = yaml.safe_load(path.read_text()) or {}
    values["text_dim"] = text_dim
    return DiTConfig(**values)


def _config_diff(a: DiTConfig, b: DiTConfig) -> list[str]:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return [f"model.{k}: preset {da[k]!r}, weights {db[k]!r}" for k in da
            if da[k] != db[k] and not (isinstance(da[k], float) and abs(da[k] - db[k]) < 1e-12)]


def import_wan(src: str, out: str, preset: str | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Convert a diffusers Wan 2.1 T2V transformer at ``src`` into a vdit export folder ``out``.

    Returns:
        ``{"export": out, "params": n, "model": {...}}``.

    Raises:
        FileNotFoundError: no diffusers transformer at ``src``, or an unknown preset.
        WanConversionError: an unsupported variant, unknown / missing tensors, shapes that do not
            fit (naming the setting), or a preset that differs from the weights' config.
    """
    config, tensors = read_diffusers_folder(src)
    cfg = dit_config_from_diffusers(config)
    if preset is not None:
        want = preset_config(preset, cfg.text_dim)
        diff = _config_diff(want, cfg)
        if diff:
            raise WanConversionError(f"the weights at {src} are not model={preset}:\n  " + "\n  ".join(diff))
        cfg = want
    state = wan_to_vdit(tensors, cfg)
    with torch.device("meta"):
        model = VideoDiT(cfg)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, assign=True)
    root = Path(src)
    text = TextEncoderConfig(name="hf", path=str(root) if (root / "text_encoder").is_dir() else None,
                             max_length=WAN_TEXT_MAX_LENGTH, hidden_size=cfg.text_dim)
    vae = AutoencoderConfig(name="wan", path=str(root) if (root / "vae").is_dir() else None)
    run_cfg = TrainConfig(model=cfg, text_encoder=text, vae=vae,
                          data=DataConfig(shards="(imported weights: set data.shards)"), run_name="wan-import")
    export(run_cfg, model, out, step=0, weights="imported", dtype=dtype)
    with open(os.path.join(out, "model.yaml"), "w") as f:
        f.write(f"# model config of the weights imported from {src} (vdit-import wan)\n")
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    return {"export": out, "params": sum(p.numel() for p in model.parameters()), "model": dataclasses.asdict(cfg)}


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (``vdit-import``)."""
    ap = argparse.ArgumentParser(prog="vdit-import", description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["wan"], help="the source model family")
    ap.add_argument("src", help="diffusers pipeline folder or its transformer/ folder (local)")
    ap.add_argument("out", help="output folder (a vdit export)")
    ap.add_argument("--model", default=None, help="check against this conf/model preset (e.g. wan2.1-t2v-1.3b)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    try:
        result = import_wan(args.src, args.out, args.model, dtype)
    except (FileNotFoundError, WanConversionError) as exn:
        print(f"vdit-import: {exn}", file=sys.stderr)
        return 1
    print(json.dumps({"export": result["export"], "params": result["params"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

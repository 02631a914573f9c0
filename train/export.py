"""vdit-export: turn a (sharded) DCP checkpoint into one safetensors file plus a config JSON.

Run:
    vdit-export --run-dir runs/quickstart                      # latest checkpoint, EMA weights
    vdit-export --run-dir runs/my_run --checkpoint runs/my_run/checkpoints/step-00020000 \
        --weights raw --out /models/my_run_20k

    vdit-export --run-dir runs/wan_lora --merge-lora --format diffusers-wan --out /models/wan_lora_diffusers
    vdit-export --from-export /models/wan13b_vdit --format diffusers-wan --out /models/wan13b_back

Writes ``{out}/model.safetensors`` (fp32 by default, ``--dtype bf16`` to halve it) and
``{out}/config.json`` (the run's full config, so ``vdit-sample --weights {out}`` rebuilds the model).
``--format diffusers-wan`` writes a folder ``diffusers.WanTransformer3DModel.from_pretrained`` loads
instead (a Wan-style model: ``conf/model/wan2.1-t2v-*.yaml``; :mod:`vdit.model.wan`).
``--merge-lora`` folds a LoRA run's adapters into the weights (needed for ``diffusers-wan``; without
it a LoRA run's export keeps base and adapters apart and ``load_exported`` rebuilds the adapters).
Weights with NaN/Inf are refused (exit status 1).
Only the model (or EMA) tensors are read from the checkpoint: DCP loads exactly the requested
keys and reshards them from whatever layout saved them (FSDP on N ranks, one process, ...), so
the optimizer state is never gathered anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from vdit.train.config import TrainConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def load_run_config(run_dir: str) -> TrainConfig:
    """The run's ``config.yaml`` merged onto the schema.

    Raises:
        FileNotFoundError: ``run_dir`` has no config.yaml.
    """
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: not a vdit run directory")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path)))


def load_checkpoint_weights(cfg: TrainConfig, checkpoint: str, weights: str = "ema",
                            device: torch.device | str = "cpu") -> tuple[torch.nn.Module, int]:
    """Build the model of ``cfg`` on ``device`` and load ``ema`` or ``raw`` weights from a DCP checkpoint.

    Returns ``(model, step)``.

    Raises:
        FileNotFoundError: not a complete checkpoint. ValueError: unknown ``weights``.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from vdit.train.checkpoint import CheckpointManager
    from vdit.train.ema import EMA
    from vdit.train.build import build_model

    model = build_model(cfg, torch.device(device))
    manager = CheckpointManager(os.path.dirname(checkpoint.rstrip("/")))
    if weights == "ema" and cfg.lora.rank > 0:  # the EMA follows the adapters only: the frozen base comes from the model
        sd = {"app": {"model": get_model_state_dict(model)}}
        manager.load(checkpoint, sd)
        set_model_state_dict(model, sd["app"]["model"])
    if weights == "ema":
        ema = EMA(model, cfg.train.ema_decay)
        step = manager.load(checkpoint, {"ema": ema})
        ema.copy_to(model)
    elif weights == "raw":
        sd = {"app": {"model": get_model_state_dict(model)}}
        step = manager.load(checkpoint, sd)
        set_model_state_dict(model, sd["app"]["model"])
    else:
        raise ValueError(f"weights must be 'ema' or 'raw'; got {weights!r}")
    return model, step


def export(cfg: TrainConfig, model: torch.nn.Module, out_dir: str, step: int, weights: str,
           dtype: torch.dtype = torch.float32) -> str:
    """Write ``model``'s parameters to ``{out_dir}/model.safetensors`` and the config to ``config.json``; returns out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"step": str(step), "weights": weights,
                                                                      "format": "vdit"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump({"step": step, "weights": weights, "config": OmegaConf.to_container(OmegaConf.structured(cfg))},
                  f, indent=2)
    return out_dir


def load_exported(path: str, device: torch.device | str = "cpu") -> tuple[TrainConfig, torch.nn.Module, int]:
    """Load an exported folder (model.safetensors + config.json) on one device; returns ``(cfg, model, step)``.

    Raises:
        FileNotFoundError: a file is missing.
    """
    from vdit.train.build import build_model

    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"{os.path.join(path, name)} not found: not a vdit export")
    with open(os.path.join(path, CONFIG_FILE)) as f:
        meta = json.load(f)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), meta["config"]))
    model = build_model(cfg, torch.device(device))
    state = load_file(os.path.join(path, WEIGHTS_FILE), device=str(device))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return cfg, model, int(meta["step"])


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (``vdit-export``)."""
    from vdit.train.checkpoint import CheckpointManager

    ap = argparse.ArgumentParser(prog="vdit-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--from-export", default=None, help="convert an export folder (vdit-export, vdit-import) instead")
    ap.add_argument("--format", choices=["vdit", "diffusers-wan"], default="vdit")
    ap.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the weights")
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory (default: latest complete)")
    ap.add_argument("--weights", choices=["ema", "raw"], default="ema")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--out", default=None, help="output folder (default: {run_dir}/export/step-N)")
    args = ap.parse_args(argv)
    if (args.run_dir is None) == (args.from_export is None):
        ap.error("give exactly one of --run-dir and --from-export")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        if args.from_export:
            cfg, model, step = load_exported(args.from_export)
            ckpt = args.from_export
        else:
            cfg = load_run_config(args.run_dir)
            ckpt = args.checkpoint or CheckpointManager(os.path.join(args.run_dir, "checkpoints")).latest()
            if ckpt is None:
                raise FileNotFoundError(f"no complete checkpoint under {args.run_dir}/checkpoints")
            model, step = load_checkpoint_weights(cfg, ckpt, args.weights)
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise ValueError(f"{ckpt} has non-finite {args.weights} weights in {len(bad)} tensors (first: {bad[0]}); "
                             "refusing to export. Export an earlier checkpoint with --checkpoint")
        if args.merge_lora or cfg.lora.rank > 0 and args.format == "diffusers-wan":
            cfg, model = merge_lora_export(cfg, model, required=args.merge_lora)
        out = args.out or os.path.join(args.run_dir or args.from_export, "export",
                                       f"step-{step}" + ("-diffusers" if args.format == "diffusers-wan" else ""))
        if args.format == "diffusers-wan":
            from vdit.model.wan import write_diffusers_folder

            out = str(write_diffusers_folder(out, cfg.model, model.state_dict(), dtype))
        else:
            out = export(cfg, model, out, step, args.weights, dtype)
    except (FileNotFoundError, ValueError) as exn:
        print(f"vdit-export: {exn}", file=sys.stderr)
        return 1
    print(json.dumps({"step": step, "weights": args.weights, "format": args.format, "export": out}))
    return 0


def merge_lora_export(cfg: TrainConfig, model: torch.nn.Module, required: bool = True
                      ) -> tuple[TrainConfig, torch.nn.Module]:
    """Fold a LoRA model's adapters into plain weights; returns the config without LoRA and the plain model.

    Raises:
        ValueError: ``required`` (``--merge-lora`` given) and the run has no LoRA, or not ``required``
            (a diffusers export of a LoRA run) -- the adapters must be merged explicitly.
    """
    import dataclasses

    from vdit.train.lora import merge_lora

    if cfg.lora.rank <= 0:
        raise ValueError("--merge-lora: this run has no LoRA adapters (lora.rank=0)")
    if not required:
        raise ValueError("a LoRA run exports to diffusers only with its adapters merged: add --merge-lora")
    merge_lora(model)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=0),
                              train=dataclasses.replace(cfg.train, init_from=None))
    return cfg, model


if __name__ == "__main__":
    sys.exit(main())

"""vdit-export: turn a (sharded) DCP checkpoint into one safetensors file plus a config JSON.

Run:
    vdit-export --run-dir runs/quickstart                      # latest checkpoint, EMA weights
    vdit-export --run-dir runs/my_run --checkpoint runs/my_run/checkpoints/step-00020000 \
        --weights raw --out /models/my_run_20k

Writes ``{out}/model.safetensors`` (fp32 by default, ``--dtype bf16`` to halve it) and
``{out}/config.json`` (the run's full config, so ``vdit-sample --weights {out}`` rebuilds the model).
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
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory (default: latest complete)")
    ap.add_argument("--weights", choices=["ema", "raw"], default="ema")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--out", default=None, help="output folder (default: {run_dir}/export/step-N)")
    args = ap.parse_args(argv)
    try:
        cfg = load_run_config(args.run_dir)
        ckpt = args.checkpoint or CheckpointManager(os.path.join(args.run_dir, "checkpoints")).latest()
        if ckpt is None:
            raise FileNotFoundError(f"no complete checkpoint under {args.run_dir}/checkpoints")
        model, step = load_checkpoint_weights(cfg, ckpt, args.weights)
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise ValueError(f"{ckpt} has non-finite {args.weights} weights in {len(bad)} tensors (first: {bad[0]}); "
                             "refusing to export. Export an earlier checkpoint with --checkpoint")
    except (FileNotFoundError, ValueError) as exn:
        print(f"vdit-export: {exn}", file=sys.stderr)
        return 1
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    out = export(cfg, model, args.out or os.path.join(args.run_dir, "export", f"step-{step}"), step, args.weights, dtype)
    print(json.dumps({"step": step, "weights": args.weights, "export": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""vdit-train: compose the Hydra config, build the Trainer, fit.

Run:
    vdit-train                                         # conf/train.yaml defaults (quickstart-sized)
    vdit-train +experiment=quickstart                  # the README quickstart
    vdit-train model=s data.shards=/data/clips run_name=s_run optim.lr=2e-4 train.steps=20000
    vdit-train --cfg job                               # print the resolved config and exit

Any undeclared key (``optim.lrr=1e-4``) stops the run before any work, naming the key.
The run directory (``run_dir``, default ``runs/${run_name}``) holds config.yaml, metrics.jsonl,
checkpoints/, samples/, eval/ and wandb/; re-running the same command resumes (``train.resume=auto``).
"""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig

from vdit.train.config import register_configs, validate

log = logging.getLogger("vdit")


def run(cfg: DictConfig) -> dict:
    """Validate ``cfg``, train, and print where the outputs are; returns the fit summary."""
    from vdit.train.trainer import Trainer

    import torch.distributed as dist

    obj = validate(cfg)
    try:
        result = Trainer(obj).fit()
        ev = result.get("eval") or {}
        summary = {"step": result["step"], "checkpoint": result["checkpoint"],
                   "eval": {k: v.get("mean") for k, v in ev.get("metrics", {}).items()}}
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.info("done: %s (run directory %s)", json.dumps(summary, default=str), obj.run_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return result


register_configs()


@hydra.main(config_path="pkg://vdit.conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console-script entry point (``vdit-train``)."""
    _hydra_main()


if __name__ == "__main__":
    main()

"""vdit-train: compose the Hydra config, build the Trainer, fit.

Run:
    vdit-train                                         # conf/train.yaml defaults (quickstart-sized)
    vdit-train +experiment=quickstart                  # the README quickstart
    vdit-train model=s data.shards=/data/clips run_name=s_run optim.lr=2e-4 train.steps=20000
    vdit-train --cfg job                               # print the resolved config and exit

Any undeclared key (``optim.lrr=1e-4``, also ``+optim.lrr=1e-4``) stops the run before any work, naming
the key; so do out-of-range values, bucket shapes that do not fit the patch size, missing shards and a
resume into a different architecture, and such a failed start leaves no run directory behind.
The run directory (``run_dir``, default ``runs/${run_name}``) holds config.yaml, metrics.jsonl,
checkpoints/, samples/, eval/ and wandb/; re-running the same command resumes (``train.resume=auto``).

Exit status: 0 done; 75 preempted (SIGTERM/SIGUSR1: one checkpoint saved, requeue to continue);
1 an error (numerics beyond the rollback limit, a config or checkpoint refused: one clear line);
3 the hang watchdog fired (stacks in ``{run_dir}/hang-rank{r}.txt``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import hydra
from omegaconf import DictConfig

from vdit.train.config import register_configs, validate

log = logging.getLogger("vdit")


def run(cfg: DictConfig) -> dict:
    """Validate ``cfg``, train, and print where the outputs are; returns the fit summary."""
    from vdit.train.trainer import Trainer

    import torch.distributed as dist

    from vdit.train.checkpoint import CheckpointError
    from vdit.train.guard import NumericsError
    from vdit.train.preemption import REQUEUE_EXIT

    run_dir = str(cfg.run_dir)
    try:
        obj = validate(cfg)
        trainer = Trainer(obj)
    except (ValueError, FileNotFoundError) as exn:
        _remove_failed_run_dir(run_dir)
        log.error("vdit-train: %s", exn)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(1)
    main = not dist.is_initialized() or dist.get_rank() == 0
    try:
        result = trainer.fit()
        if result.get("preempted"):
            if main:
                log.info("preempted: checkpoint %s at step %d; exiting with status %d (requeue to continue)",
                         result["checkpoint"], result["step"], REQUEUE_EXIT)
        else:
            ev = result.get("eval") or {}
            summary = {"step": result["step"], "checkpoint": result["checkpoint"],
                       "eval": {k: v.get("mean") for k, v in ev.get("metrics", {}).items()}}
            if main:
                log.info("done: %s (run directory %s)", json.dumps(summary, default=str), obj.run_dir)
    except (NumericsError, CheckpointError) as exn:
        log.error("vdit-train: %s", exn)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.get("preempted"):
        sys.exit(REQUEUE_EXIT)
    return result


def _remove_failed_run_dir(run_dir: str) -> None:
    """Remove ``run_dir`` after a failed start if it holds nothing but what Hydra put there (.hydra/, *.log)."""
    if not os.path.isdir(run_dir):
        return
    names = os.listdir(run_dir)
    if all(n == ".hydra" or n.endswith(".log") for n in names):
        shutil.rmtree(run_dir, ignore_errors=True)


register_configs()


@hydra.main(config_path="pkg://vdit.conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console-script entry point (``vdit-train``)."""
    _hydra_main()


if __name__ == "__main__":
    main()

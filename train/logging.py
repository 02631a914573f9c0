"""One owner for run output on rank 0: console progress bar, ``metrics.jsonl`` and wandb.

Keys are namespaced (``loss/train``, ``optim/lr``, ``perf/data_wait_frac``, ``data/skipped``).
Callers convert tensors to numbers only at the log interval, so there is one host sync per log.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from tqdm.auto import tqdm

from vdit.train.config import WandbConfig
from vdit.train.runrecord import strict_row, wandb_run_id

log = logging.getLogger(__name__)


class RunLogger:
    """Writes metrics for one run (no-op on ranks other than 0).

    Args:
        run_dir: the run directory; ``metrics.jsonl`` and ``wandb/`` go there.
        wandb_cfg: wandb mode (``offline`` default, ``online``, ``disabled``), project, entity, name.
        config: the resolved config (a plain dict) stored with the wandb run.
        total_steps, start_step: for the progress bar (steps).
        is_main: rank 0.
    """

    def __init__(self, run_dir: str, wandb_cfg: WandbConfig, config: dict[str, Any], total_steps: int,
                 start_step: int = 0, is_main: bool = True):
        self.is_main = is_main
        self.total_steps = total_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        self.bar = None
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        if wandb_cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity,
                                    name=wandb_cfg.name or os.path.basename(os.path.abspath(run_dir)),
                                    dir=run_dir, mode=wandb_cfg.mode, config=config, resume="allow",
                                    id=wandb_run_id(run_dir))  # a resumed run continues the same wandb run
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        mininterval=1.0, disable=None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append ``{"step": step, "time": unix seconds, **metrics}`` to metrics.jsonl and wandb.

        Rows are strict JSON: a NaN/Inf value is written as ``null`` and its key listed in ``"nonfinite"``.
        """
        if not self.is_main:
            return
        row = strict_row({"step": step, "time": round(time.time(), 3), **metrics})
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None and isinstance(row.get("loss/train"), float):
            self.bar.set_postfix(loss=f"{metrics['loss/train']:.4f}", lr=f"{metrics.get('optim/lr', 0):.2e}")
        if "perf/steps_per_s" in metrics and (self.bar is None or self.bar.disable):
            # No terminal (SLURM logs, CI): one progress line per log interval instead of a bar.
            rate = metrics["perf/steps_per_s"]
            eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
            log.info("step %d/%d  loss %.4f  lr %.2e  %.2f it/s  data wait %.0f%%  ETA %s", step, self.total_steps,
                     row.get("loss/train_mean", row.get("loss/train")) or float("nan"),
                     metrics.get("optim/lr", 0.0), rate, 100 * metrics.get("perf/data_wait_frac", 0.0),
                     time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?")

    def log_videos(self, step: int, key: str, videos: list[tuple[str, str]]) -> None:
        """Log mp4 files ``[(path, caption)]`` to wandb as one list of ``wandb.Video`` media under
        ``key`` at ``step`` (no-op without wandb or off rank 0). A failure (a missing file, a wandb
        error) is logged, never raised: media are a view of results already written to disk."""
        if self.wandb is None or not videos:
            return
        try:
            import wandb

            self.wandb.log({key: [wandb.Video(path, caption=caption, format="mp4") for path, caption in videos]},
                           step=step)
        except Exception as exn:  # noqa: BLE001 - never fail training over media
            log.warning("wandb: could not log %d videos under %s at step %d: %s", len(videos), key, step, exn)

    def advance(self, n: int = 1) -> None:
        """Move the progress bar by ``n`` steps (shows it/s and ETA)."""
        if self.bar is not None:
            self.bar.update(n)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            for k, v in values.items():
                self.wandb.summary[k] = v

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All rows of ``{run_dir}/metrics.jsonl`` (empty if absent)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

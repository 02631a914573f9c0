"""A truthful run record: checks before work, config history, metrics trimmed on resume, strict JSON.

* :func:`preflight` runs before anything is written or built: it resolves the shard spec (a missing
  shard folder fails here, naming ``data.shards``), and when the run will resume it compares the
  checkpoint's record of the settings that must not change within a run (:data:`IMMUTABLE`: the
  model architecture, the data geometry, the frozen encoders) with the new config. Any difference
  raises :class:`ConfigMismatchError` naming every differing key, before ``config.yaml`` is touched.
* :func:`write_config` keeps the history: when the config of a resumed segment differs from the
  previous ``config.yaml``, that file is kept as ``config.step-N.yaml`` (N: the step the new segment
  starts from) and each changed key is logged.
* :func:`apply_mutable` makes settings that may change on resume take effect (the optimizer's
  lr, weight decay, betas, eps are otherwise restored from the checkpoint; ``train.steps`` and
  eval cadence already come from the config).
* :func:`trim_metrics` cuts ``metrics.jsonl`` back to the resumed step (atomic rename, previous file
  kept as ``metrics.jsonl.bak``), so after any sequence of kills each step appears exactly once.
* :func:`strict_row` makes a metrics row strict JSON: non-finite numbers become ``null`` and their
  keys are listed under ``"nonfinite"``.
* :func:`wandb_run_id` is stored in the run directory, so a resumed run continues the same wandb run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from vdit.train.checkpoint import CheckpointError, CheckpointManager, JsonState, from_json, read_json_state

log = logging.getLogger(__name__)

# Prefixes of keys that must not change within a run: the weights' shapes and meaning depend on them.
IMMUTABLE = ("model.", "data.num_frames", "data.height", "data.width", "data.buckets", "text_encoder.name",
             "text_encoder.hidden_size", "text_encoder.max_length", "vae.name", "vae.scaling_factor")
# Keys whose change on resume is applied to restored state by apply_mutable (others take effect by themselves).
_OPTIM_KEYS = ("optim.lr", "optim.weight_decay", "optim.betas", "optim.eps")


class ConfigMismatchError(ValueError):
    """Resuming a run with a config whose immutable part (architecture, data geometry) differs."""


def flat_config(cfg: Any) -> dict[str, Any]:
    """``{"model.hidden_size": 128, ...}`` of a TrainConfig (lists kept as lists)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True), "")
    return out


def config_hash(cfg: Any) -> str:
    """sha256 of the resolved config (sorted JSON), first 16 hex digits."""
    return hashlib.sha256(json.dumps(flat_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def immutable_part(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in flat_config(cfg).items() if k.startswith(IMMUTABLE)}


class ConfigRecord(JsonState):
    """The config a checkpoint was written with: hash, immutable part, full flat config (JSON, rank 0's)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def state_dict(self) -> dict[str, Any]:
        return {"hash": config_hash(self.cfg), "immutable": immutable_part(self.cfg), "config": flat_config(self.cfg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # compared by preflight() before anything is built; nothing to restore


@dataclass
class Preflight:
    """What :func:`preflight` found: the checkpoint to resume (or None) and its config record (or None)."""

    checkpoint: str | None
    saved: dict[str, Any] | None


def resume_target(cfg: Any) -> str | None:
    """The checkpoint ``train.resume`` points at: latest complete (``auto``), None (``never``), or the path."""
    mode = cfg.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        return CheckpointManager(os.path.join(cfg.run_dir, "checkpoints")).latest()
    return mode


def preflight(cfg: Any) -> Preflight:
    """Checks that need no model and write nothing (see the module docstring). Every rank runs them.

    Raises:
        FileNotFoundError: ``data.shards`` names nothing, or a listed local shard does not exist.
        ConfigMismatchError: resuming with a different architecture / data geometry (each key named).
        CheckpointError: the checkpoint's record is unreadable or of the old pickled format.
    """
    from vdit.data.shards import expand_shards

    urls = expand_shards(cfg.data.shards)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"data.shards={cfg.data.shards!r}: {len(missing)} of {len(urls)} shards do not exist "
                                f"(first: {missing[0]})")
    path = resume_target(cfg)
    if path is None:
        return Preflight(None, None)
    entries = read_json_state(path)
    if "config" not in entries:
        return Preflight(path, None)
    saved = from_json(entries["config"])
    now = immutable_part(cfg)
    diffs = [f"  {k}: {saved['immutable'].get(k, '<absent>')!r} in the checkpoint, {now.get(k, '<absent>')!r} now"
             for k in sorted(set(saved["immutable"]) | set(now)) if saved["immutable"].get(k) != now.get(k)]
    if diffs:
        raise ConfigMismatchError(
            f"cannot resume {cfg.run_dir} from {path}: these settings must not change within a run:\n"
            + "\n".join(diffs) + "\nNothing was written. To train with the new settings start a new run "
            "(another run_name or run_dir), or pass train.resume=never to start over in this directory.")
    return Preflight(path, saved)


def write_config(cfg: Any, run_dir: str, pre: Preflight) -> None:
    """Write ``config.yaml``; keep the previous one as ``config.step-N.yaml`` when it differs; log changes (rank 0)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    new = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != new:
            step = 0
            if pre.checkpoint is not None:
                with open(os.path.join(pre.checkpoint, "COMPLETE")) as f:
                    step = int(json.load(f)["step"])
            keep = os.path.join(run_dir, f"config.step-{step}.yaml")
            os.replace(path, keep)
            log.info("config: the previous config.yaml is kept as %s", keep)
    if pre.saved is not None:
        now = flat_config(cfg)
        for k in sorted(set(now) | set(pre.saved["config"])):
            if pre.saved["config"].get(k) != now.get(k):
                log.info("config change on resume: %s: %r -> %r", k, pre.saved["config"].get(k), now.get(k))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def code_version() -> dict[str, Any]:
    """The code a run executes: ``{"version", "git_commit", "git_dirty"}``. The git fields come from the
    checkout vdit is imported from (None when it is an installed wheel or git is missing)."""
    import subprocess

    from vdit import __version__

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out: dict[str, Any] = {"version": __version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def record_launch(run_dir: str, cfg: Any, world: dict[str, Any], start_step: int) -> dict[str, Any]:
    """Append one row per process start (fresh or resumed) to ``{run_dir}/launches.jsonl`` (rank 0):
    time, the command line, the code version (:func:`code_version`), the world layout (``world``:
    world size, data-parallel and sequence-parallel sizes, backend, device), the step it starts from
    and the config hash. Returns the row."""
    import sys

    import torch

    row = {"time": round(time.time(), 3), "argv": list(sys.argv), "cwd": os.getcwd(), "host": socket.gethostname(),
           "start_step": start_step, "config_hash": config_hash(cfg), "code": code_version(),
           "torch": torch.__version__, "world": world}
    with open(os.path.join(run_dir, "launches.jsonl"), "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    return row


def apply_mutable(trainer: Any, saved: dict[str, Any] | None) -> list[str]:
    """After loading a checkpoint, make changed optimizer settings take effect; returns the changed keys.

    The optimizer's param groups and the scheduler's base learning rates come back from the
    checkpoint; a new ``optim.lr`` / ``weight_decay`` / ``betas`` / ``eps`` replaces them here (the
    schedule's shape, ``train.steps`` and the eval cadence are read from the config anyway).
    """
    if saved is None or trainer.engine is not None:
        return []
    now = flat_config(trainer.cfg)
    changed = [k for k in _OPTIM_KEYS if saved["config"].get(k) != now.get(k)]
    if not changed:
        return []
    o, sched = trainer.cfg.optim, trainer.scheduler
    for i, group in enumerate(trainer.optimizer.param_groups):
        group["initial_lr"] = o.lr
        group["betas"], group["eps"] = tuple(o.betas), o.eps
        if group.get("weight_decay", 0.0) != 0.0 or i == 0:
            group["weight_decay"] = o.weight_decay
    sched.base_lrs = [o.lr for _ in trainer.optimizer.param_groups]
    lrs = [base * lam(sched.last_epoch) for base, lam in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(trainer.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
    if trainer.is_main:
        log.info("config change on resume applied: %s", ", ".join(f"{k}={now[k]!r} (was {saved['config'].get(k)!r})"
                                                                 for k in changed))
    return changed


def trim_metrics(run_dir: str, step: int) -> int:
    """Drop ``metrics.jsonl`` rows with ``step`` > ``step`` (atomic; the old file kept as ``metrics.jsonl.bak``).

    Returns the number of rows removed. Unparseable lines (a kill mid-write) are removed too.
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if int(row.get("step", 0)) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        shutil.copyfile(path, path + ".bak")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
        log.info("metrics: removed %d rows after step %d from metrics.jsonl (previous file: metrics.jsonl.bak)",
                 dropped, step)
    return dropped


def strict_row(row: dict[str, Any]) -> dict[str, Any]:
    """Replace non-finite floats by None and list their keys under ``"nonfinite"`` (strict JSON)."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return row
    return {**{k: (None if k in bad else v) for k, v in row.items()}, "nonfinite": bad}


def wandb_run_id(run_dir: str) -> str:
    """The wandb run id of this run directory (created on first use in ``{run_dir}/wandb_run_id``)."""
    path = os.path.join(run_dir, "wandb_run_id")
    if os.path.exists(path):
        with open(path) as f:
            rid = f.read().strip()
        if rid:
            return rid
    rid = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(rid + "\n")
    return rid


__all__ = ["ConfigMismatchError", "ConfigRecord", "CheckpointError", "Preflight", "apply_mutable", "config_hash",
           "flat_config", "preflight", "strict_row", "trim_metrics", "wandb_run_id", "write_config"]

"""Checkpoints with torch.distributed.checkpoint (DCP), also in a single process.

Layout: ``{run_dir}/checkpoints/step-{N:08d}/`` holds DCP's sharded files plus ``COMPLETE``, written
last, so a checkpoint interrupted mid-save is never picked by ``resume=auto``. ``keep_last_k``
complete checkpoints are kept; older ones are deleted after a successful save.

Everything that must survive a restart is a ``Stateful`` (an object with ``state_dict()`` /
``load_state_dict()``) registered under a name: model + optimizer (:class:`ModelOptimizerState`,
through DCP's ``get_state_dict``/``set_state_dict`` so FQNs match across sharding layouts),
scheduler, EMA, data pipeline, trainer step and RNG states.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import warnings
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


class ModelOptimizerState(Stateful):
    """Model and optimizer as one Stateful, keyed by parameter FQNs (layout independent)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class ObjectState(Stateful):
    """Wrap an object whose state is plain Python data (and small tensors).

    DCP loads into the structure it is given, so free-form state is pickled into one ``bytes`` leaf:
    under ``rank{r}`` (each rank saves and restores its own; the layout must not change) or, with
    ``per_rank=False``, under ``global`` (rank 0's copy, restored on every rank of any layout).
    """

    def __init__(self, obj: Any, per_rank: bool = True):
        self.obj, self.per_rank = obj, per_rank

    def _key(self) -> str:
        # per_rank=False: one entry for the whole job (rank 0's), loadable by any number of ranks.
        if not self.per_rank:
            return "global"
        return f"rank{dist.get_rank() if dist.is_initialized() else 0}"

    def state_dict(self) -> dict[str, Any]:
        return {self._key(): pickle.dumps(self.obj.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.obj.load_state_dict(pickle.loads(state[self._key()]))


@contextmanager
def _single_process_quiet():
    """DCP warns on every call that it runs without a process group; in one process that is intended."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


class GlobalDataState(Stateful):
    """The data position of the whole job as one rank-independent entry.

    At save, every rank's ``pipeline.state_dict()`` is gathered and merged
    (:func:`vdit.data.pipeline.merge_states`) and stored pickled under ``global``; at load, every
    rank of the new job, whatever its layout, reads that one entry and takes its own share
    (the pipeline re-deals what the epoch has left when the number of data slots changed).

    Args:
        pipeline: this rank's VideoPipeline (all ranks of the default process group take part).
    """

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline

    def state_dict(self) -> dict[str, Any]:
        from vdit.data.pipeline import merge_states

        local = self.pipeline.state_dict()
        if dist.is_initialized():
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, local)
        else:
            states = [local]
        return {"global": pickle.dumps(merge_states(states))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pipeline.load_state_dict(pickle.loads(state["global"]))


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Save, find and load DCP checkpoints of a run.

    Args:
        directory: ``{run_dir}/checkpoints``.
        keep_last_k: complete checkpoints to keep (>= 1).
    """

    def __init__(self, directory: str, keep_last_k: int = 2):
        if keep_last_k < 1:
            raise ValueError(f"keep_last_k must be >= 1; got {keep_last_k}")
        self.directory = directory
        self.keep_last_k = keep_last_k

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step:08d}")

    def complete_steps(self) -> list[int]:
        """Steps of complete checkpoints (with ``COMPLETE``), ascending."""
        if not os.path.isdir(self.directory):
            return []
        steps = []
        for name in os.listdir(self.directory):
            m = _STEP_DIR.match(name)
            if m and os.path.exists(os.path.join(self.directory, name, "COMPLETE")):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> str | None:
        """Directory of the newest complete checkpoint, or None."""
        steps = self.complete_steps()
        return self.path(steps[-1]) if steps else None

    def save(self, step: int, state: dict[str, Any]) -> str:
        """Write ``state`` (name -> Stateful or tensors/plain data) as checkpoint ``step``; returns its path."""
        path = self.path(step)
        if _is_rank0() and os.path.exists(path):
            shutil.rmtree(path)  # a half-written leftover of a crashed save
        _barrier()
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=path)
        _barrier()
        if _is_rank0():
            with open(os.path.join(path, "COMPLETE"), "w") as f:
                json.dump({"step": step}, f)
            self._prune()
        _barrier()
        return path

    def load(self, path: str, state: dict[str, Any]) -> int:
        """Load checkpoint ``path`` into ``state`` in place (Statefuls get ``load_state_dict``); returns its step.

        Raises:
            FileNotFoundError: ``path`` is not a complete checkpoint.
        """
        if not os.path.exists(os.path.join(path, "COMPLETE")):
            raise FileNotFoundError(f"{path} is not a complete vdit checkpoint (no COMPLETE marker)")
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=path)
        with open(os.path.join(path, "COMPLETE")) as f:
            return int(json.load(f)["step"])

    def _prune(self) -> None:
        for step in self.complete_steps()[:-self.keep_last_k]:
            shutil.rmtree(self.path(step), ignore_errors=True)
            log.info("checkpoint: removed %s (keep_last_k=%d)", self.path(step), self.keep_last_k)

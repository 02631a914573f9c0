"""The background half of :meth:`vdit.train.checkpoint.CheckpointManager.save` (``blocking=False``).

``dcp.async_save`` copies every tensor of the state to CPU memory in the calling thread (the
training stall), then writes the files from a worker thread while training continues. Around it:

* **At most one save in flight.** A new save first finishes the previous one (:meth:`AsyncSaver.take`
  waits for it). That is also what makes the staging buffers reusable: one CPU copy of this rank's
  state is allocated at the first save (pinned on CUDA) and refilled by later ones, a 2-3x shorter
  stall than allocating it anew each time (measured on CPU).
* **COMPLETE only when every rank's write has finished.** Ranks agree at a point every rank reaches
  at the same step (:meth:`AsyncSaver.all_done` at each step boundary, or the next save, or the end
  of ``fit``): each rank puts ``future.done()`` / "failed" into one all-reduce; only when all are
  done and none failed does rank 0 write the marker, and a barrier follows, so every rank sees the
  same ``latest()`` / ``last_good()`` (a rollback picks the same target everywhere).
* **Two gloo groups of their own.** DCP's worker thread runs its plan/gather collectives on
  ``write_group`` while the training thread keeps issuing collectives on the default group; a
  collective on the same group from two threads could be matched in a different order on
  different ranks. The per-step "done?" all-reduce goes on a third group (``agree_group``), so it
  never interleaves with the worker's. Both are CPU groups (no device sync; DCP's async save needs
  a CPU backend, and the default group is NCCL on GPUs).
* **Exit after an exception.** One rank may be gone, so no collective is safe: every rank waits for
  its own write, and rank 0 marks the checkpoint when its own save succeeded. That is enough: DCP's
  coordinator (rank 0) writes ``.metadata`` only after gathering every rank's write results, so
  rank 0's future succeeding means every rank's files are on disk.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions


@dataclass
class PendingSave:
    """A checkpoint whose DCP files are being written in the background (its JSON state is on disk)."""

    step: int
    path: str
    suspect: bool
    future: Future
    started: float  # time.perf_counter() when the training thread handed it over


class AsyncSaver:
    """Starts DCP async saves and decides, with every rank, when one is finished.

    Args:
        timeout_s: timeout of the two gloo groups (``reliability.collective_timeout_s``).
    """

    def __init__(self, timeout_s: float = 1800.0):
        self.timeout_s = timeout_s
        self.pending: PendingSave | None = None
        self.waited = 0  # saves that found the previous one still writing and waited for it
        self._write_group = self._agree_group = None
        self._stager: DefaultStager | None = None  # its CPU buffers live as long as this saver

    def start(self, step: int, path: str, dcp_items: dict[str, Any], suspect: bool) -> None:
        """Stage ``dcp_items`` to CPU (blocking) and write them to ``path`` in the background.

        Collective (all ranks, same order): the state dicts may gather (DeepSpeed), and the groups
        are created at the first call.
        """
        if self.pending is not None:
            raise RuntimeError("an async checkpoint is still in flight; finish it first (CheckpointManager.wait)")
        if not dist.is_initialized():  # DCP warns from its worker thread on every such save; here it is intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled.*save in a single process")
        elif self._write_group is None:
            timeout = timedelta(seconds=self.timeout_s)
            self._write_group = dist.new_group(backend="gloo", timeout=timeout)
            self._agree_group = dist.new_group(backend="gloo", timeout=timeout)
        if self._stager is None:
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                        use_shared_memory=False, use_async_staging=False,
                                                        use_non_blocking_copy=False))
        started = time.perf_counter()
        response = dcp.async_save(dcp_items, checkpoint_id=path, process_group=self._write_group,
                                  async_stager=self._stager,
                                  no_dist=not dist.is_initialized())  # no_dist: one process, on purpose
        future = getattr(response, "upload_completion", response)  # AsyncSaveResponse with async staging
        self.pending = PendingSave(step, path, suspect, future, started)

    def all_done(self) -> bool:
        """True when the pending save has finished on every rank (collective while one is pending)."""
        if self.pending is None:
            return False
        done = self.pending.future.done()
        if dist.is_initialized():
            flag = torch.tensor([0.0 if done else 1.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._agree_group)
            done = flag.item() == 0
        return done

    def take(self, collective: bool = True) -> tuple[PendingSave, bool, BaseException | None]:
        """Wait for the pending save; returns ``(pending, ok, this rank's error)`` and forgets it.

        ``ok``: every rank's write succeeded (``collective``), or, without collectives, this rank's
        did (on rank 0 that implies every rank's: see the module docstring).
        """
        pending, self.pending = self.pending, None
        if pending is None:
            raise RuntimeError("no async checkpoint in flight")
        if not pending.future.done():
            self.waited += 1
        error = None
        try:
            pending.future.result()
        except BaseException as exn:  # noqa: BLE001 - reported (and raised) by the caller
            error = exn
        ok = error is None
        if collective and dist.is_initialized():
            failed = torch.tensor([0.0 if ok else 1.0])
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self._agree_group)
            ok = failed.item() == 0
        return pending, ok, error

    def barrier(self) -> None:
        if dist.is_initialized() and self._agree_group is not None:
            dist.barrier(group=self._agree_group)

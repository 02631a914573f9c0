"""Numerics guard: skip non-finite steps on every rank together, roll back on spikes, never save NaN.

Once per step, before the optimizer update, :meth:`StepGuard.agree` all-reduces one small float64
vector over all ranks: ``[preemption flag, non-finite flag, this rank's share of the loss]``. Every
rank thus takes the same decisions from the same numbers (no rank steps while another skips):

* **skip**: the loss or the gradient norm is NaN/Inf on some rank -> no optimizer, scheduler or
  EMA update on any rank (``train/skipped_steps``); the data of that step counts as consumed.
* **rollback**: ``max_bad_steps`` bad steps in a row -- non-finite, or a loss above
  ``spike_factor`` times its running mean (a spike) -> :func:`rollback` reloads model, optimizer, scheduler and EMA from the last good
  checkpoint (never the data position or the step counter: training continues with the data
  after the bad batches). More than ``max_rollbacks`` rollbacks, or no good checkpoint to go back
  to, raise :class:`NumericsError` (exit status 1 from ``vdit-train``).
* **preemption**: any rank received SIGTERM/SIGUSR1 (see :mod:`vdit.train.preemption`).

:meth:`StepGuard.weights_finite` is checked before every checkpoint save: non-finite weights are
never written (the save is skipped and a rollback requested). A checkpoint saved while a streak
of bad steps is open is marked ``suspect`` and is neither a rollback target nor a reason to prune
the last good one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


class NumericsError(RuntimeError):
    """Training cannot continue with finite numbers (rollback limit reached or nothing to roll back to)."""


class StepGuard:
    """Per-run numerics state. Args: cfg: :class:`vdit.train.config.ReliabilityConfig`; device; preemption."""

    def __init__(self, cfg: Any, device: torch.device, preemption: Any = None):
        self.cfg, self.device, self.preemption = cfg, device, preemption
        self.skipped_steps = 0
        self.consecutive_bad = 0
        self.rollbacks = 0
        self.spikes = 0  # steps with a loss above spike_factor x the running mean (applied, counted)
        self.good_steps = 0
        self.mean: float | None = None  # running mean of the (all-reduced) loss
        self.preempt = False  # agreed by every rank at the last step boundary
        self.rollback_wanted = ""  # the reason, when the next boundary must roll back
        self.last_skipped = False

    def agree(self, loss: torch.Tensor | None, grad_norm: torch.Tensor | None) -> bool:
        """One all-reduce for this step's decisions; returns True when the optimizer step must be skipped."""
        flag = 1.0 if self.preemption is not None and self.preemption.requested else 0.0
        known = loss is not None
        if loss is None:
            loss = torch.zeros((), device=self.device)
        norm = torch.zeros((), device=self.device) if grad_norm is None else grad_norm.detach().to(self.device)
        loss = loss.detach().to(self.device).double()
        bad = (~torch.isfinite(loss) | ~torch.isfinite(norm.double())).double()
        vec = torch.stack([torch.tensor(flag, dtype=torch.float64, device=self.device), bad,
                           torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)])
        if dist.is_initialized():
            dist.all_reduce(vec)
        preempt, nonfinite, total = vec.tolist()  # the one host sync of the guard
        self.preempt = self.preempt or preempt > 0
        c = self.cfg
        spike = (nonfinite == 0 and c.spike_factor > 0 and self.mean is not None and self.mean > 0
                 and self.good_steps >= c.spike_warmup_steps and total > c.spike_factor * self.mean)
        # A single high loss is normal in flow matching (a batch of small t under x0 prediction is
        # 1/t^2 larger): it is applied and only counted. Spikes in a row, like non-finite steps in a
        # row, mean divergence: max_bad_steps of them roll back. Only non-finite steps are skipped.
        skip = nonfinite > 0 and c.skip_nonfinite
        self.last_skipped = skip
        if nonfinite > 0:
            self.consecutive_bad += 1
            self.skipped_steps += int(skip)
            if self.consecutive_bad >= c.max_bad_steps:
                self.rollback_wanted = f"{self.consecutive_bad} consecutive steps with a non-finite loss or gradient"
        elif spike:
            self.consecutive_bad += 1
            self.spikes += 1
            if self.consecutive_bad >= c.max_bad_steps:
                self.rollback_wanted = (f"{self.consecutive_bad} consecutive bad steps, the last with loss {total:.4g} "
                                        f"above {c.spike_factor:g} x its running mean {self.mean:.4g}")
        elif known:
            self.consecutive_bad = 0
            self.good_steps += 1
            self.mean = total if self.mean is None else c.spike_beta * self.mean + (1 - c.spike_beta) * total
        return skip

    @property
    def suspect(self) -> bool:
        """A checkpoint written now would be inside a streak of bad steps."""
        return self.consecutive_bad > 0 or bool(self.rollback_wanted)

    def metrics(self) -> dict[str, float]:
        return {"train/skipped_steps": self.skipped_steps, "train/rollbacks": self.rollbacks,
                "train/loss_spikes": self.spikes}

    def weights_finite(self, model: torch.nn.Module, ema: Any = None) -> bool:
        """True when every parameter (this rank's shards) and EMA tensor is finite on every rank."""
        bad = torch.zeros((), dtype=torch.float64, device=self.device)
        tensors = list(model.parameters()) + (list(ema.shadow.values()) if ema is not None else [])
        for t in tensors:
            local = t.to_local() if isinstance(t, DTensor) else t
            bad += (~torch.isfinite(local.detach())).any().double().to(self.device)
        if dist.is_initialized():
            dist.all_reduce(bad)
        return float(bad) == 0


def rollback(trainer: Any) -> str:
    """Reload model, optimizer, scheduler and EMA from the last good checkpoint; returns its path.

    The data position and the step counter are kept, so training continues with the batches after
    the bad ones. Raises :class:`NumericsError` past ``reliability.max_rollbacks`` or without a
    good checkpoint.
    """
    g, cfg = trainer.guard, trainer.cfg
    reason = g.rollback_wanted
    trainer.checkpoints.wait()  # an async save still being written (every rank is here) may be the last good one
    target = trainer.checkpoints.last_good()
    hint = (f"lower optim.lr (now {cfg.optim.lr:g}) or optim.grad_clip, check the data of the last steps, "
            "then rerun the same command: it resumes from the last good checkpoint")
    if target is None:
        raise NumericsError(f"numerics: {reason} at step {trainer.step} and no good checkpoint to roll back to; "
                            f"stopping. {hint}")
    if g.rollbacks >= cfg.reliability.max_rollbacks:
        raise NumericsError(f"numerics: {reason} at step {trainer.step} after {g.rollbacks} rollbacks "
                            f"(reliability.max_rollbacks={cfg.reliability.max_rollbacks}); stopping. {hint}")
    keep = ("app", "scheduler", "ema")
    trainer.checkpoints.load(target, {k: v for k, v in trainer._stateful().items() if k in keep})
    g.rollbacks += 1
    g.consecutive_bad, g.rollback_wanted = 0, ""
    if trainer.is_main:
        log.warning("numerics: %s at step %d; rolled back weights, optimizer, scheduler and EMA to %s "
                    "(rollback %d of at most %d); continuing with the data after the bad batches", reason,
                    trainer.step, target, g.rollbacks, cfg.reliability.max_rollbacks)
    return target


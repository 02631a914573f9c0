"""Graceful preemption: SIGTERM / SIGUSR1 -> one checkpoint at the next step boundary -> exit 75.

SLURM sends a signal some time before it kills a job (``#SBATCH --signal=B:USR1@180``, and SIGTERM
on preemption or ``scancel``). The handler only sets a flag, so a signal never interrupts a step
or a checkpoint save half-way, and a second signal during the save changes nothing. At the next
step boundary every rank contributes its flag to the numerics guard's one small all-reduce
(:class:`vdit.train.guard.StepGuard`), so all ranks stop after the same step, save one checkpoint
together and exit with :data:`REQUEUE_EXIT`. ``launch/slurm.sbatch`` turns that into a requeue of
the job into the same run directory (``train.resume=auto`` continues from the checkpoint).

torchrun hides a worker's exit status (it exits 1 whenever a worker fails), so rank 0 also writes
the file named by ``$VDIT_REQUEUE_FILE`` (when set) on a preemption exit; the sbatch script
requeues when it finds that file or status 75.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "try again later" -- the job saved its state and wants to be requeued
REQUEUE_FILE_ENV = "VDIT_REQUEUE_FILE"
SIGNALS = ("SIGTERM", "SIGUSR1")


class Preemption:
    """Records SIGTERM/SIGUSR1 in a flag; :meth:`install` / :meth:`uninstall` around training.

    Attributes:
        requested: a signal arrived (this rank only; ranks agree through the guard's all-reduce).
        signals: names of the signals received, in order.
    """

    def __init__(self, signals: tuple[str, ...] = SIGNALS):
        self.names = signals
        self.requested = False
        self.signals: list[str] = []
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self.signals.append(name)
        self.requested = True
        # os.write, not logging: a handler may run while the logging lock is held.
        what = "again; already stopping" if len(self.signals) > 1 else \
            "stopping after this step with one checkpoint"
        os.write(2, f"vdit: received {name} {what}\n".encode())

    def install(self) -> None:
        """Install the handlers (main thread only; a no-op elsewhere, e.g. in a notebook worker thread)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        """Restore the handlers that were installed before :meth:`install`."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


def write_requeue_file(step: int, checkpoint: str | None, signals: list[str]) -> str | None:
    """Write ``$VDIT_REQUEUE_FILE`` (if set): ``{"step", "checkpoint", "signals", "time"}``; returns its path."""
    path = os.environ.get(REQUEUE_FILE_ENV)
    if not path:
        return None
    with open(path, "w") as f:
        json.dump({"step": step, "checkpoint": checkpoint, "signals": signals, "time": time.time()}, f)
    return path

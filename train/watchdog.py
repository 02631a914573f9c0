"""Per-rank hang watchdog: a step that takes too long dumps every thread's stack and exits.

A rank stuck in a collective (a peer died or diverged), a data read or a deadlock would otherwise
hold the whole allocation until it ends. :class:`Watchdog` is a daemon thread; the training loop
calls :meth:`Watchdog.beat` at every step boundary. When ``timeout_s`` seconds pass without a beat,
the thread writes every Python thread's stack of this rank to ``{run_dir}/hang-rank{r}.txt`` and
to stderr, logs one line, and ends the process with :data:`HANG_EXIT` (``os._exit``: the main
thread may be blocked inside C++ and could never run a Python exception). The launcher then sees
a failed job and restarts it from the last complete checkpoint.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

HANG_EXIT = 3


class Watchdog:
    """Args: run_dir: where ``hang-rank{r}.txt`` goes; rank; timeout_s: seconds without a beat (<= 0: off)."""

    def __init__(self, run_dir: str, rank: int, timeout_s: float):
        self.path = os.path.join(run_dir, f"hang-rank{rank}.txt")
        self.rank, self.timeout_s = rank, float(timeout_s)
        self._deadline = math.inf
        self._what = "start"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Watchdog":
        if self.timeout_s > 0 and self._thread is None:
            self.beat("start")
            self._thread = threading.Thread(target=self._run, name="vdit-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, what: str = "step") -> None:
        """Progress: the next beat is due within ``timeout_s`` seconds; ``what`` names the phase now starting."""
        self._what = what
        self._deadline = time.monotonic() + self.timeout_s

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No deadline inside (work with its own time scale, e.g. sampling for evaluation)."""
        self._deadline = math.inf
        try:
            yield
        finally:
            self.beat("step")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            if time.monotonic() > self._deadline:
                self._fire()

    def _fire(self) -> None:
        msg = (f"watchdog: rank {self.rank} made no progress for {self.timeout_s:g} s "
               f"(in {self._what}); stacks of all threads in {self.path}; exiting with status {HANG_EXIT}")
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "w") as f:
                f.write(msg + "\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            pass
        log.error(msg)
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(HANG_EXIT)

"""The test suite's one in-process multi-rank harness: N CPU ranks (gloo) spawned from a test.

``spawn(worker, world, out_dir)`` runs ``worker(rank, world, port, out_dir, *args)`` in ``world``
processes and returns what each rank's ``worker`` returned, indexed by rank. The worker calls
``init_rank`` (or its own ``init_process_group``) first; the harness destroys the process group
afterwards. Torchrun-launched jobs (the Trainer's CLI) use ``torchrun`` in ``test_distributed_train``.

Why results travel through files and ranks leave with ``os._exit``: once a rank's result is on disk
the process has nothing left to do, and process teardown (gloo's threads, DeepSpeed's op handles,
C++ static destructors) has been seen to abort a rank of a 4-rank DeepSpeed job on a 2-core CI
machine ("terminate called without an active exception", SIGABRT) after every collective had
finished, failing a test whose numbers were right. So every rank saves its result, then all ranks
pass one barrier (every result is on disk after it), then leave with ``os._exit(0)`` without
destroying the group. The parent accepts a rank that died *after* that point (all result files
present, death by signal) with a warning; a rank that raises exits the normal way, so its traceback
is reported, and a rank that dies before every result is saved fails the test.
"""
from __future__ import annotations

import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous port of one spawned group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    """The torchrun variables of ``rank`` in a ``world``-rank group on this host (plus ``extra``)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), **extra}


def init_rank(rank: int, world: int, port: int, **extra_env: str):
    """Join the group through vdit's own ``init_distributed`` (gloo on CPU), one intra-op thread per
    rank (world sizes above the core count must not oversubscribe). Returns its ``DistInfo``."""
    from vdit.train.parallel.dims import init_distributed

    torch.set_num_threads(1)
    env = rank_env(rank, world, port, **extra_env)
    os.environ.update(env)  # DeepSpeed and DCP read the process environment
    return init_distributed(environ=env)


def _result_path(out_dir: str | os.PathLike, rank: int) -> Path:
    return Path(out_dir) / f"rank{rank}.result.pt"


def _rank_main(rank: int, worker: Callable[..., Any], world: int, port: int, out_dir: str, args: tuple) -> None:
    result = worker(rank, world, port, out_dir, *args)  # an exception exits normally: spawn reports it
    path = _result_path(out_dir, rank)
    torch.save(result, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    if dist.is_initialized():
        dist.barrier()  # after this, every rank's result is on disk
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no teardown: see the module docstring


def spawn(worker: Callable[..., Any], world: int, out_dir: str | os.PathLike, *args: Any) -> list[Any]:
    """Run ``worker(rank, world, port, out_dir, *args)`` on ``world`` spawned ranks; their return values.

    ``worker`` must be a module-level function (it is pickled by name). Raises
    ``torch.multiprocessing.ProcessRaisedException`` with the rank's traceback when a rank raises,
    ``ProcessExitedException`` when one dies."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in range(world):
        _result_path(out_dir, r).unlink(missing_ok=True)
    try:
        mp.spawn(_rank_main, args=(worker, world, free_port(), str(out_dir), args), nprocs=world, join=True)
    except mp.ProcessExitedException as exc:
        saved = all(_result_path(out_dir, r).exists() for r in range(world))
        if not (saved and exc.signal_name):
            raise
        warnings.warn(f"rank {exc.error_index} died in teardown ({exc.signal_name}) after every rank had "
                      f"saved its result; results are used", RuntimeWarning, stacklevel=2)
    results = []
    for r in range(world):
        path = _result_path(out_dir, r)
        results.append(torch.load(path, weights_only=False))
        path.unlink()
    return results

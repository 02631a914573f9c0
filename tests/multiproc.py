"""The test suite's one in-process multi-rank harness: N CPU ranks (gloo) spawned from a test.

``spawn(worker, world, out_dir)`` runs ``worker(rank, world, port, out_dir, *args)`` in ``world``
processes and returns what each rank's ``worker`` returned, indexed by rank. The worker calls
``init_rank`` (or its own ``init_process_group``) first; the harness destroys the process group
afterwards. Torchrun-launched jobs (the Trainer's CLI) use ``torchrun`` in ``test_distributed_train``.

Why results travel through files and ranks leave with ``os._exit``: once a rank's result is on disk
the process has nothing left to do, and letting the interpreter run C++ static destructors has been
seen to abort a rank of a 4-rank DeepSpeed job on a 2-core CI machine ("terminate called without an
active exception", SIGABRT) after every collective had finished, failing a test whose numbers were
right. A rank that raises exits the normal way, so ``mp.spawn`` reports its traceback.
"""
from __future__ import annotations

import os
import socket
import sys
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


def _rank_main(rank: int, worker: Callable[..., Any], world: int, port: int, out_dir: str, args: tuple) -> None:
    result = worker(rank, world, port, out_dir, *args)  # an exception exits normally: spawn reports it
    path = Path(out_dir) / f"rank{rank}.result.pt"
    torch.save(result, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker: Callable[..., Any], world: int, out_dir: str | os.PathLike, *args: Any) -> list[Any]:
    """Run ``worker(rank, world, port, out_dir, *args)`` on ``world`` spawned ranks; their return values.

    ``worker`` must be a module-level function (it is pickled by name). Raises
    ``torch.multiprocessing.ProcessRaisedException`` with the rank's traceback when a rank raises,
    ``ProcessExitedException`` when one dies."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(worker, world, free_port(), str(out_dir), args), nprocs=world, join=True)
    results = []
    for r in range(world):
        path = out_dir / f"rank{r}.result.pt"
        results.append(torch.load(path, weights_only=False))
        path.unlink()
    return results

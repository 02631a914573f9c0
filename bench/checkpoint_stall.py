"""Training stall of one checkpoint save, blocking vs ``train.async_checkpoint`` (issue 11), measured in one run.

Run (CPU, one process; ~1.7 GB of state, ~3.5 GB of host memory at the peak, a few GB written to --dir)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/checkpoint_stall.py               # hidden 768, depth 8: ~110M params
    OMP_NUM_THREADS=1 .venv/bin/python bench/checkpoint_stall.py --depth 4 --rounds 2 --dir /tmp/ckbench

The state is what the Trainer checkpoints: a fp32 ``VideoDiT`` with AdamW state (``exp_avg``,
``exp_avg_sq``, filled by one step on random gradients), its EMA, the LR scheduler and a small JSON
entry, saved through :class:`vdit.train.checkpoint.CheckpointManager`. Blocking and async saves
alternate (``--rounds`` of each, so disk and page-cache effects hit both alike).

* **stall**: seconds the training thread spends inside ``save()``. Blocking: the whole DCP write
  (fsync included). Async: the CPU copy of every tensor (``dcp.async_save``'s staging) + the JSON
  state; the files are written by a worker thread.
* **write**: async only, seconds from the call until the checkpoint is ``COMPLETE`` when training
  does nothing else meanwhile (``wait()`` right away); between saves training would run here.

Prints one row per save, then a summary and, last, one JSON line
``{"params", "state_bytes", "sync_stall_s", "async_stall_s", "async_write_s", "stall_ratio"}`` (medians;
``stall_ratio`` = blocking stall / async stall).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

from vdit.model.dit import DiTConfig, VideoDiT
from vdit.train.checkpoint import CheckpointManager, ModelOptimizerState, ObjectState
from vdit.train.config import OptimConfig
from vdit.train.ema import EMA
from vdit.train.optim import build_optimizer, build_scheduler


class _Counter:
    """A stand-in for the trainer's JSON state (step + a little data)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step, "note": "bench"}

    def load_state_dict(self, state):
        self.step = state["step"]


def build_state(hidden: int, depth: int, heads: int) -> tuple[dict, int, int]:
    """The checkpointed state of a trained-looking model; returns (state, params, tensor bytes)."""
    torch.manual_seed(0)
    model = VideoDiT(DiTConfig(in_channels=16, patch_size=[1, 2, 2], hidden_size=hidden, depth=depth,
                               num_heads=heads, text_dim=384))
    optim_cfg = OptimConfig()
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, 1000)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # AdamW state exists (2 fp32 tensors per parameter)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    ema = EMA(model, 0.999)
    params = sum(p.numel() for p in model.parameters())
    tensor_bytes = params * 4 * 4  # weights + exp_avg + exp_avg_sq + EMA, fp32
    state = {"app": ModelOptimizerState(model, optimizer), "scheduler": scheduler, "ema": ema,
             "trainer": ObjectState(_Counter(), per_rank=False)}
    return state, params, tensor_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3, help="saves of each kind (alternating)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed)")
    args = ap.parse_args()

    state, params, nbytes = build_state(args.hidden, args.depth, args.heads)
    root = args.dir or tempfile.mkdtemp(prefix="vdit-ckbench-")
    manager = CheckpointManager(os.path.join(root, "checkpoints"), keep_last_k=1)
    print(f"VideoDiT hidden {args.hidden} depth {args.depth}: {params / 1e6:.1f}M params, "
          f"{nbytes / 2**30:.2f} GiB of tensor state (weights + AdamW + EMA, fp32); writing to {root}")
    sync_stall, async_stall, async_write = [], [], []
    step = 0
    try:
        for r in range(args.rounds):
            for blocking in (True, False):
                step += 1
                state["trainer"].obj.step = step
                t0 = time.perf_counter()
                manager.save(step, state, blocking=blocking)
                stall = time.perf_counter() - t0
                if blocking:
                    sync_stall.append(stall)
                    print(f"round {r}  blocking  stall {stall:7.3f} s")
                else:
                    manager.wait()
                    write = time.perf_counter() - t0
                    async_stall.append(stall)
                    async_write.append(write)
                    print(f"round {r}  async     stall {stall:7.3f} s   (written and COMPLETE after {write:.3f} s)")
                assert manager.latest() == manager.path(step)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    s, a, w = (statistics.median(x) for x in (sync_stall, async_stall, async_write))
    print(f"median stall per save: blocking {s:.3f} s, async {a:.3f} s -> {s / a:.1f}x less stall "
          f"(the async write itself took {w:.3f} s, off the training thread)")
    print(json.dumps({"params": params, "state_bytes": nbytes, "sync_stall_s": round(s, 4),
                      "async_stall_s": round(a, 4), "async_write_s": round(w, 4), "stall_ratio": round(s / a, 2)}))


if __name__ == "__main__":
    main()

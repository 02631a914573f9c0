"""Sequence-parallel benchmark: activation memory per rank and bytes communicated per step.

Run (CPU, gloo; spawns worlds 1, 2 and 4 itself and prints one table)::

    .venv/bin/python bench/sp_bench.py                      # defaults: 8x32x32 latent -> 2048 tokens
    .venv/bin/python bench/sp_bench.py --frames 16 --worlds 1 2

or under torchrun for one world size (CPU tensors, gloo)::

    torchrun --nproc_per_node 4 bench/sp_bench.py

What is measured, per rank, for one training step (forward + backward) of a tiny VideoDiT:

* ``act MB``: bytes of the tensors autograd saves for backward during the forward (via
  ``torch.autograd.graph.saved_tensors_hooks``, unique storages, parameters excluded) -- the
  activation memory a step holds at its peak. Target with SP: about 1/sp of the SP=1 value.
  Transient buffers (e.g. a ring block's score matrix) are not included.
* ``comm MB``: bytes this rank *sent*, counted inside the SP collectives (``COMM_STATS``), next to
  the analytic value. Per attention layer, with ``X = B * (L_pad/sp) * hidden * elem_bytes``:
  Ulysses 4 all-to-alls (q, k, v, out) each sending ``(sp-1)/sp * X`` forward, the same backward;
  ring ``(sp-1)`` K/V passes (``2X`` each) forward, ``(sp-1)`` K/V passes plus ``sp`` fp32 dK/dV
  passes backward; plus one all-gather of the final layer's output per step (``(sp-1) * B *
  L_pad/sp * P * elem_bytes``). Hybrid u x r: Ulysses terms with u, ring terms with r.

Timings on 2 shared CPU cores with gloo say nothing about GPUs; they are printed only as a sanity check.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vdit.model.dit import DiTConfig, VideoDiT
from vdit.train.parallel.sequence import COMM_STATS, apply_sequence_parallel, build_sp_groups


def _config(args) -> DiTConfig:
    return DiTConfig(in_channels=4, patch_size=[1, 2, 2], hidden_size=args.hidden, depth=args.depth,
                     num_heads=args.heads, text_dim=32)


def _analytic(mode: str, sp: int, u: int, r: int, cfg: DiTConfig, seq: int, batch: int, elem: int) -> float:
    """Bytes sent per rank per step (forward + backward) by the formulas in the module docstring."""
    padded = -(-seq // sp) * sp
    x = batch * (padded // sp) * cfg.hidden_size * elem  # one (B, L/sp, H, Dh) tensor
    if mode == "ulysses":
        u, r = sp, 1
    elif mode == "ring":
        u, r = 1, sp
    per_layer = 0.0
    if u > 1:
        per_layer += 2 * 4 * x * (u - 1) / u  # fwd + bwd, q/k/v/out
    if r > 1:
        per_layer += (r - 1) * 2 * x  # fwd K/V passes
        per_layer += (r - 1) * 2 * x + r * 2 * (x // elem) * 4  # bwd K/V passes + fp32 dK/dV passes
    out_width = 4 * 4  # pt*ph*pw*C
    gather = (sp - 1) * batch * (padded // sp) * out_width * elem
    return cfg.depth * per_layer + gather


def _measure(model, x, t, text, mask) -> tuple[float, float, dict]:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    COMM_STATS.reset()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x, t, text, mask)  # (B, C, T, H, W)
    act = sum(saved.values())
    out.float().square().mean().backward()
    elapsed = time.perf_counter() - start
    comm = {f"{k}/{p}": b for (k, p), b in COMM_STATS.bytes.items()}
    return act, elapsed, comm


def _run(rank: int, world: int, args, out_path: str | None) -> list[dict]:
    torch.set_num_threads(1)
    cfg = _config(args)
    g = torch.Generator().manual_seed(0)
    latent = (args.frames, args.size, args.size)
    x = torch.randn(1, 4, *latent, generator=g)
    t = torch.rand(1, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    mask = torch.ones(1, 8, dtype=torch.bool)
    seq = VideoDiT(cfg).num_tokens(*latent)
    rows = []
    modes = ["none"] if world == 1 else ["ulysses", "ring"] + (["hybrid"] if world == 4 else [])
    groups = {}
    if world > 1:  # collective: every rank builds every group in the same order
        groups["flat"] = build_sp_groups(world, world, "ulysses")
        if world == 4:
            groups["hybrid"] = build_sp_groups(world, world, "hybrid", ulysses_size=2, ring_size=2)
    for mode in modes:
        model = VideoDiT(cfg)
        u = r = 1
        if mode != "none":
            grp = groups["hybrid" if mode == "hybrid" else "flat"]
            apply_sequence_parallel(model, grp.sp, mode, grp.ulysses, grp.ring)
            u = grp.ulysses.size() if mode == "hybrid" else 1
            r = grp.ring.size() if mode == "hybrid" else 1
        _measure(model, x, t, text, mask)  # warm-up
        model.zero_grad(set_to_none=True)
        act, elapsed, comm = _measure(model, x, t, text, mask)
        row = {"mode": mode if mode != "hybrid" else f"hybrid {u}x{r}", "sp": world, "tokens": seq,
               "act_bytes": act, "comm_bytes": sum(comm.values()), "comm": comm, "seconds": elapsed,
               "analytic": _analytic(mode, world, u, r, cfg, seq, 1, 4) if world > 1 else 0.0}
        if world > 1:  # report the worst rank
            per_rank = [None] * world
            dist.all_gather_object(per_rank, row)
            row = max(per_rank, key=lambda d: d["act_bytes"])
            row["comm_bytes"] = max(d["comm_bytes"] for d in per_rank)
            row["seconds"] = max(d["seconds"] for d in per_rank)
        rows.append(row)
    if out_path and rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    return rows


def _spawned(rank: int, world: int, port: int, args, out_path: str) -> None:
    if world > 1:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=10))
    try:
        _run(rank, world, args, out_path)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _print(rows: list[dict]) -> None:
    base = next((r["act_bytes"] for r in rows if r["sp"] == 1), None)
    print(f"{'mode':<12}{'sp':>3}{'tokens':>8}{'act MB/rank':>13}{'vs sp1':>8}{'target':>8}"
          f"{'comm MB/rank':>14}{'analytic':>10}{'meas/anal':>10}{'step s':>8}")
    for r in rows:
        ratio = f"{r['act_bytes'] / base:.3f}" if base else "-"
        anal = r["analytic"]
        print(f"{r['mode']:<12}{r['sp']:>3}{r['tokens']:>8}{r['act_bytes'] / 2**20:>13.2f}{ratio:>8}"
              f"{1 / r['sp']:>8.3f}{r['comm_bytes'] / 2**20:>14.3f}{anal / 2**20:>10.3f}"
              f"{(r['comm_bytes'] / anal if anal else 0):>10.3f}{r['seconds']:>8.2f}")
    for r in rows:
        if r["comm"]:
            parts = ", ".join(f"{k} {v / 2**20:.3f}" for k, v in sorted(r["comm"].items()))
            print(f"  {r['mode']} sp={r['sp']} (rank with most activations) MB sent: {parts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args()
    if "RANK" in os.environ:  # under torchrun: one world, this process is one rank
        dist.init_process_group(timeout=timedelta(minutes=10))
        rows = _run(dist.get_rank(), dist.get_world_size(), args, None)
        if dist.get_rank() == 0:
            _print(rows)
        dist.destroy_process_group()
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            path = os.path.join(tmp, f"w{world}.json")
            mp.spawn(_spawned, args=(world, _free_port(), args, path), nprocs=world, join=True)
            with open(path) as f:
                rows += json.load(f)
    _print(rows)


if __name__ == "__main__":
    main()

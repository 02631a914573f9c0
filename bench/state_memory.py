"""Model-state memory per rank under FSDP2 and DeepSpeed ZeRO-3 (issue 3): parameters + gradients + optimizer state.

Run (CPU, gloo; spawns worlds 1, 2 and 4 itself for both backends, prints one table, writes JSON)::

    .venv/bin/python bench/state_memory.py                       # --out /tmp/state_memory.json
    .venv/bin/python bench/state_memory.py --worlds 1 2 --backends fsdp

Model: a fp32 ``VideoDiT`` (default hidden 256, depth 8, heads 4, text_dim 64: ~11.9M parameters), built
the way the Trainer builds it:

* ``fsdp``: meta build -> ``copy.deepcopy`` reference -> ``parallelize`` (``ParallelConfig(backend="fsdp")``,
  so ``apply_fsdp`` over the 1-D ``dims.fsdp_mesh`` = ``"dp_shard"``) -> ``materialize_and_init``;
  ``build_optimizer`` (torch AdamW, two groups). One step: forward, backward, ``clip_grad_norm_``,
  ``opt.step()``, **no** ``zero_grad`` (so the gradients still exist when counted).
* ``deepspeed``: plain model (meta build -> ``materialize_and_init`` on CPU) -> ``build_optimizer`` ->
  ``deepspeed_config(zero_stage=3, fp32)`` -> ``build_deepspeed``. One step: ``engine(...)``,
  ``engine.backward``, ``engine.step()``.

Every rank trains on one micro-batch of its own (a 2x8x8 latent, 32 tokens), then counts the bytes it holds.
Tensors are counted **once per storage**, at the storage's full size (``untyped_storage().nbytes()``), so
views into one flat buffer are not counted twice and padding that is allocated is counted. What is counted:

FSDP2 (per rank, after the step)
  * ``params``: ``p.to_local()`` of every (DTensor) parameter. Its storage is FSDP's padded
    ``_sharded_param_data`` (dim 0 padded to a multiple of N), so the padding is included.
  * ``grads``: ``p.grad.to_local()``: views into the reduce-scatter output of each FSDP group
    (one flat, padded, storage per group).
  * ``optim``: ``opt.state[p]["exp_avg"/"exp_avg_sq"].to_local()`` (DTensors shaped like the shard).
  * replicated: tensors every rank holds whole: AdamW's 0-dim ``step`` per parameter (4 bytes each);
    any non-DTensor parameter or gradient (none: ``fully_shard`` on the root covers every parameter).

ZeRO-3 (per rank, after the step; ``engine.optimizer`` is ``DeepSpeedZeroOptimizer_Stage3``)
  * ``params``: ``p.ds_tensor`` of every module parameter: this rank's partition (``ceil(numel/N)``
    elements), all views into one flat buffer (``lp_param_buffer`` / ``fp16_partitioned_groups_flat``,
    fp32 here since bf16 is off).
  * ``master``: ``fp32_partitioned_groups_flat`` (the partitions AdamW updates). With an fp32 model
    they are meant to alias the ``params`` flats (stage3.py ``_create_fp32_partitions``: "we don't need
    another copy of the weights"), but in DeepSpeed 0.19.8 that branch tests
    ``flat.device == self.device`` with ``self.device`` a *string* (``current_device_name()``), and
    ``torch.device("cpu") == "cpu"`` is False (so is ``torch.device("cuda:0") == "cuda:0"``): the
    master is a second fp32 copy of the partition, 4 extra bytes per parameter (ZeRO-3 holds 20 B per
    parameter / N in fp32, not 16). ``master_aliases_params`` in the JSON says which happened. With
    bf16 the fp32 master is a separate copy by design (and the ``params`` partition is 2 B).
  * ``grads``: ``grad_partitions_flat_buffer`` (this rank's fp32 gradient partitions, allocated once
    and kept), plus any ``fp32_partitioned_groups_flat[i].grad``, ``averaged_gradients`` and module
    ``p.grad`` still alive (normally none after ``step``).
  * ``optim``: ``engine.optimizer.optimizer.state[flat]["exp_avg"/"exp_avg_sq"]``: one tensor per
    flat fp32 partition (one sub-group per parameter group here).
  * replicated: module parameters whose ``p.data`` is not released after the step: ZeRO-3's
    *persistent* parameters (``ds_persist``: numel <= ``stage3_param_persistence_threshold``, default
    100000 elements, which vdit's config does not change) stay whole on every rank next to their
    partition; plus AdamW's 0-dim ``step`` per flat group.

The target is ``per_rank <= 1.05 * total / N + replicated`` (for every rank), where ``total`` is the
logical model state of one process, ``16 bytes x parameters`` (fp32 parameter, gradient, exp_avg,
exp_avg_sq); equivalently ``sharded <= 1.05 * total / N``. Reported per backend and world size:
``per-rank`` (max over ranks of sharded + replicated), ``ratio = per_rank / (total / N)``, the sharded
part's ratio, the replicated bytes, and the check. Exit status 1 when a check fails. With the default
model every dim 0 is a multiple of 4, so neither backend pads for N <= 4.

Not model state, reported apart (``other``): a census of every live CPU tensor storage found through
``gc`` after the step, minus the tensors alive before the model was built, minus the counted ones.
It shows what else a rank holds: for ZeRO-3 the contiguous-gradient IPG bucket, ``torch.empty(
reduce_bucket_size)``: 5e8 fp32 = 1.9 GiB per rank with DeepSpeed's default size (what vdit set
before issue 11; only the part written is resident on CPU, all of it on CUDA), now the model's
parameter count (:func:`vdit.train.parallel.deepspeed.bucket_elements`: 11.9M elements = 45.5 MiB
for the default model); for FSDP2 nothing of note (its all-gather / reduce-scatter buffers are
freed after use). Tensors held only by C++ (none expected after the step) are invisible
to the census.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import socket
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from vdit.model.dit import DiTConfig, VideoDiT
from vdit.train.config import LoopConfig, OptimConfig
from vdit.train.optim import build_optimizer, build_scheduler
from vdit.train.parallel.dims import ParallelConfig, ParallelDims, init_distributed
from vdit.train.parallel.fsdp import materialize_and_init, parallelize

TARGET = 1.05
OPTIM = OptimConfig(lr=1e-4, weight_decay=0.01, warmup_steps=0, schedule="constant", grad_clip=1.0)
SHARDED = ("params", "master", "grads", "optim")
REPLICATED = ("rep_params", "rep_grads", "rep_optim")
MB = 1 << 20


def _model_cfg(args) -> DiTConfig:
    return DiTConfig(in_channels=4, patch_size=[1, 2, 2], hidden_size=args.hidden, depth=args.depth,
                     num_heads=args.heads, text_dim=args.text_dim)


def _batch(cfg: DiTConfig, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return {"x": torch.randn(1, cfg.in_channels, 2, 8, 8, generator=g), "t": torch.rand(1, generator=g),
            "text": torch.randn(1, 5, cfg.text_dim, generator=g), "mask": torch.ones(1, 5, dtype=torch.bool),
            "target": torch.randn(1, cfg.in_channels, 2, 8, 8, generator=g)}


def _loss(model, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(b["x"], b["t"], b["text"], b["mask"]) - b["target"]).square().mean()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ counting
def _storage(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


class Tally:
    """Bytes per category, each storage counted once (in the first category that claims it)."""

    def __init__(self):
        self.owner: dict[int, tuple[str, int]] = {}
        self.logical: dict[str, int] = {}
        self.count: dict[str, int] = {}

    def add(self, cat: str, t) -> None:
        if t is None:
            return
        if isinstance(t, DTensor):
            t = t.to_local()
        self.logical[cat] = self.logical.get(cat, 0) + t.numel() * t.element_size()
        self.count[cat] = self.count.get(cat, 0) + 1
        ptr, nbytes = _storage(t)
        if nbytes and ptr not in self.owner:
            self.owner[ptr] = (cat, nbytes)

    def bytes(self) -> dict[str, int]:
        out = {c: 0 for c in SHARDED + REPLICATED}
        for cat, nbytes in self.owner.values():
            out[cat] += nbytes
        return out


def _census() -> dict[int, int]:
    """Every live CPU tensor storage reachable through gc: {data_ptr: nbytes}. DTensor wrappers are skipped
    (their local tensors are found on their own)."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or isinstance(obj, DTensor) or obj.device.type != "cpu":
                continue
            ptr, nbytes = _storage(obj)
        except Exception:  # exotic tensor subclasses without a storage
            continue
        if nbytes:
            seen[ptr] = nbytes
    return seen


def _is_sharded(t: DTensor) -> bool:
    return any(p.is_shard() for p in t.placements)


def _count_fsdp(model, opt) -> tuple[Tally, dict]:
    tally = Tally()
    for p in model.parameters():
        tally.add("params" if isinstance(p, DTensor) and _is_sharded(p) else "rep_params", p)
    for p in model.parameters():
        if p.grad is not None:
            tally.add("grads" if isinstance(p.grad, DTensor) and _is_sharded(p.grad) else "rep_grads", p.grad)
    for p in model.parameters():
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v):
                tally.add("optim" if isinstance(v, DTensor) and _is_sharded(v) else "rep_optim", v)
    local = sum(p.to_local().numel() for p in model.parameters() if isinstance(p, DTensor))
    return tally, {"local_param_numel": local}


def _count_zero3(engine) -> tuple[Tally, dict]:
    zopt = engine.optimizer
    base = zopt.optimizer
    tally = Tally()
    persistent = []
    for name, p in engine.module.named_parameters():
        tally.add("params", p.ds_tensor)
    for t in zopt.fp16_partitioned_groups_flat:
        tally.add("params", t)
    aliased = [_storage(m)[0] == _storage(lp)[0]
               for m, lp in zip(zopt.fp32_partitioned_groups_flat, zopt.fp16_partitioned_groups_flat)]
    for t in zopt.fp32_partitioned_groups_flat:
        tally.add("master", t)
    for name, p in engine.module.named_parameters():
        if p.data.numel() > 0:  # not released: a persistent (ds_persist) parameter, whole on every rank
            persistent.append((name, p.data.numel(), bool(getattr(p, "ds_persist", False))))
            tally.add("rep_params", p.data)
    tally.add("grads", zopt.grad_partitions_flat_buffer)
    for t in zopt.fp32_partitioned_groups_flat:
        tally.add("grads", t.grad)
    for grads in (zopt.averaged_gradients.values() if isinstance(zopt.averaged_gradients, dict)
                  else zopt.averaged_gradients):
        for g in grads or []:
            tally.add("grads", g)
    for p in engine.module.parameters():
        if p.grad is not None:
            tally.add("rep_grads" if p.grad.numel() == p.ds_numel else "grads", p.grad)
    for flat in zopt.fp32_partitioned_groups_flat:
        for v in base.state.get(flat, {}).values():
            if torch.is_tensor(v):
                tally.add("optim" if v.ndim > 0 else "rep_optim", v)
    ipg = {str(dtype): b.buffer.untyped_storage().nbytes() for dtype, b in zopt.ipg_buckets.items()
           if b.buffer is not None}
    extra = {"master_aliases_params": all(aliased), "persistent_params": len(persistent),
             "persistent_numel": sum(n for _, n, _ in persistent),
             "persistent_not_flagged": [n for n, _, flag in persistent if not flag],
             "ipg_bucket_bytes": ipg, "sub_groups": len(zopt.fp32_partitioned_groups_flat),
             "local_param_numel": sum(p.ds_tensor.numel() for p in engine.module.parameters())}
    return tally, extra


# ------------------------------------------------------------------------------------------- workers
def _worker(rank: int, world: int, port: int, backend: str, args: argparse.Namespace, out: str) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecated c10d names used inside torch/DeepSpeed
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    init_distributed()
    if not dist.is_initialized():  # a world of 1: init_distributed starts nothing, the mesh needs a group
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    before = set(_census())
    cfg = _model_cfg(args)
    batch = _batch(cfg, rank)
    t0 = time.perf_counter()
    stamps: dict[str, float] = {}

    def stamp(name: str) -> None:
        stamps[name] = round(time.perf_counter() - t0, 3)

    if backend == "fsdp":
        pcfg = ParallelConfig(backend="fsdp")
        dims = ParallelDims(pcfg, world, num_heads=cfg.num_heads)
        dims.build_mesh("cpu")
        with torch.device("meta"):
            model = VideoDiT(cfg)
        reference = copy.deepcopy(model)
        parallelize(model, dims, pcfg)
        materialize_and_init(model, "cpu", seed=0, reference=reference)
        opt = build_optimizer(model, OPTIM)
        stamp("built")
        loss = _loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        opt.step()  # no zero_grad: the gradients are part of what is measured
        del loss, reference
        tally, extra = _count_fsdp(model, opt)
        extra["mesh"] = str(dims.fsdp_mesh)
    else:
        import deepspeed
        from vdit.train.parallel.deepspeed import build_deepspeed, deepspeed_config

        deepspeed.utils.logger.setLevel(logging.WARNING)
        with torch.device("meta"):
            model = VideoDiT(cfg)
        materialize_and_init(model, "cpu", seed=0)  # the plain model the Trainer hands to DeepSpeed
        opt = build_optimizer(model, OPTIM)
        sched = build_scheduler(opt, OPTIM, 10)
        pcfg = ParallelConfig(backend="deepspeed", zero_stage=3)
        ds_cfg = deepspeed_config(LoopConfig(precision="fp32", device="cpu"), pcfg, OPTIM, 1, 1, world,
                                  sum(p.numel() for p in model.parameters()))  # buckets sized as the Trainer does
        if args.ds_persistence_threshold is not None:
            ds_cfg["zero_optimization"]["stage3_param_persistence_threshold"] = args.ds_persistence_threshold
        stamp("model")
        engine = build_deepspeed(model, opt, sched, ds_cfg)
        stamp("built")
        del model, opt
        loss = _loss(engine, batch)
        engine.backward(loss)
        engine.step()
        del loss
        tally, extra = _count_zero3(engine)
        extra["optimizer"] = type(engine.optimizer).__name__
        extra["zero_optimization"] = ds_cfg["zero_optimization"]
    stamp("stepped")
    seconds = time.perf_counter() - t0
    del batch
    census = _census()
    other = {ptr: n for ptr, n in census.items() if ptr not in before and ptr not in tally.owner}
    res = {"rank": rank, "bytes": tally.bytes(), "logical": tally.logical, "tensors": tally.count,
           "other_bytes": sum(other.values()), "other_largest": sorted(other.values(), reverse=True)[:5],
           "census_missed": sum(n for ptr, (_, n) in tally.owner.items() if ptr not in census),
           "seconds": seconds, "stamps": stamps, **extra}
    with open(os.path.join(out, f"{backend}-{world}-rank{rank}.json"), "w") as f:
        json.dump(res, f, default=str)
    dist.barrier()
    dist.destroy_process_group()


def _prebuild_deepspeed_ops() -> str:
    """Build DeepSpeed's CPU comm op here, once, before ranks are spawned (they load the cached build)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
    return deepspeed.__version__


# ------------------------------------------------------------------------------------------- report
def _summarize(backend: str, world: int, ranks: list[dict], total: int) -> dict:
    share = total / world
    rows = []
    for r in ranks:
        sharded = sum(r["bytes"][c] for c in SHARDED)
        replicated = sum(r["bytes"][c] for c in REPLICATED)
        rows.append({"rank": r["rank"], "sharded": sharded, "replicated": replicated, "per_rank": sharded + replicated,
                     "ok": sharded + replicated <= TARGET * share + replicated})
    worst = max(rows, key=lambda x: x["per_rank"])
    return {"backend": backend, "world": world, "total_logical_bytes": total, "share_bytes": share,
            "per_rank_max_bytes": worst["per_rank"], "worst_rank": worst["rank"],
            "sharded_max_bytes": max(x["sharded"] for x in rows),
            "replicated_max_bytes": max(x["replicated"] for x in rows),
            "ratio": worst["per_rank"] / share, "sharded_ratio": max(x["sharded"] for x in rows) / share,
            # what the sharded part would be if the fp32 master aliased the fp32 partition (see docstring)
            "sharded_ratio_without_master": max(x["sharded"] - r["bytes"]["master"]
                                                for x, r in zip(rows, ranks)) / share,
            "target_ok": all(x["ok"] for x in rows),
            "other_max_bytes": max(r["other_bytes"] for r in ranks), "per_rank": rows, "ranks": ranks}


def _print_table(summaries: list[dict], total: int, numel: int) -> None:
    print(f"\nmodel state: {numel:,} fp32 parameters -> total = 16 B x params = {total / MB:.2f} MB "
          f"(param + grad + exp_avg + exp_avg_sq, one process)")
    head = (f"{'backend':<10}{'N':>3}{'total/N':>10}{'per-rank':>10}{'params':>9}{'master':>8}{'grads':>9}"
            f"{'optim':>9}{'repl.':>8}{'ratio':>7}{'shard r.':>9}{'target':>8}{'other':>10}")
    print(head)
    print("-" * len(head))
    for s in summaries:
        worst = next(r for r in s["ranks"] if r["rank"] == s["worst_rank"])
        b = worst["bytes"]
        repl = sum(b[c] for c in REPLICATED)
        print(f"{s['backend']:<10}{s['world']:>3}{s['share_bytes'] / MB:>10.2f}{s['per_rank_max_bytes'] / MB:>10.2f}"
              f"{b['params'] / MB:>9.2f}{b['master'] / MB:>8.2f}{b['grads'] / MB:>9.2f}{b['optim'] / MB:>9.2f}"
              f"{repl / MB:>8.2f}{s['ratio']:>7.3f}{s['sharded_ratio']:>9.3f}{'ok' if s['target_ok'] else 'FAIL':>8}"
              f"{s['other_max_bytes'] / MB:>10.1f}")
    print(f"MB = 2^20 bytes; columns per-rank..repl. are the worst rank's; ratio = per-rank / (total/N); "
          f"shard r. = sharded part / (total/N); target: per-rank <= {TARGET} x total/N + repl. on every rank; "
          "other = live tensors outside model state (not in the ratio; ZeRO-3: IPG bucket, virtual)")
    for s in summaries:
        r = s["ranks"][0]
        b = r["bytes"]
        notes = [f"repl. = {sum(b[c] for c in REPLICATED):,} B (params {b['rep_params']:,}, grads {b['rep_grads']:,}, "
                 f"optimizer 0-dim steps {b['rep_optim']:,})"]
        if s["backend"] == "deepspeed":
            notes.append(f"{r['persistent_params']} persistent params ({r['persistent_numel']:,} elements) whole on every "
                         "rank (at N=1 they share the partition's storage)")
            if not r["master_aliases_params"]:
                notes.append(f"fp32 master is a 2nd copy of the partition; without it shard r. = "
                             f"{s['sharded_ratio_without_master']:.3f}")
            notes.append(f"IPG bucket {sum(r['ipg_bucket_bytes'].values()) / MB:.0f} MB allocated")
        print(f"  {s['backend']} N={s['world']}: " + "; ".join(notes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--backends", nargs="+", choices=("fsdp", "deepspeed"), default=["fsdp", "deepspeed"])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--text-dim", type=int, default=64)
    ap.add_argument("--ds-persistence-threshold", type=int, default=None,
                    help="override ZeRO-3's stage3_param_persistence_threshold (default: vdit's config, i.e. "
                         "DeepSpeed's 100000 elements)")
    ap.add_argument("--out", default="/tmp/state_memory.json")
    args = ap.parse_args(argv)

    with torch.device("meta"):
        numel = sum(p.numel() for p in VideoDiT(_model_cfg(args)).parameters())
    total = 16 * numel
    ds_version = _prebuild_deepspeed_ops() if "deepspeed" in args.backends else None
    summaries = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            for world in args.worlds:
                t = time.perf_counter()
                mp.spawn(_worker, args=(world, _free_port(), backend, args, tmp), nprocs=world)
                ranks = []
                for r in range(world):
                    with open(os.path.join(tmp, f"{backend}-{world}-rank{r}.json")) as f:
                        ranks.append(json.load(f))
                summaries.append(_summarize(backend, world, ranks, total))
                print(f"[{backend} N={world}] done in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    _print_table(summaries, total, numel)
    report = {"model": vars(_model_cfg(args)), "num_params": numel, "total_logical_bytes": total,
              "target": TARGET, "torch": torch.__version__, "deepspeed": ds_version,
              "ds_persistence_threshold_override": args.ds_persistence_threshold,
              "seconds": time.perf_counter() - t0, "results": summaries}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {args.out}")
    return 0 if all(s["target_ok"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())

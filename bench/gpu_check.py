"""GPU checks of vdit on one H100/H200: kernels, ring attention, dtypes under FSDP2, compile, host syncs, a 1.3B step.

Run (one GPU; the whole thing fits in 8 minutes; nobody runs it in CI)::

    bash bench/gpu_check.sh                               # every section, then a pass/fail summary
    bash bench/gpu_check.sh kernels ring                  # only these sections
    OMP_NUM_THREADS=1 bash bench/gpu_check.sh --cpu-smoke # the plumbing on CPU at tiny shapes (< 1 min)
    python bench/gpu_check.py [--cpu-smoke] [--out results.jsonl] SECTION   # one section by hand
    python bench/gpu_check.py summary --out results.jsonl                    # the summary of a results file

``gpu_check.sh`` runs each section in its own process under ``timeout`` (a hung NCCL call or a
compile that runs away costs one section, not the run), goes on when one fails, and ends with a
summary. Every section prints one JSON line ``{"section", "status": pass|fail|skipped, ...}`` (also
appended to ``--out``); ``summary`` prints one JSON line over them. ``--cpu-smoke`` runs every
section at tiny shapes on CPU, in fp32 where the GPU run uses bf16, and says ``skipped: needs CUDA``
for what has no CPU meaning (flash-attn, the CUDA sync debug mode, ``pytest -m gpu``'s tests).

Sections, their time budget on one H100/H200 (``gpu_check.sh``'s ``timeout``), and what the numbers mean:

``kernels`` (35 s)
    Attention cores of ``vdit.train.parallel.attention`` -- flash-attn (``flash_attention``, if
    importable), SDPA (``sdpa_attention``; and each of SDPA's own CUDA kernels flash /
    efficient / cuDNN forced with ``sdpa_kernel``) and ``math_attention`` -- in bf16, head dims 32,
    64, 72, 128, ``Lq = 1024 != Lk = 1500``, k and v non-contiguous slices of one packed KV buffer.
    Against an fp32 ``math_attention`` of the same (bf16-rounded) inputs: ``fwd_abs`` / ``fwd_rel``
    = max |out - ref| and that over max |ref|; ``dq_rel``, ``dk_rel``, ``dv_rel`` the same for the
    gradients of one random ``dout``. bf16 has a relative step of 2^-8 = 3.9e-3: pass = every
    ``fwd_rel`` < 2e-2 and every gradient ``*_rel`` < 5e-2. ``flash_vs_sdpa_rel``: the two bf16 cores
    against each other.
``ring`` (35 s)
    ``vdit.train.parallel.ring.ring_attention`` on a 1-rank NCCL group (FileStore), fp32 inputs under
    bf16 autocast (what the model gives it), B=1, 8192 tokens, 12 heads of 128. ``block_kernel``: what
    ``select_block_kernel`` chose (flash-attn / aten-flash; math would mean the fused path is lost).
    ``ring_*_rel``: errors against an fp32 SDPA reference; ``sdpa_bf16_*_rel``: SDPA under the same
    autocast, for scale (ring within ~2x of SDPA-in-bf16 passes; issue 14's bug was 10x). ``ring_ms`` /
    ``sdpa_ms``: forward + backward, median of 3 after 1 warm-up; ``ring_peak_gib``: peak allocated.
``dtypes`` (35 s)
    A small Wan-shaped DiT (the 1.3B preset's options, hidden 512, 2 blocks) built on meta, attention
    backend ``auto``, FSDP2 on 1 rank with bf16 parameters / fp32 reduce, materialized with
    ``materialize_and_init``; one forward (bf16 autocast, as the Trainer) and backward under
    ``warnings.simplefilter("error")``. ``core_dtypes``: (q, k, v) -> out dtypes reaching each kind of
    attention core (self / cross); ``rope_dtypes``: (x, cos) -> out of ``apply_rotary``;
    ``grad_dtypes``: of the sharded parameters' gradients (fp32 expected). Pass = no warning, no error,
    every core sees one dtype for q, k, v.
``compile`` (120 s: two inductor compilations of a block, forward and backward)
    ``apply_compile`` (each block ``.compile()``, inductor) on a hidden-1024, 2-block DiT; forward +
    backward at 4 bucket shapes (1280 .. 9984 tokens). ``graph_breaks`` (reasons -> count),
    ``unique_graphs``, ``recompiles`` (counted from dynamo's ``recompiles`` log) with their reasons;
    the ring's ``@torch.compiler.disable`` is not used here, so any break is news. ``eager_ms`` /
    ``compiled_ms``: one step at the largest bucket (median of 3), ``torch.compiler.set_stance("force_eager")``
    for eager. Pass = 0 graph breaks and at most 2 recompiles (one per new dynamic dim).
``syncs`` (50 s)
    ``vdit.train.trainer.Trainer`` on the tests' tiny config (32x32 clips written here, bf16 on CUDA),
    ``train_step`` for 20 steps under ``torch.cuda.set_sync_debug_mode("warn")``; every sync warning is
    attributed to the innermost vdit ``file:line`` of its Python stack. ``syncs``: location -> count
    (20 = once per step); ``per_step_locations``: those seen every step. The Trainer allows one host
    sync per step, ``StepGuard.agree``'s (``train/guard.py``), and otherwise ``.item()`` only at the
    log interval: pass = no other location occurs every step (``unexpected_per_step`` is empty).
``step`` (140 s)
    One training step of the ``wan2.1-t2v-1.3b`` preset (1.42 B parameters, text 512 x 4096) at a
    21 x 60 x 104 latent (patch 1x2x2 -> 32,760 tokens), full activation checkpointing, FSDP2 on 1 rank
    (bf16 params, fp32 reduce), bf16 autocast, AdamW (``vdit.train.optim.build_optimizer``): 2 untimed
    steps (``first_step_s``: the first), 3 timed. ``step_s``: median step time; ``tokens_per_s``;
    ``tflops`` = model FLOPs of the step (``vdit.train.flops.training_flops``: 3 x the forward
    matmuls, attention included, recompute not counted) / step_s;
    ``mfu`` = tflops / the card's dense bf16 peak (``device_peak_flops``: 989 TFLOP/s on H100 SXM and
    H200); ``peak_gib``: max allocated; ``dcp_save_s`` / ``dcp_load_s``: ``CheckpointManager.save`` /
    ``load`` of model + optimizer (``ModelOptimizerState``) to local disk, ``dcp_gib`` its size.
``step_compiled`` (optional: the time left of the 8 minutes minus pytest's 60 s, run if >= 100 s; a timeout = skipped)
    The same step with ``apply_compile`` (no DCP): ``compile_s`` (first step) and the same numbers.
``pytest`` (60 s)
    ``pytest -m gpu -q`` (the marker of ``pyproject.toml``; ``--cpu-smoke``: two of those files, which
    skip without CUDA).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # tests.conftest (the tiny shards of the syncs section) lives at the repository root
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SECTIONS = ("kernels", "ring", "dtypes", "compile", "syncs", "step", "step_compiled")
FWD_TOL, BWD_TOL = 2e-2, 5e-2  # relative to max |ref|; bf16's relative step is 3.9e-3


# ------------------------------------------------------------------------------------------ helpers
class Ctx:
    """What every section needs: the device, the compute dtype, the smoke flag."""

    def __init__(self, cpu_smoke: bool):
        self.smoke = cpu_smoke
        if not cpu_smoke and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-smoke to check the plumbing on CPU")
        self.device = torch.device("cpu" if cpu_smoke else "cuda")
        self.dtype = torch.float32 if cpu_smoke else torch.bfloat16  # bf16 only where it means something
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return _r(torch.cuda.max_memory_allocated() / 2**30) if self.cuda else None

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()


def _r(x: float) -> float:
    return float(f"{x:.4g}")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |a - ref|, that / max |ref|)."""
    diff = (a.float() - ref.float()).abs().max().item()
    return _r(diff), _r(diff / max(ref.float().abs().max().item(), 1e-30))


def timed_ms(ctx: Ctx, fn, warmup: int = 1, reps: int = 3) -> float:
    """Median wall time of ``fn()`` in ms over ``reps`` runs after ``warmup``, device-synchronized."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return _r(1e3 * statistics.median(times))


@contextlib.contextmanager
def one_rank_group(ctx: Ctx):
    """A 1-rank process group (NCCL on CUDA, gloo on CPU) over a FileStore, destroyed afterwards."""
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as d:
        store = dist.FileStore(os.path.join(d, "store"), 1)
        kwargs = {"device_id": torch.device("cuda", torch.cuda.current_device())} if ctx.cuda else {}
        dist.init_process_group("nccl" if ctx.cuda else "gloo", store=store, rank=0, world_size=1, **kwargs)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def fsdp_dims(ctx: Ctx, param_dtype: str):
    """``ParallelConfig`` + ``ParallelDims`` (mesh built) for FSDP2 on the 1-rank group."""
    from vdit.train.parallel.dims import ParallelConfig, ParallelDims

    pcfg = ParallelConfig(backend="fsdp", param_dtype=param_dtype, reduce_dtype="fp32")
    dims = ParallelDims(pcfg, 1, num_heads=1)
    dims.build_mesh(ctx.device.type)
    return pcfg, dims


def sharded_model(ctx: Ctx, cfg, param_dtype: str, activation_checkpointing: str = "none",
                  compiled: bool = False, before_parallelize=None):
    """A ``VideoDiT`` of ``cfg`` built on meta, attention backend ``auto``, then the project's own
    :func:`vdit.train.parallel.fsdp.parallelize` (AC -> compile -> FSDP2 on the 1-rank group) and
    :func:`~vdit.train.parallel.fsdp.materialize_and_init`. ``before_parallelize(model)`` runs on the
    plain model first (e.g. to wrap attention cores). Returns ``(model, backend)``; call inside
    :func:`one_rank_group`."""
    import dataclasses

    from vdit.model.dit import VideoDiT
    from vdit.train.parallel.attention import apply_attention_backend
    from vdit.train.parallel.fsdp import materialize_and_init, parallelize

    pcfg, dims = fsdp_dims(ctx, param_dtype)
    pcfg = dataclasses.replace(pcfg, activation_checkpointing=activation_checkpointing, compile=compiled)
    with torch.device("meta"):
        model = VideoDiT(cfg)
    reference = copy.deepcopy(model)
    backend = apply_attention_backend(model, "auto", ctx.device, ctx.dtype)
    if before_parallelize is not None:
        before_parallelize(model)
    parallelize(model, dims, pcfg, compile_kwargs={"backend": "aot_eager"} if ctx.smoke else None)
    materialize_and_init(model, ctx.device, 0, reference)
    return model, backend


def wan_config(**overrides):
    """``DiTConfig`` of ``conf/model/wan2.1-t2v-1.3b.yaml`` with ``overrides`` (text_dim 4096 = UMT5-XXL)."""
    import yaml

    from vdit.model.dit import DiTConfig

    with open(os.path.join(ROOT, "conf", "model", "wan2.1-t2v-1.3b.yaml")) as f:
        fields = yaml.safe_load(f)
    return DiTConfig(**{**fields, "text_dim": 4096, **overrides})


def model_inputs(ctx: Ctx, cfg, latent_thw, text_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, *latent_thw, generator=g)
    inp = {"x": x, "t": torch.rand(1, generator=g), "text": torch.randn(1, text_len, cfg.text_dim, generator=g),
           "target": torch.randn(x.shape, generator=g)}
    return {k: v.to(ctx.device) for k, v in inp.items()}


def fwd_bwd(ctx: Ctx, model, inp) -> torch.Tensor:
    """Forward under the compute autocast, fp32 MSE to a fixed target, backward; returns the loss."""
    with ctx.autocast():
        pred = model(inp["x"], inp["t"], inp["text"])  # (1, C, T, H, W)
    loss = F.mse_loss(pred.float(), inp["target"])
    loss.backward()
    return loss.detach()


# ------------------------------------------------------------------------------------------ 1 kernels
def run_kernels(ctx: Ctx) -> dict:
    from vdit.model.attention import math_attention, sdpa_attention
    from vdit.train.parallel.attention import _flash_func, flash_attention

    b, h, lq, lk = (1, 2, 24, 40) if ctx.smoke else (2, 8, 1024, 1500)
    cores = {"sdpa": sdpa_attention, "math": math_attention}
    fn, tag = _flash_func()
    flash_note = None
    if fn is not None and ctx.cuda:
        cores = {f"flash-{tag}": flash_attention, **cores}
    else:
        flash_note = "skipped: needs CUDA" if fn is not None else f"skipped: flash-attn not importable ({tag[:120]})"
    sdpa_kernels = {}
    if ctx.cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def forced(q, k, v, attn_mask=None, _b=backend):
                with sdpa_kernel([_b]):
                    return sdpa_attention(q, k, v, attn_mask)
            sdpa_kernels[f"sdpa[{name}]"] = forced
    rows, ok = [], True
    for d in (32, 64, 72, 128):
        g = torch.Generator(device=ctx.device).manual_seed(d)
        q = torch.randn(b, lq, h, d, device=ctx.device, generator=g).to(ctx.dtype).requires_grad_()
        kv = torch.randn(b, lk + 16, 2, h, d, device=ctx.device, generator=g).to(ctx.dtype).requires_grad_()
        dout = torch.randn(b, lq, h, d, device=ctx.device, generator=g).to(ctx.dtype)
        k, v = kv[:, 8:8 + lk, 0], kv[:, 8:8 + lk, 1]  # (B, Lk, H, D) each: strided views, offset 8 tokens
        assert not k.is_contiguous() and not v.is_contiguous()
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))  # the same bf16-rounded values
        ref = math_attention(q32, k32, v32)  # (B, Lq, H, D) fp32
        rdq, rdk, rdv = torch.autograd.grad(ref, (q32, k32, v32), dout.float())
        outs = {}
        for name, core in {**cores, **sdpa_kernels}.items():
            row = {"head_dim": d, "core": name}
            try:
                out = core(q, k, v)  # (B, Lq, H, D)
                dq, dkv = torch.autograd.grad(out, (q, kv), dout)
            except RuntimeError as e:  # an SDPA kernel that does not take this shape/dtype/device
                if name.startswith("sdpa["):
                    rows.append({**row, "unsupported": str(e).splitlines()[0][:100]})
                    continue
                raise
            outs[name] = out.detach()
            row["fwd_abs"], row["fwd_rel"] = rel_err(out, ref)
            dk, dv = dkv[:, 8:8 + lk, 0], dkv[:, 8:8 + lk, 1]  # (B, Lk, H, D) each
            for gname, grad, gref in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
                row[f"{gname}_rel"] = rel_err(grad, gref)[1]
            row["pass"] = row["fwd_rel"] < FWD_TOL and max(row["dq_rel"], row["dk_rel"], row["dv_rel"]) < BWD_TOL
            ok &= row["pass"]
            rows.append(row)
        flash = next((n for n in outs if n.startswith("flash-")), None)
        if flash:
            rows.append({"head_dim": d, "core": f"{flash} vs sdpa",
                         "flash_vs_sdpa_rel": rel_err(outs[flash], outs["sdpa"])[1]})
    for row in rows:
        print("  " + json.dumps(row))
    worst = {key: max((r[key] for r in rows if key in r), default=None)
             for key in ("fwd_rel", "dq_rel", "dk_rel", "dv_rel")}
    return {"status": "pass" if ok else "fail", "dtype": str(ctx.dtype).replace("torch.", ""),
            "shape": {"B": b, "H": h, "Lq": lq, "Lk": lk}, "flash": flash_note or f"flash-attn {tag}",
            "worst": worst, "rows": rows}


# --------------------------------------------------------------------------------------------- 2 ring
def run_ring(ctx: Ctx) -> dict:
    from vdit.model.attention import sdpa_attention
    from vdit.train.parallel.ring import _KeyLayout, ring_attention, select_block_kernel

    b, L, h, d = (1, 64, 2, 32) if ctx.smoke else (1, 8192, 12, 128)
    g = torch.Generator(device=ctx.device).manual_seed(0)
    q, k, v = (torch.randn(b, L, h, d, device=ctx.device, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(b, L, h, d, device=ctx.device, generator=g)
    with one_rank_group(ctx) as group:
        layout = _KeyLayout(real_len=L, padded_len=L)
        kernel = select_block_kernel(ctx.device, ctx.dtype, d, masked=False).name

        def ring():
            with ctx.autocast():
                out = ring_attention(q, k, v, group, layout)  # (B, L, H, D) in the compute dtype
            return out, torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))

        def sdpa_bf16():
            with ctx.autocast():
                out = sdpa_attention(q, k, v)  # (B, L, H, D)
            return out, torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))

        ref = sdpa_attention(q, k, v)  # fp32 (B, L, H, D)
        ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
        result = {"block_kernel": kernel, "tokens": L, "heads": h, "head_dim": d,
                  "compute_dtype": str(ctx.dtype).replace("torch.", "")}
        for name, fn in (("ring", ring), ("sdpa_bf16", sdpa_bf16)):
            out, grads = fn()
            result[f"{name}_out_dtype"] = str(out.dtype).replace("torch.", "")
            result[f"{name}_fwd_rel"] = rel_err(out, ref)[1]
            for gname, grad, gref in zip(("dq", "dk", "dv"), grads, ref_grads):
                result[f"{name}_{gname}_rel"] = rel_err(grad, gref)[1]
            del out, grads
        ctx.reset_peak()
        result["ring_ms"] = timed_ms(ctx, ring)
        result["ring_peak_gib"] = ctx.peak_gib()
        ctx.reset_peak()
        result["sdpa_ms"] = timed_ms(ctx, sdpa_bf16)
        result["sdpa_peak_gib"] = ctx.peak_gib()
    worst_ring = max(result[f"ring_{n}_rel"] for n in ("fwd", "dq", "dk", "dv"))
    worst_sdpa = max(result[f"sdpa_bf16_{n}_rel"] for n in ("fwd", "dq", "dk", "dv"))
    result["ring_over_sdpa_err"] = _r(worst_ring / worst_sdpa) if worst_sdpa > 0 else None  # None: fp32 smoke
    ok = worst_ring < BWD_TOL and (ctx.smoke or worst_ring <= 2 * worst_sdpa) \
        and (ctx.smoke or kernel != "math")
    return {"status": "pass" if ok else "fail", **result}


# ------------------------------------------------------------------------------------------- 3 dtypes
def run_dtypes(ctx: Ctx) -> dict:
    import vdit.model.attention as attention_module
    from vdit.model.attention import Attention

    cfg = wan_config(hidden_size=64 if ctx.smoke else 512, depth=2, num_heads=2 if ctx.smoke else 4,
                     mlp_ratio=2.0, text_dim=32 if ctx.smoke else 256)
    thw, text_len = ((2, 4, 4), 8) if ctx.smoke else ((5, 16, 16), 64)
    core_dtypes: dict[str, set] = collections.defaultdict(set)
    rope_dtypes: set = set()

    def recording(core, kind):
        def core_fn(q, k, v, attn_mask=None):
            out = core(q, k, v, attn_mask=attn_mask)
            core_dtypes[kind].add(tuple(str(t.dtype).replace("torch.", "") for t in (q, k, v, out)))
            return out
        return core_fn

    original_rotary = attention_module.apply_rotary

    def rotary(x, cos, sin):
        out = original_rotary(x, cos, sin)
        rope_dtypes.add(tuple(str(t.dtype).replace("torch.", "") for t in (x, cos, out)))
        return out

    def record_cores(model):
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                module.core = recording(module.core, "cross" if name.endswith("cross_attn") else "self")

    with one_rank_group(ctx):
        model, backend = sharded_model(ctx, cfg, "bf16" if ctx.cuda else "fp32", before_parallelize=record_cores)
        inp = model_inputs(ctx, cfg, thw, text_len)
        error = None
        attention_module.apply_rotary = rotary  # Attention.forward looks the name up in its module
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                loss = fwd_bwd(ctx, model, inp)
                ctx.sync()
        except Exception as e:  # noqa: BLE001 - a warning turned error, or a dtype mismatch: the finding
            error = f"{type(e).__name__}: {e}"[:400]
            traceback.print_exc()
        finally:
            attention_module.apply_rotary = original_rotary
        grad_dtypes = sorted({str(p.grad.dtype).replace("torch.", "")
                              for p in model.parameters() if p.grad is not None})
        param_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    uniform = all(len(set(t[:3])) == 1 for s in core_dtypes.values() for t in s)
    ok = error is None and uniform and bool(core_dtypes) and bool(rope_dtypes)
    return {"status": "pass" if ok else "fail", "error": error, "attention_backend": backend,
            "param_dtype": "bf16" if ctx.cuda else "fp32", "core_dtypes": {k: sorted(v) for k, v in core_dtypes.items()},
            "rope_dtypes": sorted(rope_dtypes), "grad_dtypes": grad_dtypes, "sharded_param_dtypes": param_dtypes,
            "core_inputs_uniform": uniform, "loss": None if error else _r(loss.item())}


# ------------------------------------------------------------------------------------------ 4 compile
class _RecompileLog(logging.Handler):
    """Collects dynamo's ``recompiles`` log records (one per recompilation, with the failed guard)."""

    def __init__(self):
        super().__init__()
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().strip().splitlines()  # "Recompiling function forward in ...", reasons
        self.records.append(" | ".join(line.strip() for line in (lines[0], lines[-1]))[:240])


def run_compile(ctx: Ctx) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    from vdit.model.dit import VideoDiT
    from vdit.train.parallel.fsdp import apply_compile

    cfg = wan_config(hidden_size=64 if ctx.smoke else 1024, depth=2, num_heads=2 if ctx.smoke else 8,
                     text_dim=32 if ctx.smoke else 256, mlp_ratio=2.0 if ctx.smoke else 4.0)
    buckets = [(1, 4, 4), (2, 4, 6), (3, 6, 8), (4, 6, 6)] if ctx.smoke else \
        [(5, 32, 32), (9, 32, 48), (13, 48, 64), (21, 30, 52)]  # latent (T, H, W): 1280, 3456, 9984, 8190 tokens
    text_len = 8 if ctx.smoke else 64
    backend = "aot_eager" if ctx.smoke else "inductor"  # CPU smoke: dynamo + AOT autograd, no C++ build
    model = VideoDiT(cfg)
    model.init_weights(seed=0)
    model.to(ctx.device)
    apply_compile(model, backend=backend)
    torch._dynamo.reset()
    counters.clear()
    handler = _RecompileLog()
    torch._logging.set_logs(recompiles=True)
    rec_logger = logging.getLogger("torch._dynamo.guards.__recompiles")  # the "recompiles" log artifact
    rec_logger.addHandler(handler)
    per_bucket = []
    t_all = time.perf_counter()
    try:
        for thw in buckets:
            inp = model_inputs(ctx, cfg, thw, text_len)
            ctx.sync()
            t0 = time.perf_counter()
            fwd_bwd(ctx, model, inp)
            ctx.sync()
            per_bucket.append({"latent_thw": list(thw), "tokens": model.num_tokens(*thw),
                               "first_step_s": _r(time.perf_counter() - t0)})
        compile_s = _r(time.perf_counter() - t_all)
        big = model_inputs(ctx, cfg, max(buckets, key=lambda s: s[0] * s[1] * s[2]), text_len)
        compiled_ms = timed_ms(ctx, lambda: fwd_bwd(ctx, model, big))
        with torch.compiler.set_stance("force_eager"):
            eager_ms = timed_ms(ctx, lambda: fwd_bwd(ctx, model, big))
    finally:
        rec_logger.removeHandler(handler)
        torch._logging.set_logs()
    breaks = {reason[:160]: n for reason, n in counters["graph_break"].items()}
    recompiles = handler.records
    stats = dict(counters["stats"])
    ok = not breaks and len(recompiles) <= 2
    return {"status": "pass" if ok else "fail", "backend": backend, "graph_breaks": breaks,
            "n_graph_breaks": sum(breaks.values()), "recompiles": len(recompiles), "recompile_reasons": recompiles[:8],
            "unique_graphs": stats.get("unique_graphs"), "frames_ok": dict(counters["frames"]).get("ok"),
            "buckets": per_bucket, "compile_and_first_steps_s": compile_s,
            "eager_ms": eager_ms, "compiled_ms": compiled_ms, "speedup": _r(eager_ms / compiled_ms)}


# -------------------------------------------------------------------------------------------- 5 syncs
def _innermost_vdit_frame(stack) -> str:
    """``file:line`` of the innermost frame in vdit's source tree (not this script), else the innermost frame."""
    mine = os.path.abspath(__file__)
    for frame in reversed(stack):
        path = os.path.abspath(frame.filename)
        if path.startswith(ROOT) and path != mine and "site-packages" not in path:
            return f"{os.path.relpath(path, ROOT)}:{frame.lineno}"
    frame = stack[-1]
    return f"{frame.filename}:{frame.lineno}"


# StepGuard.agree reads its all-reduced (preempt, non-finite, loss) vector once per step, by design.
INTENDED_SYNC_FILES = ("train/guard.py",)


def run_syncs(ctx: Ctx) -> dict:
    from tests.conftest import write_shards
    from vdit.train.config import load_config, validate
    from vdit.train.trainer import Trainer

    steps = 2 if ctx.smoke else 20
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(os.path.join(tmp, "shards"), 2, 4)
        cfg = validate(load_config([  # tests/test_train.py's tiny_cfg, on this device
            f"data.shards={os.path.join(tmp, 'shards')}", f"run_dir={os.path.join(tmp, 'run')}",
            "text_encoder.name=random", "text_encoder.hidden_size=32", "text_encoder.max_length=8",
            "data.num_frames=4", "data.height=32", "data.width=32", "data.target_fps=null", "data.frame_stride=2",
            "data.batch_size=2", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
            "model.patch_size=[1,8,8]", f"train.steps={steps + 2}", "train.checkpoint_every=1000",
            "train.log_every=1000", "optim.warmup_steps=2", "wandb.mode=disabled", "eval.enabled=false",
            f"train.device={ctx.device.type}", f"train.precision={'bf16' if ctx.cuda else 'fp32'}"]))
        trainer = Trainer(cfg)
        batches = iter(trainer.data)
        micro = [[next(batches) for _ in range(cfg.train.grad_accum_steps)] for _ in range(steps + 1)]
        trainer.train_step(micro[0])  # warm-up: first-step allocations and lazy inits are not the question
        ctx.sync()
        locations: collections.Counter = collections.Counter()
        messages: dict[str, str] = {}
        if ctx.cuda:
            def show(message, category, filename, lineno, file=None, line=None):
                where = _innermost_vdit_frame(traceback.extract_stack()[:-1])
                locations[where] += 1
                messages.setdefault(where, str(message).splitlines()[0][:120])

            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = show
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    t0 = time.perf_counter()
                    for m in micro[1:]:
                        trainer.train_step(m)
                    torch.cuda.set_sync_debug_mode("default")
                    ctx.sync()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        else:
            t0 = time.perf_counter()
            for m in micro[1:]:
                trainer.train_step(m)
        step_ms = _r(1e3 * (time.perf_counter() - t0) / steps)
    per_step = sorted(loc for loc, n in locations.items() if n >= steps)
    unexpected = [loc for loc in per_step if not loc.startswith(INTENDED_SYNC_FILES)]
    result = {"steps": steps, "step_ms": step_ms, "syncs": dict(locations.most_common()),
              "sync_messages": messages, "per_step_locations": per_step, "unexpected_per_step": unexpected}
    if not ctx.cuda:
        return {"status": "skipped", "note": "skipped: needs CUDA (set_sync_debug_mode); Trainer steps ran", **result}
    return {"status": "pass" if not unexpected else "fail", **result}


# --------------------------------------------------------------------------------------------- 6 step
def run_step(ctx: Ctx, compiled: bool = False) -> dict:
    from vdit.train.checkpoint import CheckpointManager, ModelOptimizerState
    from vdit.train.config import OptimConfig
    from vdit.train.flops import device_peak_flops, training_flops
    from vdit.train.optim import build_optimizer

    if ctx.smoke:
        cfg = wan_config(hidden_size=64, depth=2, num_heads=2, text_dim=32, mlp_ratio=2.0)
        thw, text_len = (3, 8, 8), 8
    else:
        cfg = wan_config()  # the preset exactly, text_dim 4096
        thw, text_len = (21, 60, 104), 512  # 832x480 video, 81 frames through Wan's VAE (4x8x8) -> 32,760 tokens
    t_build = time.perf_counter()
    with one_rank_group(ctx):
        model, backend = sharded_model(ctx, cfg, "bf16" if ctx.cuda else "fp32", "full", compiled)
        opt = build_optimizer(model, OptimConfig())
        inp = model_inputs(ctx, cfg, thw, text_len)
        tokens = model.num_tokens(*thw)
        flops = training_flops(cfg, (cfg.in_channels, *thw), text_len, 1)
        build_s = _r(time.perf_counter() - t_build)

        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            losses.append(fwd_bwd(ctx, model, inp))  # device tensor: read after timing
            opt.step()

        ctx.reset_peak()
        ctx.sync()
        t0 = time.perf_counter()
        step()
        ctx.sync()
        first_s = _r(time.perf_counter() - t0)
        step_s = timed_ms(ctx, step, warmup=1, reps=3) / 1e3
        peak_gib = ctx.peak_gib()
        loss = losses[-1].item()
        peak, peak_src = device_peak_flops(ctx.device)
        tflops = flops / step_s / 1e12
        result = {"model": "wan2.1-t2v-1.3b" if not ctx.smoke else "wan-shaped tiny",
                  "params": cfg.num_params(), "latent_thw": list(thw), "tokens": tokens, "text_len": text_len,
                  "attention_backend": backend, "activation_checkpointing": "full", "compiled": compiled,
                  "param_dtype": "bf16" if ctx.cuda else "fp32", "reduce_dtype": "fp32", "build_s": build_s,
                  ("compile_s" if compiled else "first_step_s"): first_s, "step_s": _r(step_s),
                  "tokens_per_s": _r(tokens / step_s), "tflop_per_step": _r(flops / 1e12), "tflops": _r(tflops),
                  "peak_tflops": _r(peak / 1e12) if peak else None, "peak_source": peak_src,
                  "mfu": _r(flops / step_s / peak) if peak else None, "peak_gib": peak_gib, "loss": _r(loss),
                  "device_name": torch.cuda.get_device_name() if ctx.cuda else "cpu"}
        if not compiled:
            with tempfile.TemporaryDirectory(dir=os.environ.get("GPU_CHECK_TMP")) as d:
                manager = CheckpointManager(d, keep_last_k=1)
                ctx.sync()
                t0 = time.perf_counter()
                path = manager.save(1, {"train": ModelOptimizerState(model, opt)})
                result["dcp_save_s"] = _r(time.perf_counter() - t0)
                result["dcp_gib"] = _r(sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path)
                                           for f in fs) / 2**30)
                t0 = time.perf_counter()
                manager.load(path, {"train": ModelOptimizerState(model, opt)})
                ctx.sync()
                result["dcp_load_s"] = _r(time.perf_counter() - t0)
            step()
            result["loss_after_load"] = _r(losses[-1].item())  # finite: the loaded state trains on
    finite = all(x == x and abs(x) != float("inf") for x in (result["loss"], result.get("loss_after_load", 0.0)))
    return {"status": "pass" if finite else "fail", **result}


# -------------------------------------------------------------------------------------------- summary
def summarize(path: str) -> dict:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    status = {r["section"]: r["status"] for r in rows}
    keys = {"kernels": ("worst",), "ring": ("block_kernel", "ring_ms", "ring_peak_gib", "ring_over_sdpa_err"),
            "dtypes": ("core_dtypes", "rope_dtypes", "error"), "compile": ("n_graph_breaks", "recompiles", "speedup"),
            "syncs": ("per_step_locations", "unexpected_per_step"),
            "step": ("step_s", "tokens_per_s", "tflops", "mfu", "peak_gib", "dcp_save_s", "dcp_load_s"),
            "step_compiled": ("compile_s", "step_s", "tokens_per_s", "tflops", "mfu", "peak_gib")}
    numbers = {r["section"]: {k: r.get(k) for k in keys.get(r["section"], ()) if k in r} for r in rows}
    failed = sorted(s for s, v in status.items() if v == "fail")
    return {"summary": True, "pass": not failed, "failed": failed, "status": status, "numbers": numbers}


def emit(result: dict, out: str | None) -> None:
    line = json.dumps(result, default=str)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("section", choices=(*SECTIONS, "summary"))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, fp32 where the GPU run uses bf16")
    p.add_argument("--out", default=None, help="append the section's JSON line here (summary: read it)")
    args = p.parse_args(argv)
    if args.section == "summary":
        if not args.out:
            p.error("summary needs --out (the results file the sections appended to)")
        result = summarize(args.out)
        print(json.dumps(result, default=str), flush=True)
        return 0 if result["pass"] else 1
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    ctx = Ctx(args.cpu_smoke)
    torch.manual_seed(0)
    runners = {"kernels": run_kernels, "ring": run_ring, "dtypes": run_dtypes, "compile": run_compile,
               "syncs": run_syncs, "step": run_step, "step_compiled": lambda c: run_step(c, compiled=True)}
    t0 = time.perf_counter()
    try:
        result = runners[args.section](ctx)
    except Exception as e:  # noqa: BLE001 - one JSON line per section, whatever happened
        traceback.print_exc()
        result = {"status": "fail", "error": f"{type(e).__name__}: {e}"[:500]}
    result = {"section": args.section, **result, "wall_s": _r(time.perf_counter() - t0),
              "device": "cpu (smoke)" if ctx.smoke else torch.cuda.get_device_name()}
    emit(result, args.out)
    return 1 if result["status"] == "fail" else 0


if __name__ == "__main__":
    sys.exit(main())

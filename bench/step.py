"""One training step of vdit's VideoDiT against diffusers' WanTransformer3DModel, same dimensions, same weights.

Run (CPU, fp32; let it have the machine to itself, timings on a loaded machine mean nothing)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/step.py                 # hidden 512, 4 blocks, 2048 tokens
    OMP_NUM_THREADS=2 .venv/bin/python bench/step.py --large         # hidden 1024, 8 blocks, 4096 tokens
    OMP_NUM_THREADS=2 .venv/bin/python bench/step.py --loader 24     # + what the data pipeline could feed
    OMP_NUM_THREADS=1 .venv/bin/python bench/step.py --hidden 64 --heads 2 --ffn 128 --depth 1 \
        --frames 2 --height 8 --width 8 --text-len 8 --text-dim 32 --reps 2 --warmup 1   # smoke run

A step is ``zero_grad`` -> forward -> MSE loss against a fixed target -> backward -> AdamW step, batch 1.
Both models are built in the same process: the diffusers model with its own random init (so every
weight, including the adaLN tables, is non-zero and every gradient flows), and vdit's model from its
tensors through :func:`vdit.model.wan.wan_to_vdit`, so they compute the same function (the forward
difference is printed as a check). Both get the same optimizer: AdamW with the parameter groups of
``vdit.train.optim.build_optimizer`` (weight decay on >= 2-D tensors only) and the same
``--optim`` implementation: ``fused`` by default, the fastest on CPU (AdamW over 16.8M fp32 parameters
on 2 cores: fused 13 ms, per-tensor loop 33 ms, foreach 51 ms), which is also what vdit trains with
(``optim.implementation=auto``); ``default`` is torch's own choice, the per-tensor loop on CPU.

Timing: ``--warmup`` untimed steps each, then ``--reps`` rounds; each round times one step of each
model, alternating which goes first, and one big ``torch.mm`` (``--gemm-n``) to measure this
machine's fp32 GEMM rate under the same conditions. Reported: min and median per model, the ratio
ours / reference (``ratio_vs_diffusers_wan`` from the minima; the medians' ratio beside it), the
FLOP count of a step (``3 x DiTConfig.flops_per_token * tokens``: forward matmuls plus a backward of
twice the forward, the same for both models), each model's achieved FLOP/s and its fraction of the
GEMM rate.

Profile: one more step of each model under ``torch.profiler`` with every op's self time attributed to
a category: attention (kernel, layout), projections (q/k/v/out Linears), norms+modulation (LayerNorms,
q/k RMSNorms and the block's modulate / gate / residual arithmetic), RoPE, MLP, optimizer (zero_grad
and step), other (embeddings, final layer, loss, gradient accumulation). Forward ops take the category
of the module they run in (forward hooks open a ``record_function`` range per module, only during the
profiled step); a backward op takes the category of the forward op that created its autograd node
(matched by sequence number). diffusers applies RoPE inline in its attention processor, so its RoPE
is counted in its attention.

The last line printed is one JSON object (``ratio_vs_diffusers_wan``, ``ours_s``, ``ref_s``,
``ours_gemm_frac``, ``ref_gemm_frac``, the profiles, ...).

Measured (2 cores of an AVX2 AMD EPYC, torch 2.13 CPU, diffusers 0.42.1, fused AdamW; fp32 GEMM
rate ~148 GFLOP/s; 288.5 GFLOP per base step, 4572 GFLOP per ``--large`` step):

    base   before 2.713 s vs 2.620 s = 1.035 (medians 1.030)   after 2.657 s vs 2.637 s = 1.008 (medians 0.999)
    large  before 43.56 s vs 41.03 s = 1.062 (medians 1.078)   after 40.84 s vs 40.92 s = 0.998

"before" is vdit at commit 5509c70, whose residual stream kept the transposed layout of the patch
embedding's output: every LayerNorm copied its input forward and backward (a LayerNorm over
(2048, 512) costs 10.7 ms forward + backward on the transposed view, 1.2 ms contiguous), 93 ms per
base step. Both steps are now the same kernels: the base step is 41 % attention (the same SDPA CPU
flash kernel in both, at ~40 % of the GEMM rate), 53 % Linear GEMMs, 4 % norms and modulation, 1 %
RoPE; what is not a GEMM or the attention kernel is under 8 % of diffusers' step, so no change outside
those kernels can reach ours / diffusers = 0.9 on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

import vdit.model.attention as vdit_attention
from vdit.model.dit import DiTConfig, VideoDiT
from vdit.model.wan import dit_config_from_diffusers, wan_to_vdit

CATEGORIES = ("attention", "projections", "norms+modulation", "rope", "mlp", "optimizer", "other")
SHAPES = {  # hidden, depth, heads, ffn, latent (T, H, W), text tokens, text width
    "base": dict(hidden=512, depth=4, heads=8, ffn=2048, frames=8, height=32, width=32, text_len=64, text_dim=512),
    "large": dict(hidden=1024, depth=8, heads=16, ffn=4096, frames=16, height=32, width=32, text_len=64,
                  text_dim=512),
}


# ------------------------------------------------------------------------------------------- models
def build_models(args) -> tuple[nn.Module, VideoDiT, DiTConfig]:
    """diffusers' Wan transformer (random init) and the VideoDiT holding the same tensors."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(args.seed)
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=args.heads,
                                attention_head_dim=args.hidden // args.heads, in_channels=16, out_channels=16,
                                text_dim=args.text_dim, freq_dim=256, ffn_dim=args.ffn, num_layers=args.depth,
                                cross_attn_norm=True, rope_max_seq_len=1024)
    cfg = dit_config_from_diffusers(ref.config)
    ours = VideoDiT(cfg)
    ours.load_state_dict(wan_to_vdit(ref.state_dict(), cfg))
    return ref.train(), ours.train(), cfg


def build_adamw(model: nn.Module, impl: str) -> torch.optim.Optimizer:
    """AdamW with ``vdit.train.optim.build_optimizer``'s groups (default OptimConfig values), ``impl`` kernels."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    kwargs = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, **kwargs)


def make_inputs(args, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, args.frames, args.height, args.width, generator=g)
    return {"x": x, "t": torch.rand(1, generator=g), "text": torch.randn(1, args.text_len, args.text_dim, generator=g),
            "target": torch.randn(x.shape, generator=g)}


def ours_forward(model: VideoDiT, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(inp["x"], inp["t"], inp["text"])  # (1, 16, T, H, W)


def ref_forward(model: nn.Module, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(inp["x"], inp["t"] * 1000, inp["text"], return_dict=False)[0]  # diffusers' timestep is 0..1000


def train_step(model: nn.Module, forward: Callable, opt: torch.optim.Optimizer, inp: dict[str, torch.Tensor],
               label: Callable[[str], object] | None = None) -> None:
    """zero_grad, forward, loss, backward, AdamW step (``label(name)`` wraps the optimizer calls when profiling)."""
    with label("optimizer") if label else _nothing():
        opt.zero_grad(set_to_none=True)
    loss = F.mse_loss(forward(model, inp), inp["target"])
    loss.backward()
    with label("optimizer") if label else _nothing():
        opt.step()


@contextmanager
def _nothing():
    yield


# ------------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gemm_seconds(n: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm
    return min(timed(lambda: torch.mm(a, b)) for _ in range(2))


# ----------------------------------------------------------------------------------------- profile
def _tag(name: str) -> str:
    return f"bench::{name}"


def ours_categories(model: VideoDiT) -> dict[nn.Module, str]:
    """Module -> category for vdit; what is not inside one of them is ``other``."""
    cats: dict[nn.Module, str] = {}
    for block in model.blocks:
        cats[block] = "norms+modulation"  # modulate, gates, residual adds run in the block itself
        for m in (block.norm1, block.norm2, block.norm_cross):
            cats[m] = "norms+modulation"
        cats[block.mlp] = "mlp"
        for attn in (block.attn, block.cross_attn):
            cats[attn] = "attention"  # the kernel and the layout work around it
            for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                cats[p] = "projections"
            cats[attn.q_norm] = cats[attn.k_norm] = "norms+modulation"
    return cats


def ref_categories(model: nn.Module) -> dict[nn.Module, str]:
    """Module -> category for diffusers' Wan (RoPE is inline in its attention processor: counted as attention)."""
    cats: dict[nn.Module, str] = {}
    for block in model.blocks:
        cats[block] = "norms+modulation"
        for m in (block.norm1, block.norm2, block.norm3):
            cats[m] = "norms+modulation"
        cats[block.ffn] = "mlp"
        for attn in (block.attn1, block.attn2):
            cats[attn] = "attention"
            for p in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
                cats[p] = "projections"
            cats[attn.norm_q] = cats[attn.norm_k] = "norms+modulation"
    return cats


@contextmanager
def labelled(cats: dict[nn.Module, str]):
    """Open a ``record_function`` range named after the category around each listed module's forward."""
    handles = []
    for module, cat in cats.items():
        stack: list = []

        def pre(_m, _a, stack=stack, cat=cat):
            rf = torch.autograd.profiler.record_function(_tag(cat))
            rf.__enter__()
            stack.append(rf)

        def post(_m, _a, _o, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def rope_labelled():
    """vdit's RoPE is a function called inside Attention.forward: wrap it for the profiled step only."""
    original = vdit_attention.apply_rotary

    def apply_rotary(*a, **k):
        with torch.autograd.profiler.record_function(_tag("rope")):
            return original(*a, **k)

    vdit_attention.apply_rotary = apply_rotary
    try:
        yield
    finally:
        vdit_attention.apply_rotary = original


def attribute(events, ops: dict[tuple[str, str], float] | None = None) -> dict[str, float]:
    """Self CPU seconds per category: a forward op inherits the innermost ``bench::`` range around it; a
    backward node (``autograd::engine::evaluate_function: ...``) the category of the forward op with
    its sequence number; everything else the category of its parent (``other`` at the top). ``ops``, if
    given, receives the seconds per ``(category, op name)``."""
    by_seq: dict[int, str] = {}
    out: dict[str, float] = defaultdict(float)
    roots = [e for e in events if e.cpu_parent is None]
    roots.sort(key=lambda e: e.time_range.start)

    def walk(e, cat: str, backward: bool) -> None:
        if e.name.startswith("bench::"):
            cat = e.name[len("bench::"):]
        elif e.name.startswith("autograd::engine::evaluate_function"):
            backward = True
            cat = by_seq.get(e.sequence_nr, "other")
        elif not backward and e.sequence_nr is not None and e.sequence_nr >= 0:
            by_seq.setdefault(e.sequence_nr, cat)
        out[cat] += e.self_cpu_time_total / 1e6
        if ops is not None:
            ops[(cat, e.name)] = ops.get((cat, e.name), 0.0) + e.self_cpu_time_total / 1e6
        for child in sorted(e.cpu_children, key=lambda c: c.time_range.start):
            walk(child, cat, backward)

    for root in roots:
        walk(root, "other", False)
    return dict(out)


def profile_step(model, forward, opt, inp, cats, rope: bool) -> tuple[dict[str, float], float, dict]:
    """Categorised self times of one step, the step's wall time under the profiler, seconds per (category, op)."""
    label = lambda name: torch.autograd.profiler.record_function(_tag(name))  # noqa: E731
    with labelled(cats), (rope_labelled() if rope else _nothing()):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            wall = timed(lambda: train_step(model, forward, opt, inp, label))
    ops: dict[tuple[str, str], float] = {}
    times = attribute(prof.events(), ops)
    ordered = {c: times.get(c, 0.0) for c in CATEGORIES} | {k: v for k, v in times.items() if k not in CATEGORIES}
    return ordered, wall, ops


def print_profile(name: str, times: dict[str, float], wall: float, ops: dict, top_ops: int = 0) -> None:
    total = sum(times.values())
    print(f"profile of {name}'s step: {wall:.3f} s under the profiler, {total:.3f} s of op self time")
    for cat, s in times.items():
        best = sorted(((t, n) for (c, n), t in ops.items() if c == cat), reverse=True)[:top_ops]
        top = "   " + ", ".join(f"{n.removeprefix('aten::')} {1e3 * t:.0f} ms" for t, n in best) if best else ""
        print(f"  {cat:<18} {s:8.3f} s  {100 * s / total:5.1f} %{top}")


# -------------------------------------------------------------------------------------------- main
def loader_rates(args, clips: int, workers: tuple[int, ...] = (1, 2)) -> dict[str, float]:
    """Batches per second the data pipeline delivers at the step's pixel shape (batch 1, alone).

    The latent ``(frames, height, width)`` maps to pixels through the Wan VAE's compression (4x in
    time, causal first frame: ``1 + 4 (frames - 1)``; 8x in space), e.g. 8 x 32 x 32 -> 29 frames
    of 256 x 256. ``clips`` H.264 clips of that shape (bench/loader_bench.py's moving noisy pattern)
    are written to webdataset shards in a temporary folder and read by ``VideoPipeline`` (decode,
    resize, float conversion) with each number of DataLoader workers, timed from the first batch.
    Measured without a model stepping beside it: what the loader could feed, not what it feeds
    while the step shares the CPU.
    """
    import os
    import sys
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as bench/step.py too
    from bench.loader_bench import make_clip, write_shards
    from vdit.data.pipeline import ClipSpec, VideoPipeline

    frames, height, width = 1 + 4 * (args.frames - 1), 8 * args.height, 8 * args.width
    out = {}
    with tempfile.TemporaryDirectory() as d:
        write_shards(d, [make_clip(i, frames + 8, max(height, width)) for i in range(clips)],
                     per_shard=max(1, clips // 8))  # enough shards for 2 workers
        spec = ClipSpec(frames, height, width, target_fps=None, frame_stride=1, seed=args.seed)
        for w in workers:
            it = iter(VideoPipeline(d, spec, batch_size=1, num_workers=w))
            first = next(it)
            assert tuple(first["video"].shape) == (1, 3, frames, height, width)
            t0 = time.perf_counter()
            for _ in range(clips - 1):
                next(it)
            out[f"loader_batches_per_s_{w}w"] = (clips - 1) / (time.perf_counter() - t0)
            del it
    return out


def _r(value: float) -> float:
    return float(f"{value:.4g}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--large", action="store_true", help="hidden 1024, 8 blocks, 16 heads, FFN 4096, 16x32x32 latent")
    for name in SHAPES["base"]:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"override ({SHAPES['base'][name]})")
    p.add_argument("--reps", type=int, default=6, help="timed rounds (one step of each model per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each model first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: OMP_NUM_THREADS)")
    p.add_argument("--optim", choices=("fused", "foreach", "default"), default="fused",
                   help="AdamW implementation, the same for both models")
    p.add_argument("--gemm-n", type=int, default=2048, help="size of the square torch.mm giving the GEMM rate")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--top-ops", type=int, default=0, help="also print the N costliest ops of each profile category")
    p.add_argument("--loader", type=int, default=0, metavar="CLIPS",
                   help="also time the data pipeline over CLIPS clips at this step's pixel shape, 1 and 2 workers")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    shape = SHAPES["large" if args.large else "base"]
    for name, value in shape.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ref, ours, cfg = build_models(args)
    tokens = ours.num_tokens(args.frames, args.height, args.width)
    flops = 3 * cfg.flops_per_token(tokens, args.text_len) * tokens  # forward + backward (2x forward), batch 1
    inp = make_inputs(args, args.seed + 1)
    with torch.no_grad():
        diff = (ours_forward(ours, inp) - ref_forward(ref, inp)).abs().max().item()
    print(f"shape: hidden {cfg.hidden_size}, {cfg.depth} blocks, {cfg.num_heads} heads, FFN {cfg.mlp_hidden}, "
          f"latent 16x{args.frames}x{args.height}x{args.width} -> {tokens} tokens, "
          f"text {args.text_len}x{args.text_dim}; "
          f"{sum(p.numel() for p in ours.parameters()):,} parameters (diffusers "
          f"{sum(p.numel() for p in ref.parameters()):,}); fp32, batch 1, {torch.get_num_threads()} threads, "
          f"AdamW {args.optim}")
    print(f"forward max |ours - diffusers| = {diff:.3g}")
    print(f"FLOPs per step (both): {flops / 1e9:.1f} GFLOP")
    runs = {"ours": (ours, ours_forward, build_adamw(ours, args.optim)),
            "ref": (ref, ref_forward, build_adamw(ref, args.optim))}
    for _ in range(args.warmup):
        for model, fwd, opt in runs.values():
            train_step(model, fwd, opt, inp)
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    gemm = [gemm_seconds(args.gemm_n)]
    for rep in range(args.reps):
        for name in (("ours", "ref") if rep % 2 == 0 else ("ref", "ours")):
            model, fwd, opt = runs[name]
            times[name].append(timed(lambda: train_step(model, fwd, opt, inp)))
        gemm.append(gemm_seconds(args.gemm_n))
        print(f"  round {rep}: ours {times['ours'][-1]:.3f} s, ref {times['ref'][-1]:.3f} s, "
              f"gemm {2 * args.gemm_n ** 3 / gemm[-1] / 1e9:.1f} GFLOP/s")
    gemm_rate = 2 * args.gemm_n ** 3 / min(gemm)
    summary = {}
    for name in ("ours", "ref"):
        lo, med = min(times[name]), statistics.median(times[name])
        summary[name] = (lo, med)
        print(f"{name:>4}: min {lo:.3f} s, median {med:.3f} s; {flops / lo / 1e9:.1f} GFLOP/s = "
              f"{flops / lo / gemm_rate:.2f} of the fp32 GEMM rate ({gemm_rate / 1e9:.1f} GFLOP/s, "
              f"torch.mm {args.gemm_n}^3)")
    ratio = summary["ours"][0] / summary["ref"][0]
    ratio_med = summary["ours"][1] / summary["ref"][1]
    print(f"ours / diffusers: {ratio:.3f} (minima), {ratio_med:.3f} (medians)")
    result = {"ratio_vs_diffusers_wan": _r(ratio), "ratio_median": _r(ratio_med),
              "ours_s": _r(summary["ours"][0]), "ref_s": _r(summary["ref"][0]),
              "ours_median_s": _r(summary["ours"][1]), "ref_median_s": _r(summary["ref"][1]),
              "ours_gemm_frac": _r(flops / summary["ours"][0] / gemm_rate),
              "ref_gemm_frac": _r(flops / summary["ref"][0] / gemm_rate),
              "gflop_per_step": _r(flops / 1e9), "gemm_gflops": _r(gemm_rate / 1e9),
              "tokens": tokens, "threads": torch.get_num_threads(), "optim": args.optim, "forward_max_diff": diff}
    if args.loader:
        rates = loader_rates(args, args.loader)
        step_rate = 1 / summary["ours"][0]
        print(f"loader (batch 1, {1 + 4 * (args.frames - 1)} x {8 * args.height} x {8 * args.width} pixels): " +
              ", ".join(f"{v:.2f} batches/s with {k.split('_')[-1][:-1]} worker(s)" for k, v in rates.items()) +
              f"; our step runs {step_rate:.3f} steps/s: headroom " +
              ", ".join(f"{v / step_rate:.1f}x" for v in rates.values()))
        result.update({k: _r(v) for k, v in rates.items()}, steps_per_s=_r(step_rate))
    if not args.no_profile:
        prof_ours, wall, ops = profile_step(ours, ours_forward, runs["ours"][2], inp, ours_categories(ours), rope=True)
        print_profile("ours", prof_ours, wall, ops, args.top_ops)
        prof_ref, wall, ops = profile_step(ref, ref_forward, runs["ref"][2], inp, ref_categories(ref), rope=False)
        print_profile("diffusers", prof_ref, wall, ops, args.top_ops)
        result["profile_ours_s"] = {k: _r(v) for k, v in prof_ours.items()}
        result["profile_ref_s"] = {k: _r(v) for k, v in prof_ref.items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

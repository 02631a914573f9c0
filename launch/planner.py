"""vdit-plan: per-GPU memory and step time of every parallel layout, before anyone books a cluster.

    vdit-plan model=14b frames=81 height=720 width=1280 gpu=h100 gpus_per_node=8 nodes=8 [batch=1]
              [precision=bf16] [text_len=512] [mfu=0.35] [text_encoder=umt5-xxl] [ema=true] [--json]

Every layout ``backend x sp_size x activation checkpointing`` is estimated; the cheapest one that
fits (least cluster time per sample, then least memory) is recommended with its ``vdit-train`` overrides.
Sizes are bytes in the API and GiB (2**30 bytes, like ``mem/peak_gb`` in metrics.jsonl) in the output.

Memory model, per GPU (``P`` parameters, ``N = world`` ranks, ``cb`` compute bytes: 2 bf16, 4 fp32):

* Sharding degree ``N`` for every backend: FSDP2 shards over ``dims.fsdp_mesh`` (the SP dim folded
  into ``dp_shard``: ``dp_shard x sp = world`` with ``dp_replicate=1``), DeepSpeed partitions over its
  data-parallel group, which is the whole world including the SP ranks (train/parallel/deepspeed.py).
* ``fsdp2``: sharded parameters stay fp32 and are the optimizer's (master) weights: params ``4P/N``,
  grads ``4P/N`` (fp32, like the sharded params), AdamW ``8P/N`` (exp_avg + exp_avg_sq), EMA ``4P/N``
  (train/ema.py clones the DTensor shards in fp32). Transient ``gathered``: two blocks' params in
  ``param_dtype`` (current + prefetched), one block's unsharded grad in ``param_dtype`` plus its
  ``reduce_dtype=fp32`` copy for the reduce-scatter, and the root's non-block params.
* ``zero1``/``zero2``/``zero3`` (DeepSpeed, ``bf16.enabled`` turns the module bf16): module params
  ``cbP`` (``cbP/N`` in ZeRO-3), fp32 master partition ``4P/N``, grads ``cbP`` (ZeRO-1) or ``cbP/N``
  (ZeRO-2/3) plus the fp32 gradient partition ``4P/N`` of the step, AdamW ``8P/N``. EMA: ``4P``
  replicated in ZeRO-1/2 (the Trainer's EMA clones the plain module's bf16 params to fp32 on every
  rank); ZeRO-3 is not wired into the Trainer (train/trainer.py raises), it is listed as
  unsupported with a hypothetical sharded EMA ``4P/N``. Transient: the ``reduce_bucket_size=5e8``
  element gradient bucket (``cb`` bytes each), plus in ZeRO-3 two gathered blocks and the root.
* Activations (:func:`block_saved_tensors`): the tensors one DiT block saves for backward, counted
  on this code (tests/test_planner.py measures them on CPU with ``saved_tensors_hooks``): per token
  ``23 D + 2 D_mlp`` values with cross-attention and QK-norm, plus per block the text-side K/V
  tensors (``Lc`` tokens, not split by SP), plus the final layer ``3 D`` per token. With
  ``precision=bf16`` (CUDA autocast) the tensors made by LayerNorm/RMSNorm (fp32 ops under autocast)
  are counted at 4 bytes, everything feeding a matmul or attention kernel at 2 bytes. SDPA/flash
  save only q, k, v, out and the log-sum-exp (no ``L x L`` matrix). Tokens per GPU
  ``ceil(L / sp)`` (Ulysses: the head-sharded q/k/v/out have the same size). ``ac=none``: all
  ``depth`` blocks; ``ac=full``: the ``depth`` block inputs (``D`` values, ``cb`` bytes) plus one
  block recomputed in backward. Backward temporaries (activation gradients) are left to the allowance.
* Frozen encoders are counted on the fullest GPU: on video shards every rank holds them; on
  ``vdit-encode`` latent shards every rank builds them at the first in-loop evaluation (pass
  ``text_encoder=none`` to plan a latent run without in-loop sampling): UMT5-XXL encoder ~5.68e9 params (d_model 4096, d_ff
  10240, 24 layers, vocab 256384), MiniLM-L6 ~22.7e6, Wan 2.1 VAE ~127e6 in fp32 (config default).
  Encoding pixels during training (no ``vdit-encode``) adds the VAE's own peak: not modelled.
* Allowance: ``10 %`` of the sum + ``1.5 GiB`` (CUDA context, NCCL buffers, allocator fragmentation).

Time model: ``training_flops`` (forward + backward model FLOPs, vdit.train.flops) per sample,
``x 4/3`` with ``ac=full`` (one extra forward), divided by ``world x peak x mfu``; ``mfu`` is the
hardware efficiency on executed FLOPs. The Ulysses all-to-alls (4 tensors of ``L/sp x D`` per block,
forward and backward, and again in the recompute) are added at a rough intra-node bandwidth per GPU
(:data:`ALLTOALL_GBPS`), not overlapped; FSDP/ZeRO collectives are assumed hidden behind compute.
Layouts are ranked by cluster time per sample (``step_s / global batch``): the global batch is
``batch x world / sp``, so step times of different ``sp`` are not comparable by themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field

import torch

from vdit.model.dit import DiTConfig, VideoDiT, num_tokens
from vdit.train.config import VAE_COMPRESSION
from vdit.train.flops import ACCELERATOR_PEAK_FLOPS, training_flops

__all__ = ["ACCELERATOR_MEMORY_GIB", "ALLTOALL_GBPS", "TEXT_ENCODERS", "VAE_PARAMS", "BACKENDS", "AC_OPTIONS",
           "Layout", "MemoryBreakdown", "Estimate", "load_model_config", "latent_shape", "param_counts",
           "block_saved_tensors", "activation_bytes", "memory_breakdown", "sp_options", "plan", "recommend", "main"]

GIB = 2 ** 30
ACCELERATOR_MEMORY_GIB = {"h100-sxm": 80, "h100-pcie": 80, "h100-nvl": 94, "h200": 141, "a100": 80, "a100-40": 40,
                          "b200": 192, "mi300x": 192, "l40s": 48}
"""Memory per GPU, GiB (datasheet capacity; the allowance covers what the driver keeps)."""
ALLTOALL_GBPS = {"h100-sxm": 350, "h100-nvl": 300, "h100-pcie": 40, "h200": 350, "a100": 230, "a100-40": 230,
                 "b200": 700, "mi300x": 300, "l40s": 25}
"""Rough achievable intra-node all-to-all bandwidth per GPU, GB/s (NVLink/xGMI/PCIe at ~75 %)."""
TEXT_ENCODERS = {"umt5-xxl": (4096, 5.68e9), "minilm": (384, 22.7e6), "none": (None, 0.0)}
"""Text encoder -> (hidden size = model.text_dim, approximate parameter count)."""
VAE_PARAMS = {"wan": 127e6, "hunyuan": 246e6, "cogvideox": 216e6, "identity": 0.0}
"""Autoencoder -> approximate parameter count (resident in fp32, the config default)."""
BACKENDS = ("fsdp2", "zero1", "zero2", "zero3")
AC_OPTIONS = ("none", "full")
OVERHEAD_FRACTION, OVERHEAD_BYTES = 0.10, int(1.5 * GIB)
DS_REDUCE_BUCKET = int(5e8)  # elements, train/parallel/deepspeed.py reduce_bucket_size


@dataclass(frozen=True)
class Layout:
    """One parallel layout: ``backend`` in :data:`BACKENDS`, Ulysses ``sp_size``, ``ac`` in :data:`AC_OPTIONS`."""

    backend: str
    sp_size: int
    ac: str

    @property
    def name(self) -> str:
        return f"{self.backend}/sp{self.sp_size}/ac-{self.ac}"

    @property
    def supported(self) -> bool:
        """False for DeepSpeed ZeRO-3, which the Trainer refuses (its EMA does not follow ZeRO-3 partitions)."""
        return self.backend != "zero3"

    def overrides(self, precision: str = "bf16") -> list[str]:
        """The ``vdit-train`` overrides selecting this layout (keys of ``conf/parallel/*.yaml`` / ParallelConfig)."""
        if self.backend == "fsdp2":
            out = ["parallel.backend=fsdp", "parallel.dp_replicate=1", "parallel.dp_shard=-1"]
            out.append(f"parallel.param_dtype={'bf16' if precision == 'bf16' else 'fp32'}")
        else:
            out = ["parallel.backend=deepspeed", f"parallel.zero_stage={self.backend[-1]}", "parallel.dp_shard=-1"]
        out += [f"parallel.sp_size={self.sp_size}", "parallel.sp_mode=ulysses",
                f"parallel.activation_checkpointing={self.ac}", f"train.precision={precision}"]
        return out


@dataclass
class MemoryBreakdown:
    """Per-GPU bytes by category (see the module docstring for each formula)."""

    params: int = 0
    master: int = 0
    grads: int = 0
    optim: int = 0
    ema: int = 0
    gathered: int = 0
    activations: int = 0
    encoders: int = 0
    overhead: int = 0

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def gib(self) -> dict[str, float]:
        """Every field and ``total`` in GiB."""
        out = {k: v / GIB for k, v in asdict(self).items()}
        out["total"] = self.total / GIB
        return out


@dataclass
class Estimate:
    """A layout's estimate: ``memory`` (bytes per GPU), ``fits`` (total <= capacity), ``step_s`` (seconds
    per optimizer step of ``batch`` samples per data-parallel rank), ``sample_s`` (step_s / global batch),
    ``sp_comm_s`` (the all-to-all part of ``step_s``)."""

    layout: Layout
    world: int
    dp: int
    global_batch: int
    tokens_per_gpu: int
    memory: MemoryBreakdown
    capacity: int
    step_s: float
    sp_comm_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.capacity

    @property
    def sample_s(self) -> float:
        return self.step_s / self.global_batch

    def to_dict(self, precision: str = "bf16") -> dict:
        return {"layout": self.layout.name, "backend": self.layout.backend, "sp_size": self.layout.sp_size,
                "activation_checkpointing": self.layout.ac, "supported": self.layout.supported, "world": self.world,
                "dp": self.dp, "global_batch": self.global_batch, "tokens_per_gpu": self.tokens_per_gpu,
                "memory_gib": self.memory.gib(), "capacity_gib": self.capacity / GIB, "fits": self.fits,
                "step_s": self.step_s, "sample_s": self.sample_s, "sp_comm_s": self.sp_comm_s,
                "overrides": self.layout.overrides(precision), "notes": self.notes}


# ------------------------------------------------------------------------------------------ inputs
def load_model_config(name: str, overrides: list[str] | tuple[str, ...] = (), text_dim: int | None = None) -> DiTConfig:
    """A ``conf/model/<name>.yaml`` preset composed through Hydra like vdit-train does (``load_config``),
    with ``model.*`` ``overrides`` and ``model.text_dim`` following ``text_dim`` (the text encoder's width)."""
    from vdit.train.config import load_config, validate

    extra = [] if text_dim is None else [f"text_encoder.hidden_size={text_dim}"]
    return validate(load_config([f"model={name}", *extra, *overrides])).model


def latent_shape(model_cfg: DiTConfig, frames: int, height: int, width: int, vae: str = "wan") -> tuple[int, ...]:
    """``(C, T', H', W')`` of one clip: ``vae`` compression from ``vdit.train.config.VAE_COMPRESSION``
    (Wan: ``T' = 1 + (T - 1) // 4``, ``H' = H / 8``, causal), ``C = model.in_channels``.

    Raises:
        ValueError: the frames/pixels do not fit the compression, or the latent not the patch size.
    """
    if vae not in VAE_COMPRESSION:
        raise ValueError(f"vae={vae!r} is not one of {sorted(VAE_COMPRESSION)}")
    ct, cs, causal = VAE_COMPRESSION[vae]
    if (frames - causal) % ct or height % cs or width % cs or frames < 1:
        need = f"frames = 1 + {ct} k" if causal else f"frames divisible by {ct}"
        raise ValueError(f"frames={frames} height={height} width={width} do not fit vae={vae} ({need}, height "
                         f"and width divisible by {cs})")
    shape = (model_cfg.in_channels, 1 + (frames - 1) // ct if causal else frames // ct, height // cs, width // cs)
    num_tokens(model_cfg, shape)  # raises if the patch size does not divide the latent
    return shape


_PARAM_CACHE: dict[str, tuple[int, int, int]] = {}


def param_counts(model_cfg: DiTConfig) -> tuple[int, int, int]:
    """``(total, per block, root = outside the blocks)`` parameters, counted on a meta-device VideoDiT
    (the same count as ``DiTConfig.num_params()``); cached per config."""
    key = repr(model_cfg)
    if key not in _PARAM_CACHE:
        with torch.device("meta"):
            model = VideoDiT(model_cfg)
        total = sum(p.numel() for p in model.parameters())
        block = sum(p.numel() for p in model.blocks[0].parameters())
        _PARAM_CACHE[key] = (total, block, total - block * len(model.blocks))
    return _PARAM_CACHE[key]


# ------------------------------------------------------------------------------------- activations
def block_saved_tensors(model_cfg: DiTConfig) -> list[tuple[str, str, int, bool]]:
    """The activations one :class:`~vdit.model.dit.DiTBlock` saves for backward, as
    ``(name, per, width, fp32_under_autocast)``: ``per`` is ``"token"`` (video tokens) or ``"text"``
    (text tokens); ``width`` values per token; the flag marks tensors that LayerNorm/RMSNorm (fp32 ops
    under CUDA autocast) make or read, stored in fp32 even in a bf16 run (taken from the autocast op
    lists, not measured: the CPU test runs fp32). RMSNorm is counted as the composite op measured on
    CPU (its input and the normalised value); a fused kernel saves less."""
    d, dm, qk, cross = model_cfg.hidden_size, model_cfg.mlp_hidden, model_cfg.qk_norm, model_cfg.cross_attention
    rows = [("norm1 input", "token", d, True), ("norm1 output (modulate)", "token", d, True),
            ("q/k/v input", "token", d, False)]
    rows += [(f"{n}_norm {w}", "token", d, True) for n in "qk" for w in ("input", "normalised") if qk]
    rows += [(f"sdpa {n}", "token", d, False) for n in ("q (rope)", "k (rope)", "v", "out")]
    rows += [("attn out_proj output (gate)", "token", d, False)]
    if cross:
        rows += [("norm_cross input", "token", d, True), ("cross q input", "token", d, False)]
        rows += [(f"cross {n}_norm {w}", per, d, True) for n, per in (("q", "token"), ("k", "text"))
                 for w in ("input", "normalised") if qk]
        rows += [("cross sdpa q", "token", d, False), ("cross sdpa out", "token", d, False),
                 ("cross out_proj input", "token", d, False), ("cross sdpa k", "text", d, False),
                 ("cross sdpa v", "text", d, False)]
    return rows + [("norm2 input", "token", d, True), ("norm2 output (modulate)", "token", d, True),
                   ("fc1 input", "token", d, False), ("gelu input", "token", dm, False),
                   ("fc2 input", "token", dm, False), ("mlp output (gate)", "token", d, False)]


def activation_bytes(model_cfg: DiTConfig, tokens_per_gpu: int, text_len: int, batch_size: int = 1,
                     ac: str = "none", precision: str = "bf16", latent_values_per_gpu: int = 0) -> int:
    """Bytes saved for backward on one GPU (see the module docstring).

    Args:
        tokens_per_gpu: video tokens this GPU holds per sample (``ceil(L / sp)``).
        text_len: text tokens per sample (replicated on every SP rank).
        batch_size: micro-batch per GPU.
        ac: ``none`` (every block's tensors) or ``full`` (block inputs + one recomputed block).
        precision: ``bf16`` (autocast: 2 bytes, fp32 for norm tensors) or ``fp32`` (4 bytes).
        latent_values_per_gpu: latent values per sample (patch embedding and output side, fp32).
    """
    if ac not in AC_OPTIONS:
        raise ValueError(f"ac={ac!r} is not one of {list(AC_OPTIONS)}")
    cb = 2 if precision == "bf16" else 4
    rows = {"token": tokens_per_gpu, "text": text_len}
    block = sum(rows[per] * width * (4 if fp32 else cb) for _, per, width, fp32 in block_saved_tensors(model_cfg))
    d = model_cfg.hidden_size
    # outside the blocks: final layer (LayerNorm input + output fp32, linear input), text context and the
    # latent-sized tensors of patch embedding / output (x0 conversion), RoPE tables (L, head_dim) x 2 fp32
    outside = tokens_per_gpu * d * (8 + cb) + text_len * d * cb + 3 * latent_values_per_gpu * 4
    outside += 2 * tokens_per_gpu * model_cfg.head_dim * 4
    if ac == "full":
        saved = model_cfg.depth * tokens_per_gpu * d * cb + block  # block inputs + one recomputed block
    else:
        saved = model_cfg.depth * block
    return int(batch_size * (saved + outside))


# ------------------------------------------------------------------------------------------ memory
def _accelerator(gpu: str) -> tuple[str, float, int]:
    """``(key, peak FLOP/s, capacity bytes)`` of an accelerator name (``h100`` -> ``h100-sxm``)."""
    key = {"h100": "h100-sxm", "a100-80": "a100"}.get(gpu.lower(), gpu.lower())
    if key not in ACCELERATOR_MEMORY_GIB:
        raise ValueError(f"unknown gpu {gpu!r}; known: {', '.join(sorted(ACCELERATOR_MEMORY_GIB))} (and h100)")
    return key, ACCELERATOR_PEAK_FLOPS["a100" if key == "a100-40" else key], ACCELERATOR_MEMORY_GIB[key] * GIB


def memory_breakdown(model_cfg: DiTConfig, frames: int, height: int, width: int, layout: Layout, world: int,
                     batch_size: int = 1, precision: str = "bf16", text_len: int = 512, text_encoder: str = "umt5-xxl",
                     text_dtype: str = "bf16", vae: str = "wan", ema: bool = True) -> MemoryBreakdown:
    """Per-GPU bytes of ``layout`` on ``world`` GPUs for clips of ``frames x height x width`` pixels.

    Args:
        world: total GPUs (the sharding degree of every backend, see the module docstring).
        batch_size: micro-batch per data-parallel rank (``data.batch_size``).
        precision: ``bf16`` or ``fp32`` (``train.precision``).
        text_len: padded caption tokens (``text_encoder.max_length``).
        text_encoder, text_dtype: resident text encoder (:data:`TEXT_ENCODERS`) and its weight dtype.
        vae: autoencoder name (compression and resident weights, fp32).
        ema: count the EMA shadow (``train.ema_decay`` is always set in vdit, so normally True).
    """
    if layout.backend not in BACKENDS:
        raise ValueError(f"backend={layout.backend!r} is not one of {list(BACKENDS)}")
    if precision not in ("bf16", "fp32") or text_dtype not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r} and text_dtype={text_dtype!r} must be bf16 or fp32")
    if text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"text_encoder={text_encoder!r} is not one of {sorted(TEXT_ENCODERS)}")
    cb = 2 if precision == "bf16" else 4
    P, blk, root = param_counts(model_cfg)
    n = world
    m = MemoryBreakdown()
    if layout.backend == "fsdp2":
        m.params, m.grads, m.optim = 4 * P // n, 4 * P // n, 8 * P // n
        m.ema = 4 * P // n if ema else 0
        m.gathered = 2 * blk * cb + blk * (cb + (4 if cb != 4 else 0)) + root * cb
    else:
        stage = int(layout.backend[-1])
        m.params = cb * P // (n if stage == 3 else 1)
        m.master, m.optim = 4 * P // n, 8 * P // n
        m.grads = cb * P // (1 if stage == 1 else n) + 4 * P // n
        m.ema = (4 * P // (n if stage == 3 else 1)) if ema else 0
        m.gathered = DS_REDUCE_BUCKET * cb + ((2 * blk + root) * cb if stage == 3 else 0)
    shape = latent_shape(model_cfg, frames, height, width, vae)
    tokens = num_tokens(model_cfg, shape)
    sp = layout.sp_size
    m.activations = activation_bytes(model_cfg, math.ceil(tokens / sp), text_len, batch_size, layout.ac, precision,
                                     latent_values_per_gpu=math.prod(shape))
    _, text_params = TEXT_ENCODERS[text_encoder]
    m.encoders = int(text_params * (2 if text_dtype == "bf16" else 4) + VAE_PARAMS.get(vae, 0.0) * 4)
    m.overhead = int(OVERHEAD_FRACTION * m.total) + OVERHEAD_BYTES
    return m


# -------------------------------------------------------------------------------------------- plan
def sp_options(model_cfg: DiTConfig, gpus_per_node: int) -> list[int]:
    """Ulysses degrees offered: divisors of ``gpus_per_node`` (SP stays inside a node) that divide ``num_heads``."""
    return [s for s in range(1, gpus_per_node + 1) if gpus_per_node % s == 0 and model_cfg.num_heads % s == 0]


def plan(model_cfg: DiTConfig, frames: int, height: int, width: int, gpu: str, gpus_per_node: int, nodes: int,
         batch_size: int = 1, precision: str = "bf16", text_len: int = 512, mfu: float = 0.35,
         text_encoder: str = "umt5-xxl", text_dtype: str = "bf16", vae: str = "wan", ema: bool = True) -> list[Estimate]:
    """Estimate every layout (:data:`BACKENDS` x :func:`sp_options` x :data:`AC_OPTIONS`) on
    ``nodes x gpus_per_node`` GPUs of kind ``gpu``; arguments as :func:`memory_breakdown`, ``mfu`` in (0, 1].

    Returns the estimates, best first: supported layouts that fit, by seconds per sample, then by
    memory; then the rest (unsupported or not fitting) by memory.
    """
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} must be in (0, 1]")
    if gpus_per_node < 1 or nodes < 1 or batch_size < 1:
        raise ValueError("gpus_per_node, nodes and batch must be >= 1")
    key, peak, capacity = _accelerator(gpu)
    world = gpus_per_node * nodes
    shape = latent_shape(model_cfg, frames, height, width, vae)
    tokens = num_tokens(model_cfg, shape)
    flops_sample = training_flops(model_cfg, shape, text_len, 1)
    cb = 2 if precision == "bf16" else 4
    out = []
    for backend in BACKENDS:
        for sp in sp_options(model_cfg, gpus_per_node):
            for ac in AC_OPTIONS:
                layout = Layout(backend, sp, ac)
                dp = world // sp
                mem = memory_breakdown(model_cfg, frames, height, width, layout, world, batch_size, precision,
                                       text_len, text_encoder, text_dtype, vae, ema)
                factor = 4.0 / 3.0 if ac == "full" else 1.0
                compute = flops_sample * batch_size * dp * factor / (world * peak * mfu)
                passes = 3 if ac == "full" else 2  # forward, backward (+ recompute)
                a2a = 4 * passes * model_cfg.depth * batch_size * math.ceil(tokens / sp) * model_cfg.hidden_size * cb
                comm = a2a * (sp - 1) / sp / (ALLTOALL_GBPS[key] * 1e9) if sp > 1 else 0.0
                notes = [] if layout.supported else ["DeepSpeed ZeRO-3 is not wired into the Trainer"]
                if backend in ("zero1", "zero2") and ema:
                    notes.append("EMA replicated in fp32 (4 B/param) under DeepSpeed ZeRO-1/2")
                out.append(Estimate(layout, world, dp, batch_size * dp, math.ceil(tokens / sp), mem, capacity,
                                    compute + comm, comm, notes))
    good = sorted((e for e in out if e.fits and e.layout.supported), key=lambda e: (e.sample_s, e.memory.total))
    rest = sorted((e for e in out if not (e.fits and e.layout.supported)), key=lambda e: e.memory.total)
    return good + rest


def recommend(estimates: list[Estimate]) -> Estimate | None:
    """The cheapest supported layout that fits (the first of :func:`plan`'s order), or None."""
    return next((e for e in estimates if e.fits and e.layout.supported), None)


# --------------------------------------------------------------------------------------------- CLI
_COLUMNS = ("params", "master", "grads", "optim", "ema", "gathered", "activations", "encoders", "overhead", "total")
_SHORT = {"gathered": "gather", "activations": "activ", "encoders": "encod", "overhead": "allow"}
_DEFAULTS = {"batch": "1", "precision": "bf16", "text_len": "512", "mfu": "0.35", "text_encoder": "umt5-xxl",
             "text_dtype": "bf16", "vae": "", "ema": "true"}
_REQUIRED = ("model", "frames", "height", "width", "gpu", "gpus_per_node", "nodes")


def _parse(argv: list[str]) -> tuple[dict, list[str], bool]:
    ap = argparse.ArgumentParser(prog="vdit-plan", description=__doc__.split("\n")[0])
    ap.add_argument("items", nargs="*", help="key=value: " + " ".join(_REQUIRED + tuple(_DEFAULTS)) + ", model.<field>")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    opts, model_over = dict(_DEFAULTS), []
    for item in args.items:
        if "=" not in item:
            ap.error(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        if k.startswith("model."):
            model_over.append(item)
        elif k in _REQUIRED or k in _DEFAULTS:
            opts[k] = v
        else:
            ap.error(f"unknown key {k!r}; known: {', '.join(_REQUIRED + tuple(_DEFAULTS))}, model.<field>")
    missing = [k for k in _REQUIRED if k not in opts]
    if missing:
        ap.error(f"missing {', '.join(k + '=' for k in missing)}")
    return opts, model_over, args.json


def main(argv: list[str] | None = None) -> int:
    """``vdit-plan``: print the layout table and the recommendation (or JSON with ``--json``).
    Returns 0 when a layout fits, 1 when none does."""
    opts, model_over, as_json = _parse(sys.argv[1:] if argv is None else list(argv))
    if opts["text_encoder"] not in TEXT_ENCODERS:
        raise SystemExit(f"text_encoder={opts['text_encoder']!r} is not one of {sorted(TEXT_ENCODERS)}")
    text_dim = TEXT_ENCODERS[opts["text_encoder"]][0]  # model.text_dim follows the encoder's width
    model_cfg = load_model_config(opts["model"], model_over, text_dim)
    vae = opts["vae"] or ("wan" if model_cfg.in_channels == 16 else "identity")
    kw = dict(batch_size=int(opts["batch"]), precision=opts["precision"], text_len=int(opts["text_len"]),
              mfu=float(opts["mfu"]), text_encoder=opts["text_encoder"], text_dtype=opts["text_dtype"], vae=vae,
              ema=opts["ema"].lower() in ("1", "true", "yes"))
    f, h, w, gpn, nodes = (int(opts[k]) for k in ("frames", "height", "width", "gpus_per_node", "nodes"))
    ests = plan(model_cfg, f, h, w, opts["gpu"], gpn, nodes, **kw)
    best = recommend(ests)
    shape = latent_shape(model_cfg, f, h, w, vae)
    P = param_counts(model_cfg)[0]
    head = {"model": opts["model"], "params": P, "latent_shape": list(shape), "tokens": num_tokens(model_cfg, shape),
            "flops_per_sample": training_flops(model_cfg, shape, kw["text_len"], 1), "gpu": opts["gpu"],
            "world": gpn * nodes, **{k: v for k, v in kw.items()}}
    extra = [f"model={opts['model']}", *model_over, f"data.num_frames={f}", f"data.height={h}", f"data.width={w}",
             f"data.batch_size={kw['batch_size']}", f"vae.name={vae}"] + ([] if vae == "identity" else ["vae.path=<dir>"])
    if opts["text_encoder"] != "none":
        name = "minilm" if opts["text_encoder"] == "minilm" else "hf text_encoder.path=<dir>"
        extra += [f"text_encoder.name={name}", f"text_encoder.hidden_size={text_dim}",
                  f"text_encoder.max_length={kw['text_len']}", f"text_encoder.dtype={kw['text_dtype']}"]
    if as_json:
        print(json.dumps({"inputs": head, "layouts": [e.to_dict(kw["precision"]) for e in ests],
                          "recommendation": None if best is None else
                          {**best.to_dict(kw["precision"]), "vdit_train": extra + best.layout.overrides(kw["precision"])}},
                         indent=1))
        return 0 if best else 1
    print(f"{opts['model']}: {P / 1e9:.2f}B params, latent {tuple(shape)}, {head['tokens']} tokens/sample, "
          f"{head['flops_per_sample']:.3g} train FLOPs/sample; {gpn * nodes} x {opts['gpu']} "
          f"({ests[0].capacity / GIB:.0f} GiB), batch {kw['batch_size']}/rank, {kw['precision']}, mfu {kw['mfu']}")
    cols = "".join(f"{_SHORT.get(c, c):>7}" for c in _COLUMNS)
    print(f"{'layout':<20}{cols}  fits  step_s  s/sample   (GiB per GPU; s/sample = step_s / global batch)")
    for e in ests:
        g, fit = e.memory.gib(), ("yes" if e.fits else "no") + ("" if e.layout.supported else "*")
        print(f"{e.layout.name:<20}" + "".join(f"{g[c]:7.1f}" for c in _COLUMNS) + f"  {fit:<4}{e.step_s:8.2f}"
              f"{e.sample_s:10.4f}")
    print("* not supported by the Trainer (DeepSpeed ZeRO-3).  ZeRO-1/2: the EMA is a full fp32 copy on every GPU.")
    if best is None:
        print("no layout fits: more GPUs (or nodes), a larger GPU, fewer frames/pixels, or a smaller batch"
              + (", or precision=bf16" if kw["precision"] != "bf16" else ""))
        return 1
    print(f"\nrecommended: {best.layout.name}: {best.memory.total / GIB:.1f} of {best.capacity / GIB:.0f} GiB, "
          f"step {best.step_s:.2f} s (global batch {best.global_batch}, SP all-to-all {best.sp_comm_s:.2f} s), "
          f"{best.sample_s:.4g} s per sample")
    print("  vdit-train " + " ".join(extra + best.layout.overrides(kw["precision"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

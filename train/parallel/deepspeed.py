"""DeepSpeed ZeRO (stages 1-3) as an alternative to FSDP2: config, engine, and checkpoint state in the DCP flow.

Build and step (the Trainer's ``backend=deepspeed`` path)::

    model = build_model(cfg, torch.device("cpu"))           # plain model, init_weights(seed) on CPU
    optimizer = build_optimizer(model, cfg.optim)          # a torch AdamW: no DeepSpeed op to compile
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    ds_cfg = deepspeed_config(cfg.train, cfg.parallel, cfg.optim, cfg.data.batch_size,
                              cfg.train.grad_accum_steps, dims.dp_size)
    engine = build_deepspeed(model, optimizer, scheduler, ds_cfg)

    for batch in micro_batches:                            # one optimizer step
        loss = ...                                         # this micro-batch's share of the step's loss
        engine.backward(loss, scale_wrt_gas=False)         # loss already normalised over the step
        engine.step()              # optimizer + scheduler + zero_grad only at the last micro-batch
    grad_norm = engine.get_global_grad_norm()              # pre-clip

Gradient accumulation is counted by DeepSpeed (``gradient_accumulation_steps = grad_accum``): it
reduces gradients at the boundary and runs clipping (``gradient_clipping``), the optimizer and the
LR scheduler (do not step it yourself) in the last ``engine.step()`` of the step. Its
``backward(loss)`` divides the loss by ``grad_accum`` by default; a loop whose loss is already
normalised over the whole step (each micro-batch loss / number of micro-batches, or the Trainer's
token-weighted form) passes ``scale_wrt_gas=False``. Both forms are tested. DeepSpeed AVERAGES
gradients over its data-parallel group, like FSDP, so a loss that undoes that average (the
Trainer's ``* dp_size``) stays correct.

Sequence parallelism: DeepSpeed's data-parallel group is the whole world (all ``dp x sp`` ranks, so
ZeRO also partitions across SP ranks) and it AVERAGES gradients over it. The rule of the FSDP path
(``vdit.train.parallel.fsdp``) is SUM over the SP group, MEAN over data streams, which is
``sp_size`` times that average: call ``engine.backward(loss * sp_size)`` (what
``vdit.train.parallel.sequence.sp_loss_scale(sp_size, "world")`` returns) and log the unscaled loss.
DeepSpeed's own SP plumbing (``data_parallel_size``/``sequence_parallel_size`` in the config) is not
used: in 0.19.8 (CPU/gloo, ZeRO-2, dp=2 x sp=2) it reduced each SP rank's gradient over the
data-parallel ranks only and divided by dp/sp, so SP ranks with different shares (0.25 / 0.75 of
the loss) ended with 0.5x / 1.5x the true gradient, never combined across the SP group (checked
while writing this module). With SP, DeepSpeed's ``train_batch_size`` counts each SP group's shared samples
``sp_size`` times (``micro * accum * dp_size * sp_size``); vdit's own sample counts are unaffected.

Checkpoints (same DCP directory and keys as the FSDP path, ``checkpoints/step-N/``):
:class:`DeepSpeedState` is a Stateful giving ``{"model": {fqn: full fp32}, "optimizer": {"state":
{fqn: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}}`` -- the format of
``torch.distributed.checkpoint.state_dict.get_state_dict`` -- assembled with DeepSpeed's
``safe_get_full_fp32_param``/``safe_get_full_optimizer_state`` (ZeRO-1/2/3). Because it is keyed by
the plain model's parameter names, a DeepSpeed checkpoint resumes on another number of ranks,
another ZeRO stage, or under FSDP / a single process, and vice versa (tested). Cost: the full fp32
parameters and Adam moments (12 bytes per parameter) are gathered to rank 0's host memory at save
and load (other ranks hold one tensor at a time), which suits models up to a few billion
parameters; beyond that DeepSpeed's own ``engine.save_checkpoint`` (per-rank partitions, same
world size only) is the scalable route.

DeepSpeed is an optional extra (``pip install -e '.[deepspeed]'``; ``make test`` installs it). This
module imports it only inside functions (:func:`require_deepspeed`), so ``import vdit.train`` never
does, and selecting ``parallel.backend=deepspeed`` without it fails at start-up with the command.

Memory (measured with ``bench/state_memory.py --worlds 2 --backends deepspeed``: ZeRO-3, fp32, 2
gloo ranks, an 11.93M-parameter VideoDiT, so 16 B x params / 2 = 91.0 MiB expected per rank):

* Buckets. DeepSpeed's default ``reduce_bucket_size`` (5e8 elements, which vdit also set before)
  makes ZeRO-3 allocate its contiguous-gradient IPG bucket as ``torch.empty(5e8)``: 1907 MiB fp32
  per rank (1 GB in bf16, and ZeRO-1/2 allocate theirs the same way) whatever the model's size.
  :func:`bucket_elements` now sizes ``reduce_bucket_size`` / ``allgather_bucket_size`` (and
  ZeRO-3's ``stage3_prefetch_bucket_size``) to the model's trainable parameter count, capped at
  5e8 elements on CUDA and 5e7 on CPU: 45.5 MiB for this model. Bucket sizes only group the
  element-wise reductions, so the numbers trained are unchanged.
* fp32 master copy (not fixable from the config). ZeRO-3 holds 20 B per parameter / N in fp32, not
  16: 113.8 MiB sharded per rank here, 1.25x. DeepSpeed 0.19.8's ``_create_fp32_partitions``
  aliases the fp32 master to the fp32 parameter partition only when ``partition.device ==
  self.device``, and ``self.device`` is a string (``'cpu'``, ``'cuda:0'``) that never equals a
  ``torch.device``, so a second fp32 copy is made. With bf16 (the default on CUDA) the separate
  fp32 master is by design (2 B bf16 parameter + 4 B master + 4 B gradient + 8 B Adam). The
  Trainer does not offer ZeRO-3 (use FSDP2, which holds 16 B / N); only the bench reaches it.
* Persistent parameters. ZeRO-3 keeps parameters of at most ``stage3_param_persistence_threshold``
  elements (DeepSpeed's default 1e5, left as is) whole on every rank: for this small model 213
  tensors, 4.46M elements, 17.0 MiB replicated per rank, so 130.8 MiB per rank in all (1.44x).
  ``{"zero_optimization": {"stage3_param_persistence_threshold": 2560}}`` (10 x hidden) in
  ``parallel.deepspeed_config`` brings it to 0.18 MiB (114.0 MiB per rank, 1.25x); for billion-
  parameter models the default replicates well under 1 %.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from vdit.train.parallel.dims import ParallelConfig

log = logging.getLogger(__name__)

BUCKET_CAP_CUDA = int(5e8)
"""Most elements per ZeRO reduce / all-gather bucket on CUDA (DeepSpeed's default, 1 GB in bf16)."""
BUCKET_CAP_CPU = int(5e7)
"""Most elements per bucket on CPU (gloo; tests and debugging): 200 MB in fp32."""
STAGE3_PREFETCH_CAP = int(5e7)
"""Most elements ZeRO-3 prefetches ahead (DeepSpeed's default ``stage3_prefetch_bucket_size``)."""
INSTALL_HINT = "pip install -e '.[deepspeed]'"

__all__ = ["deepspeed_config", "bucket_elements", "require_deepspeed", "build_deepspeed", "deepspeed_state_dict", "load_deepspeed_state_dict",
           "DeepSpeedState", "gather_full_state_dict_deepspeed", "deep_merge"]


# ------------------------------------------------------------------------------------------ config
def deep_merge(base: dict, override: dict) -> dict:
    """A copy of ``base`` with ``override`` merged in recursively (override's leaves win)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _on_cuda(cfg_train) -> bool:
    device = getattr(cfg_train, "device", "auto")
    return (device == "auto" and torch.cuda.is_available()) or str(device).startswith("cuda")


def _use_bf16(cfg_train) -> bool:
    precision = getattr(cfg_train, "precision", "fp32")
    if precision == "auto":
        return _on_cuda(cfg_train)
    return precision == "bf16"


def bucket_elements(num_params: int | None, on_cuda: bool) -> int:
    """ZeRO's communication bucket size in elements: the model's trainable parameter count, capped
    at :data:`BUCKET_CAP_CUDA` on CUDA and :data:`BUCKET_CAP_CPU` otherwise (the cap alone when
    ``num_params`` is None). A bucket never needs to be larger than the model: DeepSpeed's own
    default (5e8 elements) allocates a 1.9 GiB fp32 buffer per rank (ZeRO-3's IPG bucket) even for
    a model of a few million parameters."""
    cap = BUCKET_CAP_CUDA if on_cuda else BUCKET_CAP_CPU
    return cap if num_params is None else max(1, min(cap, int(num_params)))


def deepspeed_config(cfg_train, cfg_parallel: ParallelConfig, optim_cfg, micro_batch: int, grad_accum: int,
                     dp_size: int, num_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for a run.

    Generated: ``train_micro_batch_size_per_gpu=micro_batch``, ``gradient_accumulation_steps=
    grad_accum``, ``train_batch_size = micro_batch * grad_accum * dp_size * sp_size`` (DeepSpeed
    counts every rank as data parallel, see the module docstring), ZeRO ``zero_stage``, ``bf16``
    when ``cfg_train.precision`` is ``bf16`` (or ``auto`` on CUDA; DeepSpeed then keeps bf16
    parameters with fp32 master weights and Adam moments; keep the Trainer's autocast on), and
    ``gradient_clipping=optim.grad_clip`` (when > 0). Buckets: ``reduce_bucket_size``,
    ``allgather_bucket_size`` and (ZeRO-3) ``stage3_prefetch_bucket_size`` are
    :func:`bucket_elements` of ``num_params`` (see "Memory" in the module docstring). Then the user
    JSON ``cfg_parallel.deepspeed_config`` is deep-merged over it (its bucket sizes win).

    Args:
        cfg_train: ``LoopConfig`` (``precision``, ``device``).
        cfg_parallel: ``ParallelConfig``.
        optim_cfg: ``OptimConfig`` (``grad_clip``).
        micro_batch: samples per rank per micro-batch (``data.batch_size``).
        grad_accum: micro-batches per optimizer step (``train.grad_accum_steps``).
        dp_size: data streams (``ParallelDims.dp_size``).
        num_params: trainable parameters of the model (None: the device's cap).

    Raises:
        ValueError: the merged batch sizes disagree with each other or with the data settings (the
            message names the fields), or the JSON configures an optimizer/scheduler (vdit passes
            its own).
        FileNotFoundError: the JSON path does not exist.
    """
    if not 1 <= cfg_parallel.zero_stage <= 3:
        raise ValueError(f"parallel.zero_stage={cfg_parallel.zero_stage}: backend=deepspeed supports ZeRO stages "
                         "1-3 (stage 0 is plain data parallel: use backend=fsdp dp_replicate=N dp_shard=1)")
    world = dp_size * cfg_parallel.sp_size  # DeepSpeed's data-parallel group: every rank (see module docstring)
    bucket = bucket_elements(num_params, _on_cuda(cfg_train))
    zero: dict[str, Any] = {"stage": cfg_parallel.zero_stage, "contiguous_gradients": True,
                            "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if cfg_parallel.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False,
                    stage3_prefetch_bucket_size=min(bucket, STAGE3_PREFETCH_CAP))
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "zero_optimization": zero,
        "bf16": {"enabled": _use_bf16(cfg_train)},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW is "untested" in DeepSpeed's terms
        "steps_per_print": 1 << 30,  # vdit logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if optim_cfg.grad_clip and optim_cfg.grad_clip > 0:
        cfg["gradient_clipping"] = float(optim_cfg.grad_clip)
    if cfg_parallel.deepspeed_config:
        path = cfg_parallel.deepspeed_config
        if not os.path.exists(path):
            raise FileNotFoundError(f"parallel.deepspeed_config={path!r} does not exist")
        with open(path) as f:
            user = json.load(f)
        for key in ("optimizer", "scheduler"):
            if key in user:
                raise ValueError(f"{path}: remove {key!r}; vdit passes its own AdamW and schedule (set optim.*)")
        cfg = deep_merge(cfg, user)
    mb, ga, tb = (cfg.get("train_micro_batch_size_per_gpu"), cfg.get("gradient_accumulation_steps"),
                  cfg.get("train_batch_size"))
    if mb != micro_batch or ga != grad_accum:
        raise ValueError(f"DeepSpeed train_micro_batch_size_per_gpu={mb}, gradient_accumulation_steps={ga} differ "
                         f"from data.batch_size={micro_batch}, train.grad_accum_steps={grad_accum}; set the vdit "
                         "options instead of the JSON fields")
    if tb != mb * ga * world:
        raise ValueError(f"DeepSpeed train_batch_size={tb} != train_micro_batch_size_per_gpu * "
                         f"gradient_accumulation_steps * ranks = {mb} * {ga} * {world} = {mb * ga * world}; remove "
                         "train_batch_size from the JSON or set data.batch_size / train.grad_accum_steps")
    return cfg


# ------------------------------------------------------------------------------------------ engine
def require_deepspeed():
    """Import and return the ``deepspeed`` module (an optional extra; never imported at module import time).

    Raises:
        ImportError: DeepSpeed is not installed (the message gives the install command).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exn:
        raise ImportError(f"parallel.backend=deepspeed needs DeepSpeed, an optional extra: {INSTALL_HINT} "
                          f"(or use parallel.backend=fsdp) [{exn}]") from exn
    return deepspeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, config: dict):
    """``deepspeed.initialize(model, optimizer, lr_scheduler, config)`` on the existing process group.

    Pass a plain, initialized model and a ``torch.optim`` optimizer (DeepSpeed wraps it in its ZeRO
    optimizer; no fused CPU/CUDA op has to be compiled). DeepSpeed's data-parallel group is the
    whole world; with SP scale the backward loss by ``sp_size`` (module docstring). Without a
    process group (one process, no launcher) a 1-rank group is created (gloo on CPU, NCCL on CUDA).

    Returns:
        The ``DeepSpeedEngine``; ``engine.module`` is ``model`` (same parameter names).
    """
    deepspeed = require_deepspeed()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    names = {id(p): n for n, p in model.named_parameters()}
    group_fqns = [[names[id(p)] for p in g["params"] if p.requires_grad] for g in optimizer.param_groups]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                           dist_init_required=False)
    engine._vdit_group_fqns = [g for g in group_fqns if g]  # DeepSpeed drops groups without trainable params
    return engine


# ------------------------------------------------------------------------------------- state dicts
def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def _base_optimizer(engine) -> torch.optim.Optimizer:
    return engine.optimizer.optimizer  # the torch optimizer inside DeepSpeed's ZeRO optimizer


def _flat_fp32_partitions(engine) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions: the tensors the base optimizer's state is keyed by."""
    zopt = engine.optimizer
    if _zero_stage(engine) == 3:
        return list(zopt.fp32_partitioned_groups_flat)
    return list(zopt.single_partition_of_fp32_groups)


def _is_rank0() -> bool:
    return dist.get_rank() == 0


def _gather_param(engine, p: nn.Parameter) -> torch.Tensor:
    """Full value of a (possibly ZeRO-3 partitioned) parameter on every rank: the fp32 master when there is one."""
    from deepspeed.utils import safe_get_full_fp32_param

    if p.requires_grad:
        full = safe_get_full_fp32_param(p)
        if full is not None:
            return full.detach()
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().clone()
    return p.detach()


@torch.no_grad()
def gather_full_state_dict_deepspeed(engine, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Full fp32 CPU parameters (and persistent buffers) keyed like the plain model, without optimizer state.

    A collective (every rank must call); with ``rank0_only`` the other ranks get ``{}`` and hold
    one tensor at a time. ZeRO-3 parameters are gathered one at a time.
    """
    keep = not rank0_only or _is_rank0()
    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        full = _gather_param(engine, p)
        if keep:
            out[name] = full.float().cpu().clone() if full.is_floating_point() else full.cpu().clone()
    if keep:
        persistent = engine.module.state_dict().keys()
        for name, b in engine.module.named_buffers():
            if name in persistent:
                out[name] = b.detach().cpu().clone()
    return out


@torch.no_grad()
def deepspeed_state_dict(engine, rank0_only: bool = True) -> dict[str, Any]:
    """Model and optimizer of a ZeRO engine in the layout of ``torch.distributed.checkpoint.state_dict.get_state_dict``.

    Returns ``{"model": {fqn: fp32 tensor}, "optimizer": {"state": {fqn: {"step": scalar tensor,
    "exp_avg": full, "exp_avg_sq": full, ...}}, "param_groups": [{hyper-parameters, "params":
    [fqn, ...]}]}}`` on CPU -- exactly the keys a plain or FSDP run's ``ModelOptimizerState`` writes,
    so checkpoints move between the backends. A collective; with ``rank0_only`` the other ranks
    return ``{"model": {}, "optimizer": {"state": {}}}``.
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    keep = not rank0_only or _is_rank0()
    model_sd = gather_full_state_dict_deepspeed(engine, rank0_only)
    base = _base_optimizer(engine)
    flats = _flat_fp32_partitions(engine)
    flat_state = base.state.get(flats[0], {}) if flats else {}
    fresh = not flat_state
    if fresh:  # no step taken yet: the optimizer's initial state, so that a DCP load has slots to fill
        flat_state = _initial_state_template(base)
    else:
        _relink_optimizer_state(engine)
    per_elem = [k for k, v in flat_state.items() if torch.is_tensor(v) and v.ndim > 0]
    scalars = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
               for k, v in flat_state.items() if k not in per_elem}
    state: dict[str, dict[str, Any]] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad or not per_elem:
            continue
        shape = p.ds_shape if hasattr(p, "ds_id") else p.shape
        if fresh:
            entry = {k: torch.zeros(shape) for k in per_elem} if keep else {}
        else:
            entry = {k: safe_get_full_optimizer_state(p, k).detach() for k in per_elem}  # collectives, every rank
        if keep:
            state[name] = {**{k: v.clone() for k, v in scalars.items()},
                           **{k: v.float().cpu().clone() for k, v in entry.items()}}
    groups = []
    if keep:
        fqns = getattr(engine, "_vdit_group_fqns", None)
        for i, g in enumerate(base.param_groups):
            hyper = {k: copy.deepcopy(v) for k, v in g.items() if k != "params" and not k.startswith("_ds")}
            hyper["params"] = list(fqns[i]) if fqns is not None and i < len(fqns) else []
            groups.append(hyper)
    if not keep:
        # Nothing to save from this rank. Not even an empty list: DCP would store it as a leaf
        # "optimizer.param_groups" beside rank 0's "optimizer.param_groups.0.lr", and at load time
        # take the mismatch for a pre-2.4 checkpoint layout and restore the empty list.
        return {"model": {}, "optimizer": {"state": {}}}
    return {"model": model_sd, "optimizer": {"state": state, "param_groups": groups}}


def _initial_state_template(base: torch.optim.Optimizer) -> dict[str, Any]:
    """The per-parameter state ``base``'s class creates on its first step, as zeros (Adam: ``step`` 0-dim,
    ``exp_avg``/``exp_avg_sq`` 1-element), found by stepping a throwaway 1-element copy with a zero
    gradient; AdamW's initial state is exactly these zeros. Falls back to Adam's keys."""
    import inspect

    probe = torch.zeros(1, requires_grad=True)
    try:
        accepted = inspect.signature(type(base).__init__).parameters
        opt = type(base)([probe], **{k: v for k, v in base.defaults.items() if k in accepted})
        probe.grad = torch.zeros(1)
        opt.step()
        return {k: torch.zeros_like(v) if torch.is_tensor(v) else v for k, v in opt.state[probe].items()}
    except Exception as e:  # an optimizer that cannot be probed this way
        log.warning("could not probe %s's state (%s); assuming Adam's", type(base).__name__, e)
        return {"step": torch.zeros(()), "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)}


def _broadcast_object(obj: Any) -> Any:
    box = [obj if _is_rank0() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _broadcast_tensor(t: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Rank 0's tensor on every rank (shape/dtype sent first). Gloo/NCCL broadcast on ``device``."""
    meta = _broadcast_object((tuple(t.shape), t.dtype) if _is_rank0() else None)
    buf = t.to(device).contiguous() if _is_rank0() else torch.empty(meta[0], dtype=meta[1], device=device)
    dist.broadcast(buf, src=0)
    return buf


@torch.no_grad()
def _ensure_optimizer_state(engine, template: dict[str, Any]) -> None:
    """Create the base optimizer's (lazily created) state on the flat fp32 partitions, shaped like ``template``,
    and link DeepSpeed's per-parameter fragments to it, so the ``safe_set_full_optimizer_state``
    calls that follow have tensors to write into (a fresh engine has taken no step yet)."""
    base = _base_optimizer(engine)
    created = False
    for flat in _flat_fp32_partitions(engine):
        st = base.state[flat]
        for k, v in template.items():
            if k not in st:
                created = True
                if torch.is_tensor(v) and v.ndim > 0:
                    st[k] = torch.zeros_like(flat)
                else:
                    st[k] = v.clone() if torch.is_tensor(v) else v
    if created:
        _relink_optimizer_state(engine)


def _relink_optimizer_state(engine) -> None:
    """Point ZeRO-1/2's per-parameter optimizer-state fragments at the base optimizer's current state.

    DeepSpeed links them once, right after the *first* param group's first ``step()``, for all
    groups at once; with a lazily initialized optimizer (torch AdamW) and several param groups, the
    later groups' state does not exist yet at that moment, so their fragments stay empty and
    ``safe_get_full_optimizer_state`` raises "exp_avg not found in optimizer state fragment"
    (DeepSpeed 0.19.8). Re-linking is idempotent; ZeRO-3 reads the state directly and needs nothing.
    """
    if _zero_stage(engine) not in (1, 2):
        return
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    zopt, base = engine.optimizer, _base_optimizer(engine)
    for i, flat in enumerate(zopt.single_partition_of_fp32_groups):
        if flat in base.state:
            lazy_init_hp_params_optimizer_state(zopt.bit16_groups[i], flat, base.state)
    zopt._hp_optimizer_states_linked = True


@torch.no_grad()
def load_deepspeed_state_dict(engine, sd: dict[str, Any], from_rank0: bool = True) -> None:
    """Inverse of :func:`deepspeed_state_dict`: write full parameters, optimizer state and counters into ``engine``.

    Accepts the layout of :func:`deepspeed_state_dict` and of ``get_state_dict`` (a checkpoint of the
    FSDP or single-process path). With ``from_rank0`` only rank 0's ``sd`` is read and every tensor
    is broadcast; otherwise every rank passes the full ``sd``. A collective.

    Raises:
        KeyError: a trainable parameter missing from ``sd["model"]``.
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    device = next(engine.module.parameters()).device
    src = sd if (not from_rank0 or _is_rank0()) else None

    def fetch(get):
        value = get(src) if src is not None else None
        return _broadcast_tensor(value, device) if from_rank0 else value.to(device)

    model_sd = src["model"] if src is not None else {}
    names = [n for n, _ in engine.module.named_parameters()]
    missing = [n for n in names if n not in model_sd] if src is not None else []
    missing = _broadcast_object(missing) if from_rank0 else missing
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} parameters of the model, e.g. {missing[:3]}")
    for name, p in engine.module.named_parameters():
        full = fetch(lambda s: s["model"][name])
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if _is_rank0():
                    p.data.copy_(full.view_as(p).to(p.dtype))
        else:
            p.data.copy_(full.view_as(p).to(p.dtype))
        if p.requires_grad:
            safe_set_full_fp32_param(p, full.view(p.ds_shape if hasattr(p, "ds_id") else p.shape).float())
    for name, b in engine.module.named_buffers():
        if (src is None or name in model_sd) and name in engine.module.state_dict():
            b.copy_(fetch(lambda s: s["model"][name]))

    optim = src["optimizer"] if src is not None else {}
    state = optim.get("state", {})
    first = next(iter(state.values()), None) if src is not None else None
    template = {k: (v if not torch.is_tensor(v) or v.ndim == 0 else v.new_zeros(1)) for k, v in (first or {}).items()}
    template = _broadcast_object(template) if from_rank0 else template
    if template:
        _ensure_optimizer_state(engine, template)
        base = _base_optimizer(engine)
        for flat in _flat_fp32_partitions(engine):  # scalar entries (Adam's "step") are per flat group
            for k, v in template.items():
                if not (torch.is_tensor(v) and v.ndim > 0):
                    base.state[flat][k] = v.clone() if torch.is_tensor(v) else v
        keys = [k for k, v in template.items() if torch.is_tensor(v) and v.ndim > 0]
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            for k in keys:
                value = fetch(lambda s: s["optimizer"]["state"][name][k])
                safe_set_full_optimizer_state(p, value.reshape(p.ds_shape if hasattr(p, "ds_id") else p.shape).float(), k)
    groups = _broadcast_object(optim.get("param_groups", [])) if from_rank0 else optim.get("param_groups", [])
    _load_param_groups(engine, groups)
    # DeepSpeed's counters, from the optimizer's step count (a checkpoint is taken at an optimizer
    # step boundary; micro_steps decides where the next boundary is, in this run's accumulation)
    step = template.get("step") if template else None
    if step is not None:
        engine.global_steps = int(step)
        engine.global_samples = engine.global_steps * engine.train_batch_size()
        engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()


def _load_param_groups(engine, groups: list[dict]) -> None:
    """Copy saved hyper-parameters (lr, betas, ...) into the base optimizer's groups, matched by parameter names."""
    if not groups:
        return
    base = _base_optimizer(engine)
    fqns = getattr(engine, "_vdit_group_fqns", None)
    for i, g in enumerate(base.param_groups):
        match = None
        if fqns is not None and i < len(fqns) and fqns[i]:
            match = next((s for s in groups if fqns[i][0] in s.get("params", [])), None)
        if match is None and i < len(groups):
            match = groups[i]
        if match is None:
            continue
        for k, v in match.items():
            if k != "params" and k in g and not k.startswith("_ds"):
                g[k] = copy.deepcopy(v)


class DeepSpeedState(Stateful):
    """A DeepSpeed engine as one Stateful for :class:`vdit.train.checkpoint.CheckpointManager`
    (register it where the plain path registers ``ModelOptimizerState``).

    ``state_dict()`` gathers full parameters and optimizer state to rank 0 (collective; other ranks
    contribute nothing to the files); ``load_state_dict()`` broadcasts them from rank 0.
    """

    def __init__(self, engine):
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        return deepspeed_state_dict(self.engine, rank0_only=True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_deepspeed_state_dict(self.engine, state, from_rank0=True)

"""Parallelize a single-device VideoDiT from outside: SP -> activation checkpointing -> compile -> FSDP2.

The model never imports ``torch.distributed``; every function here takes a plain ``VideoDiT`` (or any
module with ``blocks``, ``init_weights(seed=)``) and changes it in place, in the fixed order of
:func:`parallelize`. The build order of a sharded run is::

    with torch.device("meta"):
        model = VideoDiT(cfg.model)
    reference = copy.deepcopy(model)                     # un-parallelized twin, still on meta (free)
    parallelize(model, dims, cfg.parallel, apply_sp=...)
    materialize_and_init(model, device, seed, reference) # same weights as a 1-rank run, any layout

Choices (and why):

- **Parameter names never change.** Activation checkpointing uses the composable
  ``torch.distributed._composable.checkpoint`` (forward hooks on the block) rather than
  ``checkpoint_wrapper``, whose wrapper module puts ``_checkpoint_wrapped_module.`` into every
  ``named_parameters()`` name (its state_dict hooks strip it from ``state_dict()`` only, so the
  EMA, which is keyed by ``named_parameters()``, would diverge). Compile uses the in-place
  ``nn.Module.compile()`` rather than ``torch.compile(module)``, whose ``OptimizedModule`` adds
  ``_orig_mod.``. So checkpoints, EMA keys and exported weights are identical with or without AC
  and compile (tested).
- **Init on CPU, then distribute.** DTensor random ops do not reproduce a single-device init for
  the same seed (on CPU every shard draws the same stream; on CUDA the offset-based RNG differs from
  the unsharded draw order), so :func:`materialize_and_init` runs the model's own
  ``init_weights(seed)`` on a plain CPU twin on rank 0 and broadcasts it into the shards with
  ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``. This costs one full
  fp32 copy in rank 0's host memory for a moment (56 GB at 14B parameters); a model larger than
  that should start from a seed checkpoint (a DCP checkpoint written once by a 1-rank run).
  The single-device path also initializes on CPU, so CPU and GPU runs, sharded or not, start
  from the same weights.
- **Sequence-parallel gradients are summed, data-parallel gradients averaged.** Each SP rank
  holds the gradient of its own tokens' part of the full-sequence loss; the true gradient is the
  SUM over the SP group, then the MEAN over data streams. With ``backend=fsdp`` FSDP shards over
  ``dims.fsdp_mesh`` (the SP dim folded into the shard dim, so parameters are also sharded across
  SP ranks) and :func:`apply_fsdp` sets the gradient divide factor to ``dp_size`` instead of the
  mesh size: ``sum over all dp x sp ranks / dp_size = mean_dp(sum_sp)``. Without FSDP
  (``backend=none`` with SP) call :func:`sync_sp_gradients` after backward.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from vdit.train.parallel.dims import DTYPES, AC_MODES, ParallelConfig, ParallelDims

log = logging.getLogger(__name__)

__all__ = ["apply_activation_checkpointing", "apply_compile", "apply_fsdp", "parallelize", "materialize_and_init",
           "materialize_from_state",
           "sync_sp_gradients", "set_gradient_sync", "gather_full_state_dict", "is_sharded"]


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no ModuleList 'blocks' to parallelize")
    return blocks


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter is a DTensor (the model went through :func:`apply_fsdp`)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


# ------------------------------------------------------------------------------ activation ckpt
def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> list[int]:
    """Recompute block activations in backward instead of storing them.

    ``full`` checkpoints every block of ``model.blocks``; ``selective`` every ``every``-th block
    counting from the first (indices ``0, every, 2 * every, ...``); ``none`` does nothing. Uses the
    composable ``checkpoint`` (non-reentrant, forward hooks): parameter names, ``state_dict()``
    keys and ``named_parameters()`` are unchanged, and losses and gradients are bit-identical to
    no checkpointing (recompute runs the same kernels).

    Returns:
        The indices of the checkpointed blocks.

    Raises:
        ValueError: unknown mode or ``every < 1``.
    """
    from torch.distributed._composable import checkpoint

    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing={mode!r} is not one of {list(AC_MODES)}")
    if every < 1:
        raise ValueError(f"ac_every={every} must be >= 1")
    if mode == "none":
        return []
    step = 1 if mode == "full" else every
    chosen = list(range(0, len(_blocks(model)), step))
    for i in chosen:
        checkpoint(model.blocks[i])
    log.info("activation checkpointing (%s): blocks %s", mode, chosen)
    return chosen


# -------------------------------------------------------------------------------------- compile
def apply_compile(model: nn.Module, **compile_kwargs) -> None:
    """``torch.compile`` each block in place (``block.compile(**compile_kwargs)``).

    Per block rather than the whole model: the blocks are identical, so one compiled graph is reused
    ``depth`` times (compile time independent of depth), and FSDP's per-block hooks stay outside
    the graphs. In place (``nn.Module.compile``) keeps parameter names. Call before FSDP (the
    order of :func:`parallelize`). Tests use ``backend="aot_eager"`` or ``"eager"`` on CPU.

    What keeps a block one graph, compiled a bounded number of times (``tests/test_compile.py``):

    - **No graph breaks on the SDPA path**, with or without Ulysses. An attention kernel must not
      look anything up inside the forward (an ``lru_cache`` / ``importlib`` call in the traced block
      is a graph break each): resolve it when it is installed. Ulysses' all-to-alls become
      functional collectives under compile and keep their byte accounting out of traced code
      (``vdit.train.parallel.comm``: the statistics are eager-only). Ring attention stays eager by
      design (``@torch.compiler.disable``: a break around each call).
    - **Shapes.** Bucketed training changes the batch ``B`` and the token count ``L`` of the block's
      ``(B, L, D)`` input. Dynamo compiles the first bucket statically and, when a dim first
      changes, recompiles with it dynamic (automatic dynamic shapes: once if ``B`` and ``L`` change
      together, twice if apart); later buckets reuse that graph. Batch 1 gets a graph of its own
      (Dynamo specializes sizes 0 and 1), and so does, under Ulysses, a token count that needs
      padding. The count depends on those few cases, not on the number of buckets (measured on
      CPU: 3 graphs over 7 buckets with batch 1; 3 over 10 Ulysses buckets), and stays below the
      recompile limit (8) past which blocks would silently run eagerly
      (``fail_on_recompile_limit_hit`` makes that an error in the tests).
      ``dynamic=True`` in ``compile_kwargs`` makes every dim dynamic at once (2 graphs for the same
      7 buckets) but traced 2.5x slower on CPU, so the default stays.
    - **Integers on modules may become dynamic** (``torch._dynamo.config.allow_unspec_int_on_nn_module``,
      set here, process-wide): sequence parallelism keeps the per-forward token counts (real and
      padded) on its handle, reached from the block through ``attn.core``; Dynamo specializes
      integers found on modules by default, which recompiled every block at every new ``L``.
      Integers that never change (``num_heads``) stay static either way.
    """
    import torch._dynamo

    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    for block in _blocks(model):
        block.compile(**compile_kwargs)


# ----------------------------------------------------------------------------------------- FSDP
def apply_fsdp(model: nn.Module, dp_mesh, cfg: ParallelConfig, gradient_divide_factor: Optional[float] = None) -> nn.Module:
    """FSDP2 ``fully_shard`` each block of ``model.blocks``, then the root, over ``dp_mesh``.

    A 1-D mesh shards (FSDP / ZeRO-3); a 2-D ``(replicate, shard)`` mesh is HSDP (all-reduce across
    replicas, reduce-scatter within). ``MixedPrecisionPolicy(param_dtype, reduce_dtype)`` from
    ``cfg``; sharded parameters (what the optimizer sees) stay fp32. The last block keeps its
    parameters gathered after forward (backward needs them first anyway).

    Forward inputs are not cast (``cast_forward_inputs=False``, root and blocks): FSDP's default
    casts every floating-point argument to ``param_dtype``, which rounded the flow time ``t`` (0.7431
    became 0.7422 in bf16) and the RoPE cos/sin tables (passed from the root to every block) before
    the fp32 timestep sinusoid and rotary math. With bf16 parameters the forward must therefore run
    under bf16 autocast (the Trainer's ``train.precision=bf16``; see
    :func:`vdit.train.parallel.dims.resolve_param_dtype`), which casts each matmul's inputs and keeps
    norms in fp32. ``param_dtype=auto`` here (no compute dtype known) means fp32.

    Args:
        model: un-sharded module, typically still on the meta device.
        dp_mesh: ``dims.dp_mesh`` (or ``dims.fsdp_mesh`` with SP folded in).
        cfg: ``param_dtype``, ``reduce_dtype``, ``reshard_after_forward``.
        gradient_divide_factor: divide the summed gradients by this instead of the mesh size;
            ``dims.dp_size`` when the mesh includes SP ranks (see module docstring).

    Returns:
        ``model`` (now an ``FSDPModule``; parameters are DTensors).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    param_dtype = DTYPES["fp32" if cfg.param_dtype == "auto" else cfg.param_dtype]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=DTYPES[cfg.reduce_dtype], cast_forward_inputs=False)
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        reshard = cfg.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    # gloo has no AVG / PREMUL_SUM reduction: reduce with SUM, then divide (same result).
    gloo = dist.get_backend(dp_mesh.get_group(0)) == "gloo"
    for module in model.modules():
        if isinstance(module, FSDPModule):
            if gradient_divide_factor is not None:
                module.set_gradient_divide_factor(float(gradient_divide_factor))
            if gloo:
                module.set_force_sum_reduction_for_comms(True)
    return model


# ---------------------------------------------------------------------------------- parallelize
def parallelize(model: nn.Module, dims: ParallelDims, cfg: ParallelConfig,
                apply_sp: Optional[Callable[[nn.Module], None]] = None, compile_kwargs: Optional[dict] = None) -> nn.Module:
    """Apply every parallelism of ``cfg`` to ``model`` in place, in this fixed order (torchtitan style).

    Args:
        model: a plain ``VideoDiT`` built on the meta device.
        dims: the resolved layout, with :meth:`ParallelDims.build_mesh` done when SP or FSDP is on.
        cfg: the ``parallel`` config.
        apply_sp: ``apply_sp(model)`` installs sequence parallelism (from
            ``vdit.train.parallel.sequence``, bound to ``dims.sp_mesh`` by the caller); required
            when ``dims.sp_size > 1``.
        compile_kwargs: passed to ``block.compile`` (e.g. ``{"backend": "eager"}`` in tests).

    Returns:
        ``model``; call :func:`materialize_and_init` next.

    Raises:
        ValueError: ``sp_size > 1`` without ``apply_sp``.
    """
    # 1. Sequence parallelism first: it wraps each attention core (block.attn.core) and hooks the
    #    token/RoPE/output boundaries, so it must see the plain modules, before any wrapper.
    if dims.sp_size > 1:
        if apply_sp is None:
            raise ValueError(f"parallel.sp_size={dims.sp_size} needs apply_sp (vdit.train.parallel.sequence)")
        apply_sp(model)
    # 2. Activation checkpointing on the plain blocks, so the recomputed region contains the SP
    #    collectives too and compile (next) traces the checkpointed block as one unit.
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.ac_every)
    # 3. Compile each block (after AC, before FSDP: FSDP's all-gather/reduce-scatter hooks stay
    #    outside the compiled graphs).
    if cfg.compile:
        apply_compile(model, **(compile_kwargs or {}))
    # 4. FSDP last, outermost: shards parameters over the data-parallel ranks (and the SP ranks,
    #    whose gradients are then summed: divide by dp_size instead of the mesh size).
    if cfg.backend == "fsdp":
        apply_fsdp(model, dims.fsdp_mesh, cfg, gradient_divide_factor=dims.dp_size if dims.sp_size > 1 else None)
    return model


# ----------------------------------------------------------------------------------------- init
@torch.no_grad()
def materialize_and_init(model: nn.Module, device: torch.device | str, seed: int,
                         reference: Optional[nn.Module] = None) -> nn.Module:
    """Allocate a meta-device (possibly sharded) model on ``device`` and give it ``init_weights(seed)``'s weights.

    The weights equal a single-device ``to_empty(cpu); init_weights(seed)`` exactly, whatever the
    sharding and device:

    - un-sharded: ``to_empty(cpu)``, ``init_weights(seed)``, then ``.to(device)``;
    - sharded (DTensor parameters): rank 0 initializes ``reference`` (the un-parallelized twin,
      e.g. ``copy.deepcopy`` of the meta model before :func:`parallelize`) on CPU; its full state
      dict is broadcast and each rank keeps its shards (``set_model_state_dict`` with
      ``full_state_dict=True, broadcast_from_rank0=True``).

    Raises:
        ValueError: a sharded model without ``reference``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = torch.device(device)
    if not is_sharded(model):
        model.to_empty(device="cpu")
        model.init_weights(seed=seed)
        return model.to(device)
    if reference is None:
        raise ValueError("a sharded model needs reference= (its un-parallelized twin on the meta device) to be "
                         "initialized identically to a single-device run")
    model.to_empty(device=device)
    full = {}
    if dist.get_rank() == 0:
        reference.to_empty(device="cpu")
        reference.init_weights(seed=seed)
        full = reference.state_dict()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if dist.get_rank() == 0:
        reference.to_empty(device="meta")  # free the host copy
    return model


@torch.no_grad()
def materialize_from_state(model: nn.Module, device: torch.device | str,
                           full_state: Callable[[], dict[str, torch.Tensor]]) -> nn.Module:
    """Allocate a meta-device (possibly sharded) model on ``device`` and load a full state dict into it.

    ``full_state()`` builds the un-sharded CPU state (imported weights, LoRA adapters): called once,
    on rank 0 only when the model is sharded (its tensors are broadcast and each rank keeps its
    shards, as in :func:`materialize_and_init`), so one full copy exists in host memory for a moment.

    Raises:
        RuntimeError: the state does not match the model (strict load).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = torch.device(device)
    if not is_sharded(model):
        model.to_empty(device="cpu")
        model.load_state_dict(full_state())
        return model.to(device)
    model.to_empty(device=device)
    full = full_state() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


# ------------------------------------------------------------------------------------ gradients
def defer_grad_sync_fits(cfg, device: torch.device, max_fraction: float = 0.25) -> bool:
    """``parallel.defer_grad_sync``, unless deferring would hold more than ``max_fraction`` of the
    accelerator's memory: the unsharded ``reduce_dtype`` gradients of the whole model (4 bytes per
    parameter; 56 GB at 14B) stay allocated between micro-batches. Then every micro-batch
    reduce-scatters instead, with a warning. Only matters with ``train.grad_accum_steps > 1`` on CUDA.
    """
    if not cfg.parallel.defer_grad_sync or cfg.train.grad_accum_steps <= 1 or device.type != "cuda":
        return bool(cfg.parallel.defer_grad_sync)
    need = 4 * cfg.model.num_params()
    total = torch.cuda.get_device_properties(device).total_memory
    if need > max_fraction * total:
        log.warning("parallel.defer_grad_sync: the unsharded fp32 gradients (%.1f GB) exceed %.0f%% of the "
                    "device's %.0f GB; reduce-scattering every micro-batch instead", need / 1e9,
                    100 * max_fraction, total / 1e9)
        return False
    return True


def set_gradient_sync(model: nn.Module, last_micro_batch: bool, defer: bool = True) -> bool:
    """Gradient reduction of the next backward under FSDP2 gradient accumulation.

    Call before each micro-batch's backward. With ``defer`` (``parallel.defer_grad_sync``), the
    backward of every micro-batch but the last reduces nothing: each rank accumulates its
    *unsharded* gradients locally (in ``reduce_dtype``) and the last micro-batch reduce-scatters
    the sum once, so a step with ``n`` micro-batches sends one reduce-scatter per FSDP group instead
    of ``n``. The price is memory: the unsharded gradients of the whole model stay allocated
    between micro-batches (``reduce_dtype`` bytes per parameter, not divided by the number of
    shards: 5.2 GB at 1.3B parameters in fp32, 56 GB at 14B, where ``defer=False`` is the choice).
    Without ``defer``, every micro-batch reduce-scatters (sharded gradients accumulate), and HSDP's
    all-reduce across replicas still waits for the last micro-batch.

    The summed gradient is the same up to floating-point summation order (reduce-then-add versus
    add-then-reduce).

    Returns:
        True when ``model`` is an FSDP2 module (the setting was applied), False otherwise (no-op).
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return False
    if defer:
        model.set_requires_gradient_sync(last_micro_batch)
    else:
        model.set_requires_gradient_sync(True)
        model.set_requires_all_reduce(last_micro_batch)  # HSDP: replicas reduce once per step
    return True


@torch.no_grad()
def sync_sp_gradients(model: nn.Module, sp_group, bucket_bytes: int = 64 << 20) -> None:
    """All-reduce (SUM) every gradient over ``sp_group``: for layouts whose gradient reduction does not
    include the SP ranks (``backend=none`` with SP). Call after the last backward of the step,
    before clipping. DTensor gradients are reduced on their local shards; a trainable parameter without a
    gradient takes part with zeros. Flattened into buckets of ``bucket_bytes`` (one collective per
    bucket and dtype). ``vdit.train.parallel.sequence.reduce_sp_gradients`` does the same for plain
    tensors; this one also accepts FSDP's DTensor gradients."""
    if sp_group is None or dist.get_world_size(sp_group) == 1:
        return
    grads = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # take part with zeros so every rank issues the same collectives
            p.grad = torch.zeros_like(p)
        g = p.grad
        grads.append(g.to_local() if isinstance(g, DTensor) else g)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for tensors in by_dtype.values():
        bucket, size = [], 0
        for g in tensors + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= bucket_bytes):
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=sp_group)
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
                bucket, size = [], 0


# ----------------------------------------------------------------------------------------- export
def gather_full_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Full (un-sharded) CPU parameters keyed by the plain model's names, without optimizer state.

    Sharded models are gathered one tensor at a time (``get_model_state_dict`` with
    ``full_state_dict=True, cpu_offload=True``); with ``rank0_only`` only rank 0 keeps them and the
    other ranks get ``{}`` (every rank must call: it is a collective).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        if rank0_only and dist.is_initialized() and dist.get_rank() != 0:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))
    if not rank0_only:
        sd = {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v.detach().cpu() for k, v in sd.items()}
    return sd

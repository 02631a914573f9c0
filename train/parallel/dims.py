"""Process-group start-up and the parallel layout: :class:`ParallelConfig`, :func:`init_distributed`, :class:`ParallelDims`.

The world is a 3-D grid of ranks, row-major over ``("dp_replicate", "dp_shard", "sp")``::

    rank = (r * dp_shard + s) * sp_size + p        r: replica, s: shard, p: sequence-parallel rank

- ``dp_replicate`` x ``dp_shard`` ranks read distinct data (``dp_size`` data streams, ``dp_rank``
  picks the stream); FSDP shards parameters over ``dp_shard`` (and replicates over ``dp_replicate``:
  HSDP when both are > 1).
- the ``sp_size`` ranks of one sequence-parallel group read the *same* samples and split each
  sample's tokens (see ``vdit.train.parallel.sequence``). SP ranks are adjacent, so with one node
  of 8 GPUs and ``sp_size <= 8`` the all-to-alls of Ulysses stay inside the node.

Sequence parallelism is further split into ``ulysses_size`` x ``ring_size`` (``sp_mode=hybrid``);
``sp_mode=ulysses`` is all Ulysses, ``sp_mode=ring`` all ring. Ulysses scatters attention heads, so
its degree must divide the number of heads.

Launch (both set up the same environment for :func:`init_distributed`)::

    torchrun --nproc-per-node 8 -m vdit.train.main parallel.dp_shard=-1
    srun --ntasks-per-node 8 python -m vdit.train.main parallel.dp_shard=-1
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = ["ParallelConfig", "DistInfo", "DistEnv", "parse_dist_env", "first_slurm_host", "init_distributed",
           "ParallelDims", "BACKENDS", "SP_MODES", "AC_MODES", "DTYPES", "resolve_param_dtype"]

BACKENDS = ("fsdp", "deepspeed", "none")
SP_MODES = ("ulysses", "ring", "hybrid")
AC_MODES = ("none", "full", "selective")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ParallelConfig:
    """How the model is distributed (the ``parallel/`` Hydra group).

    Attributes:
        backend: ``fsdp`` (FSDP2 ``fully_shard``, HSDP when ``dp_replicate > 1``), ``deepspeed``
            (ZeRO ``zero_stage``) or ``none`` (no data-parallel wrapper: one data stream, optionally
            sequence parallel).
        dp_replicate: replicas of the parameter shards (HSDP outer dim; FSDP only).
        dp_shard: ranks a parameter is sharded over; ``-1`` = whatever is left of the world size,
            ``world_size / (dp_replicate * sp_size)``.
        sp_size: sequence-parallel degree (ranks splitting one sample's tokens).
        sp_mode: ``ulysses`` (all-to-all over heads), ``ring`` (ring attention) or ``hybrid``
            (``ulysses_size`` x ``ring_size``).
        ulysses_size, ring_size: the two factors of ``sp_size`` for ``sp_mode=hybrid`` (derived
            for the other modes).
        zero_stage: DeepSpeed ZeRO stage (0-3).
        deepspeed_config: path of a DeepSpeed JSON whose fields override the generated config
            (deep merge).
        param_dtype, reduce_dtype: FSDP ``MixedPrecisionPolicy``: compute dtype of the gathered
            parameters and dtype of the gradient reduction (``fp32``/``bf16``/``fp16``). Sharded
            parameters and optimizer states stay fp32. ``param_dtype=auto`` (default) is ``bf16``
            when ``train.precision`` resolves to bf16 on CUDA and ``fp32`` otherwise (CPU runs stay
            fp32): all-gathers move half the bytes and autocast no longer re-casts every weight in
            every forward and recompute (:func:`resolve_param_dtype`). The reduction stays fp32.
        reshard_after_forward: free gathered parameters after forward (ZeRO-3-like; False keeps
            them until backward, ZeRO-2-like, more memory, one all-gather less).
        defer_grad_sync: with gradient accumulation under FSDP, reduce-scatter gradients once per
            step (at the last micro-batch) instead of once per micro-batch; costs the unsharded
            gradients of the whole model in memory between micro-batches (``reduce_dtype`` bytes per
            parameter per rank); on CUDA it is dropped, with a warning, when that exceeds a quarter of
            the device (:func:`vdit.train.parallel.fsdp.defer_grad_sync_fits`, ``set_gradient_sync``).
        activation_checkpointing: ``none``, ``full`` (every block) or ``selective`` (every
            ``ac_every``-th block, counting from the first).
        ac_every: the period of ``selective`` checkpointing.
        compile: ``torch.compile`` every block (in place, parameter names unchanged).
        attention_backend: attention kernel (also Ulysses' inner kernel): ``auto`` picks flash-attn on CUDA
            for a bf16/fp16 compute dtype when it is installed, SDPA otherwise (fp32 included).
    """

    backend: str = "fsdp"
    dp_replicate: int = 1
    dp_shard: int = -1
    sp_size: int = 1
    sp_mode: str = "ulysses"
    ulysses_size: int = 1
    ring_size: int = 1
    zero_stage: int = 2
    deepspeed_config: Optional[str] = None
    param_dtype: str = "auto"
    reduce_dtype: str = "fp32"
    reshard_after_forward: bool = True
    defer_grad_sync: bool = True
    activation_checkpointing: str = "none"
    ac_every: int = 2
    compile: bool = False
    attention_backend: str = "auto"


def resolve_param_dtype(name: str, compute_dtype: torch.dtype, device: torch.device | str) -> str:
    """``parallel.param_dtype`` for a run computing in ``compute_dtype`` (the autocast dtype) on ``device``.

    ``auto`` -> ``bf16`` for a bf16 run on CUDA, else ``fp32``. An explicit low-precision
    ``param_dtype`` must equal the compute dtype: FSDP does not cast the forward's inputs (so the
    flow time and the RoPE tables stay fp32, see :func:`vdit.train.parallel.fsdp.apply_fsdp`), so the
    forward needs the autocast of that dtype to run the matmuls on the low-precision weights.

    Raises:
        ValueError: an unknown name, or ``param_dtype`` bf16/fp16 without a matching ``train.precision``.
    """
    if name == "auto":
        return "bf16" if compute_dtype == torch.bfloat16 and torch.device(device).type == "cuda" else "fp32"
    if name not in DTYPES:
        raise ValueError(f"parallel.param_dtype={name!r} is not one of {['auto', *DTYPES]}")
    if name != "fp32" and DTYPES[name] != compute_dtype:
        raise ValueError(f"parallel.param_dtype={name} needs the forward to run under {name} autocast, but "
                         f"train.precision resolves to {str(compute_dtype).replace('torch.', '')}; set "
                         f"train.precision={name}, or parallel.param_dtype=auto (or fp32)")
    return name


# ------------------------------------------------------------------------------------- environment
@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: global ``rank``, ``world_size``, ``local_rank`` on its node, ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class DistEnv:
    """What the launcher told this process (parsed, nothing initialized). ``source``: torchrun | slurm | single."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str


def first_slurm_host(nodelist: str, use_scontrol: bool = True) -> str:
    """First host name of a SLURM node list (``node[03-05,9],gpu7`` -> ``node03``).

    Uses ``scontrol show hostnames`` when it is on PATH (it knows every syntax SLURM accepts),
    else parses the common forms: ``host``, ``a,b``, ``prefix[01-04,7]suffix``.

    Raises:
        ValueError: an empty or unparseable list.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM node list is empty (SLURM_JOB_NODELIST unset?)")
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError) as e:  # fall back to parsing
            log.warning("scontrol show hostnames %s failed (%s); parsing the node list", nodelist, e)
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first item
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    item = nodelist[:end]
    m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", item)
    if m is None:
        if "[" in item or "]" in item or not item:
            raise ValueError(f"cannot parse SLURM node list {nodelist!r}; install scontrol or set MASTER_ADDR")
        return item
    prefix, ranges, suffix = m.groups()
    if "[" in suffix:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r} (several bracket groups); install scontrol "
                         "or set MASTER_ADDR")
    first = ranges.split(",")[0].split("-")[0]  # keeps zero padding: "03-05" -> "03"
    return f"{prefix}{first}{suffix}"


def parse_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's environment: torchrun/``torch.distributed`` (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) first, then SLURM (``SLURM_PROCID``,
    ``SLURM_NTASKS``, ``SLURM_LOCALID``, first host of ``SLURM_JOB_NODELIST``), else one process.

    Under SLURM, ``MASTER_ADDR``/``MASTER_PORT`` from the environment win; the default port is
    ``20000 + SLURM_JOB_ID % 10000`` so two jobs sharing a node do not collide.

    Raises:
        ValueError: inconsistent values (rank outside the world, missing MASTER_ADDR with torchrun
            variables), naming the variables.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        if world > 1 and "MASTER_ADDR" not in env:
            raise ValueError(f"RANK={rank} WORLD_SIZE={world} are set but MASTER_ADDR is not; launch with torchrun "
                             "or export MASTER_ADDR/MASTER_PORT")
        addr, port, source = env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        addr = env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if world > 1 else "127.0.0.1")
        job = env.get("SLURM_JOB_ID", "0")
        port = int(env.get("MASTER_PORT") or 20000 + (int(job) if job.isdigit() else 0) % 10000)
        source = "slurm"
    else:
        rank, world, local, addr, port, source = 0, 1, 0, "127.0.0.1", 29500, "single"
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world} (from {source} environment)")
    return DistEnv(rank, world, local, addr, port, source)


def init_distributed(timeout_s: float = 1800.0, environ: Mapping[str, str] | None = None) -> DistInfo:
    """Join the job's process group (NCCL with CUDA, gloo otherwise); return this rank's :class:`DistInfo`.

    Single process (no launcher variables, or a world of 1): nothing is initialized. An already
    initialized process group (tests, notebooks) is reused. Under SLURM the torchrun variables
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) are exported, so
    libraries reading them (DeepSpeed) agree.

    On CUDA the current device is set to ``cuda:LOCAL_RANK`` (modulo the visible devices) in every
    branch, before any collective: NCCL object collectives and barriers run on the *current*
    device, so a reused group without ``set_device`` would put every rank's traffic on cuda:0.
    """
    cuda = torch.cuda.is_available()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        env = os.environ if environ is None else environ
        local = int(env.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()) if cuda else rank))
        device = torch.device("cpu")
        if cuda:
            device = torch.device("cuda", local % torch.cuda.device_count())
            torch.cuda.set_device(device)
        return DistInfo(rank, world, local, device)
    e = parse_dist_env(environ)
    device = torch.device("cuda", e.local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if e.world_size == 1:
        return DistInfo(0, 1, 0, device)
    if environ is None:
        os.environ.update(RANK=str(e.rank), WORLD_SIZE=str(e.world_size), LOCAL_RANK=str(e.local_rank),
                          MASTER_ADDR=e.master_addr, MASTER_PORT=str(e.master_port))
    backend = "nccl" if cuda else "gloo"
    log.info("init_process_group(%s) rank %d/%d local %d via %s, master %s:%d", backend, e.rank, e.world_size,
             e.local_rank, e.source, e.master_addr, e.master_port)
    # Under torchrun use env:// so the rendezvous store torchrun already created is reused (with
    # --master_port 0 or c10d rendezvous, MASTER_PORT is not a port anyone listens on for us).
    init_method = "env://" if e.source == "torchrun" and environ is None else f"tcp://{e.master_addr}:{e.master_port}"
    dist.init_process_group(backend, init_method=init_method, rank=e.rank,
                            world_size=e.world_size, timeout=timedelta(seconds=timeout_s),
                            device_id=device if cuda else None)
    return DistInfo(e.rank, e.world_size, e.local_rank, device)


# ------------------------------------------------------------------------------------------ layout
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class ParallelDims:
    """The resolved, validated layout of a :class:`ParallelConfig` on ``world_size`` ranks.

    Args:
        cfg: the ``parallel`` config.
        world_size: number of ranks.
        num_heads: attention heads of the model; checked against the Ulysses degree when given.

    Attributes:
        dp_replicate, dp_shard, sp_size, ulysses_size, ring_size: resolved sizes.
        mesh: the ``("dp_replicate", "dp_shard", "sp")`` DeviceMesh after :meth:`build_mesh`.

    Raises:
        ValueError: with the offending numbers and a suggested fix, when the sizes do not multiply
            to ``world_size``, the SP sub-sizes do not multiply to ``sp_size``, the Ulysses degree
            does not divide ``num_heads``, or an option does not apply to the backend.
    """

    def __init__(self, cfg: ParallelConfig, world_size: int, num_heads: int | None = None):
        self.cfg, self.world_size = cfg, world_size
        for name, value, allowed in (("backend", cfg.backend, BACKENDS), ("sp_mode", cfg.sp_mode, SP_MODES),
                                     ("activation_checkpointing", cfg.activation_checkpointing, AC_MODES),
                                     ("param_dtype", cfg.param_dtype, ("auto", *DTYPES)),
                                     ("reduce_dtype", cfg.reduce_dtype, tuple(DTYPES))):
            if value not in allowed:
                raise ValueError(f"parallel.{name}={value!r} is not one of {list(allowed)}")
        for name in ("dp_replicate", "sp_size", "ulysses_size", "ring_size", "ac_every"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(cfg, name)} must be >= 1")
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        if not 0 <= cfg.zero_stage <= 3:
            raise ValueError(f"parallel.zero_stage={cfg.zero_stage} must be 0, 1, 2 or 3")
        self.dp_replicate, self.sp_size = cfg.dp_replicate, cfg.sp_size
        if cfg.dp_shard == -1:
            rest = cfg.dp_replicate * cfg.sp_size
            if world_size % rest:
                raise ValueError(f"world_size={world_size} is not divisible by parallel.dp_replicate * parallel.sp_size"
                                 f" = {cfg.dp_replicate} * {cfg.sp_size} = {rest}, so parallel.dp_shard=-1 cannot be "
                                 f"resolved; pick dp_replicate and sp_size whose product divides {world_size}")
            self.dp_shard = world_size // rest
        elif cfg.dp_shard >= 1:
            self.dp_shard = cfg.dp_shard
        else:
            raise ValueError(f"parallel.dp_shard={cfg.dp_shard} must be >= 1 or -1 (the rest of the world)")
        product = self.dp_replicate * self.dp_shard * self.sp_size
        if product != world_size:
            raise ValueError(f"parallel.dp_replicate * dp_shard * sp_size = {self.dp_replicate} * {self.dp_shard} * "
                             f"{self.sp_size} = {product} but world_size={world_size}; set parallel.dp_shard=-1 to use "
                             f"the rest of the world, or change the sizes so the product is {world_size}")
        self.ulysses_size, self.ring_size = self._resolve_sp(cfg)
        if num_heads is not None and num_heads % self.ulysses_size:
            options = [u for u in _divisors(self.sp_size) if num_heads % u == 0 and u > 1]
            hint = (f"sp_mode=hybrid with ulysses_size={max(options)} ring_size={self.sp_size // max(options)}"
                    if options else "")
            raise ValueError(f"model.num_heads={num_heads} is not divisible by the Ulysses degree {self.ulysses_size} "
                             f"(parallel.sp_mode={cfg.sp_mode}, sp_size={self.sp_size}): Ulysses gives every rank "
                             f"num_heads / ulysses_size whole heads. Use parallel.sp_mode=ring"
                             + (f", or {hint}" if hint else "") + ", or a head count divisible by the degree")
        if cfg.backend == "deepspeed" and self.dp_replicate > 1:
            raise ValueError(f"parallel.dp_replicate={self.dp_replicate} applies to backend=fsdp (HSDP); DeepSpeed "
                             "ZeRO partitions over all data-parallel ranks: use dp_replicate=1 and dp_shard=-1")
        if cfg.backend == "deepspeed" and cfg.zero_stage == 0:
            raise ValueError("parallel.zero_stage=0 is plain data parallel: use backend=fsdp with dp_replicate="
                             f"{world_size // self.sp_size} dp_shard=1 (DDP-equivalent), or zero_stage 1-3")
        if cfg.backend == "none" and self.dp_size > 1:
            raise ValueError(f"parallel.backend=none runs a single data stream but dp_replicate * dp_shard = "
                             f"{self.dp_size}; use backend=fsdp or deepspeed, or sp_size={world_size}")
        self.mesh = None

    @staticmethod
    def _resolve_sp(cfg: ParallelConfig) -> tuple[int, int]:
        sp, u, r = cfg.sp_size, cfg.ulysses_size, cfg.ring_size
        if cfg.sp_mode == "hybrid":
            if u * r != sp:
                raise ValueError(f"sp_mode=hybrid needs parallel.ulysses_size * ring_size == sp_size, got {u} * {r} = "
                                 f"{u * r} != {sp}; e.g. ulysses_size={sp} ring_size=1, or ulysses_size=1 "
                                 f"ring_size={sp}")
            return u, r
        own, other = ("ulysses_size", "ring_size") if cfg.sp_mode == "ulysses" else ("ring_size", "ulysses_size")
        if getattr(cfg, other) != 1 or getattr(cfg, own) not in (1, sp):
            raise ValueError(f"sp_mode={cfg.sp_mode} uses all sp_size={sp} ranks for {cfg.sp_mode}, but "
                             f"ulysses_size={u} ring_size={r} were set; use sp_mode=hybrid to split sp_size")
        return (sp, 1) if cfg.sp_mode == "ulysses" else (1, sp)

    def __repr__(self) -> str:
        return (f"ParallelDims(world={self.world_size}, dp_replicate={self.dp_replicate}, dp_shard={self.dp_shard}, "
                f"sp={self.sp_size} [ulysses={self.ulysses_size} x ring={self.ring_size}], backend={self.cfg.backend})")

    # ----------------------------------------------------------------------------------- sizes
    @property
    def dp_size(self) -> int:
        """Distinct data streams: ``dp_replicate * dp_shard`` (the global batch is ``micro * accum * dp_size``)."""
        return self.dp_replicate * self.dp_shard

    @property
    def sp_enabled(self) -> bool:
        return self.sp_size > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.cfg.backend == "fsdp"

    def _rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def dp_rank(self) -> int:
        """Which data stream this rank reads (equal on the ranks of one SP group), in ``[0, dp_size)``."""
        return self._rank() // self.sp_size

    @property
    def sp_rank(self) -> int:
        """This rank's position in its SP group, in ``[0, sp_size)``."""
        return self._rank() % self.sp_size

    # ------------------------------------------------------------------------------------ mesh
    def build_mesh(self, device_type: str = "cpu"):
        """Create the ``("dp_replicate", "dp_shard", "sp")`` DeviceMesh (size-1 dims kept), plus the flattened
        dims ``"dp_shard_sp"`` (when ``sp_size > 1``) and ``"dp"`` (when ``dp_replicate > 1``).
        Needs an initialized process group of ``world_size`` ranks."""
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized() or dist.get_world_size() != self.world_size:
            raise RuntimeError(f"build_mesh needs an initialized process group of {self.world_size} ranks "
                               "(call init_distributed() first)")
        self.mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.sp_size),
                                     mesh_dim_names=("dp_replicate", "dp_shard", "sp"))
        if self.sp_size > 1:
            self.mesh["dp_shard", "sp"]._flatten("dp_shard_sp")
        if self.dp_replicate > 1:
            self.mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return self.mesh

    def _need_mesh(self):
        if self.mesh is None:
            raise RuntimeError("call ParallelDims.build_mesh() first")
        return self.mesh

    @property
    def dp_mesh(self):
        """Data-parallel mesh: 1-D ``"dp_shard"``, or 2-D ``("dp_replicate", "dp_shard")`` for HSDP."""
        mesh = self._need_mesh()
        return mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else mesh["dp_shard"]

    @property
    def fsdp_mesh(self):
        """The mesh FSDP shards over: :attr:`dp_mesh` with the SP dim folded into the shard dim
        (``"dp_shard_sp"``) when ``sp_size > 1``, so parameters are also sharded across SP ranks.
        Use it with :func:`vdit.train.parallel.fsdp.apply_fsdp`'s ``gradient_divide_factor=dp_size``."""
        mesh = self._need_mesh()
        if self.sp_size == 1:
            return self.dp_mesh
        return mesh["dp_replicate", "dp_shard_sp"] if self.dp_replicate > 1 else mesh["dp_shard_sp"]

    @property
    def sp_mesh(self):
        return self._need_mesh()["sp"]

    @property
    def sp_group(self):
        """Process group of this rank's SP peers (size ``sp_size``)."""
        return self.sp_mesh.get_group()

    @property
    def dp_group(self):
        """Process group over all ``dp_size`` data streams at this SP position (flattened for HSDP)."""
        mesh = self._need_mesh()
        if self.dp_replicate == 1:
            return mesh["dp_shard"].get_group()
        return mesh["dp"].get_group()

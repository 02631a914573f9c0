"""Config schemas: one dataclass per component, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` only override these schemas. Because the primary config
(``conf/train.yaml``) is typed by :class:`TrainConfig`, Hydra merges every group file and every
command-line override into a struct node: an undeclared key (``optim.lrr=1e-4``) fails at
start-up with "Key 'lrr' is not in struct", before any work is done.

Groups mirror the dataclasses: ``model/`` -> :class:`vdit.model.dit.DiTConfig`, ``data/`` ->
:class:`DataConfig`, ``optim/`` -> :class:`OptimConfig`, ``train/`` -> :class:`LoopConfig`,
``eval/`` -> :class:`EvalConfig`, ``parallel/`` -> :class:`vdit.train.parallel.dims.ParallelConfig`; ``experiment/`` files compose groups (``# @package _global_``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from vdit.data.buckets import BucketConfig
from vdit.model.attention import QK_NORM_SCOPES
from vdit.model.dit import FINAL_MODULATIONS, MODULATIONS, POS_EMBEDS, TEXT_PADDINGS, DiTConfig
from vdit.model.layers import MLP_ACTIVATIONS
from vdit.model.rope import ROPE_SPLITS
from vdit.model.flow import PREDICTIONS, SOLVERS
from vdit.model.vae import AUTOENCODERS
from vdit.train.parallel.dims import ParallelConfig


@dataclass
class DataConfig:
    """Streaming video clips from webdataset shards (see ``vdit.data.pipeline``).

    ``shards`` is a directory holding ``*.tar`` shards (and the ``index.json`` that
    ``vdit-ingest`` writes), a brace pattern (``/data/clips-{000000..000127}.tar``), a glob, or a
    ``pipe:`` URL pattern. ``num_frames``/``height``/``width`` are in pixel space (frames, pixels);
    clips are resized so the short side covers the target, then cropped. Frames are taken at
    ``target_fps`` (frames per second) when set, else every ``frame_stride``-th source frame.
    ``batch_size`` is per rank (micro-batch); the global batch is
    ``batch_size * grad_accum_steps * data_parallel_size``.

    ``buckets`` (with a non-empty ``buckets.buckets`` list) switches to variable shapes: each clip goes to its nearest
    ``(num_frames, height, width)`` bucket and a bucket's batch size comes from
    ``buckets.token_budget`` (see :mod:`vdit.data.buckets`); ``num_frames/height/width`` and
    ``batch_size`` are then unused. ``video_dtype=uint8`` ships frames as bytes and normalises on the
    training device (4x less host traffic); ``auto`` (default) is uint8 on CUDA and float32 elsewhere
    (bit-equal inputs either way). Batches for a CUDA device are pinned (asynchronous copies).
    ``decode_once_per_group``: under sequence parallelism, the SP group's rank 0 alone reads and
    decodes the group's batches and broadcasts them (:mod:`vdit.train.parallel.group_batches`);
    ``false``: every SP rank decodes the same clips itself. A shard read is retried ``read_retries`` times with
    exponential backoff from ``read_backoff_s``; one attempt is bounded by ``read_timeout_s`` seconds.

    Validation data (see ``eval.val_every``): ``val_shards`` is a separate shard spec never trained
    on; otherwise the clips of ``val_fraction`` of the source videos, chosen by a fixed hash of the
    source (:mod:`vdit.data.split`), are held out of training: the same clips in every run and on
    any number of ranks.
    """

    shards: str = MISSING
    num_frames: int = 16
    height: int = 32
    width: int = 32
    target_fps: Optional[float] = 8.0
    frame_stride: int = 1
    batch_size: int = 4
    num_workers: int = 0
    shuffle: bool = True
    random_crop: bool = False
    seed: int = 0
    caption_dropout: float = 0.1
    buckets: BucketConfig = field(default_factory=BucketConfig)  # an empty bucket list: fixed shape
    video_dtype: str = "auto"
    decode_once_per_group: bool = True
    read_retries: int = 2
    read_backoff_s: float = 1.0
    read_timeout_s: Optional[float] = 600.0
    val_fraction: float = 0.0
    val_shards: Optional[str] = None


@dataclass
class TextEncoderConfig:
    """Frozen text encoder: ``minilm`` (packaged, offline default), ``hf`` (local T5/UMT5 path), ``random`` (tests).

    ``dtype``: ``fp32`` | ``bf16`` | ``fp16`` | None (the encoder's default, fp32).
    ``cache_bytes``: host memory (bytes, per rank) of the per-caption feature cache, an LRU
    (:class:`vdit.train.build.TextCache`); 2 GiB holds 256 captions of a 4096-wide T5 at 512
    tokens (8 MiB each in fp32). 0 disables the cache. Unused when training on latent shards.
    """

    name: str = "minilm"
    path: Optional[str] = None
    max_length: int = 32
    dtype: Optional[str] = None
    hidden_size: int = 384  # must equal the encoder's width (checked at build); model.text_dim follows it
    cache_bytes: int = 2 * 1024 ** 3


@dataclass
class AutoencoderConfig:
    """Video autoencoder: ``identity`` (pixel space) or a diffusers video VAE from a local ``path``.

    ``name``: ``identity`` | ``wan`` (AutoencoderKLWan) | ``hunyuan`` (AutoencoderKLHunyuanVideo) |
    ``cogvideox`` (AutoencoderKLCogVideoX). ``scaling_factor``: None uses the model's own
    normalisation (identity: 1.0). ``tiling``/``slicing`` trade speed for memory when encoding.
    """

    name: str = "identity"
    path: Optional[str] = None
    scaling_factor: Optional[float] = None
    dtype: Optional[str] = None
    tiling: bool = False
    slicing: bool = False


@dataclass
class FlowConfig:
    """Rectified-flow training objective (x_t = (1 - t) x_0 + t eps, target eps - x_0).

    ``timestep_sampling``: ``logit_normal`` (SD3, with ``logit_mean``/``logit_std``) or ``uniform``;
    ``uniform_frac``: the share of logit-normal draws replaced by uniform ones (both ends covered),
    drawn from ``U(uniform_min, 1)`` before the shift (``uniform_min`` > 0: the noisy end only).
    ``loss_weighting``: ``velocity`` (plain MSE on the velocity) or ``x0`` (the velocity MSE times
    ``t^2``, i.e. the MSE of the implied clean sample ``x_t - t v``: it stops the low-noise end,
    where the velocity error is the x0 error divided by ``t^2``, from drowning the high-noise end
    that decides layout and colour; see docs/training-recipe.md).
    ``foreground_weight``: strength of :func:`vdit.model.flow.foreground_weights` (each element's
    squared error times ``1 + foreground_weight * |x0 - temporal median of x0|``); 0 (default) is the
    plain MSE. It trades colour fidelity for small moving objects (docs/training-recipe.md). It lets small moving objects count in the loss (docs/training-recipe.md).
    ``flow_shift``: timestep shift s in t' = s t / (1 + (s - 1) t); when ``shift_base_tokens`` is set
    the shift becomes resolution dependent, ``flow_shift * sqrt(num_tokens / shift_base_tokens)``.
    """

    timestep_sampling: str = "logit_normal"
    loss_weighting: str = "velocity"
    foreground_weight: float = 0.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    uniform_frac: float = 0.0
    uniform_min: float = 0.0
    flow_shift: float = 1.0
    shift_base_tokens: Optional[int] = None


@dataclass
class OptimConfig:
    """AdamW with linear warmup then ``cosine`` or ``constant`` learning rate (``lr`` is the peak).

    ``implementation``: torch's AdamW kernel: ``fused`` (one kernel over all parameters, CPU and
    CUDA), ``foreach`` (multi-tensor), ``for_loop``, or ``auto`` (fused; torchtitan's default too).
    Measured by ``bench/step.py``, 16.8M parameters on 2 CPU cores: fused 13 ms, torch's default 33 ms,
    foreach 51 ms per step. Results agree to rounding; a run resumes with the same kernel.
    """

    lr: float = 3e-4
    implementation: str = "auto"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class LoopConfig:
    """The training loop: steps, accumulation, precision, EMA, logging and checkpoint cadence.

    ``precision``: ``fp32``, ``bf16`` (autocast) or ``auto`` (bf16 on CUDA, fp32 on CPU: this
    class of CPU has no native bf16 and runs bf16 matmuls hundreds of times slower).
    ``resume``: ``auto`` (latest complete checkpoint in ``run_dir``, else start fresh), ``never``,
    or a checkpoint directory path.
    ``flops_budget``: training compute of the run in model FLOPs (``vdit.train.flops``); when > 0 it
    replaces ``steps`` by ``floor(flops_budget / FLOPs per step)``, computed at start-up from the
    model, the clip shape, the padded caption length and the global batch (an iso-FLOP sweep gives
    every model size the same budget). Needs fixed-shape data (no ``data.buckets``).
    ``async_checkpoint``: write checkpoints in the background (``dcp.async_save``): training stalls
    only while the state is copied to host memory (one extra host copy of this rank's model,
    optimizer and EMA state, kept and refilled by later saves); ``COMPLETE`` follows once every
    rank's write has finished, at most one save is in flight, and a save still running when ``fit``
    ends is waited for. ``false``: the blocking save (no extra host memory).
    ``init_from``: a vdit export folder (``vdit-export``, ``vdit-import wan``) whose weights start a
    fresh run instead of ``init_weights(seed)``: model weights only (new optimizer and scheduler,
    EMA initialised from them, step 0); its ``model`` config must equal this run's. A checkpoint
    found by ``resume`` takes precedence.
    ``cond_frames_prob``: probability that a training sample is a continuation sample: its first
    ``k`` latent frames (``k`` uniform in ``1 .. max_cond_frames``, in multiples of the temporal
    patch) are given clean at flow time 0 and left out of the loss (:mod:`vdit.train.conditioning`,
    docs/continuation.md). 0 (default) trains text-to-video only. ``max_cond_frames`` must be smaller
    than the clips' latent frames.
    """

    steps: int = 100
    flops_budget: float = 0.0
    grad_accum_steps: int = 1
    precision: str = "auto"
    seed: int = 0
    ema_decay: float = 0.999
    log_every: int = 10
    checkpoint_every: int = 50
    keep_last_k: int = 2
    async_checkpoint: bool = True
    resume: str = "auto"
    device: str = "auto"
    init_from: Optional[str] = None
    cond_frames_prob: float = 0.0
    max_cond_frames: int = 0
    noise_device: str = "auto"


@dataclass
class LoraConfig:
    """LoRA finetuning through ``peft`` (:mod:`vdit.train.lora`); ``rank: 0`` trains every weight.

    ``rank`` > 0 adds low-rank adapters ``W + (alpha / rank) B A`` (``A`` kaiming-uniform, ``B`` zero,
    so training starts from the base model's function) to the ``nn.Linear`` layers of the DiT
    blocks whose last name is in ``target_modules`` (``q_proj, k_proj, v_proj, out_proj`` of self-
    and cross-attention, ``fc1, fc2`` of the MLP); every other weight is frozen (still FSDP-sharded)
    and only the adapters are in the optimizer and the EMA. ``dropout`` is applied to the adapter
    input. Checkpoints hold the adapters (and the frozen base); ``vdit-export --merge-lora`` folds
    them into plain weights.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])


@dataclass
class EvalConfig:
    """Sampling and scoring at the end of training (and every ``every`` steps when > 0).

    ``prompts``: captions to sample; ``num_physics_prompts`` extra physics-scene prompts are
    generated by the synthetic renderer from ``physics_seed`` (their parameters drive the
    trajectory checks; colour combinations seen in training are avoided, so they measure
    generalisation; ball radii in ``physics_radius_frac`` of the smaller side, as the training clips'
    ``vdit-prepare-samples --ball-radius-frac``, and motion ranges narrowed to
    ``physics_scene_spread``, as the training clips' ``--scene-spread``), and ``num_train_physics_prompts`` physics captions are taken from the training
    shards (clips holding renderer parameters). ``num_steps`` steps of the flow ODE with ``solver``
    (``euler`` or ``heun``) on a schedule shifted by ``flow_shift``, classifier-free guidance
    ``cfg_scale`` (1.0 disables the unconditional pass), applied at flow times in ``cfg_interval``
    (guidance in a limited interval, :func:`vdit.eval.sample.sample_latents`). Prompt ``i``'s noise is seeded by ``(seed, i)``.

    In training the prompts are shared out over the data-parallel ranks (rank r samples prompts r,
    r + dp, ...) and sampled with the training model itself, EMA weights swapped in when ``use_ema``
    (:mod:`vdit.eval.sharded`, :mod:`vdit.train.evaluation`); ``batch_size`` prompts per sampling
    pass on one rank (each pass holds the inference activations of ``batch_size`` samples, twice
    that with guidance).

    Validation loss: every ``val_every`` steps (0 = never) the flow loss on up to ``val_clips``
    held-out clips (``data.val_fraction`` / ``data.val_shards``) at the fixed ``val_timesteps`` with
    one fixed noise draw per clip, logged as ``loss/val`` and ``loss/val@t=0.50``, plus the
    one-step clean-data error ``val/x0_mse@t=0.50`` (pixels or latents, MSE).

    Continuation suite (:mod:`vdit.eval.continuation`, docs/continuation.md; for a model trained with
    ``train.cond_frames_prob > 0``): ``continuation_clips`` held-out clips (needs
    ``data.val_fraction`` or ``data.val_shards``) and ``continuation_scenes`` new procedural scenes
    are continued from their first ``continuation_frames`` latent frames (a multiple of the temporal
    patch, fewer than the clip's latent frames) and scored against the real continuation
    (Physics-IQ IoUs and MSE) and, for the scenes, with the trajectory checks. 0 and 0: off.
    """

    enabled: bool = True
    every: int = 0
    prompts: list[str] = field(default_factory=list)
    num_physics_prompts: int = 2
    num_train_physics_prompts: int = 0
    physics_seed: int = 12345
    physics_radius_frac: list[float] = field(default_factory=lambda: [0.045, 0.11])
    physics_scene_spread: float = 1.0
    num_steps: int = 20
    solver: str = "euler"
    cfg_scale: float = 3.0
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    flow_shift: float = 1.0
    seed: int = 0
    use_ema: bool = True
    batch_size: int = 1
    val_every: int = 0
    val_timesteps: list[float] = field(default_factory=lambda: [0.05, 0.25, 0.5, 0.75, 0.95])
    val_clips: int = 32
    continuation_clips: int = 0
    continuation_scenes: int = 0
    continuation_frames: int = 1


@dataclass
class WandbConfig:
    """Weights & Biases: ``mode`` is ``offline`` (default; files under run_dir/wandb), ``online`` or ``disabled``."""

    mode: str = "offline"
    project: str = "vdit"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class ReliabilityConfig:
    """Numerics guard, rollback, hang watchdog and collective timeouts (see README "Reliability").

    ``skip_nonfinite``: a step whose loss or gradient norm is NaN/Inf (on any rank) skips the
    optimizer, scheduler and EMA update on every rank (counted as ``train/skipped_steps``).
    ``max_bad_steps`` consecutive bad steps -- non-finite (skipped) or a spike: a loss above
    ``spike_factor`` x its running mean (exponential, ``spike_beta``; checked after
    ``spike_warmup_steps`` good steps; 0 disables), which is applied, since one high flow-matching
    loss is normal -- roll the weights, optimizer, scheduler and EMA back to the last good checkpoint; training then
    continues with the data after the bad batches. More than ``max_rollbacks`` rollbacks stop the
    run (exit status 1). ``watchdog_timeout_s``: a step (data read, forward, backward, collective)
    or a checkpoint save taking longer dumps every thread's stack to ``{run_dir}/hang-rank{r}.txt``
    and exits with status 3 (0 disables). ``collective_timeout_s``: the process group's timeout.
    """

    skip_nonfinite: bool = True
    max_bad_steps: int = 3
    spike_factor: float = 10.0
    spike_beta: float = 0.9
    spike_warmup_steps: int = 10
    max_rollbacks: int = 3
    watchdog_timeout_s: float = 1800.0
    collective_timeout_s: float = 1800.0


@dataclass
class TrainConfig:
    """The whole job. ``run_dir`` holds config.yaml, metrics.jsonl, checkpoints/, samples/, eval/, wandb/."""

    model: DiTConfig = field(default_factory=DiTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run_name: str = "run"
    run_dir: str = "runs/${run_name}"


_VALID = {
    ("model", "modulation"): MODULATIONS,
    ("model", "prediction"): PREDICTIONS,
    ("model", "pos_embed"): POS_EMBEDS,
    ("model", "qk_norm_scope"): QK_NORM_SCOPES,
    ("model", "mlp_act"): MLP_ACTIVATIONS,
    ("model", "final_modulation"): FINAL_MODULATIONS,
    ("model", "rope_split"): ROPE_SPLITS,
    ("model", "text_padding"): TEXT_PADDINGS,
    ("eval", "solver"): SOLVERS,
    ("text_encoder", "name"): ("minilm", "hf", "random"),
    ("vae", "name"): AUTOENCODERS,
    ("flow", "timestep_sampling"): ("logit_normal", "uniform"),
    ("flow", "loss_weighting"): ("velocity", "x0"),
    ("optim", "schedule"): ("cosine", "constant"),
    ("optim", "implementation"): ("auto", "fused", "foreach", "for_loop"),
    ("train", "precision"): ("auto", "fp32", "bf16"),
    ("wandb", "mode"): ("offline", "online", "disabled"),
    ("data", "video_dtype"): ("auto", "float32", "uint8"),
    ("train", "noise_device"): ("auto", "host", "device"),
    ("parallel", "backend"): ("fsdp", "deepspeed", "none"),
    ("parallel", "sp_mode"): ("ulysses", "ring", "hybrid"),
    ("parallel", "activation_checkpointing"): ("none", "full", "selective"),
    ("parallel", "attention_backend"): ("auto", "flash", "sdpa", "math"),
}


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore and vdit's OmegaConf resolvers (idempotent).

    Resolvers: ``${vdit.mul:a,b}`` (integer product; the model ladder's ``hidden_size = 64 * depth``).
    """
    OmegaConf.register_new_resolver("vdit.mul", lambda a, b: int(a) * int(b), replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="dit_schema", node=DiTConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="train", name="loop_schema", node=LoopConfig)
    cs.store(group="eval", name="eval_schema", node=EvalConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)


def validate(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """Check values Hydra's types cannot: enumerations, divisibility, ranges.

    Returns the config as a :class:`TrainConfig` object.

    Raises:
        ValueError: naming the offending key and the allowed values.
    """
    if isinstance(cfg, DictConfig):
        check_declared(cfg)
    obj: Any = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
    for (group, key), allowed in _VALID.items():
        value = getattr(getattr(obj, group), key)
        if value not in allowed:
            raise ValueError(f"{group}.{key}={value!r} is not one of {list(allowed)}")
    m, d = obj.model, obj.data
    if len(m.patch_size) != 3:
        raise ValueError(f"model.patch_size must have 3 entries (pt, ph, pw); got {list(m.patch_size)}")
    if m.hidden_size % m.num_heads:
        raise ValueError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    for name, size, p in (("num_frames", d.num_frames, m.patch_size[0]), ("height", d.height, m.patch_size[1]),
                          ("width", d.width, m.patch_size[2])):
        if size % p:
            raise ValueError(f"data.{name}={size} is not divisible by its model.patch_size entry {p}")
    if not 0.0 <= d.caption_dropout < 1.0:
        raise ValueError(f"data.caption_dropout={d.caption_dropout} must be in [0, 1)")
    if d.batch_size < 1 or obj.train.grad_accum_steps < 1 or obj.train.steps < 0:
        raise ValueError("data.batch_size and train.grad_accum_steps must be >= 1, train.steps >= 0")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    e = obj.eval
    if e.val_every < 0 or e.val_clips < 1 or not e.val_timesteps or not all(0.0 < t <= 1.0 for t in e.val_timesteps):
        raise ValueError(f"eval.val_every={e.val_every} must be >= 0, eval.val_clips={e.val_clips} >= 1 and "
                         f"eval.val_timesteps={list(e.val_timesteps)} non-empty values in (0, 1]")
    if e.val_every and not (d.val_fraction > 0 or d.val_shards):
        raise ValueError(f"eval.val_every={e.val_every} needs held-out clips: set data.val_fraction (e.g. 0.05) "
                         "or data.val_shards")
    if e.num_steps < 1 or e.num_physics_prompts < 0 or e.num_train_physics_prompts < 0:
        raise ValueError("eval.num_steps must be >= 1 and eval.num_physics_prompts, eval.num_train_physics_prompts >= 0")
    if not 0.0 <= obj.train.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay={obj.train.ema_decay} must be in [0, 1)")
    if obj.train.flops_budget < 0 or (obj.train.flops_budget > 0 and bool(d.buckets.buckets)):
        raise ValueError(f"train.flops_budget={obj.train.flops_budget} must be >= 0, and a budget needs fixed-shape "
                         "data (steps are counted from one clip shape): unset data.buckets")
    check_ranges(obj)
    check_buckets(obj)
    check_conditioning(obj)
    return obj


def check_declared(cfg: DictConfig, prefix: str = "") -> None:
    """Every key must be a field of its schema dataclass, also keys added with ``+key=value``.

    Raises:
        ValueError: naming the undeclared key (e.g. ``optim.lrr``) and the declared ones.
    """
    import dataclasses

    schema = OmegaConf.get_type(cfg)
    if schema is None or not dataclasses.is_dataclass(schema):
        return
    fields = {f.name for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ValueError(f"{name} is not a config key (a typo, or a '+' override of an undeclared key); "
                             f"declared keys{' of ' + prefix[:-1] if prefix else ''}: {sorted(fields)}")
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            check_declared(node, f"{name}.")


# name -> (test, what it must be). One line per numeric key whose range Hydra's types cannot express.
_RANGES = {
    "optim.lr": (lambda v: v > 0, "> 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.eps": (lambda v: v > 0, "> 0"),
    "optim.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "optim.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.grad_clip": (lambda v: v > 0, "> 0"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "train.checkpoint_every": (lambda v: v >= 1, ">= 1"),
    "train.keep_last_k": (lambda v: v >= 1, ">= 1"),
    "train.cond_frames_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "flow.uniform_frac": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "flow.uniform_min": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.max_cond_frames": (lambda v: v >= 0, ">= 0"),
    "data.num_workers": (lambda v: v >= 0, ">= 0"),
    "text_encoder.cache_bytes": (lambda v: v >= 0, ">= 0"),
    "data.frame_stride": (lambda v: v >= 1, ">= 1"),
    "data.target_fps": (lambda v: v is None or v > 0, "> 0 or null"),
    "data.read_retries": (lambda v: v >= 0, ">= 0"),
    "data.read_backoff_s": (lambda v: v >= 0, ">= 0"),
    "data.read_timeout_s": (lambda v: v is None or v > 0, "> 0 or null"),
    "flow.foreground_weight": (lambda v: v >= 0, ">= 0"),
    "model.depth": (lambda v: v >= 1, ">= 1"),
    "model.hidden_size": (lambda v: v >= 1, ">= 1"),
    "model.mlp_ratio": (lambda v: v > 0, "> 0"),
    "lora.rank": (lambda v: v >= 0, ">= 0 (0 disables LoRA)"),
    "lora.alpha": (lambda v: v > 0, "> 0"),
    "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eval.every": (lambda v: v >= 0, ">= 0"),
    "eval.num_steps": (lambda v: v >= 1, ">= 1"),
    "eval.batch_size": (lambda v: v >= 1, ">= 1"),
    "eval.continuation_clips": (lambda v: v >= 0, ">= 0"),
    "eval.physics_radius_frac": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] < 0.5, "[lo, hi] with 0 < lo <= hi < 0.5"),
    "eval.physics_scene_spread": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "eval.cfg_interval": (lambda v: len(v) == 2 and 0 <= v[0] <= v[1] <= 1, "[lo, hi] with 0 <= lo <= hi <= 1"),
    "eval.continuation_scenes": (lambda v: v >= 0, ">= 0"),
    "reliability.max_bad_steps": (lambda v: v >= 1, ">= 1"),
    "reliability.spike_factor": (lambda v: v == 0 or v > 1, "> 1, or 0 to disable"),
    "reliability.spike_beta": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "reliability.spike_warmup_steps": (lambda v: v >= 0, ">= 0"),
    "reliability.max_rollbacks": (lambda v: v >= 0, ">= 0"),
    "reliability.watchdog_timeout_s": (lambda v: v >= 0, ">= 0 (0 disables)"),
    "reliability.collective_timeout_s": (lambda v: v > 0, "> 0"),
}


def check_ranges(obj: Any) -> None:
    """Numeric ranges (``optim.lr > 0``, ...), each error naming the key.

    Raises:
        ValueError: ``optim.lr=-0.001 must be > 0``.
    """
    for name, (ok, what) in _RANGES.items():
        group, key = name.split(".")
        value = getattr(getattr(obj, group), key)
        if not ok(value):
            raise ValueError(f"{name}={value!r} must be {what}")
    betas = list(obj.optim.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"optim.betas={betas} must be two numbers in [0, 1)")


# Compression (frames, pixels) and causal time of the autoencoders, as their released weights have it.
VAE_COMPRESSION = {"identity": (1, 1, False), "wan": (4, 8, True), "hunyuan": (4, 8, True), "cogvideox": (4, 8, True)}


def check_buckets(obj: Any) -> None:
    """Every bucket ``(T, H, W)`` must fit the autoencoder's compression and then ``model.patch_size``.

    Raises:
        ValueError: naming ``data.buckets.buckets[i]``, the shape, and the factor it misses.
    """
    ct, cs, causal = VAE_COMPRESSION.get(obj.vae.name, (1, 1, False))
    pt, ph, pw = obj.model.patch_size
    for i, b in enumerate(obj.data.buckets.buckets):
        name = f"data.buckets.buckets[{i}]=(num_frames={b.num_frames}, height={b.height}, width={b.width})"
        if (b.num_frames - causal) % ct or b.height % cs or b.width % cs or b.num_frames < 1:
            frames = f"num_frames = 1 + {ct} k" if causal else f"num_frames divisible by {ct}"
            raise ValueError(f"{name} does not fit vae.name={obj.vae.name} (needs {frames}, height and width "
                             f"divisible by {cs})")
        t = 1 + (b.num_frames - 1) // ct if causal else b.num_frames // ct
        if t % pt or (b.height // cs) % ph or (b.width // cs) % pw:
            raise ValueError(f"{name}: its latent grid ({t}, {b.height // cs}, {b.width // cs}) is not divisible by "
                             f"model.patch_size={list(obj.model.patch_size)}")


def latent_frames(obj: Any, num_frames: int) -> int:
    """Latent frames of a ``num_frames``-frame clip under ``vae.name``'s temporal compression."""
    ct, _, causal = VAE_COMPRESSION.get(obj.vae.name, (1, 1, False))
    return 1 + (num_frames - 1) // ct if causal else num_frames // ct


def check_conditioning(obj: Any) -> None:
    """Frame conditioning (``train.cond_frames_prob`` > 0) needs ``1 <= train.max_cond_frames <``
    the latent frames of every clip shape (``data.num_frames``, or each bucket's), and at least the
    temporal patch; the continuation suite (``eval.continuation_clips`` / ``_scenes`` > 0) needs
    ``eval.continuation_frames`` a multiple of the temporal patch below the sample's latent frames,
    and held-out clips for ``eval.continuation_clips``.

    Raises:
        ValueError: naming ``train.max_cond_frames`` or ``eval.continuation_*`` and the bound.
    """
    loop, e, d = obj.train, obj.eval, obj.data
    pt = obj.model.patch_size[0]
    if e.continuation_clips > 0 or e.continuation_scenes > 0:
        t = latent_frames(obj, d.num_frames)
        k = e.continuation_frames
        if not (1 <= k < t and k % pt == 0):
            raise ValueError(f"eval.continuation_frames={k} must be >= 1, < {t} (the latent frames of "
                             f"data.num_frames={d.num_frames}) and a multiple of model.patch_size[0]={pt}")
        if e.continuation_clips > 0 and not (d.val_fraction > 0 or d.val_shards):
            raise ValueError(f"eval.continuation_clips={e.continuation_clips} needs held-out clips: set "
                             "data.val_fraction (e.g. 0.1) or data.val_shards")
    if loop.cond_frames_prob <= 0:
        return
    shapes = [b.num_frames for b in d.buckets.buckets] or [d.num_frames]
    frames = min(latent_frames(obj, n) for n in shapes)
    if not pt <= loop.max_cond_frames < frames:
        raise ValueError(f"train.max_cond_frames={loop.max_cond_frames} must be >= {pt} (model.patch_size[0]) and "
                         f"< {frames}, the latent frames of the shortest clip (data.num_frames / buckets, "
                         f"vae.name={obj.vae.name}), when train.cond_frames_prob={loop.cond_frames_prob} > 0")


def load_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` (Hydra syntax) outside ``@hydra.main``.

    Used by tests and tools; ``vdit-train`` composes through ``hydra.main`` with the same files.

    Raises:
        hydra.errors.ConfigCompositionException / omegaconf errors for unknown keys or groups.
        ValueError: from :func:`validate`.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="vdit.conf", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    validate(cfg)
    return cfg

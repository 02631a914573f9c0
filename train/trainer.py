"""The Trainer: build every component from a :class:`TrainConfig`, then ``fit()``.

``fit()`` is the whole loop on one screen: resume -> {train_step, log, checkpoint, eval} -> final
save and eval. Everything that must survive a restart (model, optimizer, scheduler, EMA, data
position, step, RNG states) is registered with the checkpoint manager in :meth:`_stateful`, so a
run stopped at step k and resumed reproduces the uninterrupted run's losses exactly on CPU.
"""

from __future__ import annotations

import logging
import os
import copy
import dataclasses
import random
import time
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor

from vdit.data.latents import check_encode_meta, expected_meta_from_config, load_null_text
from vdit.data.pipeline import ClipSpec, ShardReadSpec, VideoPipeline
from vdit.data.transforms import to_model_range
from vdit.model import flow
from vdit.model.dit import VideoDiT
from vdit.train.build import (  # noqa: F401 - build_model is re-exported
    TextCache,
    build_frozen,
    build_model,
    resolve_device,
    resolve_precision,
    resolve_video_dtype,
)
from vdit.train.checkpoint import CheckpointManager, GlobalDataState, ModelOptimizerState, ObjectState
from vdit.train.conditioning import frame_conditioning
from vdit.train.config import TrainConfig
from vdit.train.draws import resolve_noise_device, sample_draws
from vdit.train.ema import EMA
from vdit.train.flops import PerfMeter, WorkCounter, peak_memory_bytes, training_flops
from vdit.train.guard import StepGuard, rollback
from vdit.train.logging import RunLogger
from vdit.train.optim import build_optimizer, build_scheduler
from vdit.train.parallel.attention import apply_attention_backend
from vdit.train.parallel.deepspeed import DeepSpeedState, build_deepspeed, deepspeed_config, require_deepspeed
from vdit.train.parallel.dims import ParallelDims, init_distributed, resolve_param_dtype
from vdit.train.parallel.fsdp import (apply_activation_checkpointing, materialize_and_init, materialize_from_state,
                                      parallelize, defer_grad_sync_fits, set_gradient_sync, sync_sp_gradients)
from vdit.train.parallel.group_batches import group_batches
from vdit.train.parallel.group_encode import encode_once_per_group
from vdit.train.parallel.sequence import apply_sequence_parallel, build_sp_groups
from vdit.train.preemption import Preemption, write_requeue_file
from vdit.train.runrecord import (
    ConfigRecord,
    apply_mutable,
    preflight,
    record_launch,
    trim_metrics,
    write_config,
)
from vdit.train.validation import Validator
from vdit.train.watchdog import Watchdog

log = logging.getLogger(__name__)


class _TrainerState:
    """Step counter and RNG states of the trainer (Stateful through ObjectState)."""

    def __init__(self, trainer: "Trainer"):
        self.t = trainer

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.t.step, "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate(), "totals": self.t.work.exact_totals()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t.step = int(state["step"])
        work = self.t.work
        work.flush()  # counts of steps before this state are not this run's any more
        work.totals = {**dict.fromkeys(work.KEYS, 0.0), **state.get("totals", {})}  # absent before v0.2
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])


class Trainer:
    """Flow-matching training of a VideoDiT on streamed clips.

    Args:
        cfg: a validated :class:`TrainConfig` (see :func:`vdit.train.config.validate`).

    The run directory ``cfg.run_dir`` receives ``config.yaml``, ``metrics.jsonl``,
    ``checkpoints/step-N/``, ``samples/step-N/``, ``eval/step-N.json`` and ``wandb/``.

    On latent shards (``vdit-encode``) the frozen text encoder and VAE are not built: ``text_encoder``,
    ``vae`` and ``encode_text`` stay None until something needs them (:meth:`frozen_encoders`): the
    in-loop sampling of ``eval.enabled`` (every rank, at the first evaluation: each data-parallel
    rank samples and decodes its share of the prompts) or validation clips read from video shards.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.dist = init_distributed(cfg.reliability.collective_timeout_s)
        self.is_main = self.dist.rank == 0
        self.device = self.dist.device if self.dist.is_distributed else resolve_device(cfg.train.device)
        self.dims = ParallelDims(cfg.parallel, self.dist.world_size, num_heads=cfg.model.num_heads)
        if self.dims.dp_size > 1 and cfg.parallel.backend == "none":
            raise ValueError(f"{self.dims.dp_size} data-parallel ranks need parallel.backend=fsdp or deepspeed "
                             "(backend=none has no gradient averaging)")
        if self.dist.is_distributed:
            self.dims.build_mesh(self.device.type)
        # Shards resolved and the resume target's architecture compared before anything is built or
        # written: a failed start leaves no run directory and never touches config.yaml.
        self.preflight = preflight(cfg)
        self.dtype = resolve_precision(cfg.train.precision, self.device)
        self.noise_device = resolve_noise_device(cfg.train.noise_device, self.device)  # None: the host stream
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)  # the global stream (LoRA dropout) starts the same in every run

        self.dp_rank, self.dp_size = self.dims.dp_rank, self.dims.dp_size
        self.dp_group = self.dims.dp_group if self.dist.is_distributed and self.dp_size > 1 else None
        self.text_encoder = self.vae = self.encode_text = None  # built by frozen_encoders()
        self.data = self.build_data()
        if self.data.is_latent:  # vdit-encode shards carry latents and text: the encoders are not built
            check_encode_meta(self.data.latent_meta, expected_meta_from_config(cfg))
            null_text, null_mask = load_null_text(self.data.latent_dir)  # (L, D), (L,)
            self.null_text, self.null_mask = null_text.to(self.device).float(), null_mask.to(self.device)
        else:
            self.frozen_encoders()
        if cfg.train.flops_budget > 0:  # before the scheduler: its decay must span the budget's steps
            self.resolve_flops_budget()
        self.engine = None  # DeepSpeed engine when parallel.backend=deepspeed
        self.model, self.optimizer, self.scheduler = self.build_parallel_model()
        self.ema = EMA(self.model, cfg.train.ema_decay)  # trainable parameters only (LoRA: the adapters)
        from vdit.train.lora import parameter_summary

        self.param_summary = parameter_summary(self.model)  # logged at start (LoRA vs full finetune memory)
        self.checkpoints = CheckpointManager(os.path.join(self.run_dir, "checkpoints"), cfg.train.keep_last_k,
                                             timeout_s=cfg.reliability.collective_timeout_s)
        self.validator = Validator(cfg, self.frozen_encoders, self.device, self.dtype, self.dp_rank,
                                   self.dp_size, self.dp_group) if cfg.eval.val_every else None
        self.step = 0
        # Cumulative global training work (all data-parallel ranks), checkpointed: the compute and
        # data axes of a scaling-law fit. FLOPs are model FLOPs (vdit.train.flops).
        self.work = WorkCounter(self.device, self.dp_group)
        self.perf = PerfMeter(self.device, self.dist.world_size, cfg.model.num_params(), self.is_main)
        self.defer_grad_sync = defer_grad_sync_fits(cfg, self.device)
        self.perf.peak  # resolved now (on CPU: measured once, ~1 s) rather than inside a timed log interval
        self.preemption = Preemption()
        self.guard = StepGuard(cfg.reliability, self.device, self.preemption)
        if self.is_main:  # everything built: now the run directory may be written
            write_config(cfg, self.run_dir, self.preflight)

    def frozen_encoders(self):
        """``(text_encoder, vae, encode_text)``, built on the first call (at start-up on video shards;
        on latent shards only when sampling or video validation clips need them).

        Raises:
            ValueError: the encoders do not fit the model config (see :func:`build_frozen`).
        """
        if self.vae is None:
            tc = self.cfg.text_encoder
            self.text_encoder, self.vae = build_frozen(self.cfg, self.device)
            self.encode_text = TextCache(self.text_encoder, tc.max_length, self.device, tc.cache_bytes)
        return self.text_encoder, self.vae, self.encode_text

    def resolve_flops_budget(self) -> None:
        """Set ``train.steps`` to the whole steps that fit in ``train.flops_budget`` (model FLOPs) with
        this run's clip shape, padded caption length and global batch; logged, and recorded in
        config.yaml (written after this). ValueError when the budget buys no step."""
        c, d = self.cfg, self.cfg.data
        global_batch = d.batch_size * c.train.grad_accum_steps * self.dims.dp_size
        encoded = self.data.latent_meta.get("latent_shape") if self.data.is_latent else None
        latent = tuple(encoded) if encoded else self.frozen_encoders()[1].latent_shape(d.num_frames, d.height, d.width)
        per_step = training_flops(c.model, latent, self.text_len, global_batch)
        steps = int(c.train.flops_budget // per_step)
        if steps < 1:
            raise ValueError(f"train.flops_budget={c.train.flops_budget:.3g} FLOPs is less than one step "
                             f"({per_step:.3g} FLOPs at global batch {global_batch})")
        log.info("train.flops_budget=%.3g FLOPs / %.3g FLOPs per step -> train.steps=%d (was %d)",
                 c.train.flops_budget, per_step, steps, c.train.steps)
        c.train.steps = steps

    def build_parallel_model(self):
        """Model, optimizer and scheduler for this rank, in the fixed order of ``vdit.train.parallel``.

        FSDP / no wrapper: build on the meta device -> attention backend -> sequence parallel ->
        activation checkpointing -> compile -> FSDP -> materialize with ``init_weights(seed)``'s
        exact weights. DeepSpeed: a materialized plain model (+ SP) handed to ``deepspeed.initialize``.
        """
        cfg, pcfg, dims = self.cfg, self.cfg.parallel, self.dims
        sp = None
        if dims.sp_size > 1:
            groups = build_sp_groups(self.dist.world_size, dims.sp_size, pcfg.sp_mode, dims.ulysses_size,
                                     dims.ring_size) if pcfg.sp_mode == "hybrid" else None

            def sp(model):  # noqa: E306 - bound here, applied inside parallelize()
                apply_sequence_parallel(model, dims.sp_group, pcfg.sp_mode,
                                        ulysses_group=groups.ulysses if groups else None,
                                        ring_group=groups.ring if groups else None)
        if pcfg.backend == "deepspeed":
            require_deepspeed()  # an optional extra: fail before building anything, with the install command
            model = build_model(cfg, torch.device("cpu"), init_from=True).to(self.device)
            apply_attention_backend(model, pcfg.attention_backend, self.device, self.dtype)
            if sp is not None:
                sp(model)
            apply_activation_checkpointing(model, pcfg.activation_checkpointing, pcfg.ac_every)
            optimizer = build_optimizer(model, cfg.optim)
            scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
            if pcfg.zero_stage == 3:
                raise ValueError("parallel.backend=deepspeed with zero_stage=3 is not wired into the Trainer yet (the "
                                 "EMA would have to follow ZeRO-3 partitions); use parallel.backend=fsdp, which "
                                 "shards parameters, gradients, optimizer state and EMA the same way")
            ds_cfg = deepspeed_config(cfg.train, pcfg, cfg.optim, cfg.data.batch_size, cfg.train.grad_accum_steps,
                                      dims.dp_size, sum(p.numel() for p in model.parameters() if p.requires_grad))
            self.engine = build_deepspeed(model, optimizer, scheduler, ds_cfg)
            return model, optimizer, scheduler
        with torch.device("meta"):
            model = VideoDiT(cfg.model)
        if cfg.lora.rank > 0:  # adapters and frozen base before parallelizing: FSDP shards both alike
            from vdit.train.lora import apply_lora

            apply_lora(model, cfg.lora)
        # One process has nothing to shard over: FSDP only when there is a process group.
        eff = pcfg if self.dist.is_distributed else dataclasses.replace(pcfg, backend="none")
        # parallel.param_dtype=auto: bf16 FSDP parameters (fp32 reduction) for a bf16 run on CUDA
        eff = dataclasses.replace(eff, param_dtype=resolve_param_dtype(pcfg.param_dtype, self.dtype, self.device))
        reference = copy.deepcopy(model) if eff.backend == "fsdp" else None
        apply_attention_backend(model, pcfg.attention_backend, self.device, self.dtype)
        parallelize(model, dims, eff, apply_sp=sp)
        if cfg.train.init_from or cfg.lora.rank > 0:  # imported weights and/or seeded adapters, from a CPU twin
            materialize_from_state(model, self.device, lambda: build_model(cfg, torch.device("cpu"), True).state_dict())
        else:
            materialize_and_init(model, self.device, cfg.train.seed, reference=reference)
        optimizer = build_optimizer(model, cfg.optim)
        return model, optimizer, build_scheduler(optimizer, cfg.optim, cfg.train.steps)

    def num_tokens(self, latent_shape: tuple[int, ...]) -> int:
        """Tokens of one sample with latent ``(C, T', H', W')`` after patchify with ``model.patch_size``."""
        p = self.cfg.model.patch_size
        return (latent_shape[-3] // p[0]) * (latent_shape[-2] // p[1]) * (latent_shape[-1] // p[2])

    def flow_shift(self, num_tokens: int) -> float:
        """Timestep shift for a sample of ``num_tokens`` tokens: ``flow.flow_shift``, scaled by
        ``sqrt(num_tokens / shift_base_tokens)`` when ``flow.shift_base_tokens`` is set (SD3)."""
        f = self.cfg.flow
        return flow.resolution_shift(num_tokens, f.shift_base_tokens, f.flow_shift) if f.shift_base_tokens \
            else f.flow_shift

    def build_data(self) -> VideoPipeline:
        """The streaming pipeline for this rank's data-parallel slot (SP ranks of one group share it)."""
        d = self.cfg.data
        held_out = d.val_fraction > 0 and not d.val_shards  # validation clips come out of the training shards
        spec = ClipSpec(d.num_frames, d.height, d.width, d.target_fps, d.frame_stride, d.random_crop, d.shuffle, d.seed,
                        split="train" if held_out else "all", held_out_fraction=d.val_fraction if held_out else 0.0)
        buckets = d.buckets if d.buckets.buckets else None
        return VideoPipeline(
            d.shards, spec, None if buckets else d.batch_size, num_workers=d.num_workers, dp_rank=self.dp_rank,
            dp_size=self.dp_size, buckets=buckets,
            tokens_fn=lambda t, h, w: self.num_tokens(self.frozen_encoders()[1].latent_shape(t, h, w)),
            patch_size=tuple(self.cfg.model.patch_size),
            read=ShardReadSpec(d.read_retries, d.read_backoff_s, d.read_timeout_s),
            video_dtype=resolve_video_dtype(d.video_dtype, self.device), pin_memory=self.device.type == "cuda")

    # ----------------------------------------------------------------------------------------- state
    def _stateful(self) -> dict[str, Any]:
        app = DeepSpeedState(self.engine) if self.engine is not None else ModelOptimizerState(self.model, self.optimizer)
        return {"app": app, "scheduler": self.scheduler,
                "ema": self.ema, "data": GlobalDataState(self.data), "trainer": ObjectState(_TrainerState(self), per_rank=False),
                "config": ConfigRecord(self.cfg)}

    def save(self) -> str | None:
        if not self.guard.weights_finite(self.model, self.ema):  # never write NaN/Inf weights
            self.guard.rollback_wanted = self.guard.rollback_wanted or "non-finite weights at a checkpoint"
            if self.is_main:
                log.error("checkpoint: step %d NOT saved: non-finite weights", self.step)
            return None
        background = self.cfg.train.async_checkpoint
        path = self.checkpoints.save(self.step, self._stateful(), suspect=self.guard.suspect, blocking=not background)
        if self.is_main:
            log.info("checkpoint: %s %s", "writing in the background" if background else "saved", path)
        return path

    def maybe_resume(self) -> None:
        """Apply ``train.resume``: ``auto`` (latest complete checkpoint, if any), ``never``, or a path.

        Raises:
            FileNotFoundError: an explicit path that is not a complete checkpoint.
        """
        mode = self.cfg.train.resume
        path = None if mode == "never" else self.checkpoints.latest() if mode == "auto" else mode
        if path is None:
            if self.is_main:
                trim_metrics(self.run_dir, 0)
            return
        self.step = self.checkpoints.load(path, self._stateful())
        apply_mutable(self, self.preflight.saved if path == self.preflight.checkpoint else None)
        if self.is_main:
            trim_metrics(self.run_dir, self.step)  # each step exactly once in metrics.jsonl
            log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------------ loop
    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps``; returns ``{"step", "checkpoint", "eval"}``.

        ``stop_at`` ends this process early at that step after saving a checkpoint, as a
        preempted or time-limited job would; the next ``fit()`` with ``resume=auto`` continues.
        """
        self.maybe_resume()
        if self.is_main:
            p = self.cfg.parallel
            record_launch(self.run_dir, self.cfg, {
                "world_size": self.dist.world_size, "dp_size": self.dp_size, "sp_size": self.dims.sp_size,
                "dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "backend": p.backend,
                "device": str(self.device), "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                **self.param_summary}, self.step)
            log.info("parameters: %d trainable, %d frozen; AdamW state %.3g GB (fp32, all ranks)",
                     self.param_summary["params/trainable"], self.param_summary["params/frozen"],
                     self.param_summary["optim/state_bytes"] / 1e9)
        cfg = self.cfg.train
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        logger = RunLogger(self.run_dir, self.cfg.wandb, OmegaConf.to_container(OmegaConf.structured(self.cfg)),
                           cfg.steps, self.step, is_main=self.is_main)
        batches = self.batches()
        pending: list[torch.Tensor] = []
        t_last, wait = time.perf_counter(), 0.0
        self.work.flush()  # the interval starts here (counts of steps before fit() belong to no row)
        eval_result, preempted = None, False
        watchdog = Watchdog(self.run_dir, self.dist.rank, self.cfg.reliability.watchdog_timeout_s).start()
        self.preemption.install()
        try:
            while self.step < end:
                watchdog.beat(f"step {self.step + 1}")
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(cfg.grad_accum_steps)]
                wait += time.perf_counter() - t0
                stats = self.train_step(micro)
                for b in micro:
                    self.data.commit(b)
                self.step += 1
                pending.append(stats["loss"])
                logger.advance()
                save_now = self.step % cfg.checkpoint_every == 0 or self.step == end or self.guard.preempt
                if self.step % cfg.log_every == 0 or self.step == end or save_now:  # rows before their checkpoint
                    elapsed = time.perf_counter() - t_last
                    self._log(logger, pending, stats, elapsed, wait)
                    pending, t_last, wait = [], time.perf_counter(), 0.0
                self.checkpoints.poll()  # an async save written on every rank -> COMPLETE (same step everywhere)
                if save_now and not self.guard.rollback_wanted:
                    watchdog.beat(f"checkpoint at step {self.step}")
                    self.save()
                if self.guard.rollback_wanted:
                    rollback(self)
                if self.guard.preempt:  # agreed by every rank; the checkpoint above is saved
                    preempted = True
                    watchdog.beat(f"finishing the checkpoint of step {self.step}")
                    self.checkpoints.wait()  # COMPLETE before the requeue file names it
                    if self.is_main:  # written while SIGTERM is still only a flag here
                        write_requeue_file(self.step, self.checkpoints.latest(), self.preemption.signals)
                    break
                if self.validator is not None and (self.step % self.cfg.eval.val_every == 0 or self.step == cfg.steps):
                    with watchdog.paused():
                        logger.log(self.step, self.validator(self.model))
                if self.cfg.eval.enabled and self.cfg.eval.every and self.step % self.cfg.eval.every == 0 \
                        and self.step != cfg.steps:
                    with watchdog.paused():
                        self._log_eval(logger, self.evaluate())
            if self.cfg.eval.enabled and self.step == cfg.steps and not preempted:
                with watchdog.paused():
                    eval_result = self.evaluate()
                self._log_eval(logger, eval_result)
            watchdog.beat("finishing the last checkpoint")
            self.checkpoints.wait()  # the final save (written during the final eval) is COMPLETE on every rank
        finally:
            self.checkpoints.wait(collective=False)  # after an exception: finish a save in flight, no collectives
            watchdog.stop()
            self.preemption.uninstall()
            logger.close()
        return {"step": self.step, "checkpoint": self.checkpoints.latest(), "eval": eval_result,
                "preempted": preempted}

    def batches(self):
        """The training batches of this rank: its pipeline's, or under sequence parallelism with
        ``data.decode_once_per_group`` the group's rank 0's, read once and broadcast to the group."""
        if self.dist.is_distributed and self.dims.sp_size > 1 and self.cfg.data.decode_once_per_group:
            return group_batches(self.data, self.dims.sp_group, self.device)
        return iter(self.data)

    def _log_eval(self, logger: RunLogger, result: dict[str, Any] | None) -> None:
        """Log an evaluation (rank 0 has the result): :func:`vdit.train.evaluation.log_eval`."""
        from vdit.train.evaluation import log_eval

        log_eval(logger, self.step, result, self.run_dir)

    def _log(self, logger: RunLogger, losses: list[torch.Tensor], stats: dict[str, torch.Tensor],
             elapsed: float, wait: float) -> None:
        """Write the rows of a log interval: the host syncs of the interval happen here (and in the guard)."""
        stacked = torch.stack(losses)  # (n,) this rank's share of each step's loss
        if self.dp_group is not None:
            torch.distributed.all_reduce(stacked, group=self.dp_group)  # -> the global loss of each step
        peak_memory = torch.tensor([float(peak_memory_bytes(self.device))], dtype=torch.float64, device=self.device)
        if self.dist.is_distributed:
            torch.distributed.all_reduce(peak_memory, op=torch.distributed.ReduceOp.MAX)  # the fullest rank
        grad_norm = stats["grad_norm"].detach().to(self.device, torch.float64).reshape(1)
        *values, peak, norm = torch.cat([stacked.double(), peak_memory, grad_norm]).tolist()  # one host sync
        counts = self.work.flush()  # global flops / tokens / samples of the interval (one more with DP)
        first = self.step - len(values) + 1
        for i, v in enumerate(values[:-1]):
            logger.log(first + i, {"loss/train": v})
        n = len(values)
        logger.log(self.step, {
            "loss/train": values[-1],
            "loss/train_mean": sum(values) / n,
            "optim/lr": self.scheduler.get_last_lr()[0],
            "optim/grad_norm": norm,
            "perf/steps_per_s": n / elapsed,
            "perf/data_wait_frac": wait / elapsed,
            **self.perf.interval(counts, n, elapsed, self.work.totals, peak),
            **self.guard.metrics(),
            "data/skipped": sum(self.data.skipped.values()),
            **{f"data/skipped/{k}": v for k, v in self.data.skipped.items()},
            **{f"data/handled/{k}": v for k, v in self.data.handled.items()},
        })

    def sample_randomness(self, keys: list[str], latent_shape: tuple[int, ...]
                          ) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """Timesteps ``(B,)``, noise ``(B, *latent_shape)`` and caption-dropout flags for a micro-batch.

        Seeded per sample by ``(train.seed, step, sample key)`` (:func:`vdit.train.draws.sample_draws`):
        independent of the rank layout and the accumulation split, and exact on resume. The noise is
        drawn on the device under ``train.noise_device=device`` (the CUDA default).
        """
        return sample_draws(keys, latent_shape, seed=self.cfg.train.seed, step=self.step,
                            caption_dropout=self.cfg.data.caption_dropout, flow_cfg=self.cfg.flow,
                            shift=self.flow_shift(self.num_tokens(latent_shape)), noise_device=self.noise_device)

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns device tensors (no host sync)."""
        total = self.forward_backward(micro_batches)
        return {"loss": total, "grad_norm": self.optimizer_step(total)}

    def forward_backward(self, micro_batches: list[dict[str, Any]]) -> torch.Tensor:
        """Accumulate gradients of the flow-matching loss over micro-batches; returns the step's loss (device).

        The loss is the mean over every sample of the step: each micro-batch contributes
        ``sum of its per-sample losses / samples in the step``, so splitting the same samples into
        more accumulation steps changes neither the loss nor the gradients.
        """
        self.model.train()
        total = torch.zeros((), device=self.device)
        tokens = [self.batch_tokens(b) for b in micro_batches]
        flops = sum(training_flops(self.cfg.model, self.latent_shape(b), self.text_len, len(b["key"]))
                    for b in micro_batches)
        samples = sum(len(b["key"]) for b in micro_batches)
        # One all-reduce of the step's global counts, left on the device (the loss normalisation
        # needs the tokens now, the host only at the log interval): a float, or an fp32 0-dim tensor.
        global_tokens = self.work.add_step(flops, sum(tokens), samples)
        if isinstance(global_tokens, torch.Tensor):
            global_tokens = global_tokens.float()
        for i, (batch, batch_tokens) in enumerate(zip(micro_batches, tokens)):
            # FSDP2: reduce-scatter once, in the last micro-batch's backward (parallel.defer_grad_sync)
            set_gradient_sync(self.model, i == len(micro_batches) - 1, self.defer_grad_sync)
            x0, text, text_mask, t, noise = self.prepare_inputs(batch)
            t, noise = t.to(self.device), noise.to(self.device)
            cond = frame_conditioning(self.cfg, self.step, batch["key"], x0.shape[2])  # None: text-to-video only
            xt = flow.interpolate(x0, noise, t if cond is None else cond.path_t(t))  # (B, C, T', H', W')
            target = flow.velocity_target(x0, noise)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                pred = self.model(xt, t if cond is None else cond.model_t(t), text, text_mask)  # (B, C, T', H', W')
            weight = t.square() if self.cfg.flow.loss_weighting == "x0" else None  # (B,): MSE of x_t - t v
            fg = self.cfg.flow.foreground_weight
            element_weight = flow.foreground_weights(x0, fg) if fg > 0 else None  # (B, 1, T', H', W')
            if cond is not None:  # conditioning frames: out of the loss
                element_weight = cond.loss_weight(element_weight)  # (B, 1, T', H' or 1, W' or 1)
            per_sample, _ = flow.flow_loss(pred.float(), target, weight, element_weight)  # (B,) mean over elements
            # Token-weighted mean over the whole step on every data-parallel rank: each rank adds
            # (its tokens' squared error) / (global tokens); the data-parallel gradient average is
            # undone by the factor dp_size, so unequal bucket shapes across ranks weigh correctly.
            loss = per_sample.sum() * (batch_tokens / len(batch["key"])) / global_tokens * self.dp_size
            if self.engine is not None:
                # DeepSpeed averages gradients over every rank, SP ranks included (their gradients
                # are partial sums): scale by sp_size; our loss is already the step mean (no 1/gas).
                self.engine.backward(loss * self.dims.sp_size, scale_wrt_gas=False)
                self.engine.step()  # an optimizer step only at the accumulation boundary
            else:
                loss.backward()
            total += loss.detach() / self.dp_size
        return total

    @property
    def text_len(self) -> int:
        """Text tokens per sample as the model sees them (captions are padded to ``max_length``)."""
        return self.null_text.shape[0] if self.data.is_latent else self.cfg.text_encoder.max_length

    def latent_shape(self, batch: dict[str, Any]) -> tuple[int, ...]:
        """``(C, T', H', W')`` of one sample of a batch (latent shards carry it; videos go through the VAE)."""
        if "latent" in batch:
            return tuple(batch["latent"].shape[1:])
        return tuple(self.vae.latent_shape(*batch["video"].shape[2:]))

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        """Patch tokens in a batch (all samples)."""
        return self.num_tokens(self.latent_shape(batch)) * len(batch["key"])

    def prepare_inputs(self, batch: dict[str, Any]):
        """Latents ``x0 (B, C, T', H', W')``, text ``(B, L, D)`` + mask ``(B, L)``, and the sample draws.

        Video batches are encoded here (frozen VAE and text encoder, captions dropped to the null
        caption); latent batches from ``vdit-encode`` carry both, and a dropped caption takes the
        cached null-caption features. Returns ``(x0, text, text_mask, t (B,), noise like x0)``.
        """
        if "latent" in batch:
            x0 = batch["latent"].to(self.device, non_blocking=True)  # (B, C, T', H', W')
            t, noise, drop = self.sample_randomness(batch["key"], tuple(x0.shape[1:]))
            text = batch["text"].to(self.device, non_blocking=True).float()  # (B, L, D)
            text_mask = batch["text_mask"].to(self.device, non_blocking=True)  # (B, L)
            if any(drop):
                d = torch.tensor(drop, device=self.device)
                text = torch.where(d[:, None, None], self.null_text, text)
                text_mask = torch.where(d[:, None], self.null_mask, text_mask)
            return x0, text, text_mask, t, noise
        video = batch["video"].to(self.device, non_blocking=True)  # (B, 3, T, H, W)
        if video.dtype == torch.uint8:  # video_dtype=uint8: normalise on the device (bit-equal to the host's)
            video = to_model_range(video)
        # (B, C, T', H', W') in the model's latent space; with SP each rank of the group encodes a chunk
        x0 = encode_once_per_group(self.vae.encode, video, self.latent_shape(batch),
                                   self.dims.sp_group if self.dist.is_distributed and self.dims.sp_size > 1 else None)
        t, noise, drop = self.sample_randomness(batch["key"], tuple(x0.shape[1:]))
        captions = ["" if d else c for c, d in zip(batch["caption"], drop)]
        text, text_mask = self.encode_text(captions)  # (B, L, D), (B, L)
        return x0, text, text_mask, t, noise

    def optimizer_step(self, loss: torch.Tensor | None = None) -> torch.Tensor:
        """Clip, step the optimizer and scheduler, zero the gradients, update the EMA; returns the grad norm.

        Gradient reduction: FSDP reduces over data-parallel and SP ranks (summing SP partial
        gradients, dividing by dp_size); without FSDP, SP partial gradients are summed here.
        Under DeepSpeed the engine already stepped in :meth:`forward_backward`. The numerics guard
        (:class:`vdit.train.guard.StepGuard`) decides on every rank together whether this step's
        update is skipped (non-finite loss or gradient norm of the step's ``loss``, a loss spike).
        """
        if self.engine is not None:
            self.ema.update(self.model)
            norm = self.engine.get_global_grad_norm()  # a tensor or a float (no host sync for a tensor)
            norm = torch.zeros(()) if norm is None else torch.as_tensor(norm).detach()
            self.guard.agree(loss, norm)  # preemption and rollback decisions (DeepSpeed skips overflows itself)
            return norm
        if self.dims.sp_size > 1 and not (self.dist.is_distributed and self.cfg.parallel.backend == "fsdp"):
            sync_sp_gradients(self.model, self.dims.sp_group)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        if self.guard.agree(loss, grad_norm):  # skipped on every rank: no update, no scheduler or EMA step
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        return grad_norm

    # ------------------------------------------------------------------------------------------ eval
    def evaluate(self) -> dict[str, Any] | None:
        """Sample and score the eval prompts with the training model itself (EMA weights swapped in when
        ``eval.use_ema``), the prompts shared out over the data-parallel ranks; every rank calls this
        together. Returns the ``eval/step-N.json`` content on rank 0, None elsewhere.
        See :mod:`vdit.train.evaluation` (design and memory per rank)."""
        from vdit.eval.sharded import EvalRanks
        from vdit.train.evaluation import evaluate_in_loop

        ranks = EvalRanks(self.dp_rank, self.dp_size, self.dp_group, self.dims.sp_rank, self.dist.is_distributed)
        return evaluate_in_loop(self.cfg, self.model, self.ema, self.frozen_encoders, self.step, self.run_dir,
                                self.device, self.dtype, ranks)

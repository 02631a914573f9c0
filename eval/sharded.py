"""Evaluation with the prompts shared out over data-parallel ranks, sampled by the model as it is.

One code path for every layout: the Trainer's in-loop evaluation on one process, under FSDP2,
DeepSpeed and sequence parallelism, and ``vdit-eval checkpoint`` / ``watch`` (one rank)::

    result = evaluate_sharded(cfg, model, encode_text, vae, step, run_dir, device, dtype, ranks)

What happens, on every rank of the job:

1. **Prompts.** Rank 0 builds the prompt list (:func:`vdit.eval.hook.eval_prompts`: ``eval.prompts``,
   then the training-caption and new-scene physics prompts) and broadcasts it, so every rank has the
   same list and the same count ``N`` even if a shard read differed between ranks.
2. **Sampling.** Data-parallel rank ``r`` of ``dp`` takes prompts ``r, r + dp, ...``
   (:func:`prompt_share`) and pads its share to ``ceil(N / dp)`` with dummy prompts (the empty
   caption), whose output is thrown away: every rank makes the same number of forward calls with
   the same batch shapes, so FSDP's all-gathers (collectives over all ranks) always pair up, also
   on a rank with no prompt. The ranks of one sequence-parallel group share a data-parallel rank,
   so they sample the same prompts together (the SP hooks need every rank of the group in each
   forward). ``model`` is whatever the caller gives: the FSDP2 module itself (parameters
   all-gathered block by block during each forward, as in training), a DeepSpeed module, or a plain
   model. Prompt ``i``'s noise is seeded by ``(eval.seed, i)`` (:func:`vdit.eval.sample.prompt_noise`),
   never by rank, so a video is the same (up to float rounding) on every layout.
3. **Per-video work** on the sampling rank (SP rank 0 of its group): VAE decode, the mp4
   (``samples/step-N/{i:02d}_{slug}.mp4``, unique per prompt), the per-video scores (pure
   functions, :func:`vdit.eval.hook.score_one`) and the contact-sheet frames (at most 8 per video).
4. **Gather** of those small records to rank 0 (``gather_object`` on the data-parallel group of
   SP rank 0), which aggregates over all prompts exactly as a one-rank evaluation does and writes
   ``contact_sheet.png``, ``prompts.json``, ``scenes.json`` and ``eval/step-N.json``
   (:func:`vdit.eval.hook.finish_evaluation`). A broadcast from rank 0 ends the evaluation on every
   rank (a failure there is raised on every rank, not only on rank 0, so none waits for it).

5. **Continuation suite** (when ``eval.continuation_clips`` / ``eval.continuation_scenes`` > 0,
   :mod:`vdit.eval.continuation`): the same sharing for the continuation cases (built on rank 0,
   broadcast, continued on the data-parallel ranks, scored where sampled), gathered with the
   prompts' records; its metrics join the step's ``metrics`` as ``continuation/...``.

A failure after sampling on some rank (an unwritable file, a metric that raises) is recorded in
that video's row and never raised, so every rank always reaches the gather.

Memory per rank (the model part is the caller's: see :mod:`vdit.train.evaluation`): the frozen
text encoder and VAE (every sampling rank builds them), the inference activations of
``eval.batch_size`` samples (twice that with classifier-free guidance; no gradients are kept) and
the VAE decode of one pass; in host memory the rank's decoded videos in fp32 until they are scored
(``T x H x W x 3 x 4`` bytes each: 0.39 GB for 81 x 480 x 832; one per rank for 64 prompts on 64
ranks), and on rank 0 the gathered contact-sheet frames: at most ``8 x H x W x 3`` bytes per prompt
(9.6 MB at 480 x 832).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from vdit.data.transforms import to_uint8_video
from vdit.eval.continuation import agreed_cases, continuation_enabled, continue_share, summarize_continuation
from vdit.eval.hook import eval_prompts, finish_evaluation, sample_entry, score_names
from vdit.eval.sample import sample_latents

log = logging.getLogger(__name__)

__all__ = ["EvalRanks", "prompt_share", "agreed_prompts", "sample_share", "evaluate_sharded"]

TextFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class EvalRanks:
    """Where this process sits for an evaluation (the default: one process, nothing to share).

    Attributes:
        dp_rank, dp_size: this rank's data-parallel slot; prompts are shared out over these.
        dp_group: the data-parallel process group of this SP position (None: ``dp_size == 1``).
        sp_rank: position in the sequence-parallel group; only SP rank 0 decodes, scores and writes.
        distributed: a default process group exists (the prompt list is broadcast from rank 0 and
            a barrier ends the evaluation).
    """

    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Any = None
    sp_rank: int = 0
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one that gathers and writes the set's files."""
        return self.dp_rank == 0 and self.sp_rank == 0


def prompt_share(num_prompts: int, dp_rank: int, dp_size: int) -> tuple[list[int], int]:
    """Prompt indices of data-parallel rank ``dp_rank`` (``dp_rank, dp_rank + dp_size, ...``) and the
    number of prompts every rank samples, ``ceil(num_prompts / dp_size)`` (the share padded with dummies).

    Raises:
        ValueError: ``dp_rank`` outside ``[0, dp_size)``.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    return list(range(dp_rank, num_prompts, dp_size)), math.ceil(num_prompts / dp_size)


def agreed_prompts(cfg, ranks: EvalRanks) -> tuple[list[str], list, list]:
    """``(prompts, scene params or None, kinds)`` of :func:`vdit.eval.hook.eval_prompts`, built on rank 0
    and broadcast, so every rank samples from the same list (collective when ``ranks.distributed``)."""
    if not ranks.distributed:
        return eval_prompts(cfg)
    box = [eval_prompts(cfg) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def sample_share(cfg, model: torch.nn.Module, encode_text: TextFn, vae, prompts: list[str], device: torch.device,
                 dtype: torch.dtype = torch.float32, ranks: EvalRanks = EvalRanks()) -> dict[int, torch.Tensor]:
    """Sample this rank's share of ``prompts`` (every rank of the job calls this together).

    ``ceil(N / dp)`` prompts per rank, dummies last, in passes of ``eval.batch_size``; each pass is one
    ODE solve (``eval.num_steps`` steps; guidance doubles its batch). ``dtype`` is the autocast dtype
    of the forward (the training precision). The model is left in eval mode; the caller restores it.

    Returns:
        ``{prompt index: float32 (3, T, H, W) in [-1, 1] on CPU}`` for this rank's real prompts on SP
        rank 0; ``{}`` on the other SP ranks (they take part in the forwards, not the decoding).
    """
    e, d = cfg.eval, cfg.data
    mine, count = prompt_share(len(prompts), ranks.dp_rank, ranks.dp_size)
    padded: list[int | None] = mine + [None] * (count - len(mine))
    latent = vae.latent_shape(d.num_frames, d.height, d.width)  # (C, T', H', W')
    out: dict[int, torch.Tensor] = {}
    for start in range(0, count, e.batch_size):
        chunk = padded[start:start + e.batch_size]
        x0 = sample_latents(model, encode_text, latent, [prompts[i] if i is not None else "" for i in chunk],
                            e.num_steps, e.cfg_scale, e.flow_shift, e.seed, device, e.solver,
                            indices=[i if i is not None else len(prompts) for i in chunk],
                            dtype=dtype, cfg_interval=e.cfg_interval)  # (b, C, T', H', W')
        real = [j for j, i in enumerate(chunk) if i is not None]
        if ranks.sp_rank == 0 and real:
            videos = vae.decode(x0[real]).float().clamp(-1, 1).cpu()  # (r, 3, T, H, W)
            out.update({chunk[j]: v for j, v in zip(real, videos)})
    return out


def evaluate_sharded(cfg, model: torch.nn.Module, encode_text: TextFn, vae, step: int, run_dir: str,
                     device: torch.device, dtype: torch.dtype = torch.float32, ranks: EvalRanks = EvalRanks(),
                     extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Sample, write and score the evaluation prompts of step ``step`` (module docstring); every rank
    of the job calls this together with the same ``cfg``.

    Args:
        model: the model to sample with, in the state to evaluate (e.g. EMA weights swapped in).
        encode_text: ``captions -> (text (B, L, D), mask (B, L))``; ``vae``: the frozen autoencoder.
        dtype: autocast dtype of the forward (fp32: none).
        extra: keys added to the JSON.

    Returns:
        On global rank 0 the JSON written to ``eval/step-N.json`` (``{"step", "metrics", "videos",
        "contact_sheet", "sampler", "timing", **extra}``); None on the other ranks, and everywhere
        when there is no prompt (logged).
    """
    t0 = time.perf_counter()
    prompts, params, kinds = agreed_prompts(cfg, ranks)
    if not prompts:
        if ranks.is_main:
            log.warning("eval: no prompts (eval.prompts is empty and no physics prompts): step %d not evaluated", step)
        return None
    fps = cfg.data.target_fps or 8.0
    cases = agreed_cases(cfg, vae, ranks) if continuation_enabled(cfg) else []
    was_training = model.training
    try:
        videos = sample_share(cfg, model, encode_text, vae, prompts, device, dtype, ranks)
        cont = continue_share(cfg, model, encode_text, vae, cases, step, run_dir, device, dtype, ranks) if cases else []
    finally:
        model.train(was_training)
    t_sampled = time.perf_counter()
    out_dir = os.path.join(run_dir, "samples", f"step-{step}")
    names = score_names(params)
    entries = [sample_entry(i, prompts[i], to_uint8_video(v), params[i], fps, out_dir, run_dir, names)
               for i, v in sorted(videos.items())]
    t_scored = time.perf_counter()
    if ranks.dp_group is not None and ranks.dp_size > 1 and ranks.sp_rank == 0:
        gathered: list[Any] | None = [None] * ranks.dp_size if ranks.is_main else None
        dist.gather_object((entries, cont), gathered, dst=0, group=ranks.dp_group)
        entries = [en for part in gathered for en in part[0]] if gathered is not None else []
        cont = [en for part in gathered for en in part[1]] if gathered is not None else []
    result, error = None, None
    if ranks.is_main:
        timing = {"sample_s": round(t_sampled - t0, 3), "score_s": round(t_scored - t_sampled, 3),
                  "ranks": ranks.dp_size}
        try:
            suite = summarize_continuation(cases, cont) if cases else None
            more = {"continuation": suite["videos"]} if suite else {}
            result = finish_evaluation(cfg, step, run_dir, prompts, params, kinds, entries,
                                       {"timing": timing, **more, **(extra or {})},
                                       extra_metrics=suite["metrics"] if suite else None)
        except Exception as exn:
            if not ranks.distributed:
                raise
            log.exception("eval: writing step %d failed", step)
            error = f"{type(exn).__name__}: {exn}"
    if ranks.distributed:  # every rank leaves together, after rank 0 wrote the files, and fails together
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise RuntimeError(f"eval of step {step} failed on rank 0: {box[0]}")
    return result

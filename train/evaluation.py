"""The Trainer's in-loop evaluation: sample with the training model itself, EMA weights swapped in.

Every ``eval.every`` steps and at the end of training, :meth:`vdit.train.trainer.Trainer.evaluate`
calls :func:`evaluate_in_loop`, which

1. swaps the EMA weights into the training model's own parameters (:func:`ema_weights`): under
   FSDP2 the local shards of the DTensor parameters exchange values with the EMA's local shards
   (the EMA is a clone of the parameters, so both have the same mesh and placements); under
   DeepSpeed ZeRO-1/2 and on one process the (unsharded) module tensors do the same;
2. runs :func:`vdit.eval.sharded.evaluate_sharded`: the prompts are shared out over the
   data-parallel ranks, every rank makes the same number of forward calls (FSDP gathers each
   block's parameters for the forward, exactly as in training, and frees them after it), ranks of
   a sequence-parallel group sample the same prompt together, each sampling rank decodes, writes
   and scores its own videos, and rank 0 gathers the per-video results, aggregates and writes
   ``eval/step-N.json``;
3. swaps the training weights back, bit for bit, so training continues exactly as without the
   evaluation (tested: same losses);
4. logs the means to ``metrics.jsonl`` / wandb as ``eval/<metric>`` (``gen/*`` as they are), the
   sample videos to wandb, and the time taken as ``perf/eval_s`` (:func:`log_eval`).

Memory per rank, beyond training (no full copy of the model anywhere):

* weights: none that lasts. Values are exchanged tensor by tensor through one temporary the size
  of the largest local tensor (for the 14B preset on 64 ranks, a 5120 x 13824 fp32 matrix sharded
  64 ways: 4.4 MB). Where the module's dtype differs from the fp32 EMA (DeepSpeed's bf16 module)
  an exchange would round the EMA, so the training tensors are copied aside instead: one extra
  copy of the module's tensors (2 bytes per parameter in bf16, not sharded under ZeRO-1/2).
* FSDP's transient all-gathered parameters during each forward, as in a training forward: one
  block at a time (14B: 14.3e9 / 40 blocks x 2 bytes = 0.72 GB with ``param_dtype=bf16``, 1.4 GB
  in fp32; twice that with the next block prefetched), plus the root and the last block, which
  FSDP keeps gathered after a forward and :func:`ema_weights` frees (reshards) before swapping back.
* inference activations of ``eval.batch_size`` samples (x 2 with guidance), without gradients:
  about one block's q, k, v, attention output and MLP hidden at a time. 14B at 81 x 720 x 1280
  (75,600 tokens), ``sp_size=2``, bf16, batch 1 with guidance: (4 x 5120 + 13824) x 37,800 tokens
  x 2 x 2 bytes = 5.2 GB. Plus the decoded videos, see :mod:`vdit.eval.sharded`.
* the frozen text encoder and VAE on every sampling rank (built at the first evaluation when
  training reads latent shards; on video shards every rank has them anyway): UMT5-XXL in bf16 is
  about 10.6 GiB, the Wan VAE about 0.5 GB in fp32.

Arithmetic for the 14B preset (14.3e9 parameters) on 64 x 80 GB GPUs, FSDP over 64 ranks,
``sp_size=2``: what stays resident during the evaluation is the sharded training state (fp32
parameters 0.9 GB, EMA 0.9 GB, Adam moments 1.8 GB per rank; gradients are freed after the
optimizer step) and the encoders (11.1 GiB = 11.9 GB); the evaluation adds ~2.2 GB of gathered
blocks (two in flight plus the kept last block, bf16) and ~5.2 GB of activations: about
3.6 + 11.9 + 2.2 + 5.2 = 23 GB per rank, well under the training step's own peak (56 GiB
in ``docs/planner.md``), whose activations are freed by then. The previous path built a full fp32
copy of the model on every rank (4 x 14.3e9 = 57 GB) and sampled on rank 0 alone; an extra copy of
the FSDP shards (instead of the exchange) would have been 4 x 14.3e9 / 64 = 0.9 GB per rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from vdit.eval.sharded import EvalRanks, evaluate_sharded
from vdit.train.ema import EMA

log = logging.getLogger(__name__)

__all__ = ["ema_weights", "evaluate_in_loop", "log_eval"]


def _reshard(model: nn.Module) -> None:
    """Free the parameters FSDP2 keeps gathered after a forward (the root and the last block do not
    reshard after forward), so no gathered copy of the other weights outlives a swap."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def ema_weights(model: nn.Module, ema: EMA, enabled: bool = True) -> Iterator[nn.Module]:
    """Inside the block, ``model``'s parameters hold the EMA weights; after it, the training weights
    again, bit for bit (also after an exception).

    Same dtype (FSDP2's fp32 sharded parameters and fp32 EMA, or any fp32 module): the values are
    exchanged in place, local shard by local shard (the EMA holds the training weights meanwhile),
    through one temporary tensor. Different dtype (a bf16 DeepSpeed module): the training tensors
    are copied aside and the EMA, cast, is copied in. Either way no collective is involved, and
    DTensor parameters are written through ``to_local()`` (the shard FSDP gathers from).

    Raises:
        ValueError: a parameter and its EMA tensor have different layouts (not a clone of each other).
    """
    if not enabled:
        yield model
        return
    pairs = []
    for name, p in model.named_parameters():
        s = ema.shadow.get(name)
        if s is None:
            continue
        if isinstance(p, DTensor) != isinstance(s, DTensor) or \
                (isinstance(p, DTensor) and (p.placements != s.placements or p.device_mesh != s.device_mesh)):
            raise ValueError(f"parameter {name} and its EMA are laid out differently; cannot swap shard by shard")
        pairs.append((_local(p), _local(s)))
    _reshard(model)  # a gathered copy of the training weights (e.g. from validation) must not be used
    aside = _swap_in(pairs)
    try:
        yield model
    finally:
        _reshard(model)  # the gathered EMA weights of the root and the last block must not be trained
        _swap_out(pairs, aside)


@torch.no_grad()
def _swap_in(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor | None]:
    """EMA values into each ``(param, ema)`` pair's parameter: exchanged when the dtypes agree (None
    returned for the pair), else the parameter is copied aside (returned) and overwritten."""
    aside: list[torch.Tensor | None] = []
    for p, s in pairs:
        if p.dtype == s.dtype:
            tmp = p.clone()
            p.copy_(s)
            s.copy_(tmp)
            aside.append(None)
        else:
            aside.append(p.clone())
            p.copy_(s.to(p.dtype))
    return aside


@torch.no_grad()
def _swap_out(pairs: list[tuple[torch.Tensor, torch.Tensor]], aside: list[torch.Tensor | None]) -> None:
    """Undo :func:`_swap_in`: exchange back, or restore the copy set aside."""
    for (p, s), saved in zip(pairs, aside):
        if saved is None:
            tmp = p.clone()
            p.copy_(s)
            s.copy_(tmp)
        else:
            p.copy_(saved)


def evaluate_in_loop(cfg, model: nn.Module, ema: EMA, encoders: Callable[[], tuple[Any, Any, Any]], step: int,
                     run_dir: str, device: torch.device, dtype: torch.dtype, ranks: EvalRanks) -> dict[str, Any] | None:
    """Evaluate the training ``model`` (EMA weights when ``eval.use_ema``) at ``step``; every rank of
    the job calls this together (module docstring).

    Args:
        encoders: ``() -> (text_encoder, vae, encode_text)``, built on first use (every rank).
        dtype: the training autocast dtype, used for the sampling forwards.
        ranks: this rank's data-parallel / sequence-parallel position.

    Returns:
        On rank 0 the JSON written to ``eval/step-N.json`` plus ``"timing"["eval_s"]`` (seconds of
        the whole evaluation on rank 0); None on the other ranks.
    """
    t0 = time.perf_counter()
    _, vae, encode_text = encoders()
    with ema_weights(model, ema, enabled=cfg.eval.use_ema):
        result = evaluate_sharded(cfg, model, encode_text, vae, step, run_dir, device, dtype, ranks)
    if result is not None:
        result["timing"]["eval_s"] = round(time.perf_counter() - t0, 3)
    return result


def log_eval(logger, step: int, result: dict[str, Any] | None, run_dir: str) -> None:
    """Log an evaluation on rank 0 (``result`` is None elsewhere): the per-set means, ``gen/*`` keys as
    they are and the others as ``eval/<name>`` (metrics that were not evaluable, mean None, left out),
    ``perf/eval_s``, the sample videos as wandb media (when wandb is on), and a refreshed
    ``report.html`` (a failure there is logged, never raised)."""
    if result is None:
        return
    row = {name if name.startswith("gen/") else f"eval/{name}": m["mean"]
           for name, m in result["metrics"].items() if m.get("mean") is not None}
    if "eval_s" in result.get("timing", {}):
        row["perf/eval_s"] = result["timing"]["eval_s"]
    logger.log(step, row)
    logger.log_videos(step, "eval/samples", [(os.path.join(run_dir, v["path"]), v["prompt"]) for v in result["videos"]])
    from vdit.eval.run_report import refresh_report

    refresh_report(run_dir)

"""The continuation suite: continue real and procedural clips from their first frames, score against the truth.

Part of every evaluation (in training every ``eval.every`` steps, ``vdit-eval checkpoint`` /
``watch``) when ``eval.continuation_clips`` or ``eval.continuation_scenes`` is > 0; the model should
be trained with ``train.cond_frames_prob > 0`` (docs/continuation.md). The cases:

* ``heldout``: the first ``eval.continuation_clips`` held-out clips of the run's data
  (:func:`vdit.train.validation.load_val_clips`: ``data.val_shards`` or ``data.val_fraction``), with
  their captions: real footage, compared with the real continuation;
* ``procedural``: ``eval.continuation_scenes`` new scenes of the synthetic renderer (drawn from
  ``eval.physics_seed + 1``, at the sample geometry), rendered, with their captions: compared with
  the rendered continuation and checked against the scene's physics.

Each case gives the model its first ``eval.continuation_frames`` latent frames (the first
:func:`vdit.eval.sample.cond_pixel_frames` pixel frames, encoded by the autoencoder) and samples
the rest with the eval sampler settings; the given pixel frames are pasted back unchanged.

Scores (``eval/step-N.json`` ``metrics``, logged as ``eval/continuation/...``):

* ``continuation/physics_iq/{spatiotemporal_iou, spatial_iou, weighted_spatial_iou, mse}``, also per
  kind (``continuation/heldout/physics_iq/...``, ``continuation/procedural/physics_iq/...``): the
  Physics-IQ comparison (:mod:`vdit.eval.metrics.physics_iq`, its arithmetic exactly) of the
  generated continuation with the real one, over the frames after the given ones, aggregated as the
  benchmark's ``A`` values (per scenario, then over scenarios). There is one real take per clip, so
  no physical-variance ratio and no Physics-IQ score: ``exact`` is false (vdit's clips, not the benchmark's).
* ``continuation/physics/<check>_pass_rate`` (and ``continuation/gen/...`` scene fidelity): the
  trajectory checks (:mod:`vdit.eval.physics`) of each whole procedural video (given frames and
  continuation) against its scene parameters.

Sharing over ranks follows :mod:`vdit.eval.sharded` exactly: rank 0 builds the cases and broadcasts
them, data-parallel rank ``r`` continues cases ``r, r + dp, ...`` padded with dummies to the same
number of forward calls on every rank, SP rank 0 of each group decodes, writes and scores, and the
per-case records (a few numbers per frame) are gathered to rank 0 with the text-to-video ones.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from vdit.data.synthetic import SceneParams, render
from vdit.data.transforms import to_model_range, to_uint8_video
from vdit.data.video_io import write_mp4
from vdit.eval.metrics.physics_iq import ORIGINAL, physics_iq_record, physics_iq_score
from vdit.eval.sample import cond_pixel_frames, sample_latents

log = logging.getLogger(__name__)

__all__ = ["HELDOUT", "PROCEDURAL", "ContinuationCase", "continuation_enabled", "continuation_cases",
           "agreed_cases", "continue_share", "score_continuation", "summarize_continuation"]

HELDOUT, PROCEDURAL = "heldout", "procedural"
_NOISE_OFFSET = 1 << 20  # continuation case i draws the noise of prompt index 2^20 + i (apart from the prompts')
_IMPL = "vdit.eval.metrics.physics_iq (the benchmark's arithmetic; vdit's clips, one real take)"

TextFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ContinuationCase:
    """One clip to continue.

    Attributes:
        prompt: its caption. video: uint8 ``(T, H, W, 3)``, the real clip at the sample geometry.
        scene: renderer parameters (procedural cases) or None. kind: ``heldout`` / ``procedural``.
        key: the clip's key (held-out) or ``scene-i``.
    """

    prompt: str
    video: np.ndarray
    scene: SceneParams | None
    kind: str
    key: str


def continuation_enabled(cfg) -> bool:
    """Whether the evaluation has a continuation suite (``eval.continuation_clips`` or ``_scenes`` > 0)."""
    return cfg.eval.continuation_clips > 0 or cfg.eval.continuation_scenes > 0


def continuation_cases(cfg, vae) -> list[ContinuationCase]:
    """The suite's cases (module docstring): held-out clips first, then procedural scenes.

    Raises:
        RuntimeError: held-out clips asked for but none exists (from ``load_val_clips``).
    """
    from vdit.eval.hook import physics_prompts

    e, d = cfg.eval, cfg.data
    cases: list[ContinuationCase] = []
    if e.continuation_clips > 0:
        from vdit.train.validation import load_val_clips

        for c in load_val_clips(cfg, e.continuation_clips):
            if "video" in c:  # uint8 (C, T, H, W)
                video = c["video"].permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
            else:  # a latent shard: the autoencoder's reconstruction is the reference
                video = to_uint8_video(vae.decode(c["latent"][None].float())[0].float().cpu())
            cases.append(ContinuationCase(c["caption"], np.ascontiguousarray(video), None, HELDOUT, c["key"]))
    fps = d.target_fps or 8.0
    for i, (text, params) in enumerate(physics_prompts(e.continuation_scenes, e.physics_seed + 1, d.num_frames,
                                                       d.height, d.width, fps, radius_frac=e.physics_radius_frac)):
        cases.append(ContinuationCase(text, render(params), params, PROCEDURAL, f"scene-{i}"))
    return cases


def agreed_cases(cfg, vae, ranks) -> list[ContinuationCase]:
    """:func:`continuation_cases` built on rank 0 and broadcast (collective when ``ranks.distributed``)."""
    if not ranks.distributed:
        return continuation_cases(cfg, vae)
    box = [continuation_cases(cfg, vae) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def continue_share(cfg, model: torch.nn.Module, encode_text: TextFn, vae, cases: list[ContinuationCase], step: int,
                   run_dir: str, device: torch.device, dtype: torch.dtype, ranks) -> list[dict[str, Any]]:
    """Continue, write and score this rank's share of ``cases`` (every rank of the job calls this together).

    Returns this rank's entries (SP rank 0; ``[]`` on the other SP ranks): ``{"index", "path"
    (relative to run_dir), "scored" (:func:`score_continuation`) or None, "error"}``.
    """
    from vdit.eval.hook import sample_name
    from vdit.eval.sharded import prompt_share

    e, d = cfg.eval, cfg.data
    k = e.continuation_frames
    n_pix = cond_pixel_frames(vae, k)
    latent = vae.latent_shape(d.num_frames, d.height, d.width)  # (C, T', H', W')
    fps = d.target_fps or 8.0
    out_dir = os.path.join(run_dir, "samples", f"step-{step}", "continuation")
    mine, count = prompt_share(len(cases), ranks.dp_rank, ranks.dp_size)
    padded: list[int | None] = mine + [None] * (count - len(mine))
    entries: list[dict[str, Any]] = []
    for start in range(0, count, e.batch_size):
        chunk = padded[start:start + e.batch_size]
        given = torch.stack([
            to_model_range(torch.from_numpy(cases[i].video[:n_pix]).permute(3, 0, 1, 2).contiguous())
            if i is not None else torch.zeros(3, n_pix, d.height, d.width) for i in chunk])  # (b, 3, n_pix, H, W)
        cond = vae.encode(given.to(device))[:, :, :k]  # (b, C, k, H', W')
        x0 = sample_latents(model, encode_text, latent, [cases[i].prompt if i is not None else "" for i in chunk],
                            e.num_steps, e.cfg_scale, e.flow_shift, e.seed, device, e.solver,
                            indices=[_NOISE_OFFSET + (i if i is not None else len(cases)) for i in chunk],
                            dtype=dtype, cond_latents=cond, cfg_interval=e.cfg_interval)  # (b, C, T', H', W')
        real = [j for j, i in enumerate(chunk) if i is not None]
        if ranks.sp_rank != 0 or not real:
            continue
        videos = vae.decode(x0[real]).float().clamp(-1, 1).cpu()  # (r, 3, T, H, W)
        videos[:, :, :n_pix] = given[real]  # the given frames as they were
        for j, v in zip(real, videos):
            i = chunk[j]
            path = os.path.join(out_dir, sample_name(i, cases[i].prompt))
            entry: dict[str, Any] = {"index": i, "path": os.path.relpath(path, run_dir), "scored": None, "error": None}
            try:
                os.makedirs(out_dir, exist_ok=True)
                video = to_uint8_video(v)  # (T, H, W, 3)
                write_mp4(path, video, fps)
                entry["scored"] = score_continuation(video, cases[i].video, n_pix, cases[i].scene, fps)
            except Exception as exn:  # noqa: BLE001 - one bad case must not fail (or hang) the evaluation
                log.exception("eval: continuation case %d (%r) failed after sampling", i, cases[i].prompt)
                entry["error"] = f"{type(exn).__name__}: {exn}"
            entries.append(entry)
    return entries


def score_continuation(generated: np.ndarray, real: np.ndarray, given_frames: int, scene: SceneParams | None,
                       fps: float) -> dict[str, Any]:
    """Score one continuation (pure; any rank).

    Args:
        generated, real: uint8 ``(T, H, W, 3)``, the sample (given frames included) and the real clip.
        given_frames: pixel frames that were given; Physics-IQ compares the frames after them.
        scene: renderer parameters: the trajectory checks run on the whole generated video.
        fps: frames per second of both.

    Returns:
        ``{"record": PhysicsIQRecord, "physics": vdit.eval.hook.score_one(...) or None}``.

    Raises:
        ValueError: videos of different lengths, or nothing after the given frames.
    """
    from vdit.eval.hook import score_one

    if len(generated) != len(real) or len(real) <= given_frames:
        raise ValueError(f"continuation needs equal lengths beyond the {given_frames} given frames; got "
                         f"{len(generated)} and {len(real)} frames")
    rest = len(real) - given_frames
    record = physics_iq_record(generated[given_frames:], real[given_frames:], None, fps, seconds=rest / fps)
    physics = score_one(generated, scene, fps, ["physics"]) if scene is not None else None
    return {"record": record, "physics": physics}


def _iq_metrics(records: list, prefix: str) -> dict[str, Any]:
    if not records:
        return {}
    a = physics_iq_score(records)["A"]
    return {f"{prefix}physics_iq/{name}": {"mean": v, "value": v, "count": len(records), "not_evaluable": 0,
                                            "implementation": _IMPL, "original": ORIGINAL, "exact": False}
            for name, v in a.items()}


def summarize_continuation(cases: list[ContinuationCase], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The suite's metrics and per-case rows from every case's entry (rank 0; module docstring).

    Returns ``{"metrics": {name: {"mean", "value", "count", ...}}, "videos": [{"index", "prompt",
    "kind", "key", "path", "physics_iq": {...}, "physics": report, "error"}]}``.

    Raises:
        ValueError: ``entries`` do not hold each case index exactly once.
    """
    from vdit.eval.hook import summarize_scores

    by_index = {en["index"]: en for en in entries}
    if len(by_index) != len(entries) or sorted(by_index) != list(range(len(cases))):
        raise ValueError(f"continuation entries cover cases {sorted(en['index'] for en in entries)}, "
                         f"expected each of 0..{len(cases) - 1} once")
    ok = [(c, by_index[i]["scored"]) for i, c in enumerate(cases) if by_index[i]["scored"] is not None]
    metrics = _iq_metrics([s["record"] for _, s in ok], "continuation/")
    for kind in (HELDOUT, PROCEDURAL):
        metrics.update(_iq_metrics([s["record"] for c, s in ok if c.kind == kind], f"continuation/{kind}/"))
    physics = [(i, by_index[i]["scored"]["physics"]) for i, c in enumerate(cases)
               if c.scene is not None and by_index[i]["scored"] is not None]
    rows: dict[int, dict[str, Any]] = {}
    if physics:
        summary = summarize_scores([p for _, p in physics], ["physics"])
        metrics.update({f"continuation/{name}": m for name, m in summary["metrics"].items()})
        rows = {i: row for (i, _), row in zip(physics, summary["per_video"])}
    videos = []
    for i, c in enumerate(cases):
        en, scored = by_index[i], by_index[i]["scored"]
        row: dict[str, Any] = {"index": i, "prompt": c.prompt, "kind": c.kind, "key": c.key, "path": en["path"]}
        if scored is not None:
            gen = scored["record"].gen
            row["physics_iq"] = {"spatiotemporal_iou": float(np.mean(gen["spatiotemporal_iou"])),
                                 "spatial_iou": gen["spatial_iou"], "weighted_spatial_iou": gen["weighted_spatial_iou"],
                                 "mse": float(np.mean(gen["mse"]))}
            if "physics" in rows.get(i, {}):
                row["physics"] = rows[i]["physics"]
        if en["error"]:
            row["error"] = en["error"]
        videos.append(row)
    return {"metrics": metrics, "videos": videos}

"""``vdit-encode``: precompute VAE latents and text features into latent shards.

Run::

    # pixel-space identity autoencoder + packaged MiniLM (offline defaults; small)
    vdit-encode --input shards/ --output latents/ --num-frames 16 --height 64 --width 64 --target-fps 8
    # Wan 2.1 VAE + UMT5 from a local diffusers pipeline folder, bf16, tiled VAE
    vdit-encode --input shards/ --output latents/ --num-frames 81 --height 480 --width 832 --target-fps 16 \\
        --vae wan --vae-path /models/Wan2.1-T2V-1.3B-Diffusers --vae-dtype bf16 --vae-tiling \\
        --text-encoder hf --text-encoder-path /models/Wan2.1-T2V-1.3B-Diffusers --max-length 512 \\
        --text-dtype bf16 --batch-size 1
    # 8 GPUs on one node: each rank takes every 8th input shard; the last rank to finish writes index.json
    torchrun --nproc-per-node 8 -m vdit.data.encode --input shards/ --output latents/ ...
    # (or launch ranks yourself with --rank R --world-size W, then: vdit-encode --merge-index --output latents/)

Each input sample ``{key}.mp4`` is decoded at ``(num_frames, height, width, target_fps)`` exactly
as the training pipeline would (``decode_clip`` + ``clip_to_model_input``), with the window start
(and crop, with ``--random-crop``) drawn from a generator seeded by ``(seed, key)``, so the
result is reproducible and independent of batching, rank layout and order. Output in ``--output``:

* ``latents-r{rank}-{i:06d}.tar``: samples with the same keys: ``{key}.latent.pt``,
  ``{key}.text.pt``, ``{key}.txt``, ``{key}.json`` (see ``vdit.data.latents``);
* ``encode-r{rank}.json``: that rank's progress and report (shards, counts, skipped samples);
* ``index.json`` (all ranks' shards, the format ``vdit-ingest`` writes), ``encode_meta.json``
  (VAE, text encoder, geometry: checked by training) and ``null_text.pt`` (the null caption's
  features, for caption dropout without a text encoder).

Memory is bounded: input shards are streamed, one batch of clips is in memory at a time, and
output shards are written as they fill (never more than one open per rank). Output shards end at
input-shard boundaries, so ``--resume`` restarts a rank after its last completed input shard.
A sample that cannot be decoded or encoded is skipped and counted by reason; it never stops the
run (a failing VAE batch is retried clip by clip, e.g. after an out-of-memory error).

Exit status: 0 ok, 1 this rank encoded nothing from its input shards, 2 usage error.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds

from vdit.data.decode import DecodeError, decode_clip
from vdit.data.latents import LATENT_FORMAT, LATENT_FORMAT_VERSION, save_tensor_bytes, text_record
from vdit.data.shards import expand_shards
from vdit.data.transforms import clip_to_model_input
from vdit.model.text import NULL_CAPTION, TextEncoder, build_text_encoder
from vdit.model.vae import AUTOENCODERS, Autoencoder, build_autoencoder, resolve_dtype

__all__ = ["EncodeOptions", "UsageError", "clip_rng", "prepare_clip", "encode_shards", "merge_index",
           "rank_shard_urls", "build_parser", "main"]

log = logging.getLogger(__name__)


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


@dataclass
class EncodeOptions:
    """What to decode and how to store it.

    Attributes:
        num_frames, height, width: pixel clip size (``num_frames`` must fit the VAE, e.g. 1 + 4k).
        target_fps: clip frame rate (frames per second), or None to take every ``frame_stride``-th frame.
        frame_stride: integer source-frame step when ``target_fps`` is None.
        random_crop: crop at a key-seeded random offset instead of the centre.
        seed: mixes into the per-key generator (window start, crop).
        batch_size: clips per VAE / text-encoder call.
        samples_per_shard: max samples per output shard (shards also end at input-shard boundaries).
        latent_dtype: storage dtype of latents (float16 default: normalised latents are O(1), where
            float16 keeps 3 more mantissa bits than bfloat16).
        text_dtype: storage dtype of text features (bfloat16 default: T5 activations can exceed the
            float16 range).
        text_trim: drop the all-zero padding rows after the last real token on disk.
    """

    num_frames: int
    height: int
    width: int
    target_fps: float | None = None
    frame_stride: int = 1
    random_crop: bool = False
    seed: int = 0
    batch_size: int = 1
    samples_per_shard: int = 256
    latent_dtype: str = "float16"
    text_dtype: str = "bfloat16"
    text_trim: bool = True


def clip_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of one sample's random choices (window start, crop): a function of ``(seed, key)`` only."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8")), 0xE4C0DE])


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def prepare_clip(raw: dict[str, Any], opts: EncodeOptions) -> tuple[torch.Tensor, str, dict[str, Any]]:
    """Decode one input sample as training would.

    Returns:
        ``(x (3, T, H, W) float32 in [-1, 1], caption, info)`` where ``info`` is
        :func:`vdit.data.decode.decode_clip`'s (``fps``, ``indices``, ``source_fps``, ...).

    Raises:
        _Skip: ``no_video``, ``no_caption``, a decode reason (``corrupt``, ``too_short``, ...) or ``bad_frames``.
    """
    key = str(raw.get("__key__", "?"))
    video = raw.get("mp4")
    if video is None:
        raise _Skip("no_video", "sample has no .mp4")
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except (KeyError, AttributeError, UnicodeDecodeError):
        raise _Skip("no_caption", "no usable .txt caption") from None
    rng = clip_rng(opts.seed, key)
    try:
        frames, info = decode_clip(video, opts.num_frames, target_fps=opts.target_fps,
                                   stride=None if opts.target_fps else opts.frame_stride, rng=rng, name=key)
    except DecodeError as exn:
        raise _Skip(exn.reason, str(exn)) from None
    try:
        x = clip_to_model_input(frames, opts.height, opts.width, rng if opts.random_crop else None)  # (3, T, H, W)
    except ValueError as exn:
        raise _Skip("bad_frames", str(exn)) from None
    return x, caption, info


def rank_shard_urls(urls: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's input shards: every ``world_size``-th from ``rank`` (round-robin)."""
    if not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} out of range for world size {world_size}")
    return urls[rank::world_size]


def _stream(url: str, errors: list[Exception]) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard, streamed (one sample's bytes in memory at a time)."""
    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True

    try:
        yield from wds.tarfile_samples([{"url": url}], handler=handler)
    except Exception as exn:  # noqa: BLE001 - a broken shard must not kill the run
        errors.append(exn)


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class _ShardWriter:
    """Writes ``{prefix}-{i:06d}.tar`` shards (``.tmp`` until closed, then renamed)."""

    def __init__(self, out_dir: str, prefix: str, maxcount: int, start: int = 0):
        self.out_dir, self.prefix, self.maxcount, self.next = out_dir, prefix, maxcount, start
        self.closed: list[dict[str, Any]] = []
        self._writer: wds.TarWriter | None = None
        self._tmp = ""
        self._count = 0

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is not None and self._count >= self.maxcount:
            self.close_shard()
        if self._writer is None:
            self._tmp = os.path.join(self.out_dir, f"{self.prefix}-{self.next:06d}.tar.tmp")
            self._writer = wds.TarWriter(self._tmp, encoder=False, mtime=0.0)
            self._count = 0
        self._writer.write(sample)
        self._count += 1

    def close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        name = f"{self.prefix}-{self.next:06d}.tar"
        os.replace(self._tmp, os.path.join(self.out_dir, name))
        self.closed.append({"name": name, "num_samples": self._count})
        self._writer, self.next = None, self.next + 1

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                if os.path.exists(self._tmp):
                    os.remove(self._tmp)
                self._writer = None


def _module_device(module: torch.nn.Module) -> torch.device:
    t = next(module.parameters(), None)
    if t is None:
        t = next(module.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


def _vae_info(vae: Autoencoder, name: str, path: str | None) -> dict[str, Any]:
    return {"name": name, "path": os.path.abspath(path) if path else None} | vae.describe()


def build_meta(opts: EncodeOptions, vae: Autoencoder, vae_name: str, vae_path: str | None,
               text_encoder: TextEncoder, text_name: str, text_path: str | None) -> dict[str, Any]:
    """``encode_meta.json`` content (flat fields are what :func:`vdit.data.latents.check_encode_meta` compares)."""
    return {
        "format": LATENT_FORMAT,
        "version": LATENT_FORMAT_VERSION,
        "latent_channels": vae.latent_channels,
        "temporal_compression": vae.temporal_compression,
        "spatial_compression": vae.spatial_compression,
        "latent_shape": list(vae.latent_shape(opts.num_frames, opts.height, opts.width)),
        "latent_dtype": str(resolve_dtype(opts.latent_dtype)).removeprefix("torch."),
        "vae": vae_name,
        "vae_path": os.path.abspath(vae_path) if vae_path else None,
        "vae_details": _vae_info(vae, vae_name, vae_path),
        "text_encoder": text_name,
        "text_encoder_path": os.path.abspath(text_path) if text_path else getattr(text_encoder, "path", None),
        "text_hidden_size": text_encoder.hidden_size,
        "max_length": text_encoder.max_length,
        "text_dtype": str(resolve_dtype(opts.text_dtype)).removeprefix("torch."),
        "text_trimmed": opts.text_trim,
        "null_text": "null_text.pt",
        "num_frames": opts.num_frames,
        "height": opts.height,
        "width": opts.width,
        "target_fps": opts.target_fps,
        "frame_stride": opts.frame_stride,
        "random_crop": opts.random_crop,
        "seed": opts.seed,
    }


class _TextFeatures:
    """Caption -> ``text.pt`` record, batched, with a bounded cache (clips of one video share captions)."""

    def __init__(self, encoder: TextEncoder, dtype: torch.dtype, trim: bool, max_entries: int = 4096):
        self.encoder, self.dtype, self.trim, self.max_entries = encoder, dtype, trim, max_entries
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        todo = sorted({c for c in captions if c not in self.cache})
        if todo:
            hidden, mask = self.encoder.encode(todo, device="cpu")  # (N, L, D) float32, (N, L) bool
            if len(self.cache) + len(todo) > self.max_entries:
                self.cache.clear()
            for i, c in enumerate(todo):
                self.cache[c] = text_record(hidden[i], mask[i], self.dtype, self.trim)
        return [self.cache[c] for c in captions]


def _sample_json(raw: dict[str, Any], encode_info: dict[str, Any]) -> bytes:
    source: Any = None
    if raw.get("json") is not None:
        try:
            source = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            source = {"unparsed_json": True}
    record = dict(source) if isinstance(source, dict) else ({"source_json": source} if source is not None else {})
    record["encode"] = encode_info
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def _rank_report_path(output_dir: str, rank: int) -> str:
    return os.path.join(output_dir, f"encode-r{rank}.json")


def _remove_rank_outputs(output_dir: str, prefix: str, keep: set[str]) -> list[str]:
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar(\.tmp)?$")
    removed = []
    for fn in sorted(os.listdir(output_dir)):
        if pattern.match(fn) and fn not in keep:
            os.remove(os.path.join(output_dir, fn))
            removed.append(fn)
    return removed


def encode_shards(
    urls: list[str],
    output_dir: str,
    vae: Autoencoder,
    text_encoder: TextEncoder,
    opts: EncodeOptions,
    meta: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    resume: bool = False,
    log_fn: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Encode this rank's share of ``urls`` into latent shards in ``output_dir``.

    Args:
        urls: all input shards (every rank passes the same list; this rank takes ``urls[rank::world_size]``).
        output_dir: where shards, reports, ``null_text.pt`` (and, once all ranks finished, the index) go.
        vae, text_encoder: frozen encoders, already on their device.
        opts: clip geometry and storage options.
        meta: :func:`build_meta` (stored in the rank report; the merged ``encode_meta.json``).
        rank, world_size: this rank's place in the round-robin split of input shards.
        resume: continue after the input shards an earlier run of this rank completed (same meta).
        log_fn: progress printer (None: silent).

    Returns:
        The rank report (also ``encode-r{rank}.json``): ``shards``, ``encoded``, ``skipped_counts``,
        ``skipped`` (first 1000 records), ``done_inputs``, ``merged`` (whether ``index.json`` was written).

    Raises:
        UsageError: a ``resume`` whose earlier run used other options.
    """
    say = log_fn or (lambda _m: None)
    t0 = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    mine = rank_shard_urls(urls, rank, world_size)
    prefix = f"latents-r{rank}"
    report_path = _rank_report_path(output_dir, rank)
    report: dict[str, Any] = {"rank": rank, "world_size": world_size, "inputs": mine, "done_inputs": [],
                              "shards": [], "encoded": 0, "skipped_counts": {}, "skipped": [], "finished": False,
                              "meta": meta}
    if resume and os.path.exists(report_path):
        with open(report_path) as f:
            old = json.load(f)
        if old.get("meta") != meta or old.get("world_size") != world_size:
            raise UsageError(f"--resume: {report_path} was written with other options or world size; "
                             "rerun without --resume to start this rank over")
        report.update({k: old[k] for k in ("done_inputs", "shards", "encoded", "skipped_counts", "skipped")})
    _remove_rank_outputs(output_dir, prefix, {s["name"] for s in report["shards"]})
    report["finished"] = False
    _write_json(report_path, report)
    # an index from an earlier run must not describe shards this run is replacing: the last rank to
    # finish writes a fresh one
    for stale in ("index.json", "encode_meta.json"):
        if os.path.exists(os.path.join(output_dir, stale)):
            os.remove(os.path.join(output_dir, stale))
    if rank == 0:  # leftovers of an earlier run with more ranks
        for fn in sorted(os.listdir(output_dir)):
            m = re.fullmatch(r"(?:encode-r(\d+)\.json|latents-r(\d+)-\d{6}\.tar(?:\.tmp)?)", fn)
            if m and int(m.group(1) or m.group(2)) >= world_size:
                os.remove(os.path.join(output_dir, fn))

    # the null caption's features: what caption dropout uses when training without a text encoder
    null_hidden, null_mask = text_encoder.encode([NULL_CAPTION], device="cpu")  # (1, L, D), (1, L)
    text_dtype = resolve_dtype(opts.text_dtype)
    _write_bytes(os.path.join(output_dir, "null_text.pt"),
                 save_tensor_bytes(text_record(null_hidden[0], null_mask[0], text_dtype, opts.text_trim)))

    latent_dtype = resolve_dtype(opts.latent_dtype)
    texts = _TextFeatures(text_encoder, text_dtype, opts.text_trim)
    vae_device = _module_device(vae)
    latent_shape = tuple(meta["latent_shape"])
    skipped = Counter(report["skipped_counts"])
    writer = _ShardWriter(output_dir, prefix, opts.samples_per_shard, start=len(report["shards"]))

    def skip(key: str, url: str, reason: str, detail: str) -> None:
        skipped[reason] += 1
        if len(report["skipped"]) < 1000:
            report["skipped"].append({"key": key, "shard": os.path.basename(url), "reason": reason,
                                      "detail": detail[:300]})
        log.warning("encode: %s: %s: %s (%s); skipped", url, key, reason, detail[:200])

    def encode_batch(batch: list[tuple[dict, torch.Tensor, str, dict]], url: str) -> int:
        x = torch.stack([b[1] for b in batch]).to(vae_device)  # (B, 3, T, H, W)
        try:
            z = vae.encode(x)  # (B, C, T', H', W') float32
            outcomes: list[torch.Tensor | Exception] = list(z)
        except Exception as exn:  # noqa: BLE001 - e.g. CUDA OOM on a big batch: retry clip by clip
            if len(batch) == 1:
                outcomes = [exn]
            else:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                outcomes = []
                for item in batch:
                    try:
                        outcomes.append(vae.encode(item[1][None].to(vae_device))[0])
                    except Exception as exn1:  # noqa: BLE001
                        outcomes.append(exn1)
        del x
        records = texts([b[2] for b in batch])
        written = 0
        for (raw, _, caption, info), z_i, text in zip(batch, outcomes, records):
            key = str(raw["__key__"])
            if isinstance(z_i, Exception):
                skip(key, url, "encode_failed", f"{type(z_i).__name__}: {z_i}")
                continue
            latent = z_i.detach().to("cpu", latent_dtype).clone()  # (C, T', H', W'), owns its storage
            if tuple(latent.shape) != latent_shape or not torch.isfinite(latent).all():
                skip(key, url, "bad_latent", f"shape {tuple(latent.shape)}, finite={bool(torch.isfinite(latent).all())}")
                continue
            encode_info = {"vae": meta["vae"], "vae_path": meta["vae_path"], "latent_shape": list(latent.shape),
                           "latent_dtype": meta["latent_dtype"], "text_encoder": meta["text_encoder"],
                           "text_tokens": int(text["mask"].sum()), "text_dtype": meta["text_dtype"],
                           "num_frames": opts.num_frames, "height": opts.height, "width": opts.width,
                           "fps": info["fps"], "frame_indices": info["indices"], "source_fps": info["source_fps"]}
            writer.write({"__key__": key, "latent.pt": save_tensor_bytes(latent), "text.pt": save_tensor_bytes(text),
                          "txt": caption.encode("utf-8"), "json": _sample_json(raw, encode_info)})
            written += 1
        return written

    done = set(report["done_inputs"])
    try:
        for i, url in enumerate(mine, start=1):
            if url in done:
                continue
            t_shard, n_enc, n_seen, n_skip0 = time.perf_counter(), 0, 0, sum(skipped.values())
            errors: list[Exception] = []
            batch: list[tuple[dict, torch.Tensor, str, dict]] = []
            for raw in _stream(url, errors):
                key = str(raw.get("__key__", "?"))
                n_seen += 1
                try:
                    x, caption, info = prepare_clip(raw, opts)
                except _Skip as s:
                    skip(key, url, s.reason, s.detail)
                    continue
                batch.append(({"__key__": key, "json": raw.get("json")}, x, caption, info))  # drop the mp4 bytes
                if len(batch) == opts.batch_size:
                    n_enc += encode_batch(batch, url)
                    batch = []
            if batch:
                n_enc += encode_batch(batch, url)
            if errors:
                skip("-", url, "shard_truncated" if n_seen else "shard_unreadable",
                     f"{type(errors[0]).__name__}: {errors[0]}")
            writer.close_shard()  # output shards end at input-shard boundaries: resume granularity
            report["encoded"] += n_enc
            report["done_inputs"].append(url)
            report["shards"] += writer.closed
            writer.closed = []
            report["skipped_counts"] = dict(sorted(skipped.items()))
            _write_json(report_path, report)
            dt = time.perf_counter() - t_shard
            n_skip = sum(skipped.values()) - n_skip0
            say(f"[rank {rank}] {i}/{len(mine)} {os.path.basename(url)}: {n_enc} encoded"
                + (f", {n_skip} skipped" if n_skip else "") + f" ({n_enc / max(dt, 1e-9):.1f} clips/s)")
    except BaseException:
        writer.abort()
        raise
    report["finished"] = True
    report["elapsed_s"] = round(time.perf_counter() - t0, 3)
    _write_json(report_path, report)
    try:
        merge_index(output_dir, world_size=world_size)
        report["merged"] = True
        say(f"[rank {rank}] all {world_size} rank(s) finished: wrote {os.path.join(output_dir, 'index.json')}")
    except RuntimeError as exn:  # other ranks still running: the last one to finish merges
        report["merged"] = False
        say(f"[rank {rank}] done; index not written yet ({exn})")
    return report


def merge_index(output_dir: str, world_size: int | None = None) -> dict[str, Any]:
    """Write ``index.json`` and ``encode_meta.json`` covering every rank's shards.

    Args:
        output_dir: the ``vdit-encode`` output folder.
        world_size: expected number of ranks (default: from the rank reports).

    Returns:
        The index dict.

    Raises:
        FileNotFoundError: no rank reports in ``output_dir``.
        RuntimeError: a rank has not finished (or its report is missing), or ranks disagree on
            the world size or the encode settings.
    """
    paths = sorted(glob.glob(os.path.join(output_dir, "encode-r*.json")))
    if not paths:
        raise FileNotFoundError(f"no encode-r*.json rank reports in {output_dir}")
    reports = {}
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        reports[int(r["rank"])] = r
    ws = world_size if world_size is not None else reports[min(reports)]["world_size"]
    bad_ws = sorted(r for r, rep in reports.items() if rep["world_size"] != ws and r < ws)
    if bad_ws:
        raise RuntimeError(f"ranks {bad_ws} ran with another world size than {ws}; re-encode them")
    missing = [r for r in range(ws) if r not in reports]
    unfinished = [r for r in range(ws) if r in reports and not reports[r]["finished"]]
    if missing or unfinished:
        raise RuntimeError(f"waiting for ranks: missing {missing}, unfinished {unfinished} of world size {ws}")
    meta = reports[0]["meta"]
    differ = [r for r in range(ws) if reports[r]["meta"] != meta]
    if differ:
        raise RuntimeError(f"ranks {differ} encoded with other settings than rank 0; re-encode them")
    shards = sorted((s for r in range(ws) for s in reports[r]["shards"]), key=lambda s: s["name"])
    skipped: Counter = Counter()
    for r in range(ws):
        skipped.update(reports[r]["skipped_counts"])
    total = sum(s["num_samples"] for s in shards)
    index = {"shards": shards, "total_samples": total, "format": LATENT_FORMAT, "world_size": ws,
             "skipped_counts": dict(sorted(skipped.items()))}
    _write_json(os.path.join(output_dir, "encode_meta.json"),
                meta | {"total_samples": total, "num_shards": len(shards), "skipped_counts": index["skipped_counts"]})
    _write_json(os.path.join(output_dir, "index.json"), index)
    return index


def _env_int(*names: str) -> int | None:
    for n in names:
        if os.environ.get(n, "").strip():
            return int(os.environ[n])
    return None


def build_parser() -> argparse.ArgumentParser:
    """The ``vdit-encode`` argument parser."""
    p = argparse.ArgumentParser(prog="vdit-encode",
                                description="Precompute VAE latents + text features into latent shards.")
    p.add_argument("--input", help="input shards: folder (index.json or *.tar), brace pattern or glob")
    p.add_argument("--output", required=True, help="output folder for latent shards, index.json, encode_meta.json")
    p.add_argument("--num-frames", type=int, help="frames per clip (a causal VAE needs 1 + k * 4)")
    p.add_argument("--height", type=int, help="clip height in pixels")
    p.add_argument("--width", type=int, help="clip width in pixels")
    p.add_argument("--target-fps", type=float, default=None, help="clip frame rate (default: every --frame-stride-th frame)")
    p.add_argument("--frame-stride", type=int, default=1, help="source-frame step without --target-fps (default 1)")
    p.add_argument("--random-crop", action="store_true", help="key-seeded random crop instead of the centre")
    p.add_argument("--seed", type=int, default=0, help="seed mixed with each key for window start / crop (default 0)")
    p.add_argument("--vae", default="identity", choices=AUTOENCODERS, help="autoencoder (default identity)")
    p.add_argument("--vae-path", default=None, help="local diffusers VAE folder (or pipeline folder with vae/)")
    p.add_argument("--vae-dtype", default="auto", help="VAE weights dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    p.add_argument("--vae-tiling", action="store_true", help="encode in spatial tiles (lower peak memory)")
    p.add_argument("--vae-slicing", action="store_true", help="encode one clip of a batch at a time")
    p.add_argument("--scaling-factor", type=float, default=None,
                   help="override the latent scaling factor (identity/hunyuan/cogvideox; default: the model's)")
    p.add_argument("--text-encoder", default="minilm", choices=("minilm", "hf", "random"),
                   help="text encoder (default minilm, packaged)")
    p.add_argument("--text-encoder-path", default=None, help="local HF model folder (or diffusers pipeline folder)")
    p.add_argument("--text-hidden-size", type=int, default=None, help="width of the random test encoder")
    p.add_argument("--max-length", type=int, default=32, help="tokens per caption (default 32)")
    p.add_argument("--text-dtype", default="auto", help="text encoder weights dtype: auto, fp32, bf16")
    p.add_argument("--latent-dtype", default="float16", help="stored latent dtype: float16 (default), bfloat16, float32")
    p.add_argument("--text-store-dtype", default="bfloat16", help="stored text feature dtype (default bfloat16)")
    p.add_argument("--no-text-trim", action="store_true", help="store all max_length feature rows, padding included")
    p.add_argument("--batch-size", type=int, default=1, help="clips per VAE call (default 1; raise while memory allows)")
    p.add_argument("--samples-per-shard", type=int, default=256, help="max samples per output shard (default 256)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda:$LOCAL_RANK / $SLURM_LOCALID if CUDA is available, else cpu), cpu, cuda:N")
    p.add_argument("--rank", type=int, default=None, help="this rank (default: $RANK / $SLURM_PROCID / 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of ranks (default: $WORLD_SIZE / $SLURM_NTASKS / 1)")
    p.add_argument("--resume", action="store_true", help="continue after this rank's completed input shards")
    p.add_argument("--merge-index", action="store_true",
                   help="only write index.json + encode_meta.json from finished rank reports, then exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-shard progress lines")
    return p


def _options(args: argparse.Namespace) -> EncodeOptions:
    for name in ("input", "num_frames", "height", "width"):
        if getattr(args, name) is None:
            raise UsageError(f"--{name.replace('_', '-')} is required")
    if args.batch_size < 1 or args.samples_per_shard < 1:
        raise UsageError("--batch-size and --samples-per-shard must be >= 1")
    for flag in ("latent_dtype", "text_store_dtype"):
        try:
            resolve_dtype(getattr(args, flag))
        except ValueError as exn:
            raise UsageError(f"--{flag.replace('_', '-')}: {exn}") from None
    return EncodeOptions(num_frames=args.num_frames, height=args.height, width=args.width,
                         target_fps=args.target_fps, frame_stride=args.frame_stride, random_crop=args.random_crop,
                         seed=args.seed, batch_size=args.batch_size, samples_per_shard=args.samples_per_shard,
                         latent_dtype=args.latent_dtype, text_dtype=args.text_store_dtype,
                         text_trim=not args.no_text_trim)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vdit-encode``; returns the exit status (0 ok, 1 nothing encoded, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    rank = args.rank if args.rank is not None else (_env_int("RANK", "SLURM_PROCID") or 0)
    world_size = args.world_size if args.world_size is not None else (_env_int("WORLD_SIZE", "SLURM_NTASKS") or 1)
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, flush=True))
    if args.merge_index:
        try:
            index = merge_index(args.output, world_size=args.world_size)
        except (FileNotFoundError, RuntimeError) as exn:
            print(f"vdit-encode: error: {exn}", file=sys.stderr)
            return 2
        print(f"vdit-encode: index.json: {len(index['shards'])} shard(s), {index['total_samples']} samples", flush=True)
        return 0
    try:
        opts = _options(args)
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} out of range for world size {world_size}")
        urls = expand_shards(args.input)
        out_abs = os.path.abspath(args.output)
        urls = [u for u in urls if os.path.dirname(os.path.abspath(u)) != out_abs]  # never re-read our own output
        if not urls:
            raise UsageError(f"{args.input}: no input shards outside --output")
        if args.device == "auto" and torch.cuda.is_available():
            # one GPU per rank; under srun --gpus-per-task each task sees only its own GPU
            local = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
            device = torch.device(f"cuda:{local % torch.cuda.device_count()}")
        elif args.device == "auto":
            device = torch.device("cpu")
        else:
            device = torch.device(args.device)
        auto = "bfloat16" if device.type == "cuda" else "float32"
        vae_dtype = auto if args.vae_dtype == "auto" else args.vae_dtype
        text_dtype = auto if args.text_dtype == "auto" else args.text_dtype
        kw: dict[str, Any] = {"scaling_factor": args.scaling_factor}
        if args.vae != "identity":
            kw |= {"dtype": vae_dtype, "tiling": args.vae_tiling, "slicing": args.vae_slicing}
        vae = build_autoencoder(args.vae, args.vae_path, **kw).to(device)
        text_encoder = build_text_encoder(args.text_encoder, args.text_encoder_path, args.max_length,
                                          dtype=text_dtype, hidden_size=args.text_hidden_size).to(device)
        vae.latent_shape(opts.num_frames, opts.height, opts.width)  # frame/size constraints, before any work
        meta = build_meta(opts, vae, args.vae, args.vae_path, text_encoder, args.text_encoder, args.text_encoder_path)
        say(f"vdit-encode: rank {rank}/{world_size}: {len(rank_shard_urls(urls, rank, world_size))} of {len(urls)} "
            f"input shards -> {args.output}; latent {tuple(meta['latent_shape'])} {meta['latent_dtype']} on {device}")
        report = encode_shards(urls, args.output, vae, text_encoder, opts, meta, rank=rank, world_size=world_size,
                               resume=args.resume, log_fn=say)
    except (UsageError, ValueError, FileNotFoundError) as exn:
        print(f"vdit-encode: error: {exn}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k}={v}" for k, v in report["skipped_counts"].items())
    print(f"vdit-encode: rank {rank}: {report['encoded']} clips encoded into {len(report['shards'])} shard(s)"
          + (f"; skipped {sum(report['skipped_counts'].values())} ({counts})" if counts else ""), flush=True)
    if report["encoded"] == 0 and report["inputs"]:
        print(f"vdit-encode: rank {rank} encoded nothing usable", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

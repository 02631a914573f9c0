"""Loader benchmark: decoded clips/s of the pipeline vs raw decord and a naive PyAV loader; RSS growth.

Run on demand (not a unit test; a few minutes on 2 cores)::

    .venv/bin/python bench/loader_bench.py                 # everything
    .venv/bin/python bench/loader_bench.py --clips 24 --rss-decodes 1000   # quicker
    # the same with decord2 instead of decord 0.6 (module name `decord` shadowed from another venv):
    PYTHONPATH=/path/with/decord2/only .venv/bin/python bench/loader_bench.py

It writes its own clips (PyAV/libx264, moving pattern + noise, 24 fps) into webdataset shards in a
temporary directory and measures, in one run:

1. ``pipeline`` (VideoPipeline, T=33 at 256x256, 1 and 2 DataLoader workers, from shards) vs
   ``raw`` decord (the same clips and the same frame indices, bytes already in memory,
   ``VideoReader(num_threads=1).get_batch(sorted indices)``; one process). Target >= 0.9x.
2. On long sources (``--long-seconds``, default 15 s): the pipeline (1 worker) vs a ``naive`` loader
   that decodes the whole video with PyAV and then picks the same 33 frames.
3. Host RSS growth over ``--rss-decodes`` clip decodes (small clips, through
   ``vdit.data.decode.VideoDecoder`` and through raw decord), from ``/proc/self/status``. Target < 50 MB.

Ratios are measured in the same run on the same machine; absolute clips/s depend on the CPU. Each
number is the best of ``--rounds`` interleaved rounds, and clips per CPU-second (this process plus
its DataLoader workers, from psutil) is printed beside wall-clock clips/s: on a shared machine the
CPU figure is the stable one.
"""

from __future__ import annotations

import argparse
import gc
import io
import itertools
import os
import sys
import tempfile
import time

import numpy as np
import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import av  # noqa: E402
import decord  # noqa: E402
import webdataset as wds  # noqa: E402

from vdit.data.decode import VideoDecoder, select_frame_indices  # noqa: E402
from vdit.data.pipeline import ClipSpec, VideoPipeline, _sample_rng  # noqa: E402
from vdit.data.video_io import encode_mp4  # noqa: E402

T, SIZE, FPS = 33, 256, 24.0


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def make_clip(seed: int, frames: int, size: int) -> bytes:
    """A moving gradient with noise: realistic enough that H.264 has real work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        base = 128 + 60 * np.sin((x + 3 * t + seed) / 17.0) * np.cos((y - 2 * t) / 23.0)
        noise = rng.normal(0, 12, (size, size, 1))
        out[t] = np.clip(base[..., None] + noise + np.array([0, 20, -20]), 0, 255).astype(np.uint8)
    return encode_mp4(out, FPS, crf=23)


def write_shards(directory: str, clips: list[bytes], per_shard: int) -> None:
    os.makedirs(directory, exist_ok=True)
    for s in range(0, len(clips), per_shard):
        with wds.TarWriter(os.path.join(directory, f"clips-{s // per_shard:06d}.tar")) as w:
            for i in range(s, min(s + per_shard, len(clips))):
                w.write({"__key__": f"clip_{i:05d}", "mp4": clips[i], "txt": f"clip {i}"})


def shard_bytes(directory: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".tar"):
            for s in wds.tarfile_samples([{"url": os.path.join(directory, name)}]):
                out[s["__key__"]] = s["mp4"]
    return out


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live children (DataLoader workers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def run_pipeline(directory: str, workers: int, n: int, seed: int = 0) -> tuple[float, float, list]:
    """(clips per wall second, clips per CPU second, items) of the pipeline over ``n`` clips (batch 1).

    Timed from the first batch (worker start-up excluded); CPU time counts the workers too.
    """
    spec = ClipSpec(T, SIZE, SIZE, target_fps=None, frame_stride=1, random_crop=False, seed=seed)
    pipe = VideoPipeline(directory, spec, batch_size=1, num_workers=workers)
    it = iter(pipe)
    first = next(it)
    items = [(first["key"][0], first["item"][0])]
    t, c = time.perf_counter(), cpu_seconds()
    for b in itertools.islice(it, n - 1):
        items.append((b["key"][0], b["item"][0]))
        assert b["video"].shape == (1, 3, T, SIZE, SIZE) and b["video"].dtype == torch.float32
    dt, dc = time.perf_counter() - t, cpu_seconds() - c
    del it
    return (n - 1) / dt, (n - 1) / dc, items


def clip_indices(data: bytes, item, seed: int = 0) -> list[int]:
    """The indices the pipeline used for ``item`` (fixed shape, stride 1: no bucket draw)."""
    epoch, shard, pos = item
    vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
    n, fps = len(vr), vr.get_avg_fps()
    del vr
    return select_frame_indices(n, fps, T, stride=1, rng=_sample_rng(seed, epoch, shard, pos))


def run_raw(data_by_key: dict[str, bytes], items: list, seed: int = 0) -> float:
    work = [(data_by_key[k], clip_indices(data_by_key[k], it, seed)) for k, it in items]
    t, c = time.perf_counter(), time.process_time()
    for data, idx in work:
        vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
        frames = vr.get_batch(idx).asnumpy()
        assert frames.shape == (T, SIZE, SIZE, 3)
        del vr
    return len(work) / (time.perf_counter() - t), len(work) / (time.process_time() - c)


def run_naive(data_by_key: dict[str, bytes], items: list, seed: int = 0) -> float:
    work = [(data_by_key[k], clip_indices(data_by_key[k], it, seed)) for k, it in items]
    t, c = time.perf_counter(), time.process_time()
    for data, idx in work:
        with av.open(io.BytesIO(data)) as container:
            container.streams.video[0].thread_type = "SLICE"  # one core, like the others
            allf = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        frames = allf[idx]
        assert frames.shape == (T, SIZE, SIZE, 3)
    return len(work) / (time.perf_counter() - t), len(work) / (time.process_time() - c)


def rss_growth(decodes: int, via_pipeline_decoder: bool) -> tuple[float, float, float]:
    """(RSS after warm-up, RSS at the end, growth) in MB over ``decodes`` decodes of small clips."""
    clips = [make_clip(100 + i, 24, 64) for i in range(8)]
    rng = np.random.default_rng(0)

    def one(i: int) -> None:
        data = clips[i % len(clips)]
        start = int(rng.integers(0, 24 - 16 + 1))
        if via_pipeline_decoder:
            with VideoDecoder(data) as dec:
                dec.get_frames(list(range(start, start + 16)))
        else:
            vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
            vr.get_batch(list(range(start, start + 16))).asnumpy()
            del vr

    warm = min(200, decodes // 10)
    for i in range(warm):
        one(i)
    gc.collect()
    r0 = rss_mb()
    for i in range(decodes):
        one(i)
    gc.collect()
    r1 = rss_mb()
    return r0, r1, r1 - r0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=48, help="short clips (2 s, 256x256) in the shards")
    ap.add_argument("--long-clips", type=int, default=6)
    ap.add_argument("--long-seconds", type=float, default=15.0)
    ap.add_argument("--rss-decodes", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best of each is kept")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: speed,long,rss")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    print(f"decord {decord.__version__} ({os.path.dirname(decord.__file__)}), PyAV {av.__version__}, "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        if "speed" not in skip:
            t0 = time.perf_counter()
            clips = [make_clip(i, 48, SIZE) for i in range(args.clips)]
            short = os.path.join(tmp, "short")
            write_shards(short, clips, 8)
            data = shard_bytes(short)
            print(f"[setup] {len(clips)} clips x 48 frames {SIZE}x{SIZE} @ {FPS:g} fps, "
                  f"{sum(map(len, clips)) / len(clips) / 1e3:.0f} kB each ({time.perf_counter() - t0:.0f} s)")
            n = args.clips
            wall: dict[str, float] = {}
            cpu: dict[str, float] = {}
            items = None
            for _ in range(args.rounds):  # interleaved rounds, best of each: the machine may be shared
                for label, workers in (("pipeline 0 workers", 0), ("pipeline 1 worker", 1), ("pipeline 2 workers", 2)):
                    w, c, got = run_pipeline(short, workers, n)
                    items = items or got
                    wall[label], cpu[label] = max(wall.get(label, 0.0), w), max(cpu.get(label, 0.0), c)
                w, c = run_raw(data, items)
                wall["raw"], cpu["raw"] = max(wall.get("raw", 0.0), w), max(cpu.get("raw", 0.0), c)
            raw_w, raw_c = wall.pop("raw"), cpu.pop("raw")
            print(f"[speed] T={T} {SIZE}x{SIZE}, best of {args.rounds} rounds; wall clips/s (ratio to raw) and "
                  f"clips per CPU-second incl. workers (ratio to raw):")
            print(f"[speed]   raw decord         {raw_w:6.1f} clips/s          {raw_c:6.1f} clips/CPU-s")
            for k in wall:
                print(f"[speed]   {k:<18} {wall[k]:6.1f} clips/s ({wall[k] / raw_w:.2f}x)  "
                      f"{cpu[k]:6.1f} clips/CPU-s ({cpu[k] / raw_c:.2f}x)")
        if "long" not in skip:
            t0 = time.perf_counter()
            nf = int(args.long_seconds * FPS)
            long_clips = [make_clip(1000 + i, nf, SIZE) for i in range(args.long_clips)]
            longd = os.path.join(tmp, "long")
            write_shards(longd, long_clips, 1)
            data = shard_bytes(longd)
            print(f"[setup] {len(long_clips)} long sources x {nf} frames ({args.long_seconds:g} s) "
                  f"({time.perf_counter() - t0:.0f} s)")
            n = 2 * args.long_clips
            best = {"pipeline 1 worker": [0.0, 0.0], "raw decord": [0.0, 0.0], "naive PyAV whole video": [0.0, 0.0]}
            items = None
            for _ in range(args.rounds):
                w, c, got = run_pipeline(longd, 1, n + 1)
                items = items or got
                for k, (w, c) in zip(best, [(w, c), run_raw(data, items), run_naive(data, items)]):
                    best[k] = [max(best[k][0], w), max(best[k][1], c)]
            p1, naive = best["pipeline 1 worker"], best["naive PyAV whole video"]
            print(f"[long] {args.long_seconds:g} s sources, best of {args.rounds}: "
                  + " | ".join(f"{k} {w:.2f} clips/s, {c:.2f} clips/CPU-s" for k, (w, c) in best.items())
                  + f" -> pipeline {p1[0] / naive[0]:.1f}x naive (wall), {p1[1] / naive[1]:.1f}x (CPU)")
        if "rss" not in skip:
            for label, via in (("VideoDecoder", True), ("raw decord", False)):
                t0 = time.perf_counter()
                r0, r1, g = rss_growth(args.rss_decodes, via)
                print(f"[rss] {label}: {args.rss_decodes} decodes of 16 frames 64x64: RSS {r0:.0f} -> {r1:.0f} MB, "
                      f"growth {g:+.1f} MB ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

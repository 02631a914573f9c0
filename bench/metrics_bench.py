"""Seconds per video for every weight-free metric, at 49 x 480 x 832 and 16 x 256 x 256, on this CPU.

Run:
    python bench/metrics_bench.py                 # both sizes, 1 repeat
    python bench/metrics_bench.py --sizes 16x256x256 --threads 1

Each metric runs on its own (a fresh flow cache, so a flow-based metric pays for its own optical
flow); the last row, ``all (shared flow)``, scores every metric in one registry call, where the
flow-based metrics share one flow cache. The video is a procedural scene (a ball under gravity,
rendered by ``vdit.data.synthetic``) over a moving texture, so flows are non-trivial; ``physics``
uses the scene's parameters and ``physics_iq`` compares the video with itself.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch

from vdit.data.synthetic import random_scene, render
from vdit.eval.metrics.flow import FlowCache, FarnebackFlow
from vdit.eval.metrics.registry import REGISTRY, WEIGHT_FREE, Backends, Inputs, score_video


def make_video(T: int, H: int, W: int, fps: float) -> tuple[np.ndarray, object]:
    params = random_scene(np.random.default_rng(0), H, W, T, fps)
    video = render(params)
    rng = np.random.default_rng(1)
    tex = cv2.GaussianBlur(rng.integers(0, 256, (H, W + 4 * T, 3)).astype(np.float32), (0, 0), 3.0)
    tex = np.clip((tex - tex.mean()) * 2, -25, 25)
    for t in range(T):  # background texture panning 4 px/frame under the ball
        video[t] = np.clip(video[t] + tex[:, 4 * t:4 * t + W], 0, 255).astype(np.uint8)
    return video, params


def bench(T: int, H: int, W: int, fps: float = 16.0) -> dict[str, float]:
    video, params = make_video(T, H, W, fps)
    item = Inputs(video, fps, scene=params, reference=video)
    backends = Backends()
    times = {}
    for name in WEIGHT_FREE:
        cache = FlowCache(video, FarnebackFlow())
        t0 = time.perf_counter()
        REGISTRY[name].run(item, cache, backends)
        times[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_video(item, WEIGHT_FREE, backends)
    times["all (shared flow)"] = time.perf_counter() - t0
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="49x480x832,16x256x256", help="comma-separated TxHxW")
    ap.add_argument("--threads", type=int, default=None, help="torch / OpenCV threads (default: library default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    results = {s: bench(*s) for s in sizes}
    names = list(next(iter(results.values())))
    head = ["metric"] + [f"{T}x{H}x{W} (s/video)" for T, H, W in sizes]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for n in names:
        print("| " + " | ".join([n] + [f"{results[s][n]:.3f}" for s in sizes]) + " |")
    print(f"\ncpu threads: torch {torch.get_num_threads()}, opencv {cv2.getNumThreads()}")


if __name__ == "__main__":
    main()

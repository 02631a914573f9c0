"""Shared fixtures: tiny webdataset shards made here (no network, no system ffmpeg)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import webdataset as wds

from vdit.data.video_io import encode_mp4

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def clip_frames(sample_id: int, num_frames: int = 12, size: int = 32) -> np.ndarray:
    """A clip whose mean gray level encodes ``sample_id`` and whose frames ramp slowly (uint8 (T, H, W, 3))."""
    base = 20 + (sample_id * 37) % 200
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        frames[t] = base + t
    return frames


def write_shards(directory, num_shards: int, per_shard: int, num_frames: int = 12, size: int = 32,
                 fps: float = 8.0, bad: dict[int, bytes] | None = None) -> list[str]:
    """Write ``num_shards`` tar shards of ``per_shard`` samples; sample ``i`` has caption ``"clip i"``.

    ``bad`` maps a sample id to replacement mp4 bytes (e.g. garbage) to plant corrupt samples.
    Also writes the ``index.json`` that vdit-ingest writes.
    """
    os.makedirs(directory, exist_ok=True)
    urls, entries = [], []
    sid = 0
    for s in range(num_shards):
        url = os.path.join(directory, f"clips-{s:06d}.tar")
        with wds.TarWriter(url) as w:
            for _ in range(per_shard):
                data = (bad or {}).get(sid) or encode_mp4(clip_frames(sid, num_frames, size), fps)
                w.write({"__key__": f"clip_{sid:05d}", "mp4": data, "txt": f"clip {sid}",
                         "json": json.dumps({"id": sid}).encode()})
                sid += 1
        urls.append(url)
        entries.append({"name": os.path.basename(url), "num_samples": per_shard})
    with open(os.path.join(directory, "index.json"), "w") as f:
        json.dump({"shards": entries, "num_samples": sid}, f)
    return urls


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """4 shards x 6 clips of 12 frames, 32x32, 8 fps."""
    d = tmp_path_factory.mktemp("shards")
    write_shards(str(d), 4, 6)
    return str(d)

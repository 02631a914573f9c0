"""Buckets: token-budget batch sizes, clip -> bucket assignment, bucketed batches, SP groups."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf

from vdit.data.buckets import BucketConfig, Buckets, BucketSpec, latent_tokens
from vdit.data.pipeline import ClipSpec, VideoPipeline
from vdit.data.video_io import encode_mp4

# (height, width, frames) of the clips, cycled over sample ids
SHAPES = [(32, 32, 12), (32, 64, 12), (64, 32, 12), (32, 32, 20), (32, 64, 20)]

BUCKETS = BucketConfig(
    buckets=[BucketSpec(4, 16, 16, 1.0), BucketSpec(4, 16, 32, 1.0), BucketSpec(4, 32, 16, 1.0),
             BucketSpec(8, 16, 16, 1.0)],
    token_budget=1024, patch_size=[1, 2, 2])
SPEC = ClipSpec(num_frames=4, height=16, width=16, target_fps=None, frame_stride=2, random_crop=True, seed=5)


def write_varied_shards(directory, num_shards: int, per_shard: int) -> list[str]:
    """Shards of clips with several aspect ratios and durations; sample ``i`` has shape ``SHAPES[i % 5]``."""
    os.makedirs(directory, exist_ok=True)
    urls, sid = [], 0
    for s in range(num_shards):
        url = os.path.join(directory, f"clips-{s:06d}.tar")
        with wds.TarWriter(url) as w:
            for _ in range(per_shard):
                h, wd, t = SHAPES[sid % len(SHAPES)]
                frames = np.full((t, h, wd, 3), 20 + (sid * 37) % 200, np.uint8)
                frames += np.arange(t, dtype=np.uint8)[:, None, None, None]
                w.write({"__key__": f"clip_{sid:05d}", "mp4": encode_mp4(frames, 8.0), "txt": f"clip {sid}",
                         "json": json.dumps({"id": sid}).encode()})
                sid += 1
        urls.append(url)
    return urls


@pytest.fixture(scope="session")
def varied_shards(tmp_path_factory):
    """4 shards x 5 clips of mixed aspect ratio (1:1, 2:1, 1:2) and length (12 or 20 frames)."""
    d = tmp_path_factory.mktemp("varied")
    write_varied_shards(str(d), 4, 5)
    return str(d)


def test_token_budget_batch_sizes_and_tokens():
    b = Buckets(BUCKETS)
    assert [x.tokens for x in b] == [4 * 8 * 8, 4 * 8 * 16, 4 * 16 * 8, 8 * 8 * 8]
    assert [x.batch_size for x in b] == [4, 2, 2, 2]
    assert latent_tokens(33, 256, 256, (1, 2, 2), (4, 8, 8), causal_time=True) == 9 * 16 * 16
    over = Buckets(BucketConfig([BucketSpec(8, 64, 64)], token_budget=100))
    assert over[0].batch_size == 1  # max(1, floor(budget / tokens))
    fixed = Buckets(BucketConfig([BucketSpec(4, 16, 16, batch_size=3)]))
    assert fixed[0].batch_size == 3
    custom = Buckets(BucketConfig([BucketSpec(4, 16, 16)], token_budget=10), tokens_fn=lambda t, h, w: 5)
    assert custom[0].batch_size == 2
    assert "tokens/batch" in b.describe()


@pytest.mark.parametrize("bad", [
    BucketConfig([], token_budget=10),
    BucketConfig([BucketSpec(4, 16, 16), BucketSpec(4, 16, 16)], token_budget=10),
    BucketConfig([BucketSpec(4, 16, 16, weight=0.0)], token_budget=10),
    BucketConfig([BucketSpec(4, 16, 16, weight=-1.0)], token_budget=10),
    BucketConfig([BucketSpec(4, 16, 16)]),
    BucketConfig([BucketSpec(4, 1, 1)], token_budget=10),
])
def test_bad_bucket_configs_raise(bad):
    with pytest.raises(ValueError):
        Buckets(bad)


def test_schema_composes_with_omegaconf():
    cfg = OmegaConf.merge(OmegaConf.structured(BucketConfig),
                          {"token_budget": 1024, "buckets": [{"num_frames": 4, "height": 16, "width": 32}]})
    b = Buckets(OmegaConf.to_object(cfg))
    assert b[0].shape == (4, 16, 32) and b[0].batch_size == 2
    assert Buckets(OmegaConf.to_container(cfg))[0].batch_size == 2  # plain dicts work too


def test_assignment_by_aspect_duration_and_size():
    b = Buckets(BUCKETS)
    long, short = (lambda t: True), (lambda t: t <= 4)
    assert b[b.assign(32, 64, short, None)[0]].shape == (4, 16, 32)  # wide -> wide
    assert b[b.assign(64, 32, short, None)[0]].shape == (4, 32, 16)  # tall -> tall
    assert b[b.assign(32, 32, short, None)[0]].shape == (4, 16, 16)  # square, too short for 8 frames
    picks = {b[b.assign(32, 32, long, np.random.default_rng(i))[0]].num_frames for i in range(40)}
    assert picks == {4, 8}  # equally near: drawn by weight
    assert b.assign(32, 32, lambda t: False, None) == (None, "too_short")
    assert b.assign(8, 8, long, None) == (None, "too_small")  # no upscaling by default
    heavy = Buckets(BucketConfig([BucketSpec(4, 16, 16, 1.0), BucketSpec(8, 16, 16, 0.0)], token_budget=1024))
    assert all(heavy.assign(32, 32, long, np.random.default_rng(i))[0] == 0 for i in range(10))


def take(pipe, n):
    return list(itertools.islice(iter(pipe), n))


def test_bucketed_batches_are_homogeneous_and_deterministic(varied_shards):
    a = take(VideoPipeline(varied_shards, SPEC, buckets=BUCKETS), 6)
    b = take(VideoPipeline(varied_shards, SPEC, BUCKETS), 6)  # positional BucketConfig works too
    sizes = {x.shape: x.batch_size for x in Buckets(BUCKETS)}
    shapes = set()
    for x, y in zip(a, b):
        T, H, W = x["bucket"]
        assert x["video"].shape == (sizes[(T, H, W)], 3, T, H, W)  # (B, C, T, H, W)
        assert x["num_tokens"] == Buckets(BUCKETS)[[k.shape for k in Buckets(BUCKETS)].index((T, H, W))].tokens \
            * len(x["key"])
        assert -1.0 <= x["video"].min() and x["video"].max() <= 1.0
        assert x["key"] == y["key"] and torch.equal(x["video"], y["video"])
        shapes.add((T, H, W))
        for key in x["key"]:  # the aspect ratio of the bucket is the clip's
            h, w, _ = SHAPES[int(key.split("_")[1]) % len(SHAPES)]
            assert (W > H) == (w > h) and (H > W) == (h > w)
    assert len(shapes) >= 3


def test_sequence_parallel_ranks_share_a_slot(varied_shards):
    """Two ranks of one SP group pass the same dp_rank: identical batches, so the same bucket every step."""
    sp0 = take(VideoPipeline(varied_shards, SPEC, buckets=BUCKETS, dp_rank=1, dp_size=2), 4)
    sp1 = take(VideoPipeline(varied_shards, SPEC, buckets=BUCKETS, dp_rank=1, dp_size=2), 4)
    assert [x["bucket"] for x in sp0] == [x["bucket"] for x in sp1]
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(sp0, sp1))
    other = take(VideoPipeline(varied_shards, SPEC, buckets=BUCKETS, dp_rank=0, dp_size=2), 4)
    assert not set(k for x in other for k in x["key"]) & set(k for x in sp0 for k in x["key"])

"""Frozen-encoder work once per sequence-parallel group: each rank encodes its chunk, all get every latent.

Two gloo ranks. ``encode_once_per_group`` against a local encode for batches of 1, 2 and 3 clips
(with 1 clip the second rank encodes nothing), and the Trainer with ``parallel.sp_size=2``: its
``prepare_inputs`` encodes each clip of a video batch on one rank only and both ranks get the
latents a single process computes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.conftest import write_shards
from tests.multiproc import init_rank, spawn
from tests.test_train import tiny_cfg
from vdit.train.parallel.group_encode import chunk_bounds, encode_once_per_group

pytestmark = pytest.mark.multiproc


def test_chunk_bounds_cover_every_sample_once():
    for num in range(7):
        for n in (1, 2, 3, 4):
            got = [i for r in range(n) for i in range(*chunk_bounds(num, n, r))]
            assert got == list(range(num)), (num, n)
    assert chunk_bounds(1, 2, 1) == (1, 1)  # nothing left for the second rank


def _encode_worker(rank, world, port, out_dir):
    init_rank(rank, world, port)
    out = {}
    for b in (1, 2, 3):
        x = torch.randn(b, 3, 2, 4, 4, generator=torch.Generator().manual_seed(b))  # the same on both ranks
        seen = []

        def encode(v):  # a per-sample "VAE": (b, 3, T, H, W) -> (b, 2, T, H/2, W/2)
            seen.append(v.shape[0])
            return v[:, :2, :, ::2, ::2] * 3.0

        got = encode_once_per_group(encode, x, (2, 2, 2, 2), dist.group.WORLD)
        out[b] = {"encoded": sum(seen), "equal": torch.equal(got, encode(x).float())}
    return out


def test_each_rank_encodes_its_chunk_and_gets_all(tmp_path):
    ranks = spawn(_encode_worker, 2, tmp_path)
    for b, per_rank in ((1, [1, 0]), (2, [1, 1]), (3, [2, 1])):
        assert [r[b]["encoded"] for r in ranks] == per_rank, b
        assert all(r[b]["equal"] for r in ranks), b


def _trainer_worker(rank, world, port, out_dir, shards):
    from vdit.train.trainer import Trainer

    init_rank(rank, world, port)
    t = Trainer(tiny_cfg(shards, f"{out_dir}/run", "parallel.backend=none", "parallel.sp_size=2",
                         "parallel.dp_shard=1", "data.batch_size=3"))
    batch = next(iter(t.data))
    encoded = []
    encode = t.vae.encode
    t.vae.encode = lambda v: (encoded.append(v.shape[0]), encode(v))[1]
    x0, text, mask, ts, noise = t.prepare_inputs(batch)
    return {"encoded": sum(encoded), "x0": x0, "video": batch["video"], "key": batch["key"]}


def test_trainer_encodes_a_video_batch_once_per_sp_group(tmp_path):
    shards = str(tmp_path / "shards")
    write_shards(shards, 2, 3)
    ranks = spawn(_trainer_worker, 2, tmp_path, shards)
    assert [r["encoded"] for r in ranks] == [2, 1]  # 3 clips: 2 on the first rank, 1 on the second
    assert ranks[0]["key"] == ranks[1]["key"]
    for r in ranks:  # identity autoencoder: the latents are the clips themselves, on both ranks
        assert torch.equal(r["x0"], ranks[0]["video"])

"""Work once per sequence-parallel group: each rank encodes its chunk and all get every latent; rank 0
alone reads and decodes the batches and the group receives them.

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
from vdit.train.parallel.group_batches import group_batches
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


def _batches_worker(rank, world, port, out_dir):
    init_rank(rank, world, port)

    def source():  # rank 0's pipeline: two batches, then a failure
        for i in range(2):
            yield {"video": torch.arange(24, dtype=torch.uint8).reshape(1, 3, 2, 2, 2) + i,
                   "latent": torch.randn(2, 4, generator=torch.Generator().manual_seed(i)).t(),  # not contiguous
                   "text_mask": torch.tensor([[True, False, True]]), "key": [f"k{i}"], "slot_state": {"pos": i}}
        raise ValueError("no usable clip in shards/x.tar")

    class NotMine:  # the other ranks' pipelines must not be read
        def __iter__(self):
            raise AssertionError(f"rank {rank} read its pipeline")

    it = group_batches(source() if rank == 0 else NotMine(), dist.group.WORLD, torch.device("cpu"))
    got = [next(it) for _ in range(2)]
    try:
        next(it)
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    return {"batches": got, "error": error}


def test_rank0_reads_the_batches_and_the_group_receives_them(tmp_path):
    ranks = spawn(_batches_worker, 2, tmp_path)
    for i in range(2):
        a, b = ranks[0]["batches"][i], ranks[1]["batches"][i]
        assert a.keys() == b.keys() == {"video", "latent", "text_mask", "key", "slot_state"}
        for k in ("video", "latent", "text_mask"):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        assert b["key"] == [f"k{i}"] and b["slot_state"] == {"pos": i}
    assert ranks[0]["error"] == "ValueError: no usable clip in shards/x.tar"
    assert ranks[1]["error"].startswith("RuntimeError: the data pipeline of this SP group's rank 0")
    assert "no usable clip in shards/x.tar" in ranks[1]["error"]


def _fit_worker(rank, world, port, out_dir, shards, once):
    from vdit.data.pipeline import VideoPipeline
    from vdit.train.trainer import Trainer

    init_rank(rank, world, port)
    if once and rank == 1:  # SP rank 1 must not decode anything
        def refuse(self):
            raise AssertionError("SP rank 1 read its pipeline")
        VideoPipeline.__iter__ = refuse
    t = Trainer(tiny_cfg(shards, f"{out_dir}/run{int(once)}", "parallel.backend=none", "parallel.sp_size=2",
                         "parallel.dp_shard=1", f"data.decode_once_per_group={str(once).lower()}",
                         "train.steps=4", "train.checkpoint_every=100"))
    t.fit()
    return {"state": t.data.state_dict(), "weights": {k: v.clone() for k, v in t.model.state_dict().items()}}


def test_training_with_batches_read_once_per_group_equals_reading_on_every_rank(tmp_path):
    shards = str(tmp_path / "shards")
    write_shards(shards, 2, 3)
    runs = {once: spawn(_fit_worker, 2, tmp_path / str(once), shards, once) for once in (True, False)}
    for once, ranks in runs.items():
        assert ranks[0]["state"] == ranks[1]["state"], once  # the group holds one data position
    assert runs[True][0]["state"] == runs[False][0]["state"]
    for k, v in runs[False][0]["weights"].items():
        assert torch.equal(v, runs[True][0]["weights"][k]), k
        assert torch.equal(v, runs[True][1]["weights"][k]), k

"""The streaming pipeline on latent shards (vdit-encode output): batch format, exact values, resume,
DataLoader workers, layout changes, skipped samples, and the bucket / latent-shard conflict."""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
from collections import Counter

import pytest
import torch
import webdataset as wds

from vdit.data.buckets import BucketConfig, BucketSpec
from vdit.data.encode import main as encode_main
from vdit.data.latents import read_latent_sample
from vdit.data.pipeline import ClipSpec, VideoPipeline, merge_states
from vdit.data.shards import expand_shards
from tests.conftest import write_shards

SPEC = ClipSpec(num_frames=4, height=16, width=16, target_fps=None, frame_stride=2, seed=5)
LATENT = (3, 4, 16, 16)  # identity autoencoder: (C, T', H', W') = (3, T, H, W)
TEXT = (8, 32)  # random text encoder: (max_length, hidden)
ALL_KEYS = [f"clip_{i:05d}" for i in range(12)]
BUCKETS = BucketConfig(buckets=[BucketSpec(4, 16, 16)], token_budget=4096)


@pytest.fixture(scope="module", autouse=True)
def _no_launcher_env():
    """vdit-encode reads RANK / WORLD_SIZE when --rank/--world-size are absent."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """4 video shards x 3 clips (12 frames, 32x32, 8 fps)."""
    d = str(tmp_path_factory.mktemp("video"))
    write_shards(d, 4, 3)
    return d


@pytest.fixture(scope="module")
def latent_dir(video_dir, tmp_path_factory):
    """vdit-encode output: 4 latent shards x 3 samples, latent (3, 4, 16, 16) float16, text (8, 32)."""
    out = str(tmp_path_factory.mktemp("latents"))
    rc = encode_main(["--input", video_dir, "--output", out, "--num-frames", "4", "--height", "16", "--width", "16",
                      "--frame-stride", "2", "--text-encoder", "random", "--max-length", "8", "-q"])
    assert rc == 0
    return out


def raw_samples(directory: str) -> dict[str, dict]:
    return {s["__key__"]: s for url in expand_shards(directory) for s in wds.tarfile_samples([{"url": url}])}


def take(pipe, n):
    return list(itertools.islice(iter(pipe), n))


def keys(batches):
    return [k for b in batches for k in b["key"]]


def same_batches(a, b):
    assert keys(a) == keys(b)
    for x, y in zip(a, b):
        assert x["bucket"] == y["bucket"] and x["num_tokens"] == y["num_tokens"]
        for name in ("latent", "text", "text_mask"):
            assert torch.equal(x[name], y[name]), name


def test_batches_format_and_exact_values(latent_dir):
    pipe = VideoPipeline(latent_dir, SPEC, 2, patch_size=(1, 2, 2))
    assert pipe.is_latent and pipe.latent_dir == os.path.abspath(latent_dir)
    assert pipe.latent_meta["latent_shape"] == list(LATENT)
    batches = take(pipe, 12)  # two epochs of 12 samples
    raws = raw_samples(latent_dir)
    for b in batches:
        assert "video" not in b
        assert {"latent", "text", "text_mask", "caption", "key", "item", "bucket", "num_tokens", "slot_state",
                "logical_worker"} <= set(b)
        assert b["latent"].shape == (2, *LATENT) and b["latent"].dtype == torch.float32
        assert b["text"].shape == (2, *TEXT) and b["text"].dtype == torch.float32
        assert b["text_mask"].shape == (2, TEXT[0]) and b["text_mask"].dtype == torch.bool
        assert b["bucket"] == LATENT and b["num_tokens"] == 2 * 4 * 8 * 8  # patch (1, 2, 2) over (4, 16, 16)
        for i, k in enumerate(b["key"]):
            ref = read_latent_sample(raws[k], latent_shape=LATENT, text_shape=TEXT)
            assert torch.equal(b["latent"][i], ref["latent"]) and torch.equal(b["text"][i], ref["text"])
            assert torch.equal(b["text_mask"][i], ref["text_mask"])
            assert b["caption"][i] == ref["caption"] == f"clip {int(k.split('_')[1])}"
    epoch0, epoch1 = keys(batches[:6]), keys(batches[6:])
    assert sorted(epoch0) == sorted(epoch1) == ALL_KEYS and epoch0 != epoch1  # each once, reshuffled
    assert keys(take(VideoPipeline(latent_dir, SPEC, 2), 12)) == epoch0 + epoch1  # deterministic
    # num_tokens without patch_size: tokens_fn on the encoded pixel geometry, else T' H' W'
    tf = take(VideoPipeline(latent_dir, SPEC, 2, tokens_fn=lambda t, h, w: t * h * w // 8), 1)[0]
    assert tf["num_tokens"] == 2 * 4 * 16 * 16 // 8
    assert take(VideoPipeline(latent_dir, SPEC, 2), 1)[0]["num_tokens"] == 2 * 4 * 16 * 16


def test_detected_from_glob_list_and_per_sample(latent_dir, tmp_path):
    for spec in (os.path.join(latent_dir, "*.tar"), expand_shards(latent_dir)):
        assert VideoPipeline(spec, SPEC, 3).is_latent
    plain = tmp_path / "plain"  # the tars without encode_meta.json: detected per sample (latent.pt)
    plain.mkdir()
    for url in expand_shards(latent_dir):
        shutil.copy(url, plain)
    pipe = VideoPipeline(str(plain), SPEC, 3)
    assert not pipe.is_latent
    a, b = take(pipe, 4), take(VideoPipeline(latent_dir, SPEC, 3), 4)
    same_batches(a, b)
    assert "video" not in a[0] and a[0]["bucket"] == LATENT


@pytest.mark.parametrize("workers, stop", [(0, 1), (0, 4), (2, 3)])
def test_resume_mid_epoch_equals_uninterrupted(latent_dir, workers, stop):
    """batch 5 over 3-sample shards: batches straddle shards (and epochs); the stop is inside a shard."""
    n = stop + 5
    full = take(VideoPipeline(latent_dir, SPEC, 5, num_workers=workers), n)
    pipe = VideoPipeline(latent_dir, SPEC, 5, num_workers=workers)
    it = iter(pipe)
    for _ in range(stop):
        pipe.commit(next(it))
    next(it)  # prefetched, never committed: replayed after resume
    del it
    state = pickle.loads(pickle.dumps(pipe.state_dict()))
    assert any(s["pos"] > 0 for s in state["slots"].values())  # stopped inside a shard
    resumed = VideoPipeline(latent_dir, SPEC, 5, num_workers=workers)
    resumed.load_state_dict(state)
    same_batches(take(resumed, n - stop), full[stop:])


def test_dataloader_workers_cover_the_epoch(latent_dir):
    batches = take(VideoPipeline(latent_dir, SPEC, 3, num_workers=2), 4)  # 2 slots x 2 shards x 3 samples
    assert sorted(keys(batches)) == ALL_KEYS
    assert sorted(b["logical_worker"] for b in batches) == [0, 0, 1, 1]
    raws = raw_samples(latent_dir)
    b = batches[-1]
    assert b["latent"].dtype == torch.float32 and b["text_mask"].dtype == torch.bool
    for i, k in enumerate(b["key"]):
        assert torch.equal(b["latent"][i], read_latent_sample(raws[k])["latent"])


@pytest.mark.parametrize("old, new", [((1, 2), (2, 0)), ((2, 0), (1, 2))])
def test_resume_on_another_layout_sees_every_sample_once(latent_dir, old, new):
    """(ranks, workers) -> other (ranks, workers) mid-epoch: the rest of the epoch is re-dealt."""
    def build(layout):
        return [VideoPipeline(latent_dir, SPEC, 2, dp_rank=r, dp_size=layout[0], num_workers=layout[1])
                for r in range(layout[0])]

    pipes, seen = build(old), Counter()
    its = [iter(p) for p in pipes]
    for p, it in zip(pipes, its):
        b = next(it)
        p.commit(b)
        seen.update((e, k) for (e, _, _), k in zip(b["item"], b["key"]))
        next(it)  # prefetched, never committed
    del its
    state = merge_states([pickle.loads(pickle.dumps(p.state_dict())) for p in pipes])
    pipes = build(new)
    for p in pipes:
        p.load_state_dict(state)
    its = [iter(p) for p in pipes]
    for _ in range(12):
        for it in its:
            b = next(it)
            seen.update((e, k) for (e, _, _), k in zip(b["item"], b["key"]))
        if sorted(k for e, k in seen if e == 0) == ALL_KEYS:
            break
    assert max(seen.values()) == 1, [x for x, c in seen.items() if c > 1]
    assert sorted(k for e, k in seen if e == 0) == ALL_KEYS


def test_bad_latent_samples_are_skipped_and_counted(latent_dir, video_dir, tmp_path):
    """A corrupt latent, a missing text, a wrong shape and a video-only sample: skipped, counted, no crash."""
    bad = str(tmp_path / "bad")
    shutil.copytree(latent_dir, bad)
    video = raw_samples(video_dir)
    urls = expand_shards(bad)
    for url in urls:
        samples = list(wds.tarfile_samples([{"url": url}]))
        for s in samples:
            s.pop("__url__", None)
            s.pop("__local_path__", None)
            if s["__key__"] == "clip_00001":
                s["latent.pt"] = s["latent.pt"][:40]  # truncated
            elif s["__key__"] == "clip_00004":
                del s["text.pt"]
            elif s["__key__"] == "clip_00007":
                buf = __import__("io").BytesIO()
                torch.save(torch.zeros(3, 4, 8, 8), buf)
                s["latent.pt"] = buf.getvalue()
        if url == urls[-1]:
            samples.append({"__key__": "clip_00011x", "mp4": video["clip_00000"]["mp4"], "txt": b"a video"})
        with wds.TarWriter(url, encoder=False) as w:
            for s in samples:
                w.write(s)
    pipe = VideoPipeline(bad, ClipSpec(4, 16, 16, None, 2, shuffle=False), 1)
    it = iter(pipe)
    got = []
    for _ in range(9):  # the 9 good samples of epoch 0, then the first of epoch 1
        b = next(it)
        pipe.commit(b)
        got += b["key"]
    assert got == [k for k in ALL_KEYS if k not in ("clip_00001", "clip_00004", "clip_00007")]
    pipe.commit(next(it))
    assert pipe.skipped == {"corrupt_latent": 1, "no_text": 1, "latent_shape_mismatch": 1, "no_latent": 1}


def test_buckets_with_latent_shards_raise(latent_dir, tmp_path):
    with pytest.raises(ValueError, match="buckets cannot apply"):
        VideoPipeline(latent_dir, SPEC, buckets=BUCKETS)
    with pytest.raises(ValueError, match="buckets cannot apply"):
        VideoPipeline(latent_dir, SPEC, BUCKETS)  # a BucketConfig in the batch_size position
    with pytest.raises(ValueError, match="batch_size"):
        VideoPipeline(latent_dir, SPEC)
    with pytest.raises(ValueError, match="patch_size"):
        VideoPipeline(latent_dir, SPEC, 2, patch_size=(1, 2))
    plain = tmp_path / "plain"  # latent samples found only while reading, in a bucketed pipeline
    plain.mkdir()
    for url in expand_shards(latent_dir):
        shutil.copy(url, plain)
    with pytest.raises(ValueError, match="fixed geometry"):
        take(VideoPipeline(str(plain), SPEC, buckets=BUCKETS), 1)


def test_mixed_shapes_without_meta_group_by_shape_and_resume(latent_dir, video_dir, tmp_path):
    """Latent tars of two geometries without encode_meta.json: batches group equal shapes; samples
    waiting in a shape's queue at the stop are re-read on resume and the run continues exactly."""
    small = str(tmp_path / "small")
    assert encode_main(["--input", video_dir, "--output", small, "--num-frames", "4", "--height", "8", "--width", "8",
                        "--frame-stride", "2", "--text-encoder", "random", "--max-length", "8", "-q"]) == 0
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for tag, d in (("a", latent_dir), ("b", small)):
        for url in expand_shards(d):
            shutil.copy(url, mixed / f"{tag}-{os.path.basename(url)}")
    full = take(VideoPipeline(str(mixed), SPEC, 2), 10)
    assert {b["bucket"] for b in full} == {LATENT, (3, 4, 8, 8)}
    assert all(b["latent"].shape[1:] == b["bucket"] for b in full)
    stop = next(i for i in range(1, 10) if full[i]["slot_state"]["queued"]) + 1  # a sample waits after batch i
    pipe = VideoPipeline(str(mixed), SPEC, 2)
    it = iter(pipe)
    for _ in range(stop):
        pipe.commit(next(it))
    del it
    state = pipe.state_dict()
    assert next(iter(state["slots"].values()))["queued"]
    resumed = VideoPipeline(str(mixed), SPEC, 2)
    resumed.load_state_dict(state)
    same_batches(take(resumed, 10 - stop), full[stop:])

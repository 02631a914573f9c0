"""Held-out validation split: by source video, disjoint from training, the same on every layout."""

from __future__ import annotations

import json

import pytest

from vdit.data.pipeline import ClipSpec, VideoPipeline
from vdit.data.split import in_split, is_held_out, sample_in_split, source_id
from vdit.train.config import load_config, validate
from vdit.train.validation import load_val_clips


def _keys(shards: str, split: str, fraction: float, dp_rank: int = 0, dp_size: int = 1) -> list[str]:
    spec = ClipSpec(12, 32, 32, None, 1, shuffle=False, split=split, held_out_fraction=fraction)
    keys = []
    for batch in VideoPipeline(shards, spec, 1, dp_rank=dp_rank, dp_size=dp_size):
        if batch["item"][0][0] > 0:
            return keys
        keys += batch["key"]


def test_train_and_val_are_disjoint_and_cover_every_clip(small_shards):
    train, val = _keys(small_shards, "train", 0.3), _keys(small_shards, "val", 0.3)
    assert val and train and not set(train) & set(val)
    assert sorted(train + val) == sorted(_keys(small_shards, "all", 0.3)) == [f"clip_{i:05d}" for i in range(24)]
    assert val == [k for k in _keys(small_shards, "all", 0.0) if is_held_out(k, 0.3)]
    # two data-parallel ranks together train on exactly the same clips
    two = _keys(small_shards, "train", 0.3, 0, 2) + _keys(small_shards, "train", 0.3, 1, 2)
    assert sorted(two) == sorted(train)


def test_clips_of_one_source_video_fall_on_the_same_side():
    meta = {"source_sha256": "ab" * 32, "source": "videos/a.mp4"}
    sides = {sample_in_split({"__key__": f"a_{i:04d}", "json": json.dumps(meta).encode()}, "val", 0.5)
             for i in range(20)}
    assert len(sides) == 1
    assert source_id("a_0003", meta) == "ab" * 32
    assert source_id("a_0003", {"source": "videos/a.mp4"}) == "videos/a.mp4"
    assert source_id("a_0003", None) == "a_0003"
    assert sample_in_split({"__key__": "k", "json": b"not json"}, "all", 0.5)
    assert not is_held_out("anything", 0.0)
    with pytest.raises(ValueError, match="fraction"):
        is_held_out("k", 1.0)
    with pytest.raises(ValueError, match="split"):
        in_split("k", "test", 0.1)


def test_load_val_clips_reads_the_held_out_clips_in_a_fixed_order(small_shards, tmp_path):
    cfg = validate(load_config([f"data.shards={small_shards}", "data.num_frames=4", "data.target_fps=null",
                                "data.val_fraction=0.3", "eval.val_every=10", f"run_dir={tmp_path}"]))
    clips = load_val_clips(cfg, 100)
    assert [c["key"] for c in clips] == [k for k in _keys(small_shards, "val", 0.3)]
    assert clips[0]["video"].shape == (3, 4, 32, 32) and clips[0]["caption"].startswith("clip ")
    assert [c["key"] for c in load_val_clips(cfg, 2)] == [c["key"] for c in clips[:2]]


def test_validation_settings_fail_at_start_up(small_shards):
    with pytest.raises(ValueError, match="val_fraction"):
        validate(load_config([f"data.shards={small_shards}", "eval.val_every=10"]))
    with pytest.raises(ValueError, match="val_fraction"):
        validate(load_config([f"data.shards={small_shards}", "data.val_fraction=1.5"]))

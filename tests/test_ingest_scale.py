"""vdit-ingest at scale: worker processes, crash isolation, manifest layouts, clip modes, filters,
de-duplication, shard sizes, resume, the stats report. Tiny generated videos (64 px, 1-4 s)."""

import csv
import json
import os
import shutil
import tarfile

import cv2
import numpy as np
import pytest
import webdataset as wds

import vdit.data.ingest as ingest_mod
from vdit.data.decode import probe
from vdit.data.filters import (
    check_aspect,
    check_frames,
    check_motion,
    check_resolution,
    check_seconds,
    motion_score,
    perceptual_key,
)
from vdit.data.ingest import main, parse_bytes
from vdit.data.manifest import load_manifest, parse_seconds
from vdit.data.shards import expand_shards
from vdit.data.video_io import encode_mp4, read_all_frames, write_mp4

FPS = 12.0


def texture_frames(n: int, height: int = 64, width: int = 64, speed: float = 2.0, seed: int = 0) -> np.ndarray:
    """uint8 (n, H, W, 3): a smooth random texture filling the frame, panning ``speed`` px/frame to the right."""
    noise = np.random.default_rng(seed).integers(0, 256, (height, width)).astype(np.float32)
    base = cv2.GaussianBlur(noise, (0, 0), 2.0)
    base = ((base - base.min()) / (base.max() - base.min()) * 255).astype(np.uint8)
    frames = np.stack([np.roll(base, int(round(speed * t)), axis=1) for t in range(n)])
    return np.repeat(frames[..., None], 3, axis=3)


def make_video(path, n=24, speed=2.0, seed=0, caption=None, height=64, width=64) -> str:
    write_mp4(path, texture_frames(n, height, width, speed, seed), FPS)
    if caption is not None:
        with open(os.path.splitext(str(path))[0] + ".txt", "w", encoding="utf-8") as f:
            f.write(caption)
    return str(path)


def run(*args) -> int:
    return main(["-q", *map(str, args)])


def index_of(out) -> dict:
    with open(os.path.join(out, "index.json")) as f:
        return json.load(f)


def report_of(out) -> dict:
    with open(os.path.join(out, "ingest_report.json")) as f:
        return json.load(f)


def samples_of(out) -> list[dict]:
    return [s for shard in index_of(out)["shards"]
            for s in wds.WebDataset(os.path.join(out, shard["name"]), shardshuffle=False)]


def metas_of(out) -> dict[str, dict]:
    return {s["__key__"]: json.loads(s["json"]) for s in samples_of(out)}


def shard_bytes_of(out) -> dict[str, bytes]:
    return {s["name"]: open(os.path.join(out, s["name"]), "rb").read() for s in index_of(out)["shards"]}


def reasons(report) -> dict[str, str]:
    """{clip key or video file name: reason} of the skips."""
    return {s.get("clip") or os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A folder of 6 captioned 2 s videos (64x64, 12 fps) panning at different speeds, one static."""
    root = tmp_path_factory.mktemp("collection")
    for i in range(6):
        make_video(root / f"v{i}.mp4", n=24, speed=[0, 1, 2, 3, 1.5, 2.5][i], seed=i, caption=f"video {i}")
    return root


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------


def test_two_workers_write_the_same_bytes_as_one(collection, tmp_path):
    common = ["--input", collection, "--clip-seconds", 1, "--samples-per-shard", 4]
    assert run(*common, "--output", tmp_path / "w1") == 0
    assert run(*common, "--output", tmp_path / "w2", "--workers", 2) == 0
    one, two = shard_bytes_of(tmp_path / "w1"), shard_bytes_of(tmp_path / "w2")
    assert len(one) >= 2 and one == two
    assert (tmp_path / "w1" / "index.json").read_bytes() == (tmp_path / "w2" / "index.json").read_bytes()
    assert report_of(tmp_path / "w2")["options"]["workers"] == 2


def test_a_crashing_decoder_loses_only_its_video(collection, tmp_path, monkeypatch):
    monkeypatch.setenv("VDIT_INGEST_CRASH_ON", "v3.mp4")  # the worker holding v3 segfaults (test hook)
    out = tmp_path / "out"
    assert run("--input", collection, "--output", out, "--clip-seconds", 1, "--workers", 2) == 0
    report = report_of(out)
    crash = [s for s in report["skipped"] if s["reason"] == "crash"]
    assert [os.path.basename(s["path"]) for s in crash] == ["v3.mp4"]
    assert {m["source"] for m in metas_of(out).values()} == {f"v{i}.mp4" for i in range(6)} - {"v3.mp4"}


def test_a_hanging_decoder_is_ended_and_its_video_skipped_as_timeout(collection, tmp_path, monkeypatch):
    """Issue 12: a video whose decoder never returns costs --video-timeout seconds, is skipped as ``timeout``,
    and the rest of the ingest continues."""
    monkeypatch.setenv("VDIT_INGEST_HANG_ON", "v2.mp4")  # the worker holding v2 hangs (test hook)
    out = tmp_path / "out"
    assert run("--input", collection, "--output", out, "--clip-seconds", 1, "--workers", 2,
               "--video-timeout", 4) == 0
    report = report_of(out)
    timeouts = [s for s in report["skipped"] if s["reason"] == "timeout"]
    assert [os.path.basename(s["path"]) for s in timeouts] == ["v2.mp4"]
    assert {m["source"] for m in metas_of(out).values()} == {f"v{i}.mp4" for i in range(6)} - {"v2.mp4"}


# ----------------------------------------------------------------------------------------------
# Manifest layouts and clip modes
# ----------------------------------------------------------------------------------------------

OPENVID_HEADER = ("video,caption,aesthetic score,motion score,temporal consistency score,camera motion,"
                  "frame,fps,seconds\n")


def test_openvid_csv_carries_its_columns(tmp_path):
    videos = tmp_path / "openvid" / "video"
    make_video(videos / "celebv_abc_0.mp4", n=24, speed=2, seed=1)
    make_video(videos / "pexels_9.mp4", n=24, speed=1, seed=2)
    manifest = tmp_path / "OpenVid-1M.csv"
    manifest.write_text(OPENVID_HEADER
                        + 'celebv_abc_0.mp4,"A woman smiles, then nods.",5.12,3.5,0.99,static,24,12.0,2.0\n'
                        + "pexels_9.mp4,A slow pan over a field.,4.80,1.25,0.97,pan_right,24,12.0,2.0\n"
                        + "missing.mp4,Not downloaded.,4.0,1.0,0.9,static,24,12.0,2.0\n")
    found = load_manifest(str(manifest), [str(videos)])
    assert found.layout == "openvid" and [j.source for j in found.jobs] == ["celebv_abc_0.mp4", "missing.mp4",
                                                                           "pexels_9.mp4"]
    out = tmp_path / "out"
    assert run("--input", manifest, "--video-root", videos, "--output", out, "--clip-seconds", 0) == 0
    metas = metas_of(out)
    celeb = metas["celebv_abc_0_0000"]
    assert celeb["caption"] == "A woman smiles, then nods."
    assert celeb["extra"] == {"aesthetic score": 5.12, "motion score": 3.5, "temporal consistency score": 0.99,
                              "camera motion": "static", "frame": 24, "fps": 12.0, "seconds": 2.0}
    report = report_of(out)
    assert report["manifest_format"] == "openvid" and reasons(report) == {"missing.mp4": "missing"}

    jsonl = tmp_path / "openvid.jsonl"
    jsonl.write_text(json.dumps({"video": "pexels_9.mp4", "caption": "A pan.", "aesthetic score": 4.8,
                                 "camera motion": "pan_right"}) + "\n")
    found = load_manifest(str(jsonl), str(videos))
    assert found.layout == "openvid" and found.jobs[0].segments[0].extra == {"aesthetic score": 4.8,
                                                                              "camera motion": "pan_right"}


def test_panda70m_timestamps_become_spans_and_clips(tmp_path):
    root = tmp_path / "panda_videos"
    make_video(root / "-abc_DEF12.mp4", n=48, speed=2, seed=3)  # 4 s
    manifest = tmp_path / "panda70m.csv"
    with open(manifest, "w", newline="") as f:  # cells hold Python list literals, as in the released CSVs
        w = csv.writer(f)
        w.writerow(["videoID", "url", "timestamp", "caption", "matching_score"])
        w.writerow(["-abc_DEF12", "https://www.youtube.com/watch?v=-abc_DEF12",
                    str([["0:00:00.000", "0:00:01.500"], ["0:00:01.500", "0:00:03.750"]]),
                    str(["A man's hand waves.", 'It\'s raining, "then" sunny.']), str([0.41, 0.39])])
        w.writerow(["gone_video", "u", str([["0:00:00", "0:00:02"]]), str(["x"]), str([0.3])])
        w.writerow(["bad", "u", str([["0:00:02", "0:00:01"]]), str(["reversed"]), str([0.3])])
    found = load_manifest(str(manifest), str(root))
    assert found.layout == "panda"
    (job,) = [j for j in found.jobs if j.source == "-abc_DEF12.mp4"]
    assert [(s.start, s.end, s.caption) for s in job.segments] == [
        (0.0, 1.5, "A man's hand waves."), (1.5, 3.75, 'It\'s raining, "then" sunny.')]
    assert job.segments[1].extra == {"videoID": "-abc_DEF12", "url": "https://www.youtube.com/watch?v=-abc_DEF12",
                                     "matching_score": 0.39, "span_index": 1}
    assert [s.reason for s in found.skipped] == ["bad_row"]

    jsonl = tmp_path / "panda70m.jsonl"
    jsonl.write_text(json.dumps({"videoID": "-abc_DEF12", "url": "u", "caption": ["one", "two"],
                                 "timestamp": [["0:00:00.000", "0:00:01.500"], ["0:00:01.500", "0:00:03.750"]],
                                 "matching_score": [0.41, 0.39]}) + "\n")
    (jjob,) = load_manifest(str(jsonl), str(root)).jobs
    assert [(s.start, s.end) for s in jjob.segments] == [(0.0, 1.5), (1.5, 3.75)]

    out = tmp_path / "out"
    assert run("--input", manifest, "--video-root", root, "--output", out, "--clip-mode", "timestamps",
               "--max-clip-seconds", 2) == 0
    metas = metas_of(out)
    spans = sorted((m["start_frame"], m["end_frame"], m["caption"]) for m in metas.values())
    # 1.5 s at 12 fps = frames [0, 18); the second span [18, 45) is capped at 2 s = 24 frames
    assert spans == [(0, 18, "A man's hand waves."), (18, 42, 'It\'s raining, "then" sunny.')]
    assert all(m["extra"]["videoID"] == "-abc_DEF12" for m in metas.values())
    assert reasons(report_of(out)) == {"gone_video.mp4": "missing", "bad.mp4": "bad_row"}

    # window mode cuts each span into windows instead
    assert run("--input", manifest, "--video-root", root, "--output", tmp_path / "win", "--clip-seconds", 1) == 0
    assert sorted(m["start_frame"] for m in metas_of(tmp_path / "win").values()) == [0, 18, 30]


def test_generic_manifest_clock_times_and_format_errors(tmp_path):
    assert parse_seconds("0:00:01.234", "start") == pytest.approx(1.234)
    assert parse_seconds("01:02:03", "start") == 3723 and parse_seconds("2.5", "end") == 2.5
    with pytest.raises(ValueError):
        parse_seconds("1:2:3:4", "start")
    make_video(tmp_path / "a.mp4", n=36, seed=4)
    (tmp_path / "m.csv").write_text("path,caption,start,end\na.mp4,clock span,0:00:01.000,0:00:02.500\n")
    assert run("--input", tmp_path / "m.csv", "--output", tmp_path / "o", "--clip-mode", "timestamps") == 0
    (meta,) = metas_of(tmp_path / "o").values()
    assert (meta["start_frame"], meta["end_frame"]) == (12, 30)
    # a layout forced against the header, or a header that fits no layout: usage errors
    assert run("--input", tmp_path / "m.csv", "--output", tmp_path / "o2", "--manifest-format", "panda") == 2
    (tmp_path / "x.csv").write_text("clip,text\na.mp4,hello\n")
    assert run("--input", tmp_path / "x.csv", "--output", tmp_path / "o3") == 2
    assert run("--input", tmp_path / "m.csv", "--output", tmp_path / "o4", "--max-clip-seconds", 1) == 2


# ----------------------------------------------------------------------------------------------
# Filters and motion
# ----------------------------------------------------------------------------------------------


def test_filter_functions_name_their_reasons():
    assert check_resolution(480, 640, 360, 640) is None
    assert check_resolution(240, 640, 360, 0).reason == "low_resolution"
    assert check_aspect(100, 400, None, 3).reason == "bad_aspect" and check_aspect(100, 100, 0.5, 2) is None
    assert check_frames(7, 8).reason == "few_frames" and check_frames(8, 8) is None
    assert check_seconds(0.5, 1.0).reason == "too_short" and check_seconds(3.0, 0, 2.5).reason == "too_long"
    assert check_motion(0.1, 0.3).reason == "low_motion" and check_motion(0.1, None) is None
    assert parse_bytes("500MB") == 500_000_000 and parse_bytes("1.5KiB") == 1536 and parse_bytes("4096") == 4096


def test_motion_score_static_is_zero_and_pan_matches_speed():
    def encoded(frames):
        return read_all_frames(encode_mp4(frames, FPS))[0]

    assert motion_score(encoded(texture_frames(12, speed=0))) < 0.05
    for speed in (1, 2, 3):
        assert motion_score(encoded(texture_frames(12, speed=speed, seed=speed))) == pytest.approx(speed, rel=0.1)
    # the score is per frame at a 64 px short side: the same pan at 128 px (2x the pixels) scores the same
    assert motion_score(texture_frames(12, 128, 128, speed=4, seed=5)) == pytest.approx(2, rel=0.1)
    frames = texture_frames(12, seed=6)
    assert perceptual_key(frames) == perceptual_key(frames.copy()) != perceptual_key(frames[::-1].copy())


def test_each_filter_skips_with_its_reason(tmp_path):
    v = tmp_path / "v"
    make_video(v / "small.mp4", n=24, height=32, width=32, seed=7)
    make_video(v / "wide.mp4", n=24, height=48, width=160, seed=8)
    make_video(v / "static.mp4", n=24, speed=0, seed=9)
    make_video(v / "moving.mp4", n=48, speed=2, seed=10)
    rows = [("small.mp4", None, None), ("wide.mp4", None, None), ("static.mp4", None, None),
            ("moving.mp4", 0.0, 0.5),  # 6 frames
            ("moving.mp4", 0.5, 1.25),  # 9 frames, 0.75 s
            ("moving.mp4", 1.0, 4.0),  # 3 s
            ("moving.mp4", 1.5, 3.5)]  # 2 s: passes
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"v/{p}", "caption": f"{p} {s}", "start": s, "end": e}) + "\n"
                                for p, s, e in rows))
    out = tmp_path / "out"
    assert run("--input", manifest, "--output", out, "--clip-mode", "timestamps", "--no-shuffle",
               "--min-height", 40, "--max-aspect", 2.5, "--min-frames", 8, "--min-seconds", 1.0,
               "--max-seconds", 2.5, "--min-motion", 0.3) == 0
    report = report_of(out)
    assert reasons(report) == {"small.mp4": "low_resolution", "wide.mp4": "bad_aspect", "static_0000": "low_motion",
                               "moving_0000": "few_frames", "moving_0001": "too_short", "moving_0002": "too_long"}
    (kept,) = metas_of(out).values()
    assert (kept["start_frame"], kept["end_frame"]) == (18, 42)
    assert kept["motion_score"] == pytest.approx(2.0, rel=0.1)
    assert report["skipped_counts"] == {"bad_aspect": 1, "few_frames": 1, "low_motion": 1, "low_resolution": 1,
                                        "too_long": 1, "too_short": 1}


# ----------------------------------------------------------------------------------------------
# De-duplication and shard sizes
# ----------------------------------------------------------------------------------------------


def test_duplicate_files_and_clips_are_dropped(tmp_path):
    d = tmp_path / "in"
    make_video(d / "a.mp4", n=24, seed=11, caption="original")
    shutil.copy(d / "a.mp4", d / "b_copy.mp4")
    (d / "b_copy.txt").write_text("the same file under another name")
    make_video(d / "c.mp4", n=24, seed=12, caption="different")
    out = tmp_path / "out"
    assert run("--input", d, "--output", out, "--clip-seconds", 0, "--no-shuffle") == 0
    report = report_of(out)
    (dup,) = report["skipped"]
    assert (os.path.basename(dup["path"]), dup["reason"], dup["duplicate_of"]) == ("b_copy.mp4", "duplicate", "a.mp4")
    assert set(metas_of(out)) == {"a_0000", "c_0000"}

    # one file, two manifest rows with the same span: the second clip repeats the first's frames
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "in/c.mp4", "caption": "first", "start": 0, "end": 1}) + "\n"
                        + json.dumps({"path": "in/c.mp4", "caption": "again", "start": 0, "end": 1}) + "\n")
    assert run("--input", manifest, "--output", tmp_path / "m", "--clip-mode", "timestamps") == 0
    (dup,) = report_of(tmp_path / "m")["skipped"]
    assert (dup["reason"], dup["clip"], dup["duplicate_of"]) == ("duplicate", "c_0001", "c_0000")
    assert run("--input", manifest, "--output", tmp_path / "nd", "--clip-mode", "timestamps", "--no-dedup") == 0
    assert len(metas_of(tmp_path / "nd")) == 2


def test_shard_bytes_closes_shards_before_the_target(collection, tmp_path):
    out = tmp_path / "out"
    limit = 40_000
    assert run("--input", collection, "--output", out, "--clip-seconds", 0.5, "--clip-stride-seconds", 0.5,
               "--shard-bytes", "40KB") == 0
    index = index_of(out)
    sizes = [s["bytes"] for s in index["shards"]]
    assert len(sizes) >= 3 and all(b <= limit for b in sizes)
    assert sizes == [os.path.getsize(out / s["name"]) for s in index["shards"]]
    assert index["samples_per_shard"] is None and index["shard_bytes"] == limit
    # every shard but the last was full: with the next shard's first sample it would have been too big
    def end_of(members):  # bytes used by these members: up to the end of the last one's padded data
        return members[-1].offset_data + -(-members[-1].size // 512) * 512

    for shard, nxt in zip(index["shards"], index["shards"][1:]):
        with tarfile.open(out / shard["name"]) as tar:
            used = end_of(tar.getmembers())
        with tarfile.open(out / nxt["name"]) as tar:
            members = tar.getmembers()
            first = [m for m in members if m.name.split(".")[0] == members[0].name.split(".")[0]]
            extra = end_of(first)
        assert -(-(used + extra + 1024) // 10240) * 10240 > limit  # + end blocks, 10240-byte records
    assert run("--input", collection, "--output", tmp_path / "bad", "--shard-bytes", "lots") == 2


# ----------------------------------------------------------------------------------------------
# Resume, report, index
# ----------------------------------------------------------------------------------------------


def test_resumed_ingest_equals_uninterrupted_and_skips_done_shards(collection, tmp_path, monkeypatch):
    args = ["--input", collection, "--clip-seconds", 1, "--clip-stride-seconds", 0.5, "--samples-per-shard", 3]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run(*args, "--output", full) == 0

    assert run(*args, "--output", resumed, "--stop-after-shards", 2) == 3  # simulated interruption
    state = json.loads((resumed / "_ingest_state.json").read_text())
    assert [s["name"] for s in state["shards"]] == ["clips-000000.tar", "clips-000001.tar"] and not state["complete"]
    record = json.loads((resumed / "_ingest_state" / "clips-000001.tar.json").read_text())
    assert len(record["clips"]) == 3 and record["videos"]
    done_mtimes = {n: os.stat(resumed / n).st_mtime_ns for n in ("clips-000000.tar", "clips-000001.tar")}
    cursor_video = state["cursor"][0]

    calls = []
    real = ingest_mod.process_video
    monkeypatch.setattr(ingest_mod, "process_video", lambda *a, **k: calls.append(a[0].source) or real(*a, **k))
    assert run(*args, "--output", resumed) == 0
    assert len(calls) == 6 - cursor_video < 6  # only videos from the resume point are decoded again
    assert {n: os.stat(resumed / n).st_mtime_ns for n in done_mtimes} == done_mtimes
    assert shard_bytes_of(resumed) == shard_bytes_of(full)
    assert (resumed / "index.json").read_bytes() == (full / "index.json").read_bytes()
    volatile = ("output", "elapsed_s", "clips_per_s", "resume")
    a, b = report_of(full), report_of(resumed)
    assert {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}
    assert b["resume"]["resumed_shards"] == 2

    calls.clear()
    assert run(*args, "--output", resumed) == 0 and calls == []  # complete: nothing is redone
    assert run(*args[:-1], 4, "--output", resumed) == 2  # other arguments: refused ...
    assert run(*args[:-1], 4, "--output", resumed, "--overwrite") == 0  # ... unless --overwrite
    assert all(s["num_samples"] <= 4 for s in index_of(resumed)["shards"])
    os.remove(resumed / "clips-000000.tar")  # a completed shard went missing: refused, not silently redone
    assert run(*args[:-1], 4, "--output", resumed) == 2


def test_report_stats_and_index_for_remote_urls(collection, tmp_path):
    out = tmp_path / "out"
    assert run("--input", collection, "--output", out, "--clip-seconds", 1, "--samples-per-shard", 4) == 0
    report, index = report_of(out), index_of(out)
    c = report["counts"]
    assert (c["videos_total"], c["videos_read"], c["videos_with_clips"]) == (6, 6, 6)
    n = c["clips_written"]
    assert n == index["total_samples"] == sum(s["num_samples"] for s in index["shards"]) == len(samples_of(out))
    assert c["shards"] == len(index["shards"]) and c["shard_bytes"] == index["total_bytes"]
    assert report["durations"]["total_s"] == pytest.approx(n * 1.0)
    assert sum(report["durations"]["histogram_s"].values()) == n
    assert report["resolutions"] == {"clips": {"64x64": n}, "sources": {"64x64": 6}}
    assert report["fps"] == {"clips": {"12": n}, "sources": {"12": 6}}
    assert sum(report["motion"]["histogram"].values()) == n and 0.5 < report["motion"]["mean"] < 3
    # the static video's two windows are identical: one is dropped, and reported with an example
    assert report["skip_reasons"]["duplicate"]["count"] == 1
    assert report["skip_reasons"]["duplicate"]["examples"][0]["duplicate_of"] == "v0_0000"
    assert all("motion_score" in m and "dedup_key" in m and len(m["source_sha256"]) == 64
               for m in metas_of(out).values())

    # shards are listed by relative name; the brace pattern serves object-storage URLs
    assert all("/" not in s["name"] for s in index["shards"])
    pattern = index["shard_pattern"]
    assert pattern == f"clips-{{000000..{len(index['shards']) - 1:06d}}}.tar"
    urls = expand_shards(f"pipe:cat {out}/{pattern}")
    assert len(urls) == len(index["shards"])
    assert sum(1 for _ in wds.WebDataset(urls, shardshuffle=False)) == n
    assert probe(samples_of(out)[0]["mp4"]).num_frames == 12

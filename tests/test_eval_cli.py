"""vdit-eval videos: any folder of mp4s -> one JSON; errors listed; Physics-IQ layout; old usage."""

import json
import os

import numpy as np
import pytest

from vdit.data.synthetic import write_synthetic_dataset
from vdit.data.video_io import write_mp4
from vdit.eval import score
from vdit.eval.metrics.registry import WEIGHT_FREE


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    rows = write_synthetic_dataset(root, 3, seed=3, height=32, width=32, num_frames=16, fps=8)
    with open(root / "broken.mp4", "wb") as f:
        f.write(b"not a video")
    scenes = {os.path.basename(r["path"]): r["meta"]["synthetic"] for r in rows}
    with open(root / "scenes.json", "w") as f:
        json.dump(scenes, f)
    with open(root / "prompts.json", "w") as f:
        json.dump([{"prompt": r["caption"], "path": os.path.basename(r["path"])} for r in rows], f)
    return root


def run(argv, capsys):
    assert score.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_scores_every_weight_free_metric_and_lists_errors(folder, capsys, tmp_path):
    out = run(["videos", str(folder), "--scenes", str(folder / "scenes.json"), "--out", str(tmp_path / "s.json")],
              capsys)
    assert json.loads((tmp_path / "s.json").read_text()) == out
    assert [e["path"] for e in out["errors"]] == [str(folder / "broken.mp4")]
    assert len(out["videos"]) == 3 and all("path" in v for v in out["videos"])
    expected = set(WEIGHT_FREE) - {"physics_iq"}
    assert set(out["metrics"]) == expected
    for name, m in out["metrics"].items():
        assert {"value", "count", "not_evaluable", "implementation", "original", "exact"} <= set(m), name
    assert out["metrics"]["temporal_flickering_all"]["count"] == 3
    assert out["metrics"]["physics"]["count"] + out["metrics"]["physics"]["not_evaluable"] == 3
    assert set(out["metrics"]["physics"]["checks"]) >= {"gravity", "horizontal", "order"}
    assert out["skipped"]["physics_iq"] == "needs reference"
    assert out["metrics"]["dynamic_degree"]["exact"] is False  # OpenCV flow


def test_selected_metrics_and_unknown_name(folder, capsys):
    out = run(["videos", str(folder / "synthetic_00000.mp4"), "--metrics", "motion_jerk,temporal_flickering_all"],
              capsys)
    assert set(out["metrics"]) == {"motion_jerk", "temporal_flickering_all"}
    with pytest.raises(KeyError, match="unknown metric"):
        score.main(["videos", str(folder / "synthetic_00000.mp4"), "--metrics", "nope"])


def test_old_usage_still_works(folder, capsys):
    out = run([str(folder / "synthetic_00001.mp4"), "--scene-json", str(folder / "scenes.json")], capsys)
    assert out["metrics"]["physics"]["count"] + out["metrics"]["physics"]["not_evaluable"] == 1


def test_physics_iq_benchmark_layout(tmp_path, capsys):
    rng = np.random.default_rng(0)
    T, H, W = 12, 32, 48

    def clip(shift):
        v = np.full((T, H, W, 3), 40, np.uint8)
        for t in range(T):
            x = 4 + 2 * t + shift
            v[t, 10:20, x:x + 8] = 220
        return v + rng.integers(0, 2, v.shape, dtype=np.uint8)

    ref, gen = tmp_path / "testing" / "8FPS", tmp_path / "gen"
    os.makedirs(ref), os.makedirs(gen)
    write_mp4(ref / "0001_testing-videos_8FPS_perspective-left_take-1_trimmed-ball.mp4", clip(0), 8)
    write_mp4(ref / "0002_testing-videos_8FPS_perspective-left_take-2_trimmed-ball.mp4", clip(1), 8)
    write_mp4(gen / "0001_perspective-left_trimmed-ball.mp4", clip(0), 8)
    write_mp4(gen / "other.mp4", clip(3), 8)  # no reference: physics_iq not available for it
    out = run(["videos", str(gen), "--reference", str(tmp_path / "testing"), "--metrics", "physics_iq"], capsys)
    m = out["metrics"]["physics_iq"]
    assert m["count"] == 1 and m["missing_inputs"] == 1 and m["exact"] is True
    assert m["V"] is not None and 0 < m["value"] <= 100
    assert m["A"]["spatiotemporal_iou"] > 0.9  # generated == take 1 up to mp4 noise


def test_nothing_readable_returns_1(tmp_path):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"nope")
    assert score.main(["videos", str(bad)]) == 1


def test_samples_folder_scenes_json_is_picked_up(folder, capsys):
    out = run(["videos", str(folder), "--metrics", "physics"], capsys)  # no --scenes: the folder's scenes.json
    assert out["metrics"]["physics"]["count"] + out["metrics"]["physics"]["not_evaluable"] == 3

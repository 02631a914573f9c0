"""launch/quickstart.py's data step: shards are reused while the data recipe is unchanged and rebuilt
when it changes (a rerun after a recipe update must not train on the old clips)."""

from __future__ import annotations

import json
import os

from vdit.launch.quickstart import build_data


def test_data_is_reused_until_the_recipe_changes(tmp_path):
    data = str(tmp_path / "data")
    shards = build_data(data, synthetic_clips=2, synthetic_size=32, ball_radius_frac=(0.045, 0.11))
    index = os.path.join(shards, "index.json")
    first = os.stat(index).st_mtime_ns
    assert build_data(data, synthetic_clips=2, synthetic_size=32, ball_radius_frac=(0.045, 0.11)) == shards
    assert os.stat(index).st_mtime_ns == first  # same recipe: not rebuilt
    build_data(data, synthetic_clips=2, synthetic_size=32, ball_radius_frac=(0.12, 0.17))
    with open(os.path.join(data, "build.json")) as f:
        assert json.load(f)["ball_radius_frac"] == [0.12, 0.17]
    with open(os.path.join(data, "raw", "manifest.jsonl")) as f:
        radii = [b["radius"] for row in map(json.loads, f) if "synthetic" in row for b in row["synthetic"]["balls"]]
    assert radii and all(0.12 * 32 - 1e-6 <= r <= 0.17 * 32 + 1e-6 for r in radii)  # rebuilt with the new balls

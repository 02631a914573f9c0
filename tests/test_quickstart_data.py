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


def test_prepare_samples_scene_spread_reaches_the_renderer_and_the_eval_prompts(tmp_path):
    """``--scene-spread`` draws the clips as ``random_scene(spread=...)`` does, and
    ``eval.physics_scene_spread`` draws the new-scene prompts alike; a spread outside [0, 1] is a usage error."""
    import numpy as np

    from vdit.data import samples
    from vdit.data.synthetic import random_scene
    from vdit.eval.hook import physics_prompts

    out = tmp_path / "raw"
    assert samples.main(["--output", str(out), "--synthetic-clips", "3", "--height", "32", "--width", "32",
                         "--num-frames", "16", "--fps", "12", "--scene-spread", "0"]) in (0, None)
    with open(out / "synthetic" / "manifest.jsonl") as f:
        rows = [json.loads(line) for line in f]
    for i, row in enumerate(rows):
        seed = int(np.random.SeedSequence([0, i]).generate_state(1)[0])
        assert row["synthetic"] == random_scene(np.random.default_rng(seed), 32, 32, 16, 12.0, spread=0.0).to_json()
    assert samples.main(["--output", str(tmp_path / "bad"), "--synthetic-clips", "1", "--scene-spread", "2"]) == 2
    (_, a), = physics_prompts(1, 5, 16, 32, 32, 12.0, spread=0.0)
    assert a == random_scene(np.random.default_rng(5), 32, 32, 16, 12.0, spread=0.0)

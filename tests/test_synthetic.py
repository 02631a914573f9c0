"""The procedural physics-scene renderer: determinism, captions, exact physics, dataset files."""

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from vdit.data.synthetic import (
    BACKGROUND_COLORS, BALL_COLORS, FLOOR_COLORS, BallParams, SceneParams, caption, make_clip,
    random_scene, render, simulate, write_synthetic_dataset,
)
from vdit.data.video_io import read_all_frames
from vdit.eval.report import contact_sheet


def drop_scene(g=250.0, restitution=0.8, size=64, num_frames=48, fps=24.0):
    return SceneParams(
        "drop", size, size, num_frames, fps, "dark blue", BACKGROUND_COLORS["dark blue"], "gray",
        FLOOR_COLORS["gray"], 8, [BallParams("red", BALL_COLORS["red"], 4.0, 30.3, 6.7)],
        gravity=g, restitution=restitution, friction=0.1,
    )


SCENE_WORD = {"drop": "dropped", "throw": "thrown", "bounce": "bounces"}


def test_make_clip_is_deterministic():
    a, b = make_clip(7), make_clip(7)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert a[0].dtype == np.uint8 and a[0].shape == (48, 64, 64, 3)
    c = make_clip(8)
    assert c[1] != a[1] or not np.array_equal(c[0], a[0])


def test_captions_name_colors_and_scene():
    seen = set()
    for seed in range(24):
        params = random_scene(np.random.default_rng(seed))
        text = caption(params)
        seen.add(params.scene)
        assert SCENE_WORD[params.scene] in text, text
        assert params.floor in text and params.background in text, text
        for ball in params.balls:
            assert f" {ball.color} ball" in text, text
        assert 1 <= len(params.balls) <= 2
        assert 0.5 <= params.restitution <= 0.9
    assert seen == {"drop", "throw", "bounce"}


def test_caption_counts_bounces():
    params = drop_scene()
    sim = simulate(params)
    n = len(sim["bounce_times"][0])
    assert n >= 2
    words = {2: "twice", 3: "three times", 4: "four times"}
    assert words[n] in caption(params, sim)


def test_json_round_trip():
    params = random_scene(np.random.default_rng(3))
    text = json.dumps(params.to_json())
    back = SceneParams.from_json(json.loads(text))
    assert back == params
    assert SceneParams.from_json(text) == params
    assert np.array_equal(render(back), render(params))


@pytest.mark.parametrize("change", [
    {"scene": "roll"}, {"restitution": 1.2}, {"restitution": 0.0}, {"gravity": -10.0},
    {"friction": 1.5}, {"floor_height": 64},
])
def test_invalid_params_raise(change):
    with pytest.raises(ValueError):
        dataclasses.replace(drop_scene(), **change)


def test_ball_starting_below_floor_raises():
    params = drop_scene()
    with pytest.raises(ValueError):
        dataclasses.replace(params, balls=[dataclasses.replace(params.balls[0], y=60.0)])


def test_trajectories_never_penetrate_floor_or_walls():
    scenes = [random_scene(np.random.default_rng(s)) for s in range(20)]
    # A fast ball thrown into the right wall, low friction, elastic.
    scenes.append(SceneParams("throw", 64, 64, 96, 24.0, "black", BACKGROUND_COLORS["black"], "gray",
                              FLOOR_COLORS["gray"], 6, [BallParams("yellow", BALL_COLORS["yellow"], 5.0, 10.0, 40.0,
                                                                   400.0, -150.0)],
                              gravity=400.0, restitution=1.0, friction=0.0))
    for params in scenes:
        sim = simulate(params)
        pos = sim["positions"]
        radii = np.array([b.radius for b in params.balls])
        assert np.all(pos[:, :, 1] + radii <= params.floor_line + 1e-9)
        assert np.all(pos[:, :, 0] - radii >= -0.5 - 1e-9)
        assert np.all(pos[:, :, 0] + radii <= params.width - 0.5 + 1e-9)
    assert len(sim["wall_hits"][0]) >= 2  # the last scene bounced between the walls


def test_drop_is_an_exact_parabola():
    g, fps = 250.0, 24.0
    params = drop_scene(g=g, fps=fps)
    sim = simulate(params)
    first = sim["bounce_times"][0][0]
    frames = np.flatnonzero(sim["times"] < first)
    t, y = sim["times"][frames], sim["positions"][frames, 0, 1]
    a, b, c = np.polyfit(t, y, 2)
    assert abs(2 * a / g - 1) < 0.01
    assert abs(2 * a / g - 1) < 1e-9  # in fact exact: closed-form simulation
    assert b == pytest.approx(0.0, abs=1e-6) and c == pytest.approx(6.7)
    # Restitution: rebound speed = e * impact speed, so successive apex heights shrink by e^2.
    impact = g * first
    contact_y = params.floor_line - 4.0
    assert first == pytest.approx(np.sqrt(2 * (contact_y - 6.7) / g))
    t2 = sim["bounce_times"][0][1] - first
    assert t2 == pytest.approx(2 * 0.8 * impact / g)


def test_render_draws_floor_background_and_ball():
    params = drop_scene()
    sim = simulate(params)
    frames = render(params, sim)
    assert frames.shape == (48, 64, 64, 3) and frames.dtype == np.uint8
    assert tuple(frames[0, 0, 0]) == BACKGROUND_COLORS["dark blue"]
    assert tuple(frames[0, 63, 0]) == FLOOR_COLORS["gray"] and tuple(frames[0, 56, 5]) == FLOOR_COLORS["gray"]
    assert tuple(frames[0, 55, 5]) == BACKGROUND_COLORS["dark blue"]
    x, y = sim["positions"][0, 0]
    assert tuple(frames[0, int(round(y)), int(round(x))]) == BALL_COLORS["red"]
    # An explicit trajectory is drawn as given; NaN hides the ball.
    hidden = render(params, np.full((3, 1, 2), np.nan))
    assert np.all(hidden[:, :56] == BACKGROUND_COLORS["dark blue"])
    with pytest.raises(ValueError):
        render(params, np.zeros((3, 2, 2)))


def test_write_synthetic_dataset(tmp_path):
    rows = write_synthetic_dataset(tmp_path, num_clips=3, seed=5, height=64, width=48, num_frames=12, fps=12)
    assert len(rows) == 3
    with open(os.path.join(tmp_path, "manifest.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 3
    for i, (row, line) in enumerate(zip(rows, lines)):
        assert line["path"] == f"synthetic_{i:05d}.mp4"
        assert row["path"] == os.path.join(os.path.abspath(tmp_path), line["path"])
        assert line["caption"] == row["caption"] and line["synthetic"] == row["meta"]["synthetic"]
        frames, fps = read_all_frames(row["path"])
        assert frames.shape == (12, 64, 48, 3) and fps == pytest.approx(12)
        params = SceneParams.from_json(line["synthetic"])
        # The decoded clip is the rendered one up to compression noise.
        err = np.abs(frames.astype(np.int16) - render(params).astype(np.int16)).mean()
        assert err < 4.0
    assert write_synthetic_dataset(tmp_path / "again", 3, 5, 64, 48, 12, 12)[1]["caption"] == rows[1]["caption"]


def test_contact_sheet(tmp_path):
    clips = [make_clip(s, 32, 32, 10, 12)[0] for s in range(2)] + [make_clip(2, 64, 48, 24)[0]]
    path = contact_sheet(clips, ["a", "b " * 80, "c"], max_frames=8, path=tmp_path / "sheet.png")
    image = np.asarray(Image.open(path))
    assert image.ndim == 3 and image.shape[0] > 3 * 96 and image.shape[1] >= 8 * 96
    with pytest.raises(ValueError):
        contact_sheet(clips, ["only one"], path=tmp_path / "x.png")


@pytest.mark.parametrize("radius_frac", [(0.045, 0.11), (0.12, 0.17)])
def test_radius_frac_bounds_every_ball(radius_frac):
    """Radii lie in ``radius_frac`` of the smaller side (never under 2.5 px), and scenes stay valid."""
    lo, hi = radius_frac
    for seed in range(20):
        p = random_scene(np.random.default_rng(seed), 32, 48, 16, 12.0, radius_frac)
        for b in p.balls:
            assert max(lo * 32, 2.5) - 1e-9 <= b.radius <= max(hi * 32, 3.5) + 1e-9
    with pytest.raises(ValueError, match="radius_frac"):
        random_scene(np.random.default_rng(0), 32, 32, 16, 12.0, (0.2, 0.1))


def _third(x: float, width: int) -> int:
    return min(2, int((x + 0.5) / width * 3))


def test_caption_names_each_balls_third_on_request():
    words = ("on the left", "in the middle", "on the right")
    for seed in range(30):
        p = random_scene(np.random.default_rng(seed), 32, 32, 16, 12.0)
        text = caption(p, start_third=True)
        for b in p.balls:
            assert f"{b.color} ball {words[_third(b.x, p.width)]}" in text, text
        assert not any(w in caption(p) for w in words)  # the default caption does not
    # clips drawn with a narrowed spread are captioned with their third, full-variety clips are not
    assert any(w in make_clip(0, 32, 32, 16, 12.0, spread=0.0)[1] for w in words)
    assert not any(w in make_clip(0, 32, 32, 16, 12.0)[1] for w in words)


def test_spread_zero_makes_the_motion_a_function_of_the_caption():
    """With spread 0 two one-ball scenes with the same scene type, direction and third move alike:
    the same gravity, restitution, friction, floor band, start point (the third's centre) and speeds."""
    seen: dict[tuple, tuple] = {}
    for seed in range(120):
        p = random_scene(np.random.default_rng(seed), 32, 32, 16, 12.0, spread=0.0)
        if len(p.balls) != 1:
            continue
        b = p.balls[0]
        key = (p.scene, b.vx > 0, _third(b.x, p.width))
        # start height as a share of the ball's own vertical room (the radius varies with the size word)
        y_top, span = b.radius - 0.5, p.floor_line - 2 * b.radius + 0.5
        motion = (p.gravity, p.restitution, p.friction, p.floor_height, round(abs(b.vx), 9),
                  round((b.y - y_top - 1) / span, 9) if p.scene != "throw" else None)
        if key in seen:
            assert motion == seen[key], (key, motion, seen[key])
        seen[key] = motion
        if p.scene in ("drop", "bounce"):
            centre = (_third(b.x, p.width) + 0.5) * p.width / 3 - 0.5
            lo, hi = b.radius - 0.5, p.width - 0.5 - b.radius
            assert b.x == pytest.approx(min(max(centre, lo), hi))
    assert len(seen) >= 6


@pytest.mark.parametrize("spread", [0.0, 0.3])
def test_spread_narrows_the_ranges_around_their_middle(spread):
    for seed in range(40):
        p = random_scene(np.random.default_rng(seed), 32, 32, 16, 12.0, spread=spread)
        g64 = p.gravity * 64 / 32
        assert 275 - spread * 125 - 1e-6 <= g64 <= 275 + spread * 125 + 1e-6
        assert abs(p.friction - 0.15) <= spread * 0.15 + 1e-9
        for b in p.balls:
            if p.scene != "throw":
                centre = (_third(b.x, p.width) + 0.5) * p.width / 3 - 0.5
                lo, hi = b.radius - 0.5, p.width - 0.5 - b.radius
                assert abs(b.x - min(max(centre, lo), hi)) <= spread * p.width / 6 + 1e-6
    with pytest.raises(ValueError, match="spread"):
        random_scene(np.random.default_rng(0), 32, 32, 16, 12.0, spread=1.5)


def test_full_spread_draws_the_same_scenes_as_before():
    """spread=1 (the default) keeps the scenes the renderer drew before the option existed
    (values recorded from that version)."""
    known = {0: ("bounce", 80.12169049202434, 16.612953235822573, 16.52036351944353),
             1: ("throw", 93.01995158995422, 28.402344220835207, 18.060203113278952),
             2: ("bounce", 176.77821757428504, 9.449488681492513, 13.297215508673737)}
    for seed, (scene, gravity, x, y) in known.items():
        p = random_scene(np.random.default_rng(seed), 32, 32, 16, 12.0, spread=1.0)
        assert p.scene == scene
        assert (p.gravity, p.balls[0].x, p.balls[0].y) == pytest.approx((gravity, x, y), rel=1e-12)

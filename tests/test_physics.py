"""Trajectory physics checks (EVAL.md B2/D): the renderer's own clips pass, broken variants fail."""

import json

import numpy as np
import pytest

from vdit.data.synthetic import (
    BACKGROUND_COLORS, BALL_COLORS, FLOOR_COLORS, BallParams, SceneParams, random_scene, render, simulate,
)
from vdit.data.video_io import encode_mp4, read_all_frames
from vdit.eval.physics import (
    detect_bounces, gravity_check, physics_checks, split_flight_segments, track_balls,
)

from vdit.eval.physics import CHECKS  # noqa: E402


def throw_scene(size=64, scene="throw"):
    """A red ball thrown up and to the right: 3 flights, 2 bounces, a wall hit at the end."""
    s = size / 64
    return SceneParams(scene, size, size, 48, 24.0, "dark blue", BACKGROUND_COLORS["dark blue"], "gray",
                       FLOOR_COLORS["gray"], int(8 * s),
                       [BallParams("red", BALL_COLORS["red"], 4 * s, 8 * s, 36 * s, 30 * s, -110 * s)],
                       gravity=300.0 * s, restitution=0.75, friction=0.1)


@pytest.fixture(scope="module")
def scene():
    params = throw_scene()
    sim = simulate(params)
    return params, sim, render(params, sim)


def failed(report):
    return {name for name in CHECKS if report[name]["passed"] is False}


def test_tracking_is_subpixel(scene):
    params, sim, video = scene
    centroids = track_balls(video, params)
    assert np.abs(centroids - sim["positions"]).max() < 0.15


def test_own_clip_passes_in_memory(scene):
    params, _, video = scene
    report = physics_checks(video, params, gravity_tol=0.02)
    assert report["passed"], failed(report)
    g = report["gravity"]
    assert g["g_rel_error"] < 0.02 and g["num_segments"] == 3
    assert g["consistent"] and g["fit_ok"] and g["direction_ok"] and g["magnitude_ok"]
    json.dumps(report, allow_nan=False)  # plain JSON


def test_own_clip_passes_after_mp4_round_trip(scene):
    params, _, video = scene
    decoded, fps = read_all_frames(encode_mp4(video, params.fps))
    report = physics_checks(decoded, params, fps=fps, gravity_tol=0.02)
    assert report["passed"], failed(report)
    assert report["gravity"]["g_rel_error"] < 0.02


def test_own_clip_passes_at_128():
    params = throw_scene(128)
    report = physics_checks(render(params), params, gravity_tol=0.02)
    assert report["passed"], failed(report)


@pytest.mark.parametrize("seed", range(6))
def test_random_scenes_pass(seed):
    params = random_scene(np.random.default_rng(seed))
    report = physics_checks(render(params), params, gravity_tol=0.02)
    assert report["passed"], (params.scene, failed(report), report["gravity"]["g_rel_error"])


def test_bounces_split_flights(scene):
    params, sim, _ = scene
    y = sim["positions"][:, 0, 1]
    found = detect_bounces(y)
    assert len(found) == len(sim["bounce_frames"][0])
    for b, f in zip(sim["bounce_frames"][0], found):
        assert abs(b - f) <= 1
    segments = split_flight_segments(y, min_len=4)
    assert len(segments) == 3 and all(f not in np.concatenate(segments) for f in found)


def test_wrong_fps_breaks_magnitude(scene):
    params, _, video = scene
    report = gravity_check(video, params, fps=params.fps / 2)  # t doubles -> g_est = g / 4
    assert report["g_est"] == pytest.approx(params.gravity / 4, rel=0.02)
    assert not report["magnitude_ok"] and not report["passed"]


# ---- variants that break one law each ----------------------------------------------------------


def test_teleport_fails_continuity(scene):
    params, sim, _ = scene
    pos = sim["positions"].copy()
    pos[20:23, 0, 0] += 20.0  # mid-flight, 3 frames away and back
    report = physics_checks(render(params, pos), params)
    assert "continuity" in failed(report) and not report["passed"]
    # Residuals against the locally fitted motion: the frames around both jumps (out and back).
    assert report["continuity"]["num_violations"] >= 2 and report["continuity"]["max_residual_px"] > 15


def test_antigravity_fails_direction(scene):
    params, sim, _ = scene
    pos = sim["positions"].copy()
    r = params.balls[0].radius
    top, contact = r - 0.5, params.floor_line - r
    pos[:, 0, 1] = top + contact - pos[:, 0, 1]  # upside down: falls upwards, rebounds off the top
    report = physics_checks(render(params, pos), params)
    assert "gravity" in failed(report)
    assert report["gravity"]["direction_ok"] is False and report["gravity"]["g_est"] < 0


def test_floor_sinking_fails_penetration(scene):
    params, sim, _ = scene
    pos = sim["positions"].copy()
    first = sim["bounce_frames"][0][0]
    contact = params.floor_line - params.balls[0].radius
    pos[first:, 0, 1] = np.minimum(contact + np.arange(48 - first), contact + 5.0)  # sinks 5 px
    pos[first:, 0, 0] = pos[first, 0, 0]
    report = physics_checks(render(params, pos), params)
    assert failed(report) == {"penetration"}
    assert report["penetration"]["max_floor_depth_px"] == pytest.approx(5.0, abs=0.3)


def _bouncing_y(times, y0, g, contact, rebound_speeds):
    """y(t) of a ball dropped from rest at y0 whose k-th rebound leaves the floor at rebound_speeds[k]."""
    starts, state = [0.0], [(y0, 0.0)]
    t_hit = np.sqrt(2 * (contact - y0) / g)
    for v in rebound_speeds:
        starts.append(starts[-1] + t_hit)
        state.append((contact, -v))
        t_hit = 2 * v / g
    y = np.empty_like(times)
    for i, t in enumerate(times):
        k = np.searchsorted(starts, t, side="right") - 1
        (ys, vs), tau = state[k], t - starts[k]
        y[i] = min(ys + vs * tau + g * tau * tau / 2, contact)
    return y


def test_energy_gain_fails_energy(scene):
    params, sim, _ = scene
    g, contact = params.gravity, params.floor_line - params.balls[0].radius
    y0 = contact - 16.0
    v_impact = np.sqrt(2 * g * 16.0)
    # Each rebound leaves faster than the ball arrived: apexes 16 -> 25 -> 39 px.
    y = _bouncing_y(sim["times"], y0, g, contact, [1.25 * v_impact, 1.25 ** 2 * v_impact])
    pos = np.stack([np.full_like(y, 32.0), y], axis=-1)[:, None, :]
    report = physics_checks(render(params, pos), params)
    assert "energy" in failed(report)
    assert report["energy"]["max_gain_px"] > 5
    assert report["gravity"]["passed"]  # still ballistic between the bounces
    # Control: the same construction with rebounds slower than impacts passes.
    y = _bouncing_y(sim["times"], y0, g, contact, [0.8 * v_impact, 0.64 * v_impact])
    pos = np.stack([np.full_like(y, 32.0), y], axis=-1)[:, None, :]
    assert physics_checks(render(params, pos), params)["passed"]


def test_vanishing_ball_fails_permanence(scene):
    params, sim, _ = scene
    pos = sim["positions"].copy()
    pos[30:33] = np.nan  # not drawn
    report = physics_checks(render(params, pos), params)
    assert "permanence" in failed(report)
    assert report["permanence"]["missing"] == 3 and report["permanence"]["min_count"] == 0


def test_other_resolution_and_blur_still_pass(scene):
    """A generated video may come at another size and softer: scored in the scene's units."""
    import cv2

    params, _, video = scene
    up = np.stack([cv2.GaussianBlur(cv2.resize(f, (128, 128), interpolation=cv2.INTER_LINEAR), (0, 0), 1.5)
                   for f in video])
    report = physics_checks(up, params, gravity_tol=0.02)
    assert report["passed"], failed(report)
    assert report["gravity"]["g_est"] == pytest.approx(params.gravity, rel=0.02)


def test_nothing_tracked_is_not_evaluable_never_a_vacuous_pass():
    """A video with no ball in it (e.g. an untrained model's gray output) cannot pass energy/penetration/continuity."""
    from vdit.data.synthetic import random_scene
    from vdit.eval.physics import physics_checks

    params = random_scene(np.random.default_rng(0), 64, 64, 24, 12)
    blank = np.full((24, 64, 64, 3), 128, np.uint8)
    out = physics_checks(blank, params)
    for name in ("energy", "penetration", "continuity"):
        assert out[name]["passed"] is None, name
    assert out["gravity"]["passed"] is False and out["permanence"]["passed"] is False
    assert out["passed"] is False

"""The five cases an audit found passing the trajectory checks (issue 8) now fail their check;
vacuous passes are not evaluable; per-check and per-scene reporting."""

import dataclasses

import numpy as np
import pytest

from vdit.data.synthetic import BACKGROUND_COLORS, BALL_COLORS, FLOOR_COLORS, BallParams, SceneParams, render, simulate
from vdit.eval.physics import CHECKS, physics_checks
from vdit.eval.physics_report import pass_rates, trajectory_physics


def scene(x=8.0, y=36.0, vx=30.0, vy=-110.0, kind="throw", g=300.0):
    return SceneParams(kind, 64, 64, 48, 24.0, "dark blue", BACKGROUND_COLORS["dark blue"], "gray",
                       FLOOR_COLORS["gray"], 8, [BallParams("red", BALL_COLORS["red"], 4.0, x, y, vx, vy)],
                       gravity=g, restitution=0.75, friction=0.1)


def verdicts(report):
    return {name: report[name]["passed"] for name in CHECKS}


def test_own_clip_passes_every_check():
    params = scene()
    report = physics_checks(render(params), params)
    assert report["passed"] is True and all(v is True for v in verdicts(report).values()), verdicts(report)
    assert report["gravity"]["g_rel_error"] < 0.02


def test_permanent_sideways_teleport_fails_continuity():
    params = scene()
    pos = simulate(params)["positions"].copy()
    pos[20:, 0, 0] += 12.0  # 12 px at 64 px, for good, mid-flight
    pos[:, 0, 0] = np.minimum(pos[:, 0, 0], 59.5)  # stay inside the right wall
    report = physics_checks(render(params, pos), params)
    assert report["continuity"]["passed"] is False and report["passed"] is False
    assert report["continuity"]["max_residual_px"] > 10


def test_one_swapped_pair_of_frames_fails_order():
    params = scene()
    video = render(params)
    video[[12, 13]] = video[[13, 12]]  # mid-flight, ~2 px/frame sideways and vertically
    report = physics_checks(video, params)
    assert report["order"]["passed"] is False and 12 in report["order"]["swapped_pairs"]
    assert report["passed"] is False


def test_speeding_up_sideways_after_a_bounce_fails_horizontal():
    params = scene(x=12.0, y=20.0, vx=8.0, vy=0.0, kind="drop")
    sim = simulate(params)
    pos = sim["positions"].copy()
    b = sim["bounce_frames"][0][0]
    pos[b:, 0, 0] = pos[b, 0, 0] + 2.5 * (pos[b:, 0, 0] - pos[b, 0, 0])  # |vx| x 2.5 after the bounce
    assert pos[:, 0, 0].max() < 59.5
    report = physics_checks(render(params, pos), params)
    assert report["horizontal"]["passed"] is False and report["horizontal"]["max_speed_gain"] > 0.3
    assert report["passed"] is False
    # Control: the renderer's own clip of the same scene passes the horizontal check.
    assert physics_checks(render(params, sim), params)["horizontal"]["passed"] is True


def test_hovering_frozen_ball_fails_gravity_and_is_not_evaluable_elsewhere():
    params = scene(x=30.0, y=20.0, vx=0.0, vy=0.0, kind="drop")
    pos = np.tile(np.array([[[30.0, 20.0]]]), (48, 1, 1))
    report = physics_checks(render(params, pos), params)
    assert report["gravity"]["passed"] is False and report["passed"] is False
    for name in ("energy", "penetration", "continuity", "horizontal", "order", "permanence"):
        assert report[name]["passed"] is None, name  # no evidence: never a pass
    assert set(report["not_evaluable"]) == {"energy", "penetration", "continuity", "horizontal", "order",
                                            "permanence"}


def test_gravity_eight_percent_off_fails_at_the_default_tolerance():
    params = scene()
    wrong = dataclasses.replace(params, gravity=params.gravity * 1.08)
    report = physics_checks(render(wrong), params)  # default tolerance, as in training
    assert report["gravity"]["g_rel_error"] == pytest.approx(0.08, abs=0.01)
    assert report["gravity"]["magnitude_ok"] is False and report["gravity"]["passed"] is False


def test_pass_rates_per_check_and_scene_count_not_evaluable_apart():
    good = scene()
    frozen = scene(x=30.0, y=20.0, vx=0.0, vy=0.0, kind="drop")
    reports = [physics_checks(render(good), good),
               physics_checks(render(frozen, np.tile(np.array([[[30.0, 20.0]]]), (48, 1, 1))), frozen)]
    agg = pass_rates(reports)
    assert agg["pass_rate"] == 0.5
    assert agg["checks"]["energy"] == {"pass_rate": 1.0, "count": 1, "not_evaluable": 1,
                                       "mean_error": agg["checks"]["energy"]["mean_error"], "error_key": "max_gain_px"}
    assert agg["checks"]["gravity"]["pass_rate"] == 0.5 and agg["checks"]["gravity"]["mean_error"] > 0.4
    assert agg["scenes"]["throw"]["pass_rate"] == 1.0 and agg["scenes"]["drop"]["pass_rate"] == 0.0


def test_trajectory_metric_result():
    params = scene()
    r = trajectory_physics(render(params), params, params.fps)
    assert r.name == "physics" and r.value == 1.0 and r.exact is True
    assert "exactly the specified checks" in r.original


@pytest.mark.parametrize("radius_frac", [(0.045, 0.11), (0.12, 0.17)])  # the default, the quickstart's
@pytest.mark.parametrize("seed", range(0, 20, 2))
def test_renderer_clips_pass_at_quickstart_size(seed, radius_frac):
    """16 frames of 32 x 32 at 8 fps: flights of 2-5 frames; bounces found with the scene's g."""
    from vdit.data.synthetic import random_scene

    params = random_scene(np.random.default_rng(seed), 32, 32, 16, 8.0, radius_frac)
    report = physics_checks(render(params), params)
    assert report["passed"] is True, (params.scene, verdicts(report))

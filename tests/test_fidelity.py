"""Scene fidelity on procedural prompts: known answers on rendered scenes and on a colour cloud."""

import numpy as np

from vdit.data.synthetic import SceneParams, make_clip
from vdit.eval.fidelity import scene_fidelity, summarize_fidelity


def _clip(seed=3, size=32):
    frames, _, meta = make_clip(seed, size, size, 16, 12.0)
    return frames, SceneParams.from_json(meta["synthetic"])


def test_a_rendered_scene_is_its_own_perfect_sample():
    frames, params = _clip()
    f = scene_fidelity(frames, params)
    assert f["bg_color_err"] < 1.0 and f["floor_color_err"] < 1.0
    assert f["ball_found_frac"] == 1.0
    assert f["ball_size_err"] < 0.3


def test_a_cloud_of_the_ball_colour_is_not_a_ball():
    frames, params = _clip()
    cloud = frames.copy()
    ball = params.balls[0]
    cloud[:, : params.height - params.floor_height] = ball.rgb  # everything above the floor in the ball colour
    f = scene_fidelity(cloud, params)
    assert f["ball_found_per_ball"][0] == 0.0
    # an empty scene (background and floor only) finds no ball and keeps perfect colours
    empty = np.empty_like(frames)
    empty[:] = params.background_rgb
    empty[:, params.height - params.floor_height:] = params.floor_rgb
    g = scene_fidelity(empty, params)
    assert g["ball_found_frac"] == 0.0 and g["bg_color_err"] < 1.0 and g["ball_size_err"] is None
    s = summarize_fidelity([scene_fidelity(frames, params), g])
    assert s["ball_found_80_frac"]["mean"] == 0.5 and s["ball_size_err"]["not_evaluable"] == 1

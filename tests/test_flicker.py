"""Known-answer tests for temporal_flickering (EVAL.md D) and the shared video check."""

import json

import numpy as np
import pytest

from vdit.eval.metrics.base import MetricResult, check_video
from vdit.eval.metrics.flicker import temporal_flickering, temporal_flickering_all


def _texture(rng, t=8, h=16, w=20, high=200):
    frame = rng.integers(0, high, size=(h, w, 3), dtype=np.uint8)
    return np.repeat(frame[None], t, axis=0)


def test_static_video_is_exactly_one():
    video = _texture(np.random.default_rng(0))
    result = temporal_flickering(video)
    assert result.value == 1.0 and result.details["static"] is True
    assert result.name == "temporal_flickering" and result.exact is False  # OpenCV flow in the static filter
    assert result.details["pair_mae"] == [0.0] * 7
    raw = temporal_flickering_all(video)
    assert raw.value == 1.0 and raw.exact is True and raw.name == "temporal_flickering_all"


@pytest.mark.parametrize("amplitude", [10, 40])
def test_alternating_gray_offset(amplitude):
    video = _texture(np.random.default_rng(1)).copy()
    video[1::2] += np.uint8(amplitude)  # texture < 200, so no wrap-around
    result = temporal_flickering_all(video)
    assert abs(result.value - (1 - amplitude / 255)) < 0.005


def test_no_uint8_overflow():
    video = np.zeros((4, 8, 8, 3), np.uint8)
    video[1::2] = 255
    assert temporal_flickering_all(video).value == pytest.approx(0.0, abs=1e-12)


def test_random_noise_scores_much_lower():
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)
    value = temporal_flickering_all(noise).value
    assert value < 0.75  # E|U - U'| = 85 on 0..255 -> ~0.67
    assert value < temporal_flickering_all(_texture(rng)).value


def test_result_is_json_serialisable():
    result = temporal_flickering_all(_texture(np.random.default_rng(3), t=3))
    d = json.loads(json.dumps(result.to_dict()))
    assert isinstance(result, MetricResult)
    assert d["original"].startswith("VBench temporal_flickering")
    assert d["implementation"].startswith("vdit.eval.metrics.flicker")


@pytest.mark.parametrize("bad", [
    np.zeros((4, 8, 8, 3), np.float32),      # dtype
    np.zeros((4, 8, 8), np.uint8),           # no channel axis
    np.zeros((4, 8, 8, 4), np.uint8),        # RGBA
    np.zeros((1, 8, 8, 3), np.uint8),        # T < 2
    np.zeros((0, 8, 8, 3), np.uint8),        # empty
    [[[[0, 0, 0]]], [[[0, 0, 0]]]],          # not an array
])
def test_invalid_videos_raise(bad):
    with pytest.raises(ValueError):
        temporal_flickering(bad)
    with pytest.raises(ValueError):
        temporal_flickering_all(bad)
    with pytest.raises(ValueError):
        check_video(bad)

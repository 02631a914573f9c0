"""Known answers (EVAL.md D) for the flow-based and consistency VBench dimensions, and the original
rules' arithmetic checked by hand with a fake flow backend."""

import cv2
import numpy as np
import pytest
import torch

from vdit.eval.metrics.consistency import background_consistency, consistency_from_features, subject_consistency
from vdit.eval.metrics.flicker import temporal_flickering, temporal_flickering_all
from vdit.eval.metrics.flow import FarnebackFlow, FlowCache, top_fraction_mean
from vdit.eval.metrics.motion import dynamic_degree, motion_jerk, motion_magnitude, motion_smoothness, static_filter


def texture(h, w, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (h, w, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0) * 3 - 256, 0, 255).astype(np.uint8)


def pan(v, T=16, H=64, W=64, seed=0):
    """A window sliding over a smooth texture at v px/frame (content moves left by v)."""
    tex = texture(H + 10, W + v * T + 10, seed)
    return np.stack([tex[5:5 + H, 5 + i * v:5 + i * v + W] for i in range(T)])


@pytest.fixture(scope="module")
def still():
    return np.repeat(texture(64, 64)[None], 16, axis=0)


def test_static_video_known_answers(still):
    assert temporal_flickering(still, 8).value == 1.0
    assert temporal_flickering_all(still, 8).value == 1.0
    sf = static_filter(still, 8)
    assert sf.value == 1.0 and sf.details["static"] is True
    dd = dynamic_degree(still, 8)
    assert dd.value == 0.0 and dd.details["max_flow"] < 0.1
    assert motion_jerk(still).value == pytest.approx(0.0, abs=1e-6)
    assert motion_smoothness(still).value == 1.0
    assert subject_consistency(still).value == pytest.approx(1.0, abs=1e-9)
    assert background_consistency(still).value == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("v", [2, 4])
def test_pan_median_flow_and_dynamic(v):
    video = pan(v)
    jerk = motion_jerk(video)
    med = np.array(jerk.details["median_flow"])
    assert np.abs(med[:, 0] + v).max() < 0.2 and np.abs(med[:, 1]).max() < 0.2  # content moves left
    assert jerk.details["median_speed"] == pytest.approx(v, abs=0.2)
    assert dynamic_degree(video, 8).value == 1.0
    assert motion_magnitude(video, 8).value == pytest.approx(v, abs=0.5)
    assert static_filter(video, 8).value == 0.0
    assert temporal_flickering(video, 8).value is None  # not static: outside VBench's dimension
    assert temporal_flickering_all(video, 8).value < 1.0


def test_alternating_gray_offset_is_static_flicker():
    video = np.repeat(np.clip(texture(48, 48), 0, 199)[None], 8, axis=0)
    video[1::2] += np.uint8(20)
    result = temporal_flickering(video, 8)
    assert result.details["static"] is True
    assert result.value == pytest.approx(1 - 20 / 255, abs=0.005)


def test_swaps_and_stutter_raise_jerk():
    v = 3
    video = pan(v)
    assert motion_jerk(video).value < 0.3
    swapped = video.copy()
    swapped[[6, 7]] = swapped[[7, 6]]
    assert motion_jerk(swapped).value >= v
    stutter = video.copy()
    stutter[7] = stutter[6]
    assert motion_jerk(stutter).value >= v / 2


def test_smoothness_prefers_smooth_motion():
    video = pan(3)
    smooth = motion_smoothness(video).value
    assert smooth > 0.99
    shuffled = video[[0, 1, 2, 3, 5, 4, 6, 7, 9, 8, 10, 11, 13, 12, 14, 15]]
    assert motion_smoothness(shuffled).value < smooth - 0.01


def test_hard_cuts_lower_consistency():
    a = pan(1, seed=1)
    cut = a.copy()
    other = pan(1, seed=2).astype(np.float32) * np.array([0.4, 0.9, 1.3], np.float32)  # another scene, other tint
    cut[8:] = np.clip(other, 0, 255).astype(np.uint8)[8:]
    for fn in (subject_consistency, background_consistency):
        assert fn(cut).value < fn(a).value - 0.02


def test_consistency_formula_by_hand():
    # f0 = e1, f1 = e1, f2 = e2, f3 = -e1 (cosines: 1, 0, -1 -> clamp at 0)
    f = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    score, sims = consistency_from_features(f)
    # i=1: (1 + 1)/2 = 1; i=2: (0 + 0)/2 = 0; i=3: (max(0, cos(e2,-e1)) = 0 + max(0, -1) = 0)/2 = 0
    assert sims == [1.0, 0.0, 0.0] and score == pytest.approx(1 / 3)


class ConstFlow:
    """Fake backend: flow (i -> j) is a uniform field whose magnitude is looked up by pair."""

    exact, pads, name = False, False, "const"

    def __init__(self, video, table):
        self.video, self.table = video, table

    def __call__(self, a, b, padded=False):
        i = next(k for k in range(len(self.video)) if self.video[k] is a or np.shares_memory(self.video[k], a))
        j = next(k for k in range(len(self.video)) if self.video[k] is b or np.shares_memory(self.video[k], b))
        out = np.zeros(a.shape[:2] + (2,), np.float32)
        out[..., 0] = self.table.get((i, j), 0.0)
        return out


def _run(fn, T, H, table, fps=8.0):
    video = np.zeros((T, H, H, 3), np.uint8)
    frames = [video[i] for i in range(T)]
    cache = FlowCache(video, ConstFlow(frames, table))
    cache.video = video
    return fn(video, fps, cache=cache)


def test_static_filter_rule_by_hand():
    # T = 16, 64 x 64: thres = 3 * 64 / 256 = 0.75, count_num = round(2 * 16 / 16) = 2.
    T = 16
    two = {(3, 4): 1.0, (9, 10): 1.0}
    r = _run(static_filter, T, 64, two)
    assert r.details["thres"] == 0.75 and r.details["count_num"] == 2
    assert r.value == 1.0  # two exceed: at most count_num
    three = {**two, (12, 13): 1.0}
    assert _run(static_filter, T, 64, three).value == 0.0  # three > count_num
    # The first/last pairs: <= thres * count_num * 2 = 3.0 px, whatever the consecutive pairs did.
    assert _run(static_filter, T, 64, {**two, (0, 15): 2.9}).value == 1.0
    assert _run(static_filter, T, 64, {(15, 0): 3.1}).value == 0.0
    # T = 4: count_num = round(0.5) = 0 -> any first/last motion (> 0) is not static.
    assert _run(static_filter, 4, 64, {(0, 3): 0.01}).value == 0.0


def test_dynamic_degree_rule_by_hand():
    # fps 24 -> every 3rd frame of 16: 0, 3, ..., 15 -> N = 6 frames, count_num = round(24 / 16) = 2;
    # 64 x 64: thres = 1.5.
    r = _run(dynamic_degree, 16, 64, {(0, 3): 2.0}, fps=24.0)
    assert r.details["frames"] == [0, 3, 6, 9, 12, 15] and r.details["count_num"] == 2
    assert r.details["thres"] == 1.5 and r.value == 0.0  # one pair above, count_num 2
    assert _run(dynamic_degree, 16, 64, {(0, 3): 2.0, (9, 12): 2.0}, fps=24.0).value == 1.0
    # fps 4: round(0.5) = 0 -> step max(1, 0) = 1.
    assert _run(dynamic_degree, 8, 64, {}, fps=4.0).details["frames"] == list(range(8))


def test_top_fraction_mean_by_hand():
    flow = np.zeros((10, 10, 2), np.float32)
    flow[0, :5, 0] = [3, 4, 5, 6, 7]  # top 5 % of 100 px = 5 largest -> mean 5
    assert top_fraction_mean(flow, 0.05) == pytest.approx(5.0)
    assert top_fraction_mean(flow, 0.02) == pytest.approx(6.5)


def test_farneback_identical_frames_zero():
    frame = texture(32, 32)
    assert np.abs(FarnebackFlow()(frame, frame)).max() == 0.0


def test_pixel_backbone_pan_is_closer_than_a_cut():
    from vdit.eval.metrics.backbones import PixelBackbone, dino_preprocess

    a = pan(1, seed=1)
    other = np.clip(pan(1, seed=2).astype(np.float32) * np.array([0.4, 0.9, 1.3], np.float32), 0, 255)
    f = PixelBackbone()(dino_preprocess(np.stack([a[0], a[0], a[1], other[0].astype(np.uint8)])))
    cos = torch.nn.functional.cosine_similarity(f[0:1], f[1:]).tolist()
    assert cos[0] == pytest.approx(1.0, abs=1e-12) and cos[1] > cos[2] + 0.1

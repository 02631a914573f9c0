"""Physics-IQ port (EVAL.md B1): known answers and the original's arithmetic by hand."""

import numpy as np
import pytest

from vdit.eval.metrics.physics_iq import (
    PhysicsIQRecord, compare, mask_roundtrip, motion_masks, physics_iq_record, physics_iq_score, prepare,
)


def moving_square(T=20, H=64, W=64, start=8, speed=2, size=12, value=230, bg=30):
    v = np.full((T, H, W, 3), bg, np.uint8)
    for t in range(T):
        x = start + speed * t
        v[t, 20:20 + size, x:x + size] = value
    return v


def test_first_mask_is_empty_and_motion_is_found():
    m = motion_masks(moving_square())
    assert m.shape == (20, 64, 64) and m[0].max() == 0
    assert set(np.unique(m)) <= {0, 255} and m[5].sum() > 0
    assert motion_masks(np.repeat(moving_square()[:1], 6, axis=0)).max() == 0  # static -> no motion


def test_mask_rule_by_hand():
    # A flat frame then a +40 gray step on a 16 x 16 block (blur 5x5 keeps the block centre at 40):
    # avg = 0.3 * 40 + 0.7 * 0 = 12 (at the centre), |40 - 12| = 28 > 10 -> motion.
    v = np.zeros((3, 32, 32, 3), np.uint8)
    v[1:, 8:24, 8:24] = 40
    m = motion_masks(v)
    assert m[1, 16, 16] == 255 and m[1, 0, 0] == 0
    # frame 2: avg = 0.3 * 40 + 0.7 * 12 = 20.4 -> 20, |40 - 20| = 20 > 10 -> still motion.
    assert m[2, 16, 16] == 255
    v[2:] = v[1]
    v = np.concatenate([v, np.repeat(v[-1:], 3, axis=0)])  # avg 20.4 -> 26.3 -> 30.4 -> 33.3: diffs 14, 10, 7
    m = motion_masks(v)
    assert m[3, 16, 16] == 255 and m[4, 16, 16] == 0  # |40 - 26| = 14 > 10; |40 - 30| = 10 is not > 10


def test_clip_against_itself_scores_100():
    v = moving_square()
    rec = physics_iq_record(v, v, v, fps=4.0, seconds=5.0)
    g = rec.gen
    assert (np.mean(g["spatiotemporal_iou"]), g["spatial_iou"], g["weighted_spatial_iou"]) == (1.0, 1.0, 1.0)
    assert max(g["mse"]) == 0.0
    assert physics_iq_score([rec])["score"] == 100.0


def test_static_vs_moving_spatial_iou_zero():
    moving = moving_square()
    static = np.repeat(moving[:1], len(moving), axis=0)
    g = physics_iq_record(static, moving, fps=4.0).gen
    assert g["spatial_iou"] == 0.0 and g["weighted_spatial_iou"] == 0.0
    stats = physics_iq_score([physics_iq_record(static, moving, fps=4.0)])
    assert stats["score"] is None and stats["A"]["spatial_iou"] == 0.0 and "reason" in stats


def test_compare_by_hand():
    # Two frames of 2 x 2 masks. Frame 0: both empty -> IoU 1. Frame 1: a = {(0,0),(0,1)}, b = {(0,1)} -> 1/2.
    a = [np.zeros((2, 2), np.uint8), np.array([[1, 1], [0, 0]], np.uint8)]
    b = [np.zeros((2, 2), np.uint8), np.array([[0, 1], [0, 0]], np.uint8)]
    fa = [np.zeros((2, 2, 3)), np.ones((2, 2, 3)) * 0.5]
    fb = [np.zeros((2, 2, 3)), np.ones((2, 2, 3)) * 0.25]
    out = compare(fa, a, fb, b)
    assert out["spatiotemporal_iou"] == [1.0, 0.5]
    assert out["spatial_iou"] == 0.5
    # time-averaged: a = [[.5, .5], [0, 0]], b = [[0, .5], [0, 0]] -> sum min / sum max = .5 / 1
    assert out["weighted_spatial_iou"] == 0.5
    assert out["mse"] == [0.0, 0.0625]
    with pytest.raises(ValueError):
        compare(fa, a, fb[:1], b[:1])


def test_prepare_resizes_and_rethresholds():
    v = moving_square(T=4, H=64, W=48)
    frames, masks = prepare(v, motion_masks(v), (12, 16), 3)
    assert len(frames) == 3 and frames[0].shape == (16, 12, 3) and frames[0].max() <= 1.0
    assert masks[0].dtype == np.uint8 and set(np.unique(np.stack(masks))) <= {0, 1}


def test_score_arithmetic_by_hand():
    def rec(scenario, view, st, s, ws, mse, vst, vs, vws, vmse):
        return PhysicsIQRecord(scenario, view, {"spatiotemporal_iou": st, "spatial_iou": s, "weighted_spatial_iou": ws,
                                                "mse": mse},
                               {"spatiotemporal_iou": vst, "spatial_iou": vs, "weighted_spatial_iou": vws, "mse": vmse})
    recs = [rec("a", "left", [0.2, 0.4], 0.5, 0.3, [0.01, 0.03], [0.5, 0.7], 0.8, 0.6, [0.01, 0.01]),
            rec("a", "right", [0.6], 0.7, 0.5, [0.02], [0.9], 1.0, 0.8, [0.03]),
            rec("b", "left", [0.3], 0.1, 0.1, [0.04], [0.4], 0.6, 0.4, [0.02])]
    out = physics_iq_score(recs)
    # A_ST: scenario a: mean(.2, .4, .6) = .4; b: .3 -> .35. A_MSE: a: .02, b: .04 -> .03.
    # A_S: left mean(.5, .1) = .3, right .7 -> .5. A_WS: left .2, right .5 -> .35.
    assert out["A"] == pytest.approx({"spatiotemporal_iou": 0.35, "spatial_iou": 0.5, "weighted_spatial_iou": 0.35,
                                      "mse": 0.03})
    # V_ST: left mean(.5, .7, .4) = .5333, right .9 -> .71667 -> .7167; V_S: left .7, right 1 -> .85;
    # V_WS: left .5, right .8 -> .65; V_MSE: left mean(.01, .01, .02) = .01333, right .03 -> .02167 -> .0217.
    assert out["V"] == {"spatiotemporal_iou": 0.7167, "spatial_iou": 0.85, "weighted_spatial_iou": 0.65, "mse": 0.0217}
    expected = ((0.35 / 0.7167 + 0.5 / 0.85 + 0.35 / 0.65) / 3 - (0.03 - 0.0217)) * 100
    assert out["score"] == round(expected, 2)


def test_mask_roundtrip_keeps_masks_close():
    m = motion_masks(moving_square())
    rt = mask_roundtrip(m, 8.0)
    assert rt.shape == m.shape
    assert np.mean((rt > 127) == (m > 127)) > 0.97

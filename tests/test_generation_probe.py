"""bench/generation_probe.py's one-step scene probe: an exact denoiser finds every ball and background,
a denoiser that predicts x0 = 0 (a gray frame) finds none."""

from __future__ import annotations

import numpy as np
import torch

from bench.generation_probe import T_SCENE_PROBE, one_step_scene_fidelity
from vdit.data.synthetic import caption, random_scene, render
from vdit.eval.fidelity import rescale_scene
from vdit.model.vae import IdentityAutoencoder

H, W, T, FPS = 32, 32, 8, 12.0


def _scenes(n=3):
    out = []
    for seed in range(n):
        p = random_scene(np.random.default_rng(seed), H, W, T, FPS)
        out.append((caption(p), p))
    return out


def _encode_text(captions):
    return torch.zeros(len(captions), 2, 4), torch.ones(len(captions), 2, dtype=torch.bool)


def test_exact_denoiser_finds_every_ball_and_zero_denoiser_none():
    scenes = _scenes()
    x0 = torch.from_numpy(np.stack([render(rescale_scene(p, H, W, T, FPS)) for _, p in scenes]))
    x0 = x0.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (B, 3, T, H, W)

    def exact(xt, t, text, mask):  # the true velocity: (x_t - x0) / t
        return (xt - x0) / t[:, None, None, None, None]

    def zero(xt, t, text, mask):  # x0_hat = 0: a mid-gray frame
        return xt / t[:, None, None, None, None]

    vae = IdentityAutoencoder()
    good = one_step_scene_fidelity(exact, _encode_text, vae, "cpu", scenes, H, W, T, FPS)
    bad = one_step_scene_fidelity(zero, _encode_text, vae, "cpu", scenes, H, W, T, FPS)
    for t in T_SCENE_PROBE:
        assert good[f"ball_found@t={t}"] == 1.0 and good[f"bg_err@t={t}"] < 1.0
        assert bad[f"ball_found@t={t}"] == 0.0 and bad[f"bg_err@t={t}"] > 30.0
    assert one_step_scene_fidelity(exact, _encode_text, vae, "cpu", [], H, W, T, FPS) == {}

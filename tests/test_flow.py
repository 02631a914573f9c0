"""Flow-matching math: interpolation, target, timestep sampling and shift, loss, Euler ODE, CFG."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vdit.model import flow


def test_interpolate_endpoints_exact():
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    assert torch.equal(flow.interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(flow.interpolate(x0, noise, torch.ones(3)), noise)
    mid = flow.interpolate(x0, noise, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(mid[0], x0[0]) and torch.equal(mid[2], noise[2])
    assert torch.allclose(mid[1], 0.5 * (x0[1] + noise[1]))


def test_velocity_target_is_time_derivative():
    x0, noise = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    t, h = torch.tensor([0.3, 0.8], dtype=torch.float64), 1e-6
    fd = (flow.interpolate(x0, noise, t + h) - flow.interpolate(x0, noise, t - h)) / (2 * h)
    assert torch.allclose(fd, flow.velocity_target(x0, noise), atol=1e-6)


def test_shift_identity_monotone_and_fixed_endpoints():
    t = torch.linspace(0, 1, 101)
    assert torch.equal(flow.shift_timesteps(t, 1.0), t)
    for s in (0.5, 3.0, 10.0):
        ts = flow.shift_timesteps(t, s)
        assert (ts[1:] > ts[:-1]).all()
        assert ts[0] == 0.0 and ts[-1] == 1.0
    assert (flow.shift_timesteps(t[1:-1], 3.0) > t[1:-1]).all()  # shift > 1 moves toward noise
    with pytest.raises(ValueError):
        flow.shift_timesteps(t, 0.0)
    assert flow.resolution_shift(4096, 1024) == pytest.approx(2.0)
    assert flow.resolution_shift(1024, 1024, base_shift=3.0) == pytest.approx(3.0)


def test_timestep_sampling_range_and_determinism():
    for mode in ("logit_normal", "uniform"):
        a = flow.sample_timesteps(4096, torch.Generator().manual_seed(1), mode=mode)
        b = flow.sample_timesteps(4096, torch.Generator().manual_seed(1), mode=mode)
        assert a.shape == (4096,) and a.dtype == torch.float32
        assert torch.equal(a, b)
        assert (a > 0).all() and (a < 1).all()
    t = flow.sample_timesteps(20000, torch.Generator().manual_seed(0), logit_mean=0.0, logit_std=1.0)
    logits = torch.log(t / (1 - t))
    assert abs(logits.mean().item()) < 0.05 and abs(logits.std().item() - 1.0) < 0.05
    with pytest.raises(ValueError, match="logit_normal"):
        flow.sample_timesteps(2, mode="cosine")


def test_uniform_frac_mixes_uniform_times_into_the_logit_normal():
    """uniform_frac=0 is the plain stream; 0.2 covers the ends (t > 0.97: 0.03 % -> ~0.6 %) and keeps
    80 % of the logit-normal's draws."""
    plain = flow.sample_timesteps(50000, torch.Generator().manual_seed(2))
    assert torch.equal(plain, flow.sample_timesteps(50000, torch.Generator().manual_seed(2), uniform_frac=0.0))
    mixed = flow.sample_timesteps(50000, torch.Generator().manual_seed(2), uniform_frac=0.2)
    assert (mixed > 0).all() and (mixed < 1).all()
    assert float((plain > 0.97).float().mean()) < 0.001
    assert 0.2 * 0.03 * 0.7 < float((mixed > 0.97).float().mean()) < 0.2 * 0.03 * 1.3 + 0.001
    assert abs(float((mixed == plain).float().mean()) - 0.8) < 0.01  # the other 80 % are the plain draws
    tail = flow.sample_timesteps(50000, torch.Generator().manual_seed(2), uniform_frac=0.1, uniform_min=0.85)
    drawn = tail[tail != plain]  # U(0.85, 1): 10 % of the draws, none below 0.85
    assert abs(drawn.numel() / 50000 - 0.1) < 0.01 and float(drawn.min()) >= 0.85
    assert abs(float((tail > 0.97).float().mean()) - 0.1 * 0.03 / 0.15) < 0.004


def test_sampling_timesteps_schedule():
    ts = flow.sampling_timesteps(8, shift=3.0)
    assert ts.shape == (9,) and ts[0] == 1.0 and ts[-1] == 0.0
    assert (ts[1:] < ts[:-1]).all()
    with pytest.raises(ValueError):
        flow.sampling_timesteps(0)


@pytest.mark.parametrize("num_steps", [1, 3, 10])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_with_exact_velocity_recovers_data(num_steps, shift):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 4, 4, generator=g)
    calls = []

    def velocity_fn(x, t):
        calls.append(t)
        assert t.shape == (2,)
        return flow.velocity_target(x0, noise)

    out = flow.sample_ode(velocity_fn, noise, num_steps, shift=shift)
    assert len(calls) == num_steps
    assert torch.allclose(out, x0, atol=1e-5)


def test_euler_step_and_cfg_combine():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(flow.euler_step(x, v, 1.0, 0.75), x - 0.25 * v)
    assert torch.allclose(flow.euler_step(x, v, torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.5])),
                          torch.stack([x[0] - 0.5 * v[0], x[1]]))
    vc, vu = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(flow.cfg_combine(vc, vu, 1.0), vc, atol=1e-6)
    assert torch.equal(flow.cfg_combine(vc, vu, 0.0), vu)
    assert torch.allclose(flow.cfg_combine(vc, vu, 5.0), vu + 5.0 * (vc - vu))


def test_flow_loss():
    pred, target = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    per_sample, mean = flow.flow_loss(pred, target)
    assert per_sample.shape == (4,)
    assert torch.allclose(mean, F.mse_loss(pred, target))
    w = torch.tensor([1.0, 0.0, 2.0, 1.0])
    per_w, _ = flow.flow_loss(pred, target, w)
    assert torch.allclose(per_w, per_sample * w)
    with pytest.raises(ValueError):
        flow.flow_loss(pred, target[:, :2])
    assert math.isclose(flow.flow_loss(target, target)[1].item(), 0.0)


def test_foreground_weights_mark_the_moving_object_and_leave_static_scenes_at_one():
    static = torch.rand(2, 3, 1, 6, 6).expand(2, 3, 5, 6, 6)  # (B, C, T, H, W), no motion
    assert torch.equal(flow.foreground_weights(static, 10.0), torch.ones(2, 1, 5, 6, 6))
    video = torch.full((1, 3, 5, 6, 6), -1.0)  # black background, a white dot moving right
    for t in range(5):
        video[0, :, t, 2, t] = 1.0
    w = flow.foreground_weights(video, 10.0)  # deviation 2 on the dot, 0 elsewhere
    expected = torch.ones(1, 1, 5, 6, 6)
    for t in range(5):
        expected[0, 0, t, 2, t] = 21.0
    assert torch.equal(w, expected)
    assert torch.equal(flow.foreground_weights(video, 0.0), torch.ones(1, 1, 5, 6, 6))
    # the weights multiply each element's squared error
    pred, target = torch.zeros(1, 3, 5, 6, 6), video
    per_sample, _ = flow.flow_loss(pred, target, element_weight=w)
    assert torch.allclose(per_sample, (w * target.square()).mean().reshape(1))
    with pytest.raises(ValueError, match="strength"):
        flow.foreground_weights(video, -1.0)
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        flow.foreground_weights(video[0], 1.0)


def test_heun_is_second_order_and_counts_evaluations():
    # dx/dt = -x / (1 + t) has the exact solution x(0) = x(1) * 2 (x(t) (1 + t) is constant).
    x1 = torch.ones(3, 2)
    calls = []

    def velocity_fn(x, t):
        calls.append(t)
        return x / (1 + t[:, None])  # dx/dt with x(t)(1+t) = const -> dx/dt = -x/(1+t); time runs 1 -> 0

    def err(solver, steps):
        calls.clear()
        out = flow.sample_ode(lambda x, t: -velocity_fn(x, t), x1, steps, solver=solver)
        return (out - 2 * x1).abs().max().item(), len(calls)

    e_euler_4, n_euler = err("euler", 4)
    e_euler_8, _ = err("euler", 8)
    e_heun_4, n_heun = err("heun", 4)
    e_heun_8, _ = err("heun", 8)
    assert n_euler == 4 and n_heun == 2 * 4 - 1  # the last step ends at t = 0 and stays Euler
    assert 1.7 < e_euler_4 / e_euler_8 < 2.3  # first order
    assert e_heun_4 < e_euler_4 / 2 and e_heun_8 < e_heun_4 / 3  # second order (the final Euler step costs a bit)
    with pytest.raises(ValueError, match="solver"):
        flow.sample_ode(velocity_fn, x1, 2, solver="rk4")


def test_x0_velocity_conversions_invert_each_other():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t = torch.tensor([0.2, 0.5, 1.0])
    xt = flow.interpolate(x0, noise, t)
    v = flow.velocity_from_x0(x0, xt, t)
    assert torch.allclose(v, flow.velocity_target(x0, noise), atol=1e-5)  # the exact x0 gives the exact velocity
    assert torch.allclose(flow.x0_from_velocity(xt, v, t), x0, atol=1e-5)
    # below t_min the division is clamped: (x_t - x0) / t_min
    small = torch.tensor([0.01, 0.01, 0.01])
    xs = flow.interpolate(x0, noise, small)
    assert torch.allclose(flow.velocity_from_x0(x0, xs, small, t_min=0.05), (xs - x0) / 0.05)
    with pytest.raises(ValueError, match="t_min"):
        flow.velocity_from_x0(x0, xt, t, t_min=0.0)


def test_edm_preconditioning_is_edms_estimate_in_velocity_form():
    """v = c_vx x_t + c_vf F is the velocity of EDM's x0_hat = c_skip x_t + c_out F (Karras et al. 2022,
    Table 1, at noise level t / (1 - t) on x_t / (1 - t)); it is x_t near data and an x0 prediction at t = 1."""
    g = torch.Generator().manual_seed(0)
    xt, F = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])[:, None]
    for sigma in (0.5, 1.3):
        c_in, c_vx, c_vf = flow.edm_preconditioning(t, sigma)
        v = c_vx * xt + c_vf * F
        # EDM in its own variables: y = x_t / (1 - t), noise level s = t / (1 - t) (t < 1)
        s, y = t[:-1] / (1 - t[:-1]), xt[:-1] / (1 - t[:-1])
        c_skip, c_out = sigma ** 2 / (s ** 2 + sigma ** 2), s * sigma / (s ** 2 + sigma ** 2).sqrt()
        x0_edm = c_skip * y + c_out * F[:-1]
        assert torch.allclose(flow.x0_from_velocity(xt[:-1], v[:-1], t[:-1]), x0_edm, atol=1e-5)
        assert torch.allclose((c_in * xt)[:-1], y / (s ** 2 + sigma ** 2).sqrt(), atol=1e-5)  # EDM's c_in y
        assert torch.allclose(flow.x0_from_velocity(xt, v, t)[0], xt[0])  # t = 0: the input itself
        assert torch.allclose(flow.x0_from_velocity(xt, v, t)[-1], sigma * F[-1])  # t = 1: sigma_data F
    with pytest.raises(ValueError, match="sigma_data"):
        flow.edm_preconditioning(t, 0.0)

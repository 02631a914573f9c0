"""Rectified-flow / flow-matching math as pure functions.

Convention (rectified flow, Liu et al. 2022; flow matching, Lipman et al. 2022; as used by SD3,
Esser et al. 2024): ``t = 0`` is data, ``t = 1`` is Gaussian noise, the path is the straight line
``x_t = (1 - t) x0 + t * noise`` and the network regresses the constant velocity
``dx_t/dt = noise - x0``. Sampling integrates the ODE from ``t = 1`` down to ``t = 0``.

Classifier-free guidance (Ho & Salimans 2022) lives in the velocity function passed to
:func:`sample_ode`; :func:`cfg_combine` is the combination rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "interpolate",
    "velocity_target",
    "sample_timesteps",
    "shift_timesteps",
    "resolution_shift",
    "flow_loss",
    "foreground_weights",
    "euler_step",
    "heun_step",
    "sampling_timesteps",
    "cfg_combine",
    "sample_ode",
    "PREDICTIONS",
    "SOLVERS",
    "edm_preconditioning",
    "velocity_from_x0",
    "x0_from_velocity",
]

PREDICTIONS = ("velocity", "x0", "edm")  # what the network's raw output means (DiTConfig.prediction)
SOLVERS = ("euler", "heun")

_T_EPS = 1e-5  # sampled training times are clamped to [eps, 1 - eps] so they lie strictly inside (0, 1)


def _expand(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """``(B,)`` -> ``(B, 1, ..., 1)`` broadcastable to ``like``; floats pass through."""
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        return t.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return t


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Point on the straight path: ``x_t = (1 - t) x0 + t noise``.

    Args:
        x0: ``(B, ...)`` clean latents.
        noise: ``(B, ...)`` standard normal, same shape.
        t: ``(B,)`` times in ``[0, 1]`` (or a float), broadcast over the non-batch dims.

    Returns:
        ``(B, ...)``; exactly ``x0`` at ``t = 0`` and exactly ``noise`` at ``t = 1``.
    """
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Regression target ``d x_t / d t = noise - x0``, shape of ``x0``."""
    return noise - x0


def velocity_from_x0(x0_pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float,
                     t_min: float = 0.05) -> torch.Tensor:
    """Velocity implied by a clean-data prediction: ``v = (x_t - x0_pred) / max(t, t_min)``.

    On the straight path ``x_t = (1 - t) x0 + t noise`` the velocity is ``noise - x0 = (x_t - x0) / t``.
    Predicting ``x0`` and converting ("x-prediction, v-loss": Li & He 2025, "Back to Basics: Let
    Denoising Generative Models Denoise", arXiv 2511.13720) spares the network from reproducing its
    own input near ``t = 1``, where a velocity network must output ``x_t - E[x0 | text]``. ``t_min``
    bounds the division near data (the paper clips at 0.05).

    Args:
        x0_pred, x_t: ``(B, ...)``. t: ``(B,)`` or a float in ``[0, 1]``.

    Returns:
        ``(B, ...)`` velocity in the dtype of ``x_t``.

    Raises:
        ValueError: if ``t_min`` is not in ``(0, 1]``.
    """
    if not 0.0 < t_min <= 1.0:
        raise ValueError(f"t_min must be in (0, 1]; got {t_min}")
    t = _expand(t, x_t)
    t = t.clamp_min(t_min) if isinstance(t, torch.Tensor) else max(float(t), t_min)
    return (x_t - x0_pred) / t


def edm_preconditioning(t: torch.Tensor | float, sigma_data: float = 0.5) -> tuple:
    """EDM's preconditioning (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
    Generative Models", Table 1) on the straight path ``x_t = (1 - t) x0 + t noise``.

    With ``D = sqrt(t^2 + sigma_data^2 (1 - t)^2)`` (the std of ``x_t`` for data of std ``sigma_data``),
    the network ``F`` sees ``c_in x_t`` and the clean estimate is ``x0_hat = c_skip x_t + c_out F``
    with ``c_in = 1 / D``, ``c_skip = sigma_data^2 (1 - t) / D^2``, ``c_out = t sigma_data / D``:
    EDM's coefficients at noise level ``t / (1 - t)`` after rescaling ``x_t`` by ``1 / (1 - t)``.
    Near data (``t -> 0``) the estimate is ``x_t`` plus a small learned correction, so fine detail
    passes through the skip term instead of through the network; at ``t = 1`` it is ``sigma_data F``,
    an x0 prediction. This returns the velocity form ``v = (x_t - x0_hat) / t = c_vx x_t + c_vf F``
    with ``c_vx = (t - sigma_data^2 (1 - t)) / D^2`` and ``c_vf = -sigma_data / D``: finite at every
    ``t`` in ``[0, 1]``, with no division by ``t``.

    Args:
        t: ``(B,)`` or ``(B, 1, ..., 1)`` flow times in ``[0, 1]``, or a float.
        sigma_data: the data's standard deviation (EDM's 0.5 for pixels in ``[-1, 1]``).

    Returns:
        ``(c_in, c_vx, c_vf)``, each shaped like ``t``.

    Raises:
        ValueError: if ``sigma_data <= 0``.
    """
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0; got {sigma_data}")
    s2 = float(sigma_data) ** 2
    d2 = t * t + s2 * (1 - t) * (1 - t)
    d = d2 ** 0.5
    return 1 / d, (t - s2 * (1 - t)) / d2, -float(sigma_data) / d


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """One-step clean-data estimate from a velocity: ``x0_hat = x_t - t v`` (exact for the true velocity).

    Args: ``x_t, v``: ``(B, ...)``; ``t``: ``(B,)`` or a float. Returns ``(B, ...)``.
    """
    return x_t - _expand(t, x_t) * v


def sample_timesteps(
    batch_size: int,
    generator: torch.Generator | None = None,
    mode: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device: torch.device | str | None = None,
    uniform_frac: float = 0.0,
    uniform_min: float = 0.0,
) -> torch.Tensor:
    """Training times ``t in (0, 1)``, shape ``(B,)`` float32.

    ``logit_normal``: ``t = sigmoid(u)``, ``u ~ N(logit_mean, logit_std^2)`` (SD3, Esser et al. 2024,
    Sec. 3.1), which concentrates training on intermediate times. ``uniform``: ``t ~ U(0, 1)``.
    ``uniform_frac`` > 0 (with ``logit_normal``): each time is instead drawn uniformly with that
    probability, a mixture that keeps the logit-normal's mid-range focus and covers both ends,
    where the logit-normal puts almost nothing (``P(t > 0.97)`` = 0.03 % for ``N(0, 1)``) and
    sampling starts (``t = 1``); 0 draws exactly the plain logit-normal stream. ``uniform_min``:
    those uniform times are drawn from ``U(uniform_min, 1)`` (before any shift), to cover only the
    noisy end.
    Values are clamped to ``[1e-5, 1 - 1e-5]``. Draws happen on the generator's device (CPU when no
    generator is given) and are then moved to ``device``, so a seeded CPU generator gives the same
    numbers on every device.

    Raises:
        ValueError: for an unknown ``mode``.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if mode == "logit_normal":
        u = torch.randn(batch_size, generator=generator, device=gen_device) * logit_std + logit_mean
        t = torch.sigmoid(u)
        if uniform_frac > 0:
            pick = torch.rand(batch_size, generator=generator, device=gen_device) < uniform_frac
            u01 = torch.rand(batch_size, generator=generator, device=gen_device)
            t = torch.where(pick, uniform_min + (1.0 - uniform_min) * u01, t)
    elif mode == "uniform":
        t = torch.rand(batch_size, generator=generator, device=gen_device)
    else:
        raise ValueError(f"unknown timestep sampling mode {mode!r}; valid: 'logit_normal', 'uniform'")
    return t.clamp(_T_EPS, 1 - _T_EPS).to(device if device is not None else gen_device)


def shift_timesteps(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Timestep shift ``t' = shift * t / (1 + (shift - 1) t)`` (SD3, Esser et al. 2024, eq. 23).

    Monotone, fixes 0 and 1, identity at ``shift = 1``; ``shift > 1`` moves times toward noise
    (``t = 1``), which larger resolutions need because more tokens average away more noise.

    Raises:
        ValueError: if ``shift <= 0``.
    """
    if shift <= 0:
        raise ValueError(f"flow_shift must be > 0; got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_tokens: int, base_shift: float = 1.0) -> float:
    """Resolution-dependent shift ``base_shift * sqrt(num_tokens / base_tokens)``.

    SD3 (Esser et al. 2024, Sec. 5.3.2) derives ``alpha = sqrt(m / n)`` for moving from ``n`` to
    ``m`` pixels/tokens at equal signal-to-noise ratio; ``base_shift`` is the shift tuned at
    ``base_tokens``. Use the result as ``shift`` in :func:`shift_timesteps`.

    Raises:
        ValueError: if any argument is not positive.
    """
    if num_tokens <= 0 or base_tokens <= 0 or base_shift <= 0:
        raise ValueError(
            f"num_tokens, base_tokens, base_shift must be > 0; got {num_tokens}, {base_tokens}, {base_shift}"
        )
    return base_shift * math.sqrt(num_tokens / base_tokens)


def foreground_weights(x0: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-element loss weights that favour what differs from the clip's static background.

    ``w = 1 + strength * mean_c |x0 - median_T(x0)|``: the temporal median of each position over
    the clip's frames estimates the static background, so a moving object gets weight along its
    whole path while a static scene keeps weight 1. In a small clip a moving object covers a few
    percent of the elements and hence of the plain MSE; this lets the loss see it.

    The weights depend on the clean target, so they move the loss minimiser away from
    ``E[x0 | x_t]``: where the object's position is unknown (high noise) the optimum is a mean in
    which the object's colour counts ``w`` times, and strong weights make samples paint clouds of
    that colour. Weights computed from the noisy input instead keep the minimiser but did not help
    (docs/training-recipe.md has both measurements), so this is a trade-off knob, off by default.

    Args:
        x0: ``(B, C, T, H, W)`` clean latents (pixels in [-1, 1] for the identity autoencoder).
        strength: weight per unit of absolute deviation (latent units); 0 gives all ones.

    Returns:
        float32 ``(B, 1, T, H, W)`` weights >= 1, to broadcast over channels.

    Raises:
        ValueError: ``x0`` not 5-D, or a negative ``strength``.
    """
    if x0.ndim != 5:
        raise ValueError(f"x0 must be (B, C, T, H, W); got shape {tuple(x0.shape)}")
    if strength < 0:
        raise ValueError(f"strength must be >= 0; got {strength}")
    x = x0.detach().float().contiguous()  # median over a stride-0 (expanded) dim is wrong in torch 2.13
    background = x.median(dim=2, keepdim=True).values  # (B, C, 1, H, W)
    return 1.0 + strength * (x - background).abs().mean(dim=1, keepdim=True)  # (B, 1, T, H, W)


def flow_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
    element_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching MSE, computed in fp32.

    Args:
        pred, target: ``(B, ...)`` predicted and target velocity.
        weight: optional ``(B,)`` per-sample weights (e.g. a timestep weighting).
        element_weight: optional per-element weights broadcastable to ``pred`` (e.g.
            :func:`foreground_weights`, ``(B, 1, T, H, W)``); the squared error is multiplied by it
            before the mean.

    Returns:
        ``(per_sample (B,), mean scalar)``: per-sample MSE over all non-batch dims (times
        ``weight`` if given) and its mean over the batch.

    Raises:
        ValueError: if shapes differ.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    sq = (pred.float() - target.float()).square()
    if element_weight is not None:
        sq = sq * element_weight.float()
    per_sample = sq.flatten(1).mean(dim=1)  # (B,)
    if weight is not None:
        per_sample = per_sample * weight.float()
    return per_sample, per_sample.mean()


def euler_step(
    x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, t_next: torch.Tensor | float
) -> torch.Tensor:
    """One explicit Euler step of ``dx/dt = v``: ``x + (t_next - t) v``.

    ``x, v``: ``(B, ...)``; ``t, t_next``: floats or ``(B,)``. Going toward data, ``t_next < t``.
    """
    dt = _expand(t_next, x) - _expand(t, x)  # float, 0-d, or (B, 1, ..., 1)
    return x + dt * v


def heun_step(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
) -> torch.Tensor:
    """One Heun (explicit trapezoidal, 2nd order) step of ``dx/dt = v`` (Karras et al. 2022, Alg. 1).

    Takes the Euler proposal ``x' = x + (t_next - t) v``, evaluates ``v' = velocity_fn(x', t_next)``
    and returns ``x + (t_next - t) (v + v') / 2``. A step that ends at ``t_next = 0`` stays an Euler
    step (as in EDM), so ``N`` Heun steps cost ``2N - 1`` network evaluations.

    Args:
        velocity_fn: ``(x (B, ...), t (B,)) -> v (B, ...)``.
        x, v: ``(B, ...)`` state and its velocity at ``t``. t, t_next: 0-d tensors.
    """
    x_euler = euler_step(x, v, t, t_next)
    if float(t_next) == 0.0:
        return x_euler
    v_next = velocity_fn(x_euler, t_next.expand(x.shape[0]))  # (B, ...)
    return euler_step(x, (v + v_next) / 2, t, t_next)


def sampling_timesteps(
    num_steps: int, shift: float = 1.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Inference schedule: ``(num_steps + 1,)`` float32 from 1 down to 0, uniform then shifted
    with :func:`shift_timesteps` (endpoints stay exactly 1 and 0).

    Raises:
        ValueError: if ``num_steps < 1`` or ``shift <= 0``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, device=device, dtype=torch.float32)
    return shift_timesteps(t, shift)


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``v_uncond + cfg_scale (v_cond - v_uncond)``.

    ``cfg_scale = 1`` returns the conditional velocity, ``0`` the unconditional one.
    """
    return v_uncond + cfg_scale * (v_cond - v_uncond)


@torch.no_grad()
def sample_ode(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    num_steps: int,
    shift: float = 1.0,
    solver: str = "euler",
    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate ``dx/dt = velocity_fn(x, t)`` from ``t = 1`` (noise) to ``t = 0`` (data).

    Guidance belongs in ``velocity_fn``, for example::

        def velocity_fn(x, t):
            v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, null_text]),
                      torch.cat([mask, null_mask]))
            return cfg_combine(*v.chunk(2), cfg_scale)

    Args:
        velocity_fn: ``(x (B, ...), t (B,) float32) -> v (B, ...)``.
        noise: ``(B, ...)`` start point at ``t = 1``.
        num_steps: solver steps (Euler: ``num_steps`` network evaluations; Heun: ``2 num_steps - 1``).
        shift: timestep shift of the schedule (:func:`sampling_timesteps`).
        solver: ``"euler"`` or ``"heun"`` (:func:`heun_step`).
        callback: called as ``callback(i, x, t (B,), v)`` before step ``i`` moves ``x`` (e.g. to
            record ``x0_from_velocity(x, v, t)`` along the trajectory).

    Returns:
        ``(B, ...)`` sample at ``t = 0``, dtype of ``noise``.

    Raises:
        ValueError: an unknown ``solver`` (and see :func:`sampling_timesteps`).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {list(SOLVERS)}")
    times = sampling_timesteps(num_steps, shift, device=noise.device)  # (S + 1,)
    x = noise
    for i in range(num_steps):
        t = times[i].expand(x.shape[0])  # (B,)
        v = velocity_fn(x, t)  # (B, ...)
        if callback is not None:
            callback(i, x, t, v)
        if solver == "heun":
            x = heun_step(velocity_fn, x, v, times[i], times[i + 1])  # (B, ...)
        else:
            x = euler_step(x, v, times[i], times[i + 1])  # (B, ...)
    return x

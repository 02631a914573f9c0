"""Frechet distance / MMD known answers (EVAL.md C) and FVD with a tiny TorchScript I3D stand-in."""

import numpy as np
import pytest
import torch

from vdit.eval.metrics.base import MissingWeightsError
from vdit.eval.metrics.distribution import (
    frechet_distance, fvd, gaussian_stats, i3d_features, kvd, load_i3d, mmd2_polynomial,
)


def test_same_statistics_give_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    mu, sigma = gaussian_stats(x)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(float(np.sum((mu1 - mu2) ** 2)), rel=1e-8)


def test_one_dimensional_closed_form():
    # N(0, 4) vs N(3, 1): (0 - 3)^2 + 4 + 1 - 2 * sqrt(4 * 1) = 9 + 5 - 4 = 10
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(10.0)


def test_diagonal_closed_form():
    # Diagonal: sum (s1 - s2)^2 over standard deviations, plus ||dmu||^2.
    s1, s2 = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 1.0])
    value = frechet_distance(np.zeros(3), np.diag(s1 ** 2), np.ones(3), np.diag(s2 ** 2))
    assert value == pytest.approx(3 + 1 + 0 + 4)


def test_mmd_by_hand():
    # d = 1, kernel (xy + 1)^3. x = {0, 1}, y = {0, 2}:
    # k_xx off-diagonal: (0 + 1)^3 = 1 (twice) -> mean 1; k_yy off-diagonal: 1 -> 1;
    # k_xy: (0,0)=1, (0,2)=1, (1,0)=1, (1,2)=27 -> mean 7.5; MMD^2 = 1 + 1 - 15 = -13
    assert mmd2_polynomial(np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])) == pytest.approx(-13.0)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) + 2.0
    assert abs(mmd2_polynomial(a, rng.normal(size=(300, 4)))) < 0.2 < mmd2_polynomial(a, b)


class MeanPool(torch.nn.Module):
    """Stand-in for I3D: (N, 3, T, H, W) -> (N, 6): per-channel mean and std."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)


def test_fvd_with_local_torchscript(tmp_path):
    path = tmp_path / "i3d.pt"
    torch.jit.script(MeanPool()).save(str(path))
    model = load_i3d(str(path))
    rng = np.random.default_rng(3)
    real = [rng.integers(0, 128, (4, 16, 16, 3), dtype=np.uint8) for _ in range(4)]
    gen = [rng.integers(100, 256, (4, 16, 16, 3), dtype=np.uint8) for _ in range(4)]
    feats = i3d_features(real, model)
    assert feats.shape == (4, 6)
    same = fvd(real, real, model)
    assert same.name == "fvd" and same.exact is False and same.value == pytest.approx(0.0, abs=1e-6)
    assert fvd(real, gen, model).value > 0.1
    assert kvd(real, gen, model).value > 0.0


def test_missing_i3d_path_names_metric_and_setting(tmp_path):
    with pytest.raises(MissingWeightsError, match="fvd.*weights.i3d"):
        load_i3d(str(tmp_path / "nope.pt"))
    with pytest.raises(MissingWeightsError, match="fvd"):
        load_i3d(None)


def test_fvd_through_the_registry(tmp_path):
    from vdit.eval.metrics.registry import Inputs, score_set

    path = tmp_path / "i3d.pt"
    torch.jit.script(MeanPool()).save(str(path))
    rng = np.random.default_rng(4)
    vids = [rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8) for _ in range(3)]
    items = [Inputs(v, 8.0, reference=v) for v in vids]
    out = score_set(items, "all", weights={"i3d": str(path)})
    assert out["metrics"]["fvd"]["value"] == pytest.approx(0.0, abs=1e-6) and out["metrics"]["fvd"]["count"] == 3
    assert "kvd" in out["metrics"]
    assert "i3d" in score_set(items[:1], "all")["skipped"]["fvd"]

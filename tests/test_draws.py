"""Per-sample training draws (vdit.train.draws) and pinned batches: layout-independent, exact, on the right device."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import write_shards
from vdit.data.pipeline import ClipSpec, VideoPipeline
from vdit.train.config import FlowConfig
from vdit.train.draws import resolve_noise_device, sample_draws

SHAPE = (4, 2, 8, 8)
CPU = torch.device("cpu")


def draws(keys, step=3, noise_device=None, seed=0):
    return sample_draws(keys, SHAPE, seed=seed, step=step, caption_dropout=0.5, flow_cfg=FlowConfig(), shift=3.0,
                        noise_device=noise_device)


@pytest.mark.parametrize("noise_device", [None, CPU])
def test_a_samples_draws_do_not_depend_on_its_batch(noise_device):
    """The same key draws the same t, noise and dropout alone or in any batch (so in any rank layout)."""
    t, noise, drop = draws(["a", "b", "c", "d"], noise_device=noise_device)
    for i, key in enumerate("abcd"):
        t1, n1, d1 = draws([key], noise_device=noise_device)
        assert torch.equal(t1[0], t[i]) and torch.equal(n1[0], noise[i]) and d1[0] == drop[i]
    t2, n2, _ = draws(["d", "b"], noise_device=noise_device)
    assert torch.equal(n2[0], noise[3]) and torch.equal(t2[1], t[1])


@pytest.mark.parametrize("noise_device", [None, CPU])
def test_draws_change_with_step_seed_and_repeat(noise_device):
    _, noise, _ = draws(["a", "a"], noise_device=noise_device)
    assert not torch.equal(noise[0], noise[1])  # a clip twice in one step gets fresh draws
    assert not torch.equal(draws(["a"], step=4, noise_device=noise_device)[1][0], noise[0])
    assert not torch.equal(draws(["a"], seed=1, noise_device=noise_device)[1][0], noise[0])
    assert noise.dtype == torch.float32 and tuple(noise.shape) == (2, *SHAPE)
    assert abs(float(noise.mean())) < 0.2 and abs(float(noise.std()) - 1) < 0.2


def test_device_noise_keeps_t_and_dropout_and_draws_other_noise():
    """noise_device=device draws noise from a second seed word: t and dropout are the host stream's."""
    keys = [f"k{i}" for i in range(16)]
    th, nh, dh = draws(keys)
    td, nd, dd = draws(keys, noise_device=CPU)
    assert torch.equal(th, td) and dh == dd
    assert not torch.equal(nh, nd)
    assert nd.device == CPU


def test_flow_config_reaches_the_timestep_draws():
    """flow.uniform_frac / uniform_min travel from the config into every sample's t (then shifted)."""
    from vdit.model import flow

    cfg = FlowConfig(uniform_frac=1.0, uniform_min=0.99)
    t, _, _ = sample_draws([f"k{i}" for i in range(64)], SHAPE, seed=0, step=1, caption_dropout=0.0,
                           flow_cfg=cfg, shift=3.0)
    assert float(t.min()) >= flow.shift_timesteps(0.99, 3.0) - 1e-6


def test_resolve_noise_device():
    assert resolve_noise_device("auto", CPU) is None
    assert resolve_noise_device("host", torch.device("cuda", 0)) is None
    assert resolve_noise_device("auto", torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert resolve_noise_device("device", CPU) == CPU
    with pytest.raises(ValueError, match="noise_device"):
        resolve_noise_device("gpu", CPU)


@pytest.mark.parametrize("video_dtype", ["float32", "uint8"])
def test_pipeline_pins_every_tensor_of_a_batch(tmp_path, monkeypatch, video_dtype):
    """pin_memory=True pins each batch tensor once (CPU-only torch cannot pin: the call is recorded)."""
    write_shards(str(tmp_path), 2, 4)
    pinned = []

    def fake_pin(self):
        pinned.append(self.dtype)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    spec = ClipSpec(4, 32, 32, None, 2)
    batch = next(iter(VideoPipeline(str(tmp_path), spec, 2, video_dtype=video_dtype, pin_memory=True)))
    assert batch["video"].dtype == (torch.uint8 if video_dtype == "uint8" else torch.float32)
    assert batch["video"].dtype in pinned and len(pinned) == sum(isinstance(v, torch.Tensor) for v in batch.values())
    pinned.clear()
    next(iter(VideoPipeline(str(tmp_path), spec, 2, video_dtype=video_dtype)))
    assert pinned == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_pinned_and_noise_is_drawn_on_the_device(tmp_path):
    write_shards(str(tmp_path), 2, 4)
    batch = next(iter(VideoPipeline(str(tmp_path), ClipSpec(4, 32, 32, None, 2), 2, video_dtype="uint8",
                                    pin_memory=True)))
    assert batch["video"].is_pinned()
    dev = torch.device("cuda")
    _, noise, _ = draws(["a", "b"], noise_device=resolve_noise_device("auto", dev))
    assert noise.device.type == "cuda"
    assert torch.equal(draws(["b"], noise_device=dev)[1][0], noise[1])

"""Training: a resumed run equals the uninterrupted one; loss falls; checkpoints rotate; bad data is counted."""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import write_shards
from vdit.model import flow
from vdit.train.config import load_config, validate
from vdit.train.logging import read_metrics
from vdit.train.trainer import Trainer


def tiny_cfg(shards, run_dir, *extra):
    return validate(load_config([
        f"data.shards={shards}", f"run_dir={run_dir}", "text_encoder.name=random", "text_encoder.hidden_size=32",
        "text_encoder.max_length=8", "data.num_frames=4", "data.height=32", "data.width=32", "data.target_fps=null",
        "data.frame_stride=2", "data.batch_size=2", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
        "model.patch_size=[1,8,8]", "train.steps=6", "train.checkpoint_every=2", "train.log_every=2",
        "optim.warmup_steps=2", "wandb.mode=disabled", "eval.enabled=false", *extra]))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_shards")
    write_shards(str(d), 3, 4)
    return str(d)


def losses(run_dir):
    rows = {r["step"]: r["loss/train"] for r in read_metrics(run_dir) if "loss/train" in r}
    return [rows[s] for s in sorted(rows)]


# the last case takes the CUDA defaults' paths on CPU: noise drawn by per-sample device generators,
# uint8 frames normalised by the trainer
@pytest.mark.parametrize("accum,extra", [(1, ()), (2, ()), (1, ("train.noise_device=device", "data.video_dtype=uint8"))])
def test_resume_reproduces_uninterrupted_losses_exactly(shards, tmp_path, accum, extra):
    full = Trainer(tiny_cfg(shards, tmp_path / "full", f"train.grad_accum_steps={accum}", *extra))
    full.fit()
    cfg = tiny_cfg(shards, tmp_path / "split", f"train.grad_accum_steps={accum}", *extra)
    Trainer(cfg).fit(stop_at=3)  # an interrupted job: checkpoint at step 3, process gone
    resumed = Trainer(cfg)  # fresh objects, resume=auto
    resumed.fit()
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    assert len(losses(tmp_path / "full")) == 6
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n
    for n, a in full.ema.shadow.items():
        assert torch.equal(a, resumed.ema.shadow[n]), n
    assert full.data.state_dict() == resumed.data.state_dict()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda_matches_within_the_stated_tolerance(shards, tmp_path):
    """On CUDA (bf16 autocast, flash-attn when installed, device noise, uint8 frames) attention
    backward kernels accumulate with atomics, so a resumed run is not bit-equal to the uninterrupted
    one: the stated tolerance (README, "Distributed training") is 2e-2 relative per logged loss."""
    full = Trainer(tiny_cfg(shards, tmp_path / "full", "train.device=cuda"))
    full.fit()
    cfg = tiny_cfg(shards, tmp_path / "split", "train.device=cuda")
    Trainer(cfg).fit(stop_at=3)
    Trainer(cfg).fit()
    a, b = losses(tmp_path / "split"), losses(tmp_path / "full")
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=2e-2, atol=1e-3)


def test_noise_device_setting_reaches_the_trainers_draws(shards, tmp_path):
    """train.noise_device=device changes the noise (another seeded stream), not t or caption dropout."""
    draws = {}
    for mode in ("host", "device"):
        t = Trainer(tiny_cfg(shards, tmp_path / mode, f"train.noise_device={mode}"))
        assert t.noise_device == (None if mode == "host" else t.device)
        draws[mode] = t.sample_randomness(["a", "b"], (3, 4, 32, 32))
    assert torch.equal(draws["host"][0], draws["device"][0]) and draws["host"][2] == draws["device"][2]
    assert not torch.equal(draws["host"][1], draws["device"][1])


def test_uint8_frames_train_exactly_like_float_frames(shards, tmp_path):
    """data.video_dtype=uint8 (the CUDA default: normalised by the trainer) changes no bit of training."""
    runs = {}
    for dtype in ("float32", "uint8"):
        t = Trainer(tiny_cfg(shards, tmp_path / dtype, f"data.video_dtype={dtype}", "train.steps=3"))
        t.fit()
        runs[dtype] = (losses(tmp_path / dtype), t.model.state_dict())
    assert runs["uint8"][0] == runs["float32"][0]
    for n, a in runs["float32"][1].items():
        assert torch.equal(a, runs["uint8"][1][n]), n


def test_keep_last_k_and_latest(shards, tmp_path):
    t = Trainer(tiny_cfg(shards, tmp_path / "r", "train.keep_last_k=2"))
    t.fit()
    names = sorted(os.listdir(tmp_path / "r" / "checkpoints"))
    assert names == ["step-00000004", "step-00000006"]
    assert t.checkpoints.latest().endswith("step-00000006")


def test_incomplete_checkpoint_is_ignored(shards, tmp_path):
    t = Trainer(tiny_cfg(shards, tmp_path / "r"))
    t.fit(stop_at=2)
    os.makedirs(tmp_path / "r" / "checkpoints" / "step-00000004")  # a crash mid-save: no COMPLETE marker
    t2 = Trainer(tiny_cfg(shards, tmp_path / "r"))
    t2.maybe_resume()
    assert t2.step == 2


def test_loss_falls_on_a_fixed_batch(shards, tmp_path):
    cfg = tiny_cfg(shards, tmp_path / "r", "optim.lr=1e-2", "optim.schedule=constant", "data.caption_dropout=0")
    t = Trainer(cfg)
    batch = next(iter(t.data))
    first = []
    for _ in range(60):  # t.step stays 0: same noise and timesteps every call, pure fitting
        first.append(float(t.train_step([batch])["loss"]))
    assert first[-1] < 0.5 * first[0], first[::10]


def test_corrupt_clip_is_counted_in_logs(tmp_path):
    d = str(tmp_path / "bad")
    write_shards(d, 2, 4, bad={0: b"garbage", 5: b"garbage"})
    t = Trainer(tiny_cfg(d, tmp_path / "r", "train.steps=4", "train.log_every=4"))
    t.fit()
    last = [r for r in read_metrics(tmp_path / "r") if "data/skipped" in r][-1]
    assert last["data/skipped"] >= 1


def test_meta_init_matches_direct_init(shards, tmp_path):
    from vdit.model.dit import VideoDiT

    cfg = tiny_cfg(shards, tmp_path / "r")
    t = Trainer(cfg)
    torch.manual_seed(1234)  # the default layer init consumes the global RNG; init_weights(seed) must not care
    direct = VideoDiT(cfg.model)
    direct.init_weights(seed=cfg.train.seed)
    for (n, a), b in zip(t.model.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), n


def test_export_equals_checkpoint_weights_and_samples(shards, tmp_path):
    """vdit-export writes the EMA (or raw) weights to one safetensors file that loads on one device."""
    from vdit.eval.sample import load_run
    from vdit.train.export import main as export_main

    t = Trainer(tiny_cfg(shards, tmp_path / "r", "train.steps=2"))
    t.fit()
    out = tmp_path / "export"
    assert export_main(["--run-dir", str(tmp_path / "r"), "--out", str(out)]) == 0
    cfg, model, _, _, step, _ = load_run(weights=str(out), device="cpu")
    assert step == 2
    for name, p in model.named_parameters():
        assert torch.equal(p, t.ema.shadow[name]), name
    assert export_main(["--run-dir", str(tmp_path / "r"), "--out", str(tmp_path / "raw"), "--weights", "raw"]) == 0
    _, raw, _, _, _, _ = load_run(weights=str(tmp_path / "raw"), device="cpu")
    for (name, p), q in zip(raw.named_parameters(), t.model.parameters()):
        assert torch.equal(p, q), name
    assert export_main(["--run-dir", str(tmp_path / "nothing")]) == 1


def test_accumulation_split_gives_same_loss_and_gradients(shards, tmp_path):
    """The same 4 samples as one micro-batch or as two of 2: same loss, same gradients."""
    t = Trainer(tiny_cfg(shards, tmp_path / "r", "data.batch_size=4", "data.caption_dropout=0.5"))
    batch = next(iter(t.data))
    t.optimizer_step()  # move off the adaLN-Zero init so every parameter has a gradient
    t.optimizer.zero_grad()
    whole = t.forward_backward([batch])
    g_whole = {n: p.grad.clone() for n, p in t.model.named_parameters()}
    t.optimizer.zero_grad()
    halves = [{k: batch[k][sl] for k in ("video", "caption", "key")} for sl in (slice(0, 2), slice(2, 4))]
    split = t.forward_backward(halves)
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-7)
    for n, p in t.model.named_parameters():
        torch.testing.assert_close(p.grad, g_whole[n], rtol=1e-5, atol=1e-7, msg=n)


def test_bucketed_training_resumes_exactly(shards, tmp_path):
    """Two buckets (4 and 8 frames) under a token budget: batch sizes differ, resume stays exact."""
    buckets = ("data.buckets={token_budget: 64, patch_size: [1, 8, 8], buckets: "
               "[{num_frames: 4, height: 32, width: 32}, {num_frames: 8, height: 32, width: 32}]}")
    full = Trainer(tiny_cfg(shards, tmp_path / "full", buckets, "data.frame_stride=1"))
    full.fit()
    cfg = tiny_cfg(shards, tmp_path / "split", buckets, "data.frame_stride=1")
    Trainer(cfg).fit(stop_at=3)
    Trainer(cfg).fit()
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    rows = [r for r in read_metrics(tmp_path / "full") if "perf/tokens_per_s" in r]
    assert rows and all(r["perf/tokens_per_s"] > 0 for r in rows)


def test_training_on_vdit_encode_latents_resumes_exactly(shards, tmp_path, monkeypatch):
    """Latent shards from vdit-encode: the encoders are neither built nor run, caption dropout uses the
    cached null text; sampling builds them on demand."""
    from vdit.data.encode import main as encode_main
    from vdit.train import trainer as trainer_module

    out = str(tmp_path / "latents")
    assert encode_main(["--input", shards, "--output", out, "--num-frames", "4", "--frame-stride", "2",
                        "--height", "32", "--width", "32", "--text-encoder", "random", "--max-length", "8",
                        "--latent-dtype", "float32", "--text-store-dtype", "float32", "-q"]) == 0
    build_frozen = trainer_module.build_frozen

    def no_encoders(*args, **kwargs):
        raise AssertionError("the frozen encoders were built for latent shards")

    monkeypatch.setattr(trainer_module, "build_frozen", no_encoders)
    extra = ("data.caption_dropout=0.5",)
    full = Trainer(tiny_cfg(out, tmp_path / "full", *extra))
    assert full.data.is_latent
    full.fit()
    assert full.vae is None and full.text_encoder is None and full.encode_text is None
    cfg = tiny_cfg(out, tmp_path / "split", *extra)
    Trainer(cfg).fit(stop_at=3)
    Trainer(cfg).fit()
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    monkeypatch.setattr(trainer_module, "build_frozen", build_frozen)
    text_encoder, vae, encode_text = full.frozen_encoders()  # what evaluate() asks for on every rank
    assert vae.latent_channels == 3 and encode_text(["a caption"])[0].shape == (1, 8, 32)
    assert full.frozen_encoders()[1] is vae  # built once
    with pytest.raises(ValueError, match="in_channels|latent"):
        Trainer(tiny_cfg(out, tmp_path / "bad", "model.in_channels=4"))


def test_x0_loss_weighting_is_the_velocity_loss_times_t_squared(shards, tmp_path):
    """``flow.loss_weighting=x0`` weighs each sample's velocity MSE by t^2 (the MSE of x_t - t v);
    same batch, same draws, same initial weights otherwise."""
    plain = Trainer(tiny_cfg(shards, tmp_path / "v"))
    weighted = Trainer(tiny_cfg(shards, tmp_path / "x0", "flow.loss_weighting=x0"))
    batch = next(iter(plain.data))
    x0, text, mask, t, noise = plain.prepare_inputs(batch)
    with torch.no_grad():
        v = plain.model(flow.interpolate(x0, noise, t), t, text, mask)
        per_sample = (v - flow.velocity_target(x0, noise)).square().flatten(1).mean(1)  # (B,)
    loss_v = plain.forward_backward([batch])
    loss_x0 = weighted.forward_backward([batch])
    assert torch.allclose(loss_v, per_sample.mean(), rtol=1e-5)
    assert torch.allclose(loss_x0, (per_sample * t.square()).mean(), rtol=1e-5)
    assert loss_x0 < loss_v

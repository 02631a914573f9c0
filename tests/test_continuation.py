"""Frame-conditioned continuation: per-frame timesteps in the model, the sampler holding given frames,
the training loss mask, config checks, and 2-rank sequence parallelism / FSDP against one rank.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_continuation.py -v
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import init_rank, spawn
from vdit.eval.sample import cond_pixel_frames, generate, sample_latents
from vdit.model import flow
from vdit.model.dit import DiTConfig, VideoDiT
from vdit.model.vae import IdentityAutoencoder
from vdit.train.conditioning import FrameConditioning, choose_cond_frames, frame_conditioning

TEXT_DIM = 16


def _cfg(**kw) -> DiTConfig:
    base = dict(in_channels=4, patch_size=[1, 2, 2], hidden_size=32, depth=2, num_heads=4, text_dim=TEXT_DIM)
    base.update(kw)
    return DiTConfig(**base)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _inputs(thw=(3, 4, 6), b: int = 2, seed: int = 0, channels: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, channels, *thw, generator=g)
    t = torch.rand(b, generator=g)
    text = torch.randn(b, 5, TEXT_DIM, generator=g)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, text, mask


def _text_fn(prompts):
    g = torch.Generator().manual_seed(len(prompts))
    return torch.randn(len(prompts), 5, TEXT_DIM, generator=g), torch.ones(len(prompts), 5, dtype=torch.bool)


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("opts", [
    dict(), dict(modulation="shared", final_modulation="table"), dict(prediction="x0", pooled_text=True),
    dict(prediction="edm"), dict(cross_attention=False, pos_embed="sincos"), dict(patch_size=[2, 2, 2]),
])
def test_equal_per_frame_times_give_exactly_the_per_sample_output(opts):
    model = _randomize(VideoDiT(_cfg(**opts)))
    x, t, text, mask = _inputs((4, 4, 6))
    with torch.no_grad():
        ref = model(x, t, text, mask)
        per_frame = model(x, t[:, None].expand(-1, x.shape[2]).contiguous(), text, mask)
    assert torch.equal(per_frame, ref)


def test_edm_prediction_preconditions_each_frame_with_its_own_time():
    # adaLN-Zero init: the network outputs F = 0, so the velocity is c_vx(t_f) x_t per frame:
    # -x_t at t = 0 (x0_hat = x_t) and x_t at t = 1 (x0_hat = 0)
    model = VideoDiT(_cfg(prediction="edm", sigma_data=0.5))
    x, _, text, mask = _inputs((3, 4, 6))
    t = torch.tensor([[0.0, 0.5, 0.9], [0.3, 0.3, 1.0]])
    with torch.no_grad():
        v = model(x, t, text, mask)
    _, c_vx, _ = flow.edm_preconditioning(t[:, None, :, None, None], 0.5)
    assert torch.allclose(v, c_vx * x, rtol=1e-6, atol=1e-7)
    assert torch.allclose(v[0, :, 0], -x[0, :, 0]) and torch.allclose(v[1, :, 2], x[1, :, 2])
    with pytest.raises(ValueError, match="sigma_data"):
        VideoDiT(_cfg(prediction="edm", sigma_data=0.0))


def test_edm_prediction_is_the_x0_network_on_the_scaled_input_mixed_with_x_t():
    """With the same random weights, an x0 model fed ``c_in x_t`` reveals the network output
    ``F = c_in x_t - t v_x0``; the EDM model must return ``c_vx x_t + c_vf F`` (fails if ``c_in`` or
    the mixing is wrong or missing)."""
    x0_model = _randomize(VideoDiT(_cfg(prediction="x0", x0_t_min=1e-3)))
    edm_model = VideoDiT(_cfg(prediction="edm", sigma_data=0.7))
    edm_model.load_state_dict(x0_model.state_dict())
    x, _, text, mask = _inputs((3, 4, 6), b=3)
    t = torch.tensor([0.3, 0.8, 1.0])
    c_in, c_vx, c_vf = flow.edm_preconditioning(t[:, None, None, None, None], 0.7)
    with torch.no_grad():
        scaled = c_in * x
        F = scaled - t[:, None, None, None, None] * x0_model(scaled, t, text, mask)  # the raw network output
        got = edm_model(x, t, text, mask)
    assert F.abs().mean() > 1e-3  # the network is not at its zero init
    assert torch.allclose(got, c_vx * x + c_vf * F, rtol=1e-4, atol=1e-5)


def test_per_frame_times_modulate_each_frame_and_convert_x0_per_frame():
    # adaLN-Zero init: the network outputs x0_pred = 0, so the velocity is x_t / max(t_f, t_min) per frame
    model = VideoDiT(_cfg(prediction="x0", x0_t_min=0.05))
    x, _, text, mask = _inputs((3, 4, 6))
    t = torch.tensor([[0.0, 0.5, 0.9], [0.3, 0.3, 1.0]])
    with torch.no_grad():
        v = model(x, t, text, mask)
    expect = x / t.clamp_min(0.05)[:, None, :, None, None]
    assert torch.allclose(v, expect, rtol=1e-6, atol=0)
    # random weights: changing one frame's time changes the output, and a time that differs only on
    # frame 0 differs from the per-sample call
    model = _randomize(VideoDiT(_cfg()))
    x, t1, text, mask = _inputs((3, 4, 6))
    t = t1[:, None].repeat(1, 3)
    t[:, 0] = 0.0
    with torch.no_grad():
        a, b = model(x, t, text, mask), model(x, t1, text, mask)
    assert not torch.allclose(a, b)


def test_per_frame_time_shape_errors():
    model = VideoDiT(_cfg(patch_size=[2, 2, 2]))
    x, t, text, mask = _inputs((4, 4, 6))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(x, torch.zeros(2, 3), text, mask)
    with pytest.raises(ValueError, match="temporal patch"):
        model(x, torch.tensor([[0.0, 0.5, 0.5, 0.5]] * 2), text, mask)
    with pytest.raises(ValueError, match="temporal patch"):  # the sampler: k = 1 given frame of a 2-frame patch
        sample_latents(model, _text_fn, x.shape[1:], ["a", "b"], num_steps=1, cond_latents=x[:, :, :1])


# ---------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("solver,cfg_scale", [("euler", 1.0), ("heun", 3.0)])
def test_sampler_returns_the_conditioning_frames_exactly(solver, cfg_scale):
    model = _randomize(VideoDiT(_cfg(in_channels=3)), std=0.1)
    latent = (3, 4, 4, 6)
    cond = torch.randn(2, 3, 2, 4, 6, generator=torch.Generator().manual_seed(5))
    out = sample_latents(model, _text_fn, latent, ["a", "b"], num_steps=3, cfg_scale=cfg_scale, solver=solver,
                         cond_latents=cond)
    assert out.shape == (2, *latent) and torch.equal(out[:, :, :2], cond)
    free = sample_latents(model, _text_fn, latent, ["a", "b"], num_steps=3, cfg_scale=cfg_scale, solver=solver)
    assert not torch.allclose(out[:, :, 2:], free[:, :, 2:])  # the given frames steer the rest
    # pixel space, identity autoencoder: the given frames come back as they were
    video = torch.rand(2, 3, 4, 4, 6, generator=torch.Generator().manual_seed(6)) * 2 - 1
    gen = generate(model, _text_fn, IdentityAutoencoder(), ["a", "b"], 4, 4, 6, num_steps=2, cfg_scale=cfg_scale,
                   solver=solver, cond_video=video, cond_frames=1)
    assert torch.equal(gen[:, :, :1], video[:, :, :1]) and gen.shape == (2, 3, 4, 4, 6)
    with pytest.raises(ValueError, match="cond_latents"):
        sample_latents(model, _text_fn, latent, ["a", "b"], num_steps=1, cond_latents=torch.zeros(2, 3, 4, 4, 6))


def test_cond_pixel_frames_follow_the_causal_vae():
    class Causal:
        temporal_compression = 4

    assert cond_pixel_frames(IdentityAutoencoder(), 3) == 3
    assert cond_pixel_frames(Causal(), 1) == 1 and cond_pixel_frames(Causal(), 3) == 9


# --------------------------------------------------------------------------------------- training
def test_choice_of_conditioning_frames_is_deterministic_and_bounded():
    keys = [f"clip_{i}" for i in range(64)]
    a = choose_cond_frames(0, 3, keys, 0.5, 3, 5)
    assert torch.equal(a, choose_cond_frames(0, 3, keys, 0.5, 3, 5))  # same seed, step, keys
    assert not torch.equal(a, choose_cond_frames(0, 4, keys, 0.5, 3, 5))
    assert 0 < int((a > 0).sum()) < 64 and int(a.max()) <= 3
    assert bool((choose_cond_frames(0, 3, keys, 1.0, 4, 4) <= 3).all())  # at least one frame left to predict
    pt2 = choose_cond_frames(0, 3, keys, 1.0, 5, 8, patch_t=2)
    assert bool((pt2 % 2 == 0).all()) and bool((pt2 > 0).all())
    fc = FrameConditioning(torch.tensor([0, 1, 3]), 4)
    t = torch.tensor([0.5, 0.7, 0.9])
    assert torch.equal(fc.model_t(t), torch.tensor([[0.5] * 4, [0.0, 0.7, 0.7, 0.7], [0.0, 0.0, 0.0, 0.9]]))
    w = fc.loss_weight()[:, 0, :, 0, 0]
    assert torch.equal(w, torch.tensor([[1.0] * 4, [0.0] + [4 / 3] * 3, [0.0, 0.0, 0.0, 4.0]]))


def _trainer(tmp_path, *extra):
    from tests.conftest import write_shards
    from vdit.train.config import load_config, validate
    from vdit.train.trainer import Trainer

    d = tmp_path / "shards"
    write_shards(str(d), 1, 4)
    cfg = validate(load_config([
        f"data.shards={d}", f"run_dir={tmp_path / 'run'}", "text_encoder.name=random", "text_encoder.hidden_size=32",
        "text_encoder.max_length=8", "data.num_frames=4", "data.height=32", "data.width=32", "data.target_fps=null",
        "data.frame_stride=2", "data.batch_size=4", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
        "model.patch_size=[1,8,8]", "wandb.mode=disabled", "eval.enabled=false", "data.caption_dropout=0",
        *extra]))
    return Trainer(cfg)


def test_training_leaves_the_conditioning_frames_out_of_the_loss(tmp_path):
    t = _trainer(tmp_path, "train.cond_frames_prob=1", "train.max_cond_frames=2")
    batch = next(iter(t.data))
    t.forward_backward([batch])
    t.optimizer_step()  # off the adaLN-Zero init: the prediction depends on its input
    cond = frame_conditioning(t.cfg, t.step, batch["key"], 4)
    assert cond is not None and bool((cond.frames >= 1).all())
    draw = t.sample_randomness

    def perturbed(frames_mask):
        def sample(keys, shape):
            times, noise, drops = draw(keys, shape)
            return times, noise + 5.0 * frames_mask[:, None, :, None, None], drops
        return sample

    given = (torch.arange(4)[None] < cond.frames[:, None]).float()  # (B, T) the conditioning frames
    base = t.forward_backward([batch])
    t.sample_randomness = perturbed(given)  # changes the target (noise - x0) on the given frames only
    assert torch.equal(t.forward_backward([batch]), base)
    t.sample_randomness = perturbed(1.0 - given)  # the frames it predicts: the loss moves
    assert not torch.allclose(t.forward_backward([batch]), base)
    t.sample_randomness = draw
    # the loss is each sample's MSE over the frames it predicts, averaged over the samples
    x0, text, mask, times, noise = t.prepare_inputs(batch)
    with torch.no_grad():
        pred = t.model(flow.interpolate(x0, noise, cond.path_t(times)), cond.model_t(times), text, mask)
    err = (pred - flow.velocity_target(x0, noise)).square().mean(dim=(1, 3, 4))  # (B, T)
    keep = 1.0 - given
    expect = ((err * keep).sum(1) / keep.sum(1)).mean()
    torch.testing.assert_close(base, expect, rtol=1e-5, atol=1e-7)


def test_conditioning_off_keeps_the_per_sample_path(tmp_path):
    t = _trainer(tmp_path)
    assert frame_conditioning(t.cfg, 0, ["a", "b"], 4) is None
    assert t.cfg.train.cond_frames_prob == 0 and t.cfg.train.max_cond_frames == 0


def test_config_checks_name_the_key():
    from vdit.train.config import load_config

    base = ["data.shards=/nowhere", "data.num_frames=4", "model.patch_size=[1,8,8]"]
    with pytest.raises(ValueError, match="train.max_cond_frames=4 must be"):
        load_config(base + ["train.cond_frames_prob=0.5", "train.max_cond_frames=4"])
    with pytest.raises(ValueError, match="train.max_cond_frames=0 must be"):
        load_config(base + ["train.cond_frames_prob=0.5"])
    with pytest.raises(ValueError, match="train.cond_frames_prob"):
        load_config(base + ["train.cond_frames_prob=1.5", "train.max_cond_frames=1"])
    with pytest.raises(ValueError, match="latent frames"):  # the Wan VAE: 13 frames -> 4 latent frames
        load_config(["data.shards=/nowhere", "data.num_frames=13", "data.height=32", "data.width=32",
                     "vae.name=wan", "vae.path=/nowhere", "model.in_channels=16", "train.cond_frames_prob=0.5",
                     "train.max_cond_frames=4"])
    load_config(base + ["train.cond_frames_prob=0.5", "train.max_cond_frames=3"])  # fine


# ------------------------------------------------------------------- 2 ranks: SP and FSDP vs one
def _sp_check(mode: str) -> None:
    from vdit.train.parallel.sequence import apply_sequence_parallel, build_sp_groups, reduce_sp_gradients

    groups = build_sp_groups(2, 2, mode)
    for opts in (dict(), dict(modulation="shared", final_modulation="table", prediction="x0")):
        model = _randomize(VideoDiT(_cfg(**opts)))
        # 3 x 2 x 3 = 18 tokens, 6 per frame, 9 per rank: frame 1 straddles the two ranks
        x, t1, text, mask = _inputs((3, 4, 6))
        t = t1[:, None].repeat(1, 3)
        t[:, 0] = 0.0  # frame 0 given
        t[1, 1] = 0.0  # sample 1: frames 0 and 1 given
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) / x.numel()
        model.zero_grad()
        out = model(x, t, text, mask)
        (out * w).sum().backward()
        ref_out, ref_grads = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
        handle = apply_sequence_parallel(model, groups.sp, mode, groups.ulysses, groups.ring)
        try:
            model.zero_grad()
            out = model(x, t, text, mask)
            (out * w).sum().backward()
            reduce_sp_gradients(model, groups.sp)
            tol = 1e-5 / (0.05 if opts.get("prediction") == "x0" else 1.0)  # x0: given frames divide by x0_t_min
            assert (out - ref_out).abs().max() <= tol, f"{mode} {opts}: output {(out - ref_out).abs().max()}"
            for n, p in model.named_parameters():
                assert (p.grad - ref_grads[n]).abs().max() <= tol, f"{mode} {opts}: grad {n}"
            # the sampler: same continuation as on one rank, given frames exactly
            cond = x[:, :, :1]
            sp = sample_latents(model, _text_fn, x.shape[1:], ["a", "b"], num_steps=2, cfg_scale=2.0,
                                cond_latents=cond)
        finally:
            handle.remove()
        one = sample_latents(model, _text_fn, x.shape[1:], ["a", "b"], num_steps=2, cfg_scale=2.0, cond_latents=cond)
        assert torch.equal(sp[:, :, :1], cond) and torch.equal(one[:, :, :1], cond)
        assert (sp - one).abs().max() <= 1e-4, f"{mode} {opts}: sampled continuation"
        assert not torch.allclose(ref_out[:, :, 1:], torch.zeros_like(ref_out[:, :, 1:]))


def _fsdp_check() -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from vdit.train.parallel.dims import ParallelConfig, ParallelDims
    from vdit.train.parallel.fsdp import parallelize

    plain = _randomize(VideoDiT(_cfg()))
    cfg = ParallelConfig(backend="fsdp")
    dims = ParallelDims(cfg, 2, num_heads=4)
    dims.build_mesh("cpu")
    sharded = VideoDiT(_cfg())
    parallelize(sharded, dims, cfg)
    set_model_state_dict(sharded, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
    x, t1, text, mask = _inputs((3, 4, 6))
    t = t1[:, None].repeat(1, 3)
    t[:, :2] = 0.0
    with torch.no_grad():
        ref, out = plain(x, t, text, mask), sharded(x, t, text, mask)
    assert (out - ref).abs().max() <= 1e-5, "fsdp: per-frame output"
    cond = x[:, :, :2]
    got = sample_latents(sharded, _text_fn, x.shape[1:], ["a", "b"], num_steps=2, cond_latents=cond)
    want = sample_latents(plain, _text_fn, x.shape[1:], ["a", "b"], num_steps=2, cond_latents=cond)
    assert torch.equal(got[:, :, :2], cond) and (got - want).abs().max() <= 1e-4, "fsdp: sampled continuation"


def _worker(rank: int, world: int, port: int, out_dir: str) -> dict:
    init_rank(rank, world, port)
    results = {}
    for name, check in (("ulysses", lambda: _sp_check("ulysses")), ("ring", lambda: _sp_check("ring")),
                        ("fsdp", _fsdp_check)):
        try:
            check()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return spawn(_worker, 2, tmp_path_factory.mktemp("continuation_world2"))


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["ulysses", "ring", "fsdp"])
def test_two_ranks_condition_like_one(world2, name):
    failures = {r: res.get(name) for r, res in enumerate(world2) if res.get(name) != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{msg}" for r, msg in failures.items())


# ----------------------------------------------------------------------------- continuation suite
def test_a_perfect_continuation_scores_perfectly():
    import numpy as np

    from vdit.data.synthetic import render
    from vdit.eval.continuation import score_continuation
    from vdit.eval.hook import physics_prompts

    (_, scene), = physics_prompts(1, 7, 24, 64, 64, 8.0)
    real = render(scene)  # uint8 (T, H, W, 3)
    s = score_continuation(real, real, 2, scene, 8.0)
    gen = s["record"].gen
    assert len(gen["mse"]) == len(real) - 2 and max(gen["mse"]) == 0.0 and min(gen["spatiotemporal_iou"]) == 1.0
    assert s["physics"]["results"]["physics"].value == 1.0  # the scene's own video passes its trajectory checks
    frozen = np.repeat(real[2:3], len(real), axis=0)  # a continuation that stops moving
    assert np.mean(score_continuation(frozen, real, 2, scene, 8.0)["record"].gen["mse"]) > 0.0


def test_the_evaluation_scores_the_continuation_suite(tmp_path):
    import json
    import os

    from tests.conftest import write_shards
    from vdit.eval.sharded import evaluate_sharded
    from vdit.train.config import load_config, validate

    shards = tmp_path / "shards"
    write_shards(str(shards), 2, 4, num_frames=8, size=16)
    cfg = validate(load_config([
        f"data.shards={shards}", "data.num_frames=4", "data.height=16", "data.width=16", "data.target_fps=null",
        "data.frame_stride=2", "data.val_fraction=0.5", "model.in_channels=3", "model.patch_size=[1,4,4]",
        f"model.text_dim={TEXT_DIM}", "eval.num_steps=2", "eval.cfg_scale=2.0", "eval.prompts=[a ball]",
        "eval.num_physics_prompts=0", "eval.continuation_clips=1", "eval.continuation_scenes=1",
        "eval.continuation_frames=2", "eval.batch_size=2"]))
    model = _randomize(VideoDiT(cfg.model), std=0.05)
    run = str(tmp_path / "run")
    result = evaluate_sharded(cfg, model, _text_fn, IdentityAutoencoder(), 3, run, torch.device("cpu"))
    m = result["metrics"]
    for name in ("spatiotemporal_iou", "spatial_iou", "weighted_spatial_iou", "mse"):
        for prefix in ("continuation/", "continuation/heldout/", "continuation/procedural/"):
            assert m[f"{prefix}physics_iq/{name}"]["count"] == (2 if prefix == "continuation/" else 1)
    assert 0.0 <= m["continuation/physics_iq/mse"]["mean"] <= 1.0
    assert "continuation/physics/all_pass_rate" in m and "temporal_flickering_all" in m  # beside the prompts' metrics
    rows = result["continuation"]
    assert [r["kind"] for r in rows] == ["heldout", "procedural"] and all("error" not in r for r in rows)
    assert all(os.path.exists(os.path.join(run, r["path"])) for r in rows)
    assert json.load(open(os.path.join(run, "eval", "step-3.json")))["metrics"].keys() == m.keys()
    with pytest.raises(ValueError, match="eval.continuation_frames"):
        load_config([f"data.shards={shards}", "data.num_frames=4", "eval.continuation_scenes=1",
                     "eval.continuation_frames=4"])
    with pytest.raises(ValueError, match="eval.continuation_clips=1 needs held-out clips"):
        load_config([f"data.shards={shards}", "data.num_frames=4", "eval.continuation_clips=1"])

"""vdit-plan (vdit.launch.planner): the memory model against a measured CPU step, sharding invariants,
the 14B recommendation, the Ulysses head constraint, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from vdit.launch.planner import (GIB, Layout, activation_bytes, latent_shape, load_model_config, main,
                                 memory_breakdown, param_counts, plan, recommend, sp_options)
from vdit.model.dit import num_tokens

# tiny preset with a 32-wide random text encoder: pixel space (3 channels), patch [1, 4, 4]
FRAMES, SIZE, BATCH, TEXT_LEN = 8, 32, 2, 8
STATE_TOLERANCE = 0.10       # params + grads + AdamW + EMA, estimated vs held
ACTIVATION_TOLERANCE = 0.10  # saved-for-backward bytes (fp32, no checkpointing), estimated vs measured


@pytest.fixture(scope="module")
def tiny_train_cfg():
    from vdit.train.config import load_config, validate

    return validate(load_config(["model=tiny", "text_encoder.name=random", "text_encoder.hidden_size=32"]))


@pytest.fixture(scope="module")
def measured(tiny_train_cfg):
    """One fp32 forward + backward + AdamW step of the tiny preset on CPU, built with vdit's builders."""
    from vdit.train.build import build_model
    from vdit.train.ema import EMA
    from vdit.train.optim import build_optimizer

    torch.manual_seed(0)
    cfg = tiny_train_cfg
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optim)
    ema = EMA(model, 0.99)
    x = torch.randn(BATCH, cfg.model.in_channels, FRAMES, SIZE, SIZE)
    t = torch.rand(BATCH)
    text = torch.randn(BATCH, TEXT_LEN, cfg.model.text_dim)
    mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.bool)
    mask[0, 5:] = False
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in param_storages:  # weights are parameters (FSDP: the gathered unit), not activations
            saved[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x, t, text, mask)
    loss = (out - torch.randn_like(out)).pow(2).mean()
    loss.backward()
    optimizer.step()
    ema.update(model)

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    opt_state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"params": nbytes(model.parameters()), "grads": nbytes(p.grad for p in model.parameters()),
            "optim": nbytes(opt_state), "ema": nbytes(ema.shadow.values()), "activations": sum(saved.values())}


def test_state_bytes_match_a_measured_step(tiny_train_cfg, measured):
    m = memory_breakdown(tiny_train_cfg.model, FRAMES, SIZE, SIZE, Layout("fsdp2", 1, "none"), world=1,
                         batch_size=BATCH, precision="fp32", text_len=TEXT_LEN, text_encoder="none", vae="identity")
    assert m.master == 0  # FSDP2: the fp32 shards are the optimizer's weights
    for key in ("params", "grads", "optim", "ema"):
        ratio = getattr(m, key) / measured[key]
        print(f"{key}: estimated/measured = {ratio:.4f}")
        assert abs(ratio - 1) < STATE_TOLERANCE, key
    est = m.params + m.grads + m.optim + m.ema
    held = sum(measured[k] for k in ("params", "grads", "optim", "ema"))
    assert abs(est / held - 1) < STATE_TOLERANCE


def test_activation_bytes_match_saved_tensors(tiny_train_cfg, measured):
    cfg = tiny_train_cfg.model
    shape = latent_shape(cfg, FRAMES, SIZE, SIZE, "identity")
    est = activation_bytes(cfg, num_tokens(cfg, shape), TEXT_LEN, BATCH, "none", "fp32",
                           latent_values_per_gpu=int(torch.tensor(shape).prod()))
    ratio = est / measured["activations"]
    print(f"activations: estimated/measured = {ratio:.4f} ({est} / {measured['activations']} bytes)")
    assert abs(ratio - 1) < ACTIVATION_TOLERANCE


@pytest.mark.parametrize("options", [dict(modulation="shared", mlp_ratio=2.7), dict(cross_attention=False),
                                     dict(qk_norm=False), dict(prediction="x0", pos_embed="sincos", pooled_text=True)])
def test_activation_bytes_other_architectures(options):
    """The per-block tensor list follows the config switches (Wan-like shared adaLN, no cross-attention, ...)."""
    from vdit.model.dit import DiTConfig, VideoDiT

    torch.manual_seed(0)
    cfg = DiTConfig(in_channels=16, patch_size=[1, 2, 2], hidden_size=96, depth=3, num_heads=4, text_dim=48, **options)
    model, (B, Lc, T, H, W) = VideoDiT(cfg), (2, 16, 3, 16, 24)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.randn(B, 16, T, H, W), torch.rand(B), torch.randn(B, Lc, 48), torch.ones(B, Lc, dtype=torch.bool))
    est = activation_bytes(cfg, num_tokens(cfg, (T, H, W)), Lc, B, "none", "fp32", latent_values_per_gpu=16 * T * H * W)
    ratio = est / sum(saved.values())
    print(f"{options}: activations estimated/measured = {ratio:.4f}")
    assert abs(ratio - 1) < ACTIVATION_TOLERANCE


@pytest.fixture(scope="module")
def cfg14b():
    return load_model_config("14b", text_dim=4096)


def _mem(cfg, backend, world, sp=1, ac="none", **kw):
    return memory_breakdown(cfg, 81, 720, 1280, Layout(backend, sp, ac), world, **kw)


def test_sharding_invariants(cfg14b):
    a, b = _mem(cfg14b, "fsdp2", 16), _mem(cfg14b, "fsdp2", 32)
    for key in ("params", "grads", "optim", "ema"):
        assert getattr(b, key) == pytest.approx(getattr(a, key) / 2, rel=1e-6), key
    z1a, z1b = _mem(cfg14b, "zero1", 16), _mem(cfg14b, "zero1", 32)
    assert z1b.optim == pytest.approx(z1a.optim / 2, rel=1e-6) and z1b.master == pytest.approx(z1a.master / 2, rel=1e-6)
    assert z1b.params == z1a.params  # ZeRO-1: bf16 module params replicated
    P = param_counts(cfg14b)[0]
    assert z1a.grads > 2 * P  # ZeRO-1: full bf16 gradients (plus the fp32 partition)
    z2a, z2b = _mem(cfg14b, "zero2", 16), _mem(cfg14b, "zero2", 32)
    assert z2b.grads == pytest.approx(z2a.grads / 2, rel=1e-6) and z2b.params == z2a.params
    assert z2a.grads < z1a.grads
    z3a, z3b = _mem(cfg14b, "zero3", 16), _mem(cfg14b, "zero3", 32)
    assert z3b.params == pytest.approx(z3a.params / 2, rel=1e-6)
    act = {sp: _mem(cfg14b, "fsdp2", 64, sp).activations for sp in (1, 2, 4, 8)}
    for sp in (2, 4, 8):  # text-side tensors are replicated, so "about" 1/sp
        assert act[sp] == pytest.approx(act[1] / sp, rel=0.02), sp
    for sp in (1, 8):
        assert _mem(cfg14b, "fsdp2", 64, sp, "full").activations < _mem(cfg14b, "fsdp2", 64, sp, "none").activations
    assert _mem(cfg14b, "fsdp2", 64, precision="fp32").activations > _mem(cfg14b, "fsdp2", 64).activations


def test_14b_on_64_h100(cfg14b):
    P = param_counts(cfg14b)[0]
    assert 14.3e9 < P < 14.4e9
    assert 2 * P / GIB > 26  # the bf16 weights alone: ~28 GB
    unsharded = _mem(cfg14b, "fsdp2", 1)
    assert unsharded.params + unsharded.grads + unsharded.optim + unsharded.ema >= 20 * P  # 4+4+8+4 bytes/param
    assert unsharded.total > 80 * GIB
    ests = plan(cfg14b, 81, 720, 1280, "h100", 8, 8)
    best = recommend(ests)
    assert best is not None and best.fits and best.layout.supported and best is ests[0]
    assert best.memory.total <= 80 * GIB
    assert best.layout.backend == "fsdp2"  # ZeRO-1/2 replicate 28 GB of bf16 weights and a 57 GB fp32 EMA
    for e in ests:
        if e.layout.backend in ("zero1", "zero2"):
            assert not e.fits
    # none of the no-checkpointing layouts fit 75,600 tokens of a 5120-wide 40-block model
    assert not any(e.fits for e in ests if e.layout.ac == "none")
    assert best.step_s > 0 and best.global_batch == 64 // best.layout.sp_size


def test_sp_must_divide_heads():
    cfg13 = load_model_config("1.3b")  # 12 heads
    assert sp_options(cfg13, 8) == [1, 2, 4]
    ests = plan(cfg13, 81, 480, 832, "h100", 8, 1)
    assert {e.layout.sp_size for e in ests} == {1, 2, 4}
    with pytest.raises(ValueError, match="frames"):
        latent_shape(cfg13, 80, 480, 832, "wan")


def test_cli_table_and_json(capsys):
    args = ["model=14b", "frames=81", "height=720", "width=1280", "gpu=h100", "gpus_per_node=8", "nodes=8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "recommended: fsdp2/" in text and "parallel.activation_checkpointing=" in text
    assert main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rec = data["recommendation"]
    assert rec["fits"] and rec["memory_gib"]["total"] <= 80
    assert "parallel.backend=fsdp" in rec["vdit_train"] and "model=14b" in rec["vdit_train"]
    assert len(data["layouts"]) == 4 * 4 * 2
    assert main(["model=tiny", "frames=16", "height=32", "width=32", "gpu=h100", "gpus_per_node=1", "nodes=1",
                 "text_encoder=minilm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"]["model"] == "tiny"
    with pytest.raises(SystemExit):
        main(["model=14b", "frames=81"])  # missing keys

"""Attention backends (flash / sdpa / math), their selection, and the attention-with-LSE primitive."""

from __future__ import annotations

import logging

import pytest
import torch

from vdit.model.attention import Attention, math_attention, sdpa_attention
from vdit.model.dit import DiTConfig, VideoDiT
from vdit.train.parallel import attention as backends
from vdit.train.parallel.attention import (
    apply_attention_backend,
    attention_with_lse,
    flash_attention,
    flash_attn_available,
    select_attention_backend,
)


def _qkv(b=2, lq=5, lk=7, h=3, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, h, d, generator=g).to(dtype) for n in (lq, lk, lk))


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed here")
def test_auto_falls_back_to_sdpa_without_flash_attn():
    for device in ("cpu", "cuda", None):  # resolving "cuda" only inspects the name, it touches no GPU
        core, name = select_attention_backend("auto", device)
        assert (core, name) == (sdpa_attention, "sdpa")
    with pytest.raises(ImportError, match=r"pip install vdit\[gpu\]"):
        select_attention_backend("flash", "cuda")
    q, k, v = _qkv()
    with pytest.raises(ImportError, match=r"pip install vdit\[gpu\]"):
        flash_attention(q, k, v)


@pytest.fixture
def fake_flash(monkeypatch):
    """flash-attn "installed" without a GPU: selection only inspects names, it runs no kernel."""
    backends._logged.clear()
    monkeypatch.setattr(backends, "_flash_func", lambda: (lambda q, k, v: q, "fa2"))
    return backends.flash_attention


def test_auto_picks_by_compute_dtype(fake_flash, caplog):
    """Issue 14 #3: auto chose flash whenever it imported, so precision=fp32 on a GPU failed at the
    first forward ("flash attention needs fp16/bf16"); now flash only for CUDA and fp16/bf16."""
    with caplog.at_level(logging.INFO, logger="vdit"):
        for dtype in (torch.bfloat16, torch.float16):
            assert select_attention_backend("auto", "cuda", dtype) == (fake_flash, "flash")
        for dtype in (torch.float32, None):  # None: compute dtype unknown -> treated as fp32
            assert select_attention_backend("auto", "cuda", dtype) == (sdpa_attention, "sdpa")
            assert select_attention_backend("auto", "cuda:1", dtype) == (sdpa_attention, "sdpa")
        assert select_attention_backend("auto", "cpu", torch.bfloat16) == (sdpa_attention, "sdpa")
        select_attention_backend("auto", "cuda", torch.float32)  # same choice again: not logged again
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs.count("attention backend: sdpa (auto: compute dtype float32 (flash needs fp16/bf16))") == 1
    assert "attention backend: flash (auto: fa2 installed, device cuda, dtype bfloat16)" in msgs
    with pytest.raises(ValueError, match=r"'flash' needs an fp16/bf16 compute dtype, got float32"):
        select_attention_backend("flash", "cuda", torch.float32)
    assert select_attention_backend("flash", "cuda", torch.bfloat16)[1] == "flash"


def test_apply_fp32_on_cuda_gives_sdpa_inside_the_sp_wrapper(fake_flash):
    """The Ulysses inner kernel follows the same dtype rule (it is the kernel the backend sets)."""
    cfg = DiTConfig(in_channels=3, hidden_size=32, depth=2, num_heads=2, text_dim=16)
    model = VideoDiT(cfg)

    class Wrapper:  # stands in for vdit.train.parallel.sequence.SequenceParallelCore
        inner = math_attention

    model.blocks[0].attn.core = wrapper = Wrapper()
    assert apply_attention_backend(model, "auto", "cuda", torch.float32) == "sdpa"
    assert wrapper.inner is sdpa_attention and model.blocks[1].attn.core is sdpa_attention
    assert apply_attention_backend(model, "auto", "cuda", torch.bfloat16) == "flash"
    assert wrapper.inner is fake_flash and model.blocks[0].cross_attn.core is fake_flash


def test_explicit_backends_and_unknown_name():
    assert select_attention_backend("sdpa") == (sdpa_attention, "sdpa")
    assert select_attention_backend("math", "cpu") == (math_attention, "math")
    with pytest.raises(ValueError, match=r"unknown attention backend 'xformers'.*auto.*flash.*sdpa.*math"):
        select_attention_backend("xformers")


def test_choice_is_logged_once(caplog):
    backends._logged.clear()
    with caplog.at_level(logging.INFO, logger="vdit"):
        select_attention_backend("math")
        select_attention_backend("math")
    assert [r.getMessage() for r in caplog.records].count("attention backend: math (requested)") == 1


def test_flash_attention_with_mask_routes_to_sdpa():
    """flash_attn_func has no key-padding mask: masked calls take the SDPA path (works on CPU too)."""
    q, k, v = _qkv()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    torch.testing.assert_close(flash_attention(q, k, v, attn_mask=mask), sdpa_attention(q, k, v, attn_mask=mask))


def test_apply_sets_every_self_and_cross_attention_core():
    cfg = DiTConfig(in_channels=3, hidden_size=32, depth=2, num_heads=2, text_dim=16)
    model = VideoDiT(cfg)
    assert apply_attention_backend(model, "math", "cpu") == "math"
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attns) == 4 and all(a.core is math_attention for a in attns)

    class Wrapper:  # stands in for a sequence-parallel core: the backend goes inside it
        inner = math_attention

        def __call__(self, q, k, v, attn_mask=None):
            return self.inner(q, k, v, attn_mask)

    wrapper = Wrapper()
    model.blocks[0].attn.core = wrapper
    assert apply_attention_backend(model, "sdpa") == "sdpa"
    assert model.blocks[0].attn.core is wrapper and wrapper.inner is sdpa_attention
    assert model.blocks[1].attn.core is sdpa_attention


@pytest.mark.parametrize("masked", [False, True])
def test_attention_with_lse_matches_math_and_logsumexp(masked):
    q, k, v = _qkv()
    mask = None
    if masked:
        mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[:, 0] = True
    out, lse = attention_with_lse(q, k, v, key_mask=mask)
    assert out.shape == q.shape and lse.shape == (2, 3, 5) and lse.dtype == torch.float32
    torch.testing.assert_close(out, math_attention(q, k, v, attn_mask=mask), atol=1e-6, rtol=1e-5)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5  # (B, H, Lq, Lk)
    if masked:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=1e-6, rtol=1e-5)


def test_attention_with_lse_scale_dtype_and_fully_masked_rows():
    q, k, v = _qkv(dtype=torch.bfloat16)
    out, lse = attention_with_lse(q, k, v, scale=0.5)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * 0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float())
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    mask = torch.zeros(2, 7, dtype=torch.bool)  # no key at all: the neutral element of the LSE merge
    out, lse = attention_with_lse(*_qkv(), key_mask=mask)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_attention_with_lse_gradients_match_math():
    q, k, v = (t.requires_grad_() for t in _qkv(seed=3))
    g = torch.randn(2, 5, 3, 8)
    out, _ = attention_with_lse(q, k, v)
    ours = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(math_attention(q, k, v), (q, k, v), g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and flash_attn_available()), reason="needs CUDA and flash-attn")
def test_flash_matches_sdpa_bf16():
    q, k, v = (t.cuda() for t in _qkv(b=2, lq=256, lk=256, h=4, d=64, dtype=torch.bfloat16))
    core, name = select_attention_backend("auto", "cuda", torch.bfloat16)
    assert name == "flash"
    out = core(q, k, v)
    torch.testing.assert_close(out.float(), sdpa_attention(q, k, v).float(), atol=2e-2, rtol=2e-2)

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
    call_flash,
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


def test_call_flash_unwraps_fa3_casts_and_fixes_strided_last_dims():
    """Issue 14 #10, on CPU through the same call: FA3 returns (out, lse); k/v take q's dtype; a slice
    of a fused KV tensor keeps its strides; a strided last dimension is made contiguous."""
    q, k, v = _qkv(lq=5, lk=9)
    seen = {}

    def fa(q, k, v):
        seen.update(dtypes={x.dtype for x in (q, k, v)}, last=[x.stride(-1) for x in (q, k, v)],
                    contiguous=[x.is_contiguous() for x in (q, k, v)])
        return math_attention(q, k, v)

    def fa3(q, k, v):
        return fa(q, k, v), torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    kv = torch.cat([k, v], dim=-1)  # (B, Lk, H, 2D): k and v as slices, stride(-1) == 1, not contiguous
    ref = math_attention(q, k, v)
    torch.testing.assert_close(call_flash(fa, q, kv[..., :8], kv[..., 8:]), ref)
    assert seen["last"] == [1, 1, 1] and seen["contiguous"] == [True, False, False]
    kt = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) != 1
    assert kt.stride(-1) != 1
    torch.testing.assert_close(call_flash(fa3, q, kt, v.double()), ref)
    assert seen["last"] == [1, 1, 1] and seen["dtypes"] == {torch.float32}


def test_flash_refuses_fp32_and_cpu_tensors(fake_flash, monkeypatch):
    monkeypatch.setattr(backends, "_FLASH", (lambda q, k, v: q, "fa2"))
    with pytest.raises(ValueError, match="flash attention needs CUDA fp16/bf16 tensors"):
        flash_attention(*_qkv())
    with pytest.raises(ValueError, match="dtype=torch.float32"):
        flash_attention(*_qkv(dtype=torch.float32))


# ----------------------------------------------------------------------------------------- GPU only
_needs_flash = pytest.mark.skipif(not (torch.cuda.is_available() and flash_attn_available()),
                                  reason="needs CUDA and flash-attn")


@pytest.mark.gpu
@_needs_flash
def test_flash_matches_sdpa_bf16():
    q, k, v = (t.cuda() for t in _qkv(b=2, lq=256, lk=256, h=4, d=64, dtype=torch.bfloat16))
    core, name = select_attention_backend("auto", "cuda", torch.bfloat16)
    assert name == "flash"
    out = core(q, k, v)
    torch.testing.assert_close(out.float(), sdpa_attention(q, k, v).float(), atol=2e-2, rtol=2e-2)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.gpu
@_needs_flash
@pytest.mark.parametrize("head_dim", [32, 64, 72, 128])
@pytest.mark.parametrize("lq,lk,sliced", [(256, 256, False), (200, 333, True)])
def test_flash_forward_and_backward_match_fp32_as_well_as_sdpa(head_dim, lq, lk, sliced):
    """Values and gradients against an fp32 reference: flash's bf16 error within 2x SDPA's (+ 1e-3).
    ``sliced``: Lq != Lk and k, v are slices of one fused (B, Lk, H, 2D) tensor (non-contiguous)."""
    g = torch.Generator(device="cuda").manual_seed(head_dim + lk)
    q = torch.randn(2, lq, 4, head_dim, device="cuda", generator=g)
    if sliced:
        kv = torch.randn(2, lk, 4, 2 * head_dim, device="cuda", generator=g)
        k, v = kv[..., :head_dim], kv[..., head_dim:]
    else:
        k, v = (torch.randn(2, lk, 4, head_dim, device="cuda", generator=g) for _ in range(2))
    dout = torch.randn(2, lq, 4, head_dim, device="cuda", generator=g)
    ref_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = math_attention(*ref_in)  # fp32
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    flash, _ = select_attention_backend("flash", "cuda", torch.bfloat16)
    results = {}
    for name, core in (("flash", flash), ("sdpa", sdpa_attention)):
        xs = [x.detach().to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
        out = core(*xs)
        assert out.shape == (2, lq, 4, head_dim) and out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out, xs, dout.to(torch.bfloat16))
        results[name] = [_rel(out, ref)] + [_rel(a, b) for a, b in zip(grads, ref_grads)]
    for err_flash, err_sdpa in zip(results["flash"], results["sdpa"]):
        assert err_flash <= 2 * err_sdpa + 1e-3, results


@pytest.mark.gpu
@_needs_flash
def test_flash_under_compile_has_no_graph_break_and_same_output():
    q, k, v = (t.cuda() for t in _qkv(b=2, lq=128, lk=96, h=4, d=64, dtype=torch.bfloat16))
    flash, _ = select_attention_backend("flash", "cuda", torch.bfloat16)
    explained = torch._dynamo.explain(flash)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch.testing.assert_close(torch.compile(flash)(q, k, v), flash(q, k, v), atol=1e-2, rtol=1e-2)

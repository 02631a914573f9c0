"""Wan 2.1 import / export against diffusers' WanTransformer3DModel, on CPU in fp32.

Tiny random diffusers Wan transformers are built here (shaped like the 1.3B and the 14B: head dim,
FFN ratio, heads) and saved to disk; ``vdit-import wan`` converts them and the imported VideoDiT must
give diffusers' velocity within 1e-5 for several shapes (token counts 18, 15, 5: not all divisible
by 2), on one process and under 2-rank FSDP, Ulysses and ring sequence parallelism. vdit ->
diffusers -> vdit is bit-exact. Run:

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_wan_import.py -v -s   # -s prints the max differences
"""

from __future__ import annotations

import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import init_rank, spawn
from vdit.model.dit import DiTConfig, VideoDiT
from vdit.model.wan import (WAN_OPTIONS, WanConversionError, dit_config_from_diffusers, read_diffusers_folder,
                            vdit_to_wan, wan_to_vdit, write_diffusers_folder)
from vdit.train.export import load_exported
from vdit.train.export import main as export_main
from vdit.train.wan_import import main as import_main

TOL = 1e-5
TEXT_DIM = 32
# tiny counterparts of the presets: (heads, head dim, ffn) keep each preset's head dim split and FFN ratio
TINY = {
    "1.3b": dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=140, num_layers=2),  # 8960/1536 * 24
    "14b": dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=173, num_layers=2),  # 13824/5120 * 64
}
# latent (T, H, W), patch (1, 2, 2): 3*2*3 = 18 tokens, 1*3*5 = 15 (odd), 5*1*1 = 5
SHAPES = [(3, 4, 6), (1, 6, 10), (5, 2, 2)]


def _diffusers_model(kind: str, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=TEXT_DIM,
                                  freq_dim=256, cross_attn_norm=True, rope_max_seq_len=64, **TINY[kind]).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every weight off its init (norm gains 1, zero biases) so each one matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _inputs(thw, seed: int, b: int = 2, lc: int = 7):
    """Latent, flow time in [0, 1], text features and mask (sample 0 has 4 real tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, *thw, generator=g)
    t = torch.rand(b, generator=g)
    text = torch.randn(b, lc, TEXT_DIM, generator=g)
    mask = torch.ones(b, lc, dtype=torch.bool)
    mask[0, 4:] = False
    return x, t, text, mask


@torch.no_grad()
def _diffusers_velocity(model, x, t, text, mask):
    """diffusers' call: timestep on 0..1000, padded text features zero (Wan has no text mask)."""
    return model(x, t * 1000, text * mask[..., None], return_dict=False)[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny diffusers model saved (sharded for the 14B one) and imported with vdit-import."""
    out = {}
    for kind in TINY:
        root = tmp_path_factory.mktemp(f"wan_{kind}")
        model = _diffusers_model(kind)
        model.save_pretrained(root / "transformer", max_shard_size="200KB" if kind == "14b" else "5GB")
        assert import_main(["wan", str(root), str(root / "vdit")]) == 0
        out[kind] = root
    return out


@pytest.mark.parametrize("kind", list(TINY))
def test_imported_model_matches_diffusers(folders, kind):
    from diffusers import WanTransformer3DModel

    if kind == "14b":
        assert (folders[kind] / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ref = WanTransformer3DModel.from_pretrained(folders[kind] / "transformer").eval()
    cfg, model, step = load_exported(str(folders[kind] / "vdit"))
    model.eval()
    assert step == 0 and cfg.model.hidden_size == ref.config.num_attention_heads * ref.config.attention_head_dim
    assert cfg.text_encoder.max_length == 512 and cfg.text_encoder.hidden_size == TEXT_DIM
    worst = 0.0
    for i, thw in enumerate(SHAPES):
        x, t, text, mask = _inputs(thw, seed=i)
        expected = _diffusers_velocity(ref, x, t, text, mask)
        with torch.no_grad():
            got = model(x, t, text, mask)
        worst = max(worst, (got - expected).abs().max().item())
        assert expected.abs().max() > 0.1  # not vacuous
    print(f"\n[wan {kind}-tiny] largest |vdit - diffusers| over {len(SHAPES)} shapes: {worst:.3g}")
    assert worst <= TOL


@pytest.mark.parametrize("kind", list(TINY))
def test_round_trip_vdit_diffusers_vdit_is_bit_exact(folders, tmp_path, kind):
    from diffusers import WanTransformer3DModel

    src = folders[kind] / "vdit"
    assert export_main(["--from-export", str(src), "--format", "diffusers-wan", "--out", str(tmp_path / "d")]) == 0
    back = WanTransformer3DModel.from_pretrained(tmp_path / "d").eval()
    cfg, model, _ = load_exported(str(src))
    x, t, text, mask = _inputs(SHAPES[1], seed=5)
    with torch.no_grad():
        assert (model(x, t, text, mask) - _diffusers_velocity(back, x, t, text, mask)).abs().max() <= TOL
    config, tensors = read_diffusers_folder(tmp_path / "d")
    state = wan_to_vdit(tensors, dit_config_from_diffusers(config))
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    # sharded writing reads back the same
    write_diffusers_folder(tmp_path / "s", cfg.model, model.state_dict(), max_shard_bytes=50_000)
    _, sharded = read_diffusers_folder(tmp_path / "s")
    assert all(torch.equal(sharded[k], v) for k, v in tensors.items())


def test_errors_list_names_and_settings(folders, tmp_path):
    config, tensors = read_diffusers_folder(folders["1.3b"])
    cfg = dit_config_from_diffusers(config)
    bad = dict(tensors)
    bad["blocks.0.attn1.extra.weight"] = torch.zeros(1)
    del bad["blocks.1.ffn.net.2.bias"]
    with pytest.raises(WanConversionError, match=r"blocks\.0\.attn1\.extra\.weight.*blocks\.1\.ffn\.net\.2\.bias"):
        wan_to_vdit(bad, cfg)
    wrong = DiTConfig(**{**cfg.__dict__, "text_dim": 64})
    with pytest.raises(WanConversionError, match=r"text_proj\.fc1\.weight.*model\.text_dim"):
        wan_to_vdit(tensors, wrong)
    with pytest.raises(WanConversionError, match="model.depth"):
        wan_to_vdit(tensors, DiTConfig(**{**cfg.__dict__, "depth": 3}))
    with pytest.raises(WanConversionError, match="I2V"):
        dit_config_from_diffusers({**config, "image_dim": 1280, "added_kv_proj_dim": 5120})
    with pytest.raises(WanConversionError, match="model.final_modulation"):
        vdit_to_wan({}, DiTConfig(**{**cfg.__dict__, "final_modulation": "linear"}))
    # the CLI: a preset that does not fit, and a folder without a transformer, exit 1 with the reason
    assert import_main(["wan", str(folders["1.3b"]), str(tmp_path / "o"), "--model", "wan2.1-t2v-1.3b"]) == 1
    assert import_main(["wan", str(tmp_path), str(tmp_path / "o")]) == 1


def test_presets_are_wan_exactly():
    from diffusers import WanTransformer3DModel

    from vdit.train.wan_import import preset_config

    for name, kw in {"wan2.1-t2v-1.3b": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
                     "wan2.1-t2v-14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)}.items():
        with torch.device("meta"):
            ref = WanTransformer3DModel(**kw)
        cfg = preset_config(name, 4096)
        assert cfg == dit_config_from_diffusers(ref.config)
        assert all(getattr(cfg, k) == v for k, v in WAN_OPTIONS.items())
        assert cfg.num_params() == sum(p.numel() for p in ref.parameters())


# --------------------------------------------------------------------------------- 2 ranks (gloo)
def _dist_checks(rank: int, folder: str) -> dict[str, str]:
    import copy

    from diffusers import WanTransformer3DModel

    from vdit.train.config import LoraConfig, ParallelConfig
    from vdit.train.lora import apply_lora
    from vdit.train.parallel.dims import ParallelDims
    from vdit.train.parallel.fsdp import materialize_from_state, parallelize
    from vdit.train.parallel.sequence import apply_sequence_parallel, build_sp_groups

    ref = WanTransformer3DModel.from_pretrained(os.path.join(folder, "transformer")).eval()
    cfg, plain, _ = load_exported(os.path.join(folder, "vdit"))
    plain.eval()
    state = plain.state_dict()
    cases = [_inputs(thw, seed=i) for i, thw in enumerate(SHAPES)]
    expected = [_diffusers_velocity(ref, *c) for c in cases]
    results: dict[str, str] = {}

    def check(name, model):
        try:
            with torch.no_grad():
                worst = max((model(*c) - e).abs().max().item() for c, e in zip(cases, expected))
            results[name] = "ok" if worst <= TOL else f"max diff {worst}"
        except Exception:
            results[name] = traceback.format_exc()

    groups = build_sp_groups(2, 2, "ulysses")  # collective: every rank, same order
    for mode in ("ulysses", "ring"):
        model = copy.deepcopy(plain)
        handle = apply_sequence_parallel(model, groups.sp, mode)
        check(f"sp_{mode}", model)
        handle.remove()
    pcfg = ParallelConfig(backend="fsdp")
    dims = ParallelDims(pcfg, 2, num_heads=cfg.model.num_heads)
    dims.build_mesh("cpu")
    with torch.device("meta"):
        sharded = VideoDiT(cfg.model)
    parallelize(sharded, dims, pcfg)
    materialize_from_state(sharded, "cpu", lambda: state)
    check("fsdp", sharded.eval())
    # LoRA under FSDP: base frozen and sharded, adapters trainable; output = the single-device LoRA model
    lora = LoraConfig(rank=4)
    single = apply_lora(copy.deepcopy(plain), lora, seed=3)
    with torch.no_grad():
        for n, p in single.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    with torch.device("meta"):
        lm = apply_lora(VideoDiT(cfg.model), lora)
    parallelize(lm, dims, pcfg)
    materialize_from_state(lm, "cpu", lambda: single.state_dict())
    x, t, text, mask = cases[1]
    try:
        from torch.distributed.tensor import DTensor

        params = dict(lm.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values())
        assert all(p.requires_grad == (".lora_" in n) for n, p in params.items())
        with torch.no_grad():
            diff = (lm(x, t, text, mask) - single(x, t, text, mask)).abs().max().item()
        assert diff <= TOL, diff
        lm(x, t, text, mask).square().mean().backward()
        assert all((p.grad is not None) == p.requires_grad for p in params.values())
        results["fsdp_lora"] = "ok"
    except Exception:
        results["fsdp_lora"] = traceback.format_exc()
    return results


def _worker(rank: int, world: int, port: int, out: str, folders: dict[str, str]) -> dict:
    init_rank(rank, world, port)
    res = {}
    for kind, folder in folders.items():
        res.update({f"{kind}_{k}": v for k, v in _dist_checks(rank, folder).items()})
    dist.barrier()
    return res


@pytest.mark.multiproc
def test_equality_under_fsdp_and_sequence_parallel(folders, tmp_path):
    results = spawn(_worker, 2, tmp_path, {k: str(v) for k, v in folders.items()})
    failures = {f"rank {r} {k}": v for r, res in enumerate(results) for k, v in res.items() if v != "ok"}
    assert not failures, json.dumps(failures, indent=1)
    assert len(results[0]) == 8

"""Finetuning from imported weights: ``train.init_from``, LoRA through peft, ``--merge-lora``, and the
UMT5 text settings that reproduce Wan's conditioning (a tiny random UMT5 built here).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_wan_finetune.py -v
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import write_shards
from tests.test_train import tiny_cfg as train_cfg
from vdit.train.export import export, load_checkpoint_weights, load_exported
from vdit.train.export import main as export_main
from vdit.train.logging import read_metrics
from vdit.train.trainer import Trainer

WAN_STYLE = ["model.modulation=shared", "model.qk_norm_scope=across_heads", "model.final_modulation=table",
             "model.rope_split=wan", "model.rope_fp64=true", "model.text_padding=zeros"]


def tiny_cfg(shards, run_dir, *extra):
    """The trainer tests' tiny run (tests/test_train.py), 4 steps, in Wan's architecture options."""
    return train_cfg(shards, run_dir, "train.steps=4", "train.log_every=1", "optim.warmup_steps=0", "optim.lr=1e-2",
                     *WAN_STYLE, *extra)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Shards and a 'pretrained' export folder (random non-zero weights of the tiny Wan-style model)."""
    from vdit.model.dit import VideoDiT

    root = tmp_path_factory.mktemp("wan_finetune")
    write_shards(str(root / "shards"), 2, 4)
    cfg = tiny_cfg(root / "shards", root / "unused")
    model = VideoDiT(cfg.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    export(cfg, model, str(root / "pretrained"), 0, "raw")
    return {"shards": root / "shards", "init": str(root / "pretrained"), "state": model.state_dict()}


def _losses(run_dir):
    rows = {r["step"]: r["loss/train"] for r in read_metrics(run_dir) if "loss/train" in r}
    return [rows[s] for s in sorted(rows)]


def test_init_from_loads_weights_fresh_optimizer_and_ema(setup, tmp_path):
    t = Trainer(tiny_cfg(setup["shards"], tmp_path / "r", f"train.init_from={setup['init']}"))
    for n, p in t.model.state_dict().items():
        assert torch.equal(p, setup["state"][n]), n
    assert all(torch.equal(s, setup["state"][n]) for n, s in t.ema.shadow.items())
    assert t.step == 0 and not t.optimizer.state
    assert t.param_summary["params/frozen"] == 0
    # a different model config is an error naming the setting
    with pytest.raises(ValueError, match="model.mlp_ratio"):
        Trainer(tiny_cfg(setup["shards"], tmp_path / "bad", f"train.init_from={setup['init']}", "model.mlp_ratio=2"))


def test_lora_trains_adapters_only_resumes_exactly_and_merges(setup, tmp_path):
    extra = (f"train.init_from={setup['init']}", "lora.rank=4", "lora.alpha=8", "lora.dropout=0.1")
    full = Trainer(tiny_cfg(setup["shards"], tmp_path / "full", *extra))
    params = dict(full.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    in_optim = {id(p) for g in full.optimizer.param_groups for p in g["params"]}
    assert in_optim == {id(params[n]) for n in trainable}
    assert set(full.ema.shadow) == trainable
    s = full.param_summary
    assert s["params/trainable"] == sum(params[n].numel() for n in trainable)
    assert s["optim/state_bytes"] == 8 * s["params/trainable"]
    full.fit()

    cfg = tiny_cfg(setup["shards"], tmp_path / "split", *extra)
    Trainer(cfg).fit(stop_at=2)
    resumed = Trainer(cfg)
    resumed.fit()
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full") and len(_losses(tmp_path / "full")) == 4
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n
    # the base stayed frozen at the imported weights; the adapters moved
    sd = full.model.state_dict()
    for n, v in setup["state"].items():
        key = n.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(sd[key] if key in sd else sd[n], v), n
    assert any(sd[n].abs().max() > 0 for n in trainable if "lora_B" in n)

    # --merge-lora: plain weights whose outputs equal the adapted model's
    ckpt = full.checkpoints.latest()
    adapted, _ = load_checkpoint_weights(full.cfg, ckpt, "raw")
    out = tmp_path / "merged"
    assert export_main(["--run-dir", str(tmp_path / "full"), "--weights", "raw", "--merge-lora",
                        "--out", str(out)]) == 0
    mcfg, merged, _ = load_exported(str(out))
    assert mcfg.lora.rank == 0 and not any(".lora_" in n for n in merged.state_dict())
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 4, 32, 32, generator=g), torch.rand(2, generator=g)
    text, mask = torch.randn(2, 8, 32, generator=g), torch.ones(2, 8, dtype=torch.bool)
    adapted.eval()
    merged.eval()
    with torch.no_grad():
        want, got = adapted(x, t, text, mask), merged(x, t, text, mask)
        base = load_exported(setup["init"])[1].eval()(x, t, text, mask)
    # merging W + s B A into one matrix changes fp32 rounding only: |diff| ~ 1e-6 of the output scale (~25
    # here), while the adapters moved the output by far more
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 4e-6 * scale
    assert (base - want).abs().max().item() > 1e-3 * scale
    # a LoRA run exports to diffusers only merged
    assert export_main(["--run-dir", str(tmp_path / "full"), "--format", "diffusers-wan",
                        "--out", str(tmp_path / "d")]) == 1


def _tiny_umt5(path):
    """A random 2-layer UMT5 encoder and a word-level fast tokenizer, saved like a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = "a red ball bounces on the floor blue cube slides left".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(cfg).save_pretrained(path)


def test_umt5_settings_reproduce_wan_text_conditioning(tmp_path):
    """``text_encoder.name=hf`` with ``max_length`` = Wan's ``max_sequence_length`` gives the features
    WanPipeline builds (zero beyond each caption), and with ``model.text_padding=zeros`` the DiT sees
    exactly what Wan's transformer sees."""
    from types import SimpleNamespace

    from diffusers import WanPipeline

    from vdit.model.text import build_text_encoder

    _tiny_umt5(tmp_path / "umt5")
    captions = ["a red ball bounces on the floor", "blue cube slides left"]
    ours = build_text_encoder("hf", str(tmp_path / "umt5"), max_length=12)
    text, mask = ours.encode(captions)
    assert text.shape == (2, 12, 32) and mask.sum(1).tolist() == [8, 5]  # words + </s>
    pipe = SimpleNamespace(tokenizer=ours.tokenizer, text_encoder=ours.model, _execution_device=torch.device("cpu"))
    wan = WanPipeline._get_t5_prompt_embeds(pipe, captions, max_sequence_length=12, device=torch.device("cpu"),
                                            dtype=torch.float32)
    assert torch.equal(text, wan)

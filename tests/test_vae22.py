"""Wan 2.2 VAE against the official code's golden outputs (golden/vae22)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import runtime
from runtime.vae import LATENT_MEAN_22, LATENT_STD_22
from runtime.vae22 import patchify, unpatchify
from runtime.vae_blocks import FeatureCache, encoder_global

pytestmark = pytest.mark.golden

FP32_ABS = 1e-4
BF16_REL = 0.05


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def max_abs(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.float() - ref.float()).abs().max().item()


@pytest.fixture(scope="module")
def g22(golden):
    root = golden / "vae22"
    return {
        "config": json.loads((root / "config.json").read_text()),
        "io": load_file(str(root / "io.safetensors")),
        "weights": root / "weights.safetensors",
    }


@pytest.fixture(scope="module")
def vae(g22):
    return runtime.load_vae(g22["weights"])


def test_config_detected_from_weights(vae, g22):
    kw, c = g22["config"]["model_kwargs"], vae.config
    assert c.version == "2.2" and c.patch_size == g22["config"]["patch_size"]
    assert (c.dim, c.dec_dim, c.z_dim) == (kw["dim"], kw["dec_dim"], kw["z_dim"])
    assert (list(c.dim_mult), c.num_res_blocks) == (kw["dim_mult"], kw["num_res_blocks"])
    assert list(c.temporal_downsample) == kw["temperal_downsample"]
    assert list(c.stride) == g22["config"]["stride"]


def test_latent_constants_are_the_official_literals(vae, g22):
    assert list(LATENT_MEAN_22) == g22["config"]["latent_mean"]
    assert list(LATENT_STD_22) == g22["config"]["latent_std"]
    assert torch.equal(vae.inv_std, 1.0 / torch.tensor(g22["config"]["latent_std"], dtype=torch.float32))


def test_patchify_channel_order_and_inverse():
    """channel 4c + 2r + q holds pixel (2h + q, 2w + r)."""
    x = torch.randn(1, 3, 2, 6, 8)
    p = patchify(x)
    assert p.shape == (1, 12, 2, 3, 4)
    for c, r, q in ((0, 0, 0), (1, 1, 0), (2, 0, 1), (2, 1, 1)):
        assert torch.equal(p[0, 4 * c + 2 * r + q, :, 1, 2], x[0, c, :, 2 + q, 4 + r])
    assert torch.equal(unpatchify(p), x)


def test_encode(vae, g22):
    io = g22["io"]
    (latent,) = vae.encode([io["video"]])
    assert latent.shape == io["latent"].shape
    assert max_abs(latent, io["latent"]) < FP32_ABS


def test_encoder_intermediates(vae, g22):
    io, model = g22["io"], vae.model
    z = vae.config.z_dim
    with torch.inference_mode():
        features = [f for _, f in model.encode_chunks(io["video"], FeatureCache(), local_only=True)]
        assert len(features) == len(io["enc_chunk_frames"]) and set(io["enc_chunk_frames"].tolist()) == {1}
        cache = FeatureCache()
        outs = []
        for f in features:
            outs.append(encoder_global(model.encoder, f[None, :, None], cache))
            cache.first_chunk = False
        enc = torch.cat(outs, dim=2)
        assert max_abs(enc[0], io["enc_chunks_out"]) < FP32_ABS
        halves = model.conv1(enc)[0]
    assert max_abs(halves[:z], io["mu_unnormalized"]) < FP32_ABS
    assert max_abs(halves[z:], io["log_var"]) < FP32_ABS


def test_decode(vae, g22):
    io = g22["io"]
    (video,) = vae.decode([io["latent"]])
    assert video.shape == io["decoded"].shape
    assert max_abs(video, io["decoded"]) < FP32_ABS
    assert max_abs(vae.decode_unclamped(io["latent"]), io["decoded_preclamp"]) < FP32_ABS


def test_decoder_intermediates(vae, g22):
    io, model = g22["io"], vae.model
    z = io["latent"] / vae.inv_std.view(-1, 1, 1, 1) + vae.mean.view(-1, 1, 1, 1)
    with torch.inference_mode():
        x = model.conv2(z.unsqueeze(0))
        assert max_abs(x[0], io["dec_conv2_out"]) < FP32_ABS
        cache = FeatureCache()
        per_chunk = []
        for i in range(x.shape[2]):
            per_chunk.append(sum(1 for _ in model.decoder(x[:, :, i : i + 1], cache)))
            cache.first_chunk = False
    assert per_chunk == io["dec_chunk_frames"].tolist()


def test_single_image(vae, g22):
    io = g22["io"]
    assert max_abs(vae.encode([io["image"]])[0], io["image_latent"]) < FP32_ABS
    assert max_abs(vae.decode([io["image_latent"]])[0], io["image_decoded"]) < FP32_ABS


def test_causality_first_latent_frame(vae, g22):
    io = g22["io"]
    (whole,) = vae.encode([io["video"]])
    (first,) = vae.encode([io["video"][:, :1]])
    assert max_abs(whole[:, :1], first) < FP32_ABS


def test_channels_last_layout_gives_the_same_numbers(g22):
    io = g22["io"]
    vae = runtime.load_vae(g22["weights"], channels_last=True)
    assert max_abs(vae.encode([io["video"]])[0], io["latent"]) < FP32_ABS
    assert max_abs(vae.decode_unclamped(io["latent"]), io["decoded_preclamp"]) < FP32_ABS


def test_bf16_compute_within_readme_bound(g22):
    io = g22["io"]
    vae = runtime.load_vae(g22["weights"], dtype=torch.bfloat16)
    assert rel_l2(vae.encode([io["video"]])[0], io["latent"]) < BF16_REL
    assert rel_l2(vae.decode_unclamped(io["latent"]), io["decoded_preclamp"]) < BF16_REL


def test_spatial_size_must_be_a_multiple_of_16(vae, g22):
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode([g22["io"]["video"][:, :, :40]])


@pytest.mark.gpu
def test_cuda_matches_golden(g22):
    io = g22["io"]
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        vae = runtime.load_vae(g22["weights"], device="cuda")
        assert max_abs(vae.encode([io["video"].cuda()])[0].cpu(), io["latent"]) < FP32_ABS
        assert max_abs(vae.decode_unclamped(io["latent"].cuda()).cpu(), io["decoded_preclamp"]) < FP32_ABS
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    vae = runtime.load_vae(g22["weights"], device="cuda", dtype=torch.bfloat16)
    assert rel_l2(vae.encode([io["video"].cuda()])[0].cpu(), io["latent"]) < BF16_REL
    assert rel_l2(vae.decode_unclamped(io["latent"].cuda()).cpu(), io["decoded_preclamp"]) < BF16_REL

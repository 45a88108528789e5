"""Wan 2.1 VAE against the official code's golden outputs (golden/vae21, golden/pipeline),
and the loader's handling of real file formats."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import runtime
from runtime.vae import LATENT_MEAN_21, LATENT_STD_21, config_from_weights
from runtime.vae_blocks import FeatureCache, encoder_global

pytestmark = pytest.mark.golden

FP32_ABS = 1e-4  # README: an fp32 implementation agrees to a few 1e-6
BF16_REL = 0.05  # README: about 2% relative L2 for bf16 compute, bound 5%


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def max_abs(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.float() - ref.float()).abs().max().item()


@pytest.fixture(scope="module")
def g21(golden):
    root = golden / "vae21"
    return {
        "root": root,
        "config": json.loads((root / "config.json").read_text()),
        "io": load_file(str(root / "io.safetensors")),
        "weights": root / "weights.safetensors",
    }


@pytest.fixture(scope="module")
def vae(g21):
    return runtime.load_vae(g21["weights"])


def test_config_detected_from_weights(vae, g21):
    kw, c = g21["config"]["model_kwargs"], vae.config
    assert c.version == "2.1"
    assert (c.dim, c.z_dim, list(c.dim_mult), c.num_res_blocks) == (kw["dim"], kw["z_dim"], kw["dim_mult"], kw["num_res_blocks"])
    assert list(c.temporal_downsample) == kw["temperal_downsample"]
    assert list(c.stride) == g21["config"]["stride"]


def test_latent_constants_are_the_official_literals(vae, g21):
    assert list(LATENT_MEAN_21) == g21["config"]["latent_mean"]
    assert list(LATENT_STD_21) == g21["config"]["latent_std"]
    # held as float32 mean and 1/std computed in float32
    assert vae.mean.dtype == vae.inv_std.dtype == torch.float32
    assert torch.equal(vae.inv_std, 1.0 / torch.tensor(g21["config"]["latent_std"], dtype=torch.float32))


def test_encode(vae, g21):
    io = g21["io"]
    (latent,) = vae.encode([io["video"]])
    assert latent.shape == io["latent"].shape and latent.dtype == torch.float32
    assert max_abs(latent, io["latent"]) < FP32_ABS


def test_encoder_intermediates(vae, g21):
    """Per-chunk encoder output (mu and log_var halves), one latent frame per chunk."""
    io, model = g21["io"], vae.model
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


def test_decode(vae, g21):
    io = g21["io"]
    (video,) = vae.decode([io["latent"]])
    assert video.shape == io["decoded"].shape and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert max_abs(video, io["decoded"]) < FP32_ABS
    assert max_abs(vae.decode_unclamped(io["latent"]), io["decoded_preclamp"]) < FP32_ABS


def test_decoder_intermediates(vae, g21):
    """conv2 on the de-normalised latent, and frames per decoder chunk [1, 4, 4, ...]."""
    io, model = g21["io"], vae.model
    z = io["latent"] / vae.inv_std.view(-1, 1, 1, 1) + vae.mean.view(-1, 1, 1, 1)
    with torch.inference_mode():
        assert max_abs(model.conv2(z.unsqueeze(0))[0], io["dec_conv2_out"]) < FP32_ABS
        cache = FeatureCache()
        x = model.conv2(z.unsqueeze(0))
        per_chunk = []
        for i in range(x.shape[2]):
            per_chunk.append(sum(1 for _ in model.decoder(x[:, :, i : i + 1], cache)))
            cache.first_chunk = False
    assert per_chunk == io["dec_chunk_frames"].tolist()


def test_single_image(vae, g21):
    io = g21["io"]
    (latent,) = vae.encode([io["image"]])
    assert max_abs(latent, io["image_latent"]) < FP32_ABS
    (image,) = vae.decode([io["image_latent"]])
    assert max_abs(image, io["image_decoded"]) < FP32_ABS


def test_i2v_conditioning(vae, g21):
    """The I2V condition: image as frame 0, zeros after it, one encode; y = mask (4) + latent."""
    io = g21["io"]
    frames = io["video"].shape[1]
    cond = torch.cat([io["image"], torch.zeros(3, frames - 1, *io["image"].shape[2:])], dim=1)
    (latent,) = vae.encode([cond])
    assert max_abs(latent, io["i2v_cond_latent"]) < FP32_ABS
    mask = torch.zeros(4, *latent.shape[1:])
    mask[:, 0] = 1
    assert torch.equal(mask, io["i2v_mask"])
    assert max_abs(torch.cat([mask, latent]), io["i2v_y"]) < FP32_ABS
    # causality: latent frame 0 of the condition is the image's latent
    assert max_abs(latent[:, :1], io["image_latent"]) < FP32_ABS


def test_batch_of_videos_is_a_list_of_independent_results(vae, g21):
    io = g21["io"]
    a, b = vae.encode([io["video"], io["image"]])
    assert max_abs(a, io["latent"]) < FP32_ABS and max_abs(b, io["image_latent"]) < FP32_ABS


def test_channels_last_layout_gives_the_same_numbers(g21):
    io = g21["io"]
    vae = runtime.load_vae(g21["weights"], channels_last=True)
    assert max_abs(vae.encode([io["video"]])[0], io["latent"]) < FP32_ABS
    assert max_abs(vae.decode_unclamped(io["latent"]), io["decoded_preclamp"]) < FP32_ABS


def test_bf16_compute_within_readme_bound(g21):
    io = g21["io"]
    vae = runtime.load_vae(g21["weights"], dtype=torch.bfloat16)
    (latent,) = vae.encode([io["video"]])
    assert latent.dtype == torch.float32
    assert rel_l2(latent, io["latent"]) < BF16_REL
    assert rel_l2(vae.decode_unclamped(io["latent"]), io["decoded_preclamp"]) < BF16_REL


def test_bad_inputs_are_refused_with_a_reason(vae, g21):
    io = g21["io"]
    with pytest.raises(TypeError, match="list"):
        vae.encode(io["video"])
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae.encode([io["video"][:, :4]])
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode([io["video"][:, :, :44]])
    with pytest.raises(ValueError, match=r"\[16, T, h, w\]"):
        vae.decode([io["latent"][:8]])


# --- the pipeline's VAE (golden/pipeline): another tiny Wan 2.1 VAE, its official calls


@pytest.fixture(scope="module")
def pipeline_vae(golden):
    return runtime.load_vae(golden / "pipeline" / "vae.safetensors")


def test_pipeline_vae_on_nonzero_content(pipeline_vae, golden):
    extra = load_file(str(golden / "pipeline" / "vae_extra.safetensors"))
    (latent,) = pipeline_vae.encode([extra["encode_input"]])
    assert max_abs(latent, extra["encode_output"]) < FP32_ABS
    (video,) = pipeline_vae.decode([extra["decode_input"]])
    assert max_abs(video, extra["decode_output"]) < FP32_ABS


def test_pipeline_vae_trace(pipeline_vae, golden):
    trace = load_file(str(golden / "pipeline" / "trace.safetensors"))
    frames = trace["video"].shape[1]
    image = trace["image_resized"]
    cond = torch.cat([image[:, None], torch.zeros(3, frames - 1, *image.shape[1:])], dim=1)
    (latent,) = pipeline_vae.encode([cond])
    assert max_abs(latent, trace["vae_encode_output"]) < FP32_ABS
    (video,) = pipeline_vae.decode([trace["final_latent"]])
    assert max_abs(video, trace["video"]) < FP32_ABS


# --- loading


@pytest.fixture(scope="module")
def state_dict(g21):
    return load_file(str(g21["weights"]))


def test_official_pth_zip_and_legacy_formats(tmp_path, state_dict, g21):
    io = g21["io"]
    for name, kwargs in (("zip.pth", {}), ("legacy.pth", {"_use_new_zipfile_serialization": False})):
        path = tmp_path / name
        torch.save(state_dict, path, **kwargs)
        vae = runtime.load_vae(path)
        assert max_abs(vae.encode([io["image"]])[0], io["image_latent"]) < FP32_ABS


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pth_with_code_running_pickle_is_refused_without_running_it(tmp_path, state_dict):
    marker = tmp_path / "ran"
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({**state_dict, "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(ValueError, match="refused"):
        runtime.load_vae(path)
    assert not marker.exists()
    # the same with a plain pickle file renamed .pth
    path2 = tmp_path / "plain.pth"
    path2.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    with pytest.raises(ValueError):
        runtime.load_vae(path2)
    assert not marker.exists()


def test_a_file_that_is_not_a_wan_vae_is_refused_by_name(golden, tmp_path):
    dit = golden / "dit" / "i2v" / "weights.safetensors"
    with pytest.raises(ValueError, match="not a Wan VAE.*DiT"):
        runtime.load_vae(dit)
    other = tmp_path / "other.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match="not a Wan VAE"):
        runtime.load_vae(other)
    with pytest.raises(FileNotFoundError):
        runtime.load_vae(tmp_path / "missing.pth")


def test_comfyui_style_file_prefixed_and_half_precision(tmp_path, state_dict, g21):
    """Single files may bundle the VAE under a prefix and store bf16/fp16; names are official."""
    io = g21["io"]
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file({f"vae.{k}": v.to(torch.bfloat16) for k, v in state_dict.items()}, str(path))
    vae = runtime.load_vae(path)
    assert vae.config.version == "2.1"
    assert rel_l2(vae.encode([io["video"]])[0], io["latent"]) < BF16_REL


def test_incomplete_state_dict_names_what_is_missing(state_dict):
    sd = dict(state_dict)
    del sd["decoder.upsamples.3.time_conv.weight"]
    with pytest.raises(ValueError, match="time_conv"):
        runtime.load_vae(sd)


def test_config_from_weights_rejects_other_input_widths(state_dict):
    sd = dict(state_dict)
    sd["encoder.conv1.weight"] = torch.zeros(8, 5, 3, 3, 3)
    with pytest.raises(ValueError, match="takes 5 channels"):
        config_from_weights(sd)


@pytest.mark.gpu
def test_cuda_matches_golden(g21):
    """On CUDA with channels-last activations: float32 (TF32 off) to the fp32 bound, bf16
    to the README's bf16 bound."""
    io = g21["io"]
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        vae = runtime.load_vae(g21["weights"], device="cuda")
        assert vae.memory_format == torch.channels_last_3d
        assert max_abs(vae.encode([io["video"].cuda()])[0].cpu(), io["latent"]) < FP32_ABS
        assert max_abs(vae.encode([io["video"]])[0].cpu(), io["latent"]) < FP32_ABS  # input left on the host
        assert max_abs(vae.decode_unclamped(io["latent"].cuda()).cpu(), io["decoded_preclamp"]) < FP32_ABS
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    vae = runtime.load_vae(g21["weights"], device="cuda", dtype=torch.bfloat16)
    assert rel_l2(vae.encode([io["video"].cuda()])[0].cpu(), io["latent"]) < BF16_REL
    assert rel_l2(vae.decode_unclamped(io["latent"].cuda()).cpu(), io["decoded_preclamp"]) < BF16_REL


def test_decoder_only_file_is_named_incomplete(state_dict):
    decoder_only = {k: v for k, v in state_dict.items() if not k.startswith("encoder.")}
    with pytest.raises(ValueError, match="incomplete Wan VAE: encoder.conv1.weight"):
        runtime.load_vae(decoder_only)


def test_a_vae_that_does_not_compress_time_4x_is_refused(tmp_path, state_dict):
    """The causal chunks are 4 frames because Wan VAEs compress time 4x: a VAE whose
    encoder downsamples time once is refused, not run on the wrong chunks."""
    first = min(k for k in state_dict if k.startswith("encoder.downsamples.") and ".time_conv." in k)
    stage = first.rsplit(".time_conv.", 1)[0]
    sd = {k: v for k, v in state_dict.items() if not k.startswith(stage + ".time_conv.")}
    save_file(sd, str(tmp_path / "stride2.safetensors"))
    with pytest.raises(ValueError, match="compresses time 2x"):
        runtime.load_vae(tmp_path / "stride2.safetensors")

"""Wan 2.1 VAE state dicts in diffusers' AutoencoderKLWan naming (runtime/vae_diffusers.py).

diffusers is not a dependency: tests/data/diffusers_vae21_names.json holds its names and
shapes for a few configurations (written by tests/data/make_diffusers_vae_names.py); the
comparison against diffusers' own model runs only where diffusers is installed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import runtime
from runtime.vae import build_model, config_from_weights
from runtime.vae_diffusers import name_map

FIXTURE = Path(__file__).parent / "data" / "diffusers_vae21_names.json"
FP32_ABS = 1e-4  # golden/vae21 README: an fp32 implementation agrees to a few 1e-6
STRUCTURE = ("z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")


@pytest.fixture(scope="module")
def names():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def g21(golden):
    root = golden / "vae21"
    return {
        "kwargs": json.loads((root / "config.json").read_text())["model_kwargs"],
        "io": load_file(str(root / "io.safetensors")),
        "weights": load_file(str(root / "weights.safetensors")),
        "path": root / "weights.safetensors",
    }


def shapes_at(entry: dict, dim: int) -> dict[str, list[int]]:
    """diffusers' shapes at base width `dim`. Every axis is a multiple of the base width or
    fixed (z, RGB, kernel), so it is affine in the width: two recorded widths give any."""
    (d0, d1), dims = entry["base_dims"][:2], entry["base_dims"]
    out = {}
    for name, per_dim in entry["tensors"].items():
        if dim in dims:
            out[name] = per_dim[dims.index(dim)]
            continue
        s0, s1 = per_dim[0], per_dim[1]
        axes = [a + (b - a) * (dim - d0) / (d1 - d0) for a, b in zip(s0, s1)]
        assert all(x == int(x) for x in axes), (name, axes)
        out[name] = [int(x) for x in axes]
    return out


def meta(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def entry_like(names, kwargs) -> dict:
    found = [e for e in names["wan21"] if all(e["config"][k] == kwargs[k] for k in STRUCTURE)]
    assert found, f"{FIXTURE.name} has no entry of the structure {[kwargs[k] for k in STRUCTURE]}; regenerate it"
    return found[0]


def golden_as_diffusers(names, g21) -> dict[str, torch.Tensor]:
    """The golden official tensors under diffusers' names, through a shape-checked bijection."""
    shapes = shapes_at(entry_like(names, g21["kwargs"]), g21["kwargs"]["dim"])
    mapping = name_map(meta(shapes), "fixture")
    official = g21["weights"]
    assert len(set(mapping.values())) == len(mapping)
    assert set(mapping.values()) == set(official)
    for dname, oname in mapping.items():
        assert list(official[oname].shape) == shapes[dname], (dname, oname)
    return {dname: official[oname] for dname, oname in mapping.items()}


@pytest.mark.parametrize("index", range(3))
def test_every_recorded_configuration_translates_to_the_official_model(names, index):
    """Names and shapes of each diffusers configuration become exactly those of the
    official model of the configuration read back from them."""
    entry = names["wan21"][index]
    for dim in entry["base_dims"]:
        official = {n: t for n, t in zip(*_translated(meta(shapes_at(entry, dim))))}
        config = config_from_weights(official)
        assert config.version == "2.1" and config.dim == dim
        assert (config.z_dim, list(config.dim_mult), config.num_res_blocks, list(config.temporal_downsample)) == \
            tuple(entry["config"][k] for k in STRUCTURE)
        with torch.device("meta"):
            expected = build_model(config).state_dict()
        assert sorted(expected) == sorted(official)
        assert all(expected[k].shape == official[k].shape for k in expected)


def _translated(sd):
    mapping = name_map(sd, "fixture")
    assert len(set(mapping.values())) == len(mapping)
    return [mapping[k] for k in sd], list(sd.values())


@pytest.mark.golden
def test_golden_in_diffusers_names_equals_the_official_file(names, g21, tmp_path):
    sd = golden_as_diffusers(names, g21)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(sd, str(path))
    vae, ref = runtime.load_vae(path), runtime.load_vae(g21["path"])
    assert vae.config == ref.config
    io = g21["io"]
    (latent,), (latent_ref,) = vae.encode([io["video"]]), ref.encode([io["video"]])
    assert torch.equal(latent, latent_ref)
    assert (latent - io["latent"]).abs().max().item() < FP32_ABS
    (video,), (video_ref,) = vae.decode([io["latent"]]), ref.decode([io["latent"]])
    assert torch.equal(video, video_ref)
    assert (video - io["decoded"]).abs().max().item() < FP32_ABS


@pytest.mark.golden
def test_incomplete_or_foreign_diffusers_dicts_are_named(names, g21):
    sd = meta(shapes_at(entry_like(names, g21["kwargs"]), g21["kwargs"]["dim"]))
    last_up = max(k for k in sd if k.startswith("decoder.up_blocks.") and k.endswith(".norm2.gamma"))
    middle_attention = next(k for k in sd if k.startswith("decoder.mid_block.attentions.0."))
    for gone in (last_up, "post_quant_conv.bias", "encoder.norm_out.gamma", middle_attention):
        with pytest.raises(ValueError, match="incomplete Wan VAE in diffusers naming") as e:
            runtime.load_vae({k: v for k, v in sd.items() if k != gone})
        assert gone in str(e.value)
    with pytest.raises(ValueError, match=r"encoder\.down_blocks\.1 \(all of it\)"):
        runtime.load_vae({k: v for k, v in sd.items() if not k.startswith("encoder.down_blocks.1.")})
    extra = "encoder.down_blocks.0.conv3.weight"
    with pytest.raises(ValueError, match="no known Wan 2.1 VAE module") as e:
        runtime.load_vae({**sd, extra: torch.empty(1, device="meta")})
    assert extra in str(e.value)


def test_wan22_in_diffusers_names_is_refused(names):
    entry = names["wan22"]
    with pytest.raises(ValueError, match="only the Wan 2.1 VAE is translated") as e:
        runtime.load_vae(meta(entry["tensors"]))
    assert "Wan 2.2 VAE" in str(e.value) and f"z_dim {entry['config']['z_dim']}" in str(e.value)


def test_an_image_autoencoder_is_not_taken_for_a_wan_vae():
    sd = {"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3), "post_quant_conv.weight": torch.zeros(4, 4, 1, 1),
          "decoder.up_blocks.0.resnets.0.norm1.weight": torch.zeros(8)}
    with pytest.raises(ValueError, match="diffusers AutoencoderKL of an image model"):
        runtime.load_vae(sd)


# ----------------------------------------------------------------------------- against diffusers


def _diffusers_vae(kwargs: dict, dim: int):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.AutoencoderKLWan(base_dim=dim, attn_scales=[], **{k: kwargs[k] for k in STRUCTURE}).eval()


def _compare(model, vae, video: torch.Tensor, latent: torch.Tensor) -> tuple[float, float]:
    """Max abs differences of encode and decode between diffusers and wanrt, with the
    wrapper's normalisation applied to diffusers' mean latent."""
    mean, inv_std = vae.mean.view(-1, 1, 1, 1), vae.inv_std.view(-1, 1, 1, 1)
    with torch.no_grad():
        mu = model.encode(video[None]).latent_dist.mode()[0]
        decoded = model.decode((latent / inv_std + mean)[None]).sample[0]  # diffusers clamps as the wrapper does
    (ours_latent,), (ours_video,) = vae.encode([video]), vae.decode([latent])
    return ((mu - mean) * inv_std - ours_latent).abs().max().item(), (decoded - ours_video).abs().max().item()


@pytest.mark.golden
def test_matches_diffusers_on_the_golden_weights(names, g21):
    sd = golden_as_diffusers(names, g21)
    model = _diffusers_vae(g21["kwargs"], g21["kwargs"]["dim"])
    model.load_state_dict(sd, strict=True)
    enc, dec = _compare(model, runtime.load_vae(model.state_dict()), g21["io"]["video"], g21["io"]["latent"])
    assert enc < FP32_ABS and dec < FP32_ABS


@pytest.mark.parametrize("index", range(3))
def test_matches_diffusers_on_random_weights(names, index):
    entry = names["wan21"][index]
    model = _diffusers_vae(entry["config"], entry["base_dims"][0])
    torch.manual_seed(index)
    with torch.no_grad():  # the golden set's initialisation keeps activations near unit size
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    vae = runtime.load_vae(model.state_dict())
    st, sh, _ = vae.config.stride
    video = torch.rand(3, 1 + 2 * st, 2 * sh, 3 * sh) * 2 - 1
    latent = torch.randn(vae.config.z_dim, 3, 2, 3)
    enc, dec = _compare(model, vae, video, latent)
    assert enc < FP32_ABS and dec < FP32_ABS

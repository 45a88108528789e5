"""Wan DiT names: diffusers -> official by rules, prefix stripping, model kind by key sets."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from quant import wan_names
from quant.gguf_reader import GGUFFile


def _names(path):
    if path.suffix == ".gguf":
        with GGUFFile(path) as f:
            return list(f.tensors)
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


@pytest.mark.golden
def test_diffusers_rules_reproduce_the_golden_name_map(golden):
    entries = json.loads((golden / "gguf/diffusers/name_map.json").read_text())
    assert entries
    for e in entries:
        assert wan_names.diffusers_to_official(e["diffusers"]) == e["official"], e


@pytest.mark.golden
def test_diffusers_names_of_the_golden_file_all_map_one_to_one(golden):
    names = _names(golden / "gguf/diffusers/diffusers_weights.safetensors")
    official = [wan_names.diffusers_to_official(n) for n in names]
    assert None not in official
    assert len(set(official)) == len(names)
    assert set(official) == set(_names(golden / "gguf/wan_tiny/wan_tiny.safetensors"))


def test_diffusers_norm2_is_official_norm3_and_unknown_names_are_refused():
    assert wan_names.diffusers_to_official("blocks.7.norm2.weight") == "blocks.7.norm3.weight"
    assert wan_names.diffusers_to_official("blocks.7.scale_shift_table") == "blocks.7.modulation"
    assert wan_names.diffusers_to_official("scale_shift_table") == "head.modulation"
    # The Wan 2.1 image branch.
    assert wan_names.diffusers_to_official("blocks.3.attn2.add_k_proj.weight") == "blocks.3.cross_attn.k_img.weight"
    assert wan_names.diffusers_to_official("blocks.3.attn2.norm_added_k.weight") == "blocks.3.cross_attn.norm_k_img.weight"
    assert wan_names.diffusers_to_official("condition_embedder.image_embedder.ff.net.2.bias") == "img_emb.proj.3.bias"
    # Diffusers' norm1/norm3 have no weights, official norm names are not diffusers names.
    for name in ("blocks.0.norm1.weight", "blocks.0.norm3.weight", "blocks.0.self_attn.q.weight",
                 "blocks.0.attn1.to_q.scale", "head.head.weight", "vace_blocks.0.proj.weight", ""):
        assert wan_names.diffusers_to_official(name) is None, name


def test_strip_prefix_follows_city96():
    comfy = ["model.diffusion_model.blocks.0.x", "model.diffusion_model.head.modulation", "first_stage_model.conv.w"]
    s = wan_names.strip_prefix(comfy)
    assert s.prefix == "model.diffusion_model."
    assert s.kept == {"blocks.0.x": comfy[0], "head.modulation": comfy[1]}
    assert s.dropped == ("first_stage_model.conv.w",)

    # net. counts only when every key has it.
    assert wan_names.strip_prefix(["net.a", "net.b"]).kept == {"a": "net.a", "b": "net.b"}
    mixed = wan_names.strip_prefix(["net.a", "b"])
    assert mixed.prefix is None and mixed.kept == {"net.a": "net.a", "b": "b"}

    plain = wan_names.strip_prefix(["blocks.0.x", "head.modulation"])
    assert plain.prefix is None and plain.dropped == ()


@pytest.mark.golden
@pytest.mark.parametrize(
    "relpath, kind",
    [
        ("gguf/wan_tiny/wan_tiny.safetensors", wan_names.WAN_DIT),
        ("gguf/wan_tiny/wan_tiny-Q4_0.gguf", wan_names.WAN_DIT),
        ("gguf/diffusers/diffusers_weights.safetensors", wan_names.WAN_DIT_DIFFUSERS),
        ("t5/weights.safetensors", wan_names.T5),
        ("t5/hf_weights.safetensors", wan_names.T5),
        ("t5/umt5_tiny_q8_0.gguf", wan_names.T5),
        ("vae21/weights.safetensors", wan_names.VAE),
        ("vae22/weights.safetensors", wan_names.VAE),
    ],
)
def test_detect_model_kind(golden, relpath, kind):
    names = wan_names.strip_prefix(_names(golden / relpath)).kept
    assert wan_names.detect_model_kind(names) == kind


@pytest.mark.golden
def test_detect_model_kind_sees_through_the_comfyui_prefix(golden):
    names = _names(golden / "gguf/wan_tiny/wan_tiny_comfy_bf16.safetensors")
    assert wan_names.detect_model_kind(names) == wan_names.UNKNOWN
    assert wan_names.detect_model_kind(wan_names.strip_prefix(names).kept) == wan_names.WAN_DIT


def test_detect_model_kind_unknown():
    assert wan_names.detect_model_kind(["a.weight", "b.bias"]) == wan_names.UNKNOWN
    assert wan_names.detect_model_kind([]) == wan_names.UNKNOWN

"""Recognising model folders: official, ComfyUI, flat GGUF pairs; what is missing or ambiguous."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quant.ggml_types import GGMLType
from quant.gguf_writer import GGUFWriter
from runtime.model_folder import (HIGH, LOW, ModelFilesError, expert_role, find_model_files, name_tokens,
                                  resolve_model_files)


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_bytes(b"")


def official(root: Path) -> None:
    touch(root, "high_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors",
          "high_noise_model/diffusion_pytorch_model.safetensors.index.json",
          "low_noise_model/diffusion_pytorch_model-00001-of-00002.safetensors",
          "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google/umt5-xxl/tokenizer.json")


@pytest.mark.parametrize("name,role", [
    ("Wan2.2-I2V-A14B-HighNoise-Q8_0.gguf", HIGH),
    ("Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf", LOW),
    ("wan2.2_i2v_high_noise_14B_fp16.safetensors", HIGH),
    ("wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors", LOW),
    ("Wan2_2-I2V-A14B-HIGH_fp8_e4m3fn_scaled_KJ.safetensors", HIGH),
    ("wan22_i2v_low.gguf", LOW),
    ("high_noise_model", HIGH),
    ("wan2.2_i2v_14B_fp16.safetensors", None),
    ("high_to_low.gguf", None),  # says both
    ("highlights.gguf", None),  # a word that merely starts with "high"
])
def test_expert_role_from_names(name, role):
    assert expert_role(Path(name)) == role


def test_name_tokens_split_camel_case_and_separators():
    assert name_tokens("Wan2.2-I2V-A14B-HighNoise-Q8_0") == ["wan2", "2", "i2v", "a14b", "high", "noise", "q8", "0"]


def test_official_layout(tmp_path):
    official(tmp_path)
    files = find_model_files(tmp_path)
    assert files.layout == "official"
    assert files.high_noise == tmp_path / "high_noise_model"
    assert files.low_noise == tmp_path / "low_noise_model"
    assert files.text_encoder == tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    assert files.vae == tmp_path / "Wan2.1_VAE.pth"
    assert files.tokenizer == tmp_path / "google" / "umt5-xxl"
    files.require("high_noise", "low_noise", "text_encoder", "tokenizer", "vae")


def test_diffusers_pipeline_layout(tmp_path):
    """Wan-AI/Wan2.2-I2V-A14B-Diffusers: transformer runs the high-noise steps, transformer_2 the low-noise ones."""
    touch(tmp_path, "model_index.json",
          "transformer/diffusion_pytorch_model-00001-of-00012.safetensors", "transformer/config.json",
          "transformer_2/diffusion_pytorch_model-00001-of-00012.safetensors",
          "text_encoder/model-00001-of-00005.safetensors", "text_encoder/config.json",
          "tokenizer/tokenizer.json", "tokenizer/spiece.model",
          "vae/diffusion_pytorch_model.safetensors", "vae/config.json", "scheduler/scheduler_config.json")
    files = find_model_files(tmp_path)
    assert files.layout == "diffusers"
    assert (files.high_noise, files.low_noise) == (tmp_path / "transformer", tmp_path / "transformer_2")
    assert files.text_encoder == tmp_path / "text_encoder"
    assert files.tokenizer == tmp_path / "tokenizer"
    assert files.vae == tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    files.require("high_noise", "low_noise", "text_encoder", "tokenizer", "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFilesError, match=r"vae/diffusion_pytorch_model.safetensors \(diffusers\)"):
        find_model_files(tmp_path).require("vae")


def test_comfyui_layout_prefers_i2v_and_non_fp8_and_the_wan21_vae(tmp_path):
    touch(tmp_path, "models/diffusion_models/wan2.2_i2v_high_noise_14B_fp16.safetensors",
          "models/diffusion_models/wan2.2_i2v_low_noise_14B_fp16.safetensors",
          "models/diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
          "models/diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
          "models/diffusion_models/flux1-dev.safetensors",
          "models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
          "models/text_encoders/umt5_xxl_fp16.safetensors",
          "models/text_encoders/t5xxl_fp16.safetensors",
          "models/vae/wan2.2_vae.safetensors", "models/vae/wan_2.1_vae.safetensors",
          "models/loras/wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors")
    files = find_model_files(tmp_path)
    assert files.layout == "comfyui"
    d = tmp_path / "models" / "diffusion_models"
    assert files.high_noise == d / "wan2.2_i2v_high_noise_14B_fp16.safetensors"
    assert files.low_noise == d / "wan2.2_i2v_low_noise_14B_fp16.safetensors"
    assert files.text_encoder.name == "umt5_xxl_fp16.safetensors"
    assert files.vae.name == "wan_2.1_vae.safetensors"
    assert files.tokenizer is None  # ComfyUI ships none: it must be given
    assert any("t2v" in n for n in files.notes)
    assert any("umt5_xxl_fp8_e4m3fn_scaled" in n for n in files.notes)
    with pytest.raises(ModelFilesError, match="--tokenizer"):
        files.require("tokenizer")


def test_flat_gguf_pair_with_a_gguf_text_encoder_brings_its_tokenizer(tmp_path):
    touch(tmp_path, "Wan2.2-I2V-A14B-HighNoise-Q8_0.gguf", "Wan2.2-I2V-A14B-LowNoise-Q8_0.gguf",
          "umt5-xxl-encoder-Q8_0.gguf", "wan_2.1_vae.safetensors")
    files = find_model_files(tmp_path)
    assert files.layout == "flat"
    assert files.high_noise.name == "Wan2.2-I2V-A14B-HighNoise-Q8_0.gguf"
    assert files.low_noise.name == "Wan2.2-I2V-A14B-LowNoise-Q8_0.gguf"
    assert files.text_encoder.name == "umt5-xxl-encoder-Q8_0.gguf"
    assert files.tokenizer == files.text_encoder  # the tokenizer.ggml metadata


def write_expert_gguf(path: Path, expert: str | None) -> None:
    w = GGUFWriter(path, arch="wan")
    if expert is not None:
        w.add_metadata("wan.expert", expert)
    w.add_tensor("head.modulation", (1, 2, 4), GGMLType.F32, lambda: np.zeros(8, np.float32).tobytes())
    w.write()


def test_gguf_experts_told_apart_by_metadata(tmp_path):
    write_expert_gguf(tmp_path / "expert_a.gguf", LOW)
    write_expert_gguf(tmp_path / "expert_b.gguf", HIGH)
    files = find_model_files(tmp_path)
    assert files.high_noise.name == "expert_b.gguf"
    assert files.low_noise.name == "expert_a.gguf"


def test_ambiguous_experts_are_refused_with_the_candidates(tmp_path):
    touch(tmp_path, "wan-i2v-HighNoise-Q8_0.gguf", "wan-i2v-HighNoise-Q4_0.gguf", "wan-i2v-LowNoise-Q4_0.gguf")
    with pytest.raises(ModelFilesError, match="several high-noise experts.*Q4_0.*Q8_0.*--high-noise"):
        find_model_files(tmp_path)


def test_missing_components_are_named_with_what_was_expected(tmp_path):
    touch(tmp_path, "wan-i2v-HighNoise-Q8_0.gguf")
    files = find_model_files(tmp_path)
    with pytest.raises(ModelFilesError) as e:
        files.require("high_noise", "low_noise", "text_encoder", "vae")
    msg = str(e.value)
    assert str(tmp_path) in msg and "flat layout" in msg
    for needed in ("low-noise", "--low-noise", "text-encoder", "models_t5_umt5-xxl-enc-bf16.pth",
                   "--text-encoder", "Wan2.1_VAE.pth", "--vae"):
        assert needed in msg
    assert "high-noise: expected" not in msg  # it was found


def test_only_the_wan22_vae_is_refused(tmp_path):
    touch(tmp_path, "high_noise_model/x.safetensors", "low_noise_model/x.safetensors", "Wan2.2_VAE.pth")
    with pytest.raises(ModelFilesError, match="Wan 2.2 VAE of TI2V-5B.*--vae"):
        find_model_files(tmp_path)


def test_explicit_files_override_the_folder_and_must_exist(tmp_path):
    official(tmp_path)
    other = tmp_path / "elsewhere"
    touch(other, "my_vae.safetensors", "t5/umt5.gguf")
    files = resolve_model_files(tmp_path, vae=other / "my_vae.safetensors", text_encoder=other / "t5" / "umt5.gguf")
    assert files.vae == other / "my_vae.safetensors"
    assert files.text_encoder == other / "t5" / "umt5.gguf"
    assert files.tokenizer == other / "t5" / "umt5.gguf"  # the one that goes with the given encoder
    assert files.high_noise == tmp_path / "high_noise_model"
    with pytest.raises(ModelFilesError, match="--vae .*nope.safetensors: no such file"):
        resolve_model_files(tmp_path, vae=tmp_path / "nope.safetensors")


def test_a_file_or_a_missing_folder_is_not_a_model_folder(tmp_path):
    touch(tmp_path, "model.gguf")
    with pytest.raises(ModelFilesError, match="is a file, not a model folder"):
        find_model_files(tmp_path / "model.gguf")
    with pytest.raises(ModelFilesError, match="no such model folder"):
        find_model_files(tmp_path / "absent")

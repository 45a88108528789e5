"""Baking LoRAs at conversion time: python -m quant.convert ... --lora PATH:STRENGTH merges
in float32 before quantizing and gives what the runtime applies."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quant.convert import main as convert_main
from quant.gguf_reader import GGUFFile
from runtime import load_dit
from runtime.lora import LoraSpec, apply_loras

pytestmark = pytest.mark.filterwarnings("ignore:.*key\\(s\\)")


@pytest.fixture(scope="module")
def root(golden):
    return golden / "lora"


@pytest.fixture(scope="module")
def manifest(root):
    return json.loads((root / "manifest.json").read_text())


@pytest.fixture(scope="module")
def base_path(root, manifest):
    return root / manifest["base_checkpoint"]


def tensors(path) -> dict[str, torch.Tensor]:
    with GGUFFile(path) as f:
        out = {}
        for name in f.tensors:
            v = f.load(name)
            out[name] = v if isinstance(v, torch.Tensor) else v.dequantize(torch.float32)
        return out


def raw(path) -> dict[str, bytes]:
    with GGUFFile(path) as f:
        return {n: (f.tensors[n].ggml_type, f.raw(n).numpy().tobytes()) for n in f.tensors}


def convert(*args) -> int:
    return convert_main([str(a) for a in args] + ["--quiet", "--no-extra-metadata"])


@pytest.mark.golden
def test_baked_f32_equals_the_merged_golden_and_the_runtime(tmp_path, root, manifest, base_path, capsys):
    heads = manifest["base_config"]["num_heads"]
    base = load_file(str(base_path))
    for strength in manifest["strengths"]:
        merged = load_file(str(root / f"merged_s{strength}.safetensors"))
        for e in (e for e in manifest["files"] if e["patched_tensors"]):
            out = tmp_path / f"{e['file']}-{strength}.gguf"
            assert convert(base_path, out, "--type", "f32", "--lora", f"{root / e['file']}:{strength}") == 0
            assert "baking LoRA" in capsys.readouterr().out
            baked = tensors(out)
            runtime = load_dit(base_path, num_heads=heads)
            apply_loras(runtime, [LoraSpec(root / e["file"], strength)], mode="merge")
            for name, value in baked.items():
                want = merged[name] if name in e["patched_tensors"] else base[name]
                assert (value.float() - want).abs().max().item() <= 1e-6, (e["file"], name)
                module_name, _, attr = name.rpartition(".")
                module = runtime.get_submodule(module_name)
                used = module.dense_weight(torch.float32) if attr == "weight" and hasattr(module, "dense_weight") \
                    else getattr(module, attr)
                assert (value.float() - used.float()).abs().max().item() <= 1e-6, (e["file"], name)


@pytest.mark.golden
def test_baked_q8_0_is_the_merged_float32_quantized(tmp_path, root, manifest, base_path):
    e = next(e for e in manifest["files"] if e["patched_tensors"])
    lora = f"{root / e['file']}:0.6"
    assert convert(base_path, tmp_path / "baked.gguf", "--type", "q8_0", "--lora", lora) == 0
    assert convert(base_path, tmp_path / "merged-f32.gguf", "--type", "f32", "--lora", lora) == 0
    assert convert(tmp_path / "merged-f32.gguf", tmp_path / "requant.gguf", "--type", "q8_0") == 0
    baked, requant = raw(tmp_path / "baked.gguf"), raw(tmp_path / "requant.gguf")
    assert baked == requant
    assert any(t.name == "Q8_0" for t, _ in baked.values())


@pytest.mark.golden
def test_expert_lora_only_into_its_expert_and_refusals(tmp_path, root, manifest, base_path, capsys):
    e = next(e for e in manifest["files"] if e["patched_tensors"])
    assert convert(base_path, tmp_path / "plain.gguf", "--type", "q8_0", "--expert", "low_noise") == 0
    assert convert(base_path, tmp_path / "low.gguf", "--type", "q8_0", "--expert", "low_noise",
                   "--lora", f"high={root / e['file']}:1.0") == 0
    assert "not baked into this low-noise expert" in capsys.readouterr().out
    assert raw(tmp_path / "plain.gguf") == raw(tmp_path / "low.gguf")

    # An expert LoRA for a checkpoint whose expert is unknown; a LoRA that does not fit.
    assert convert(base_path, tmp_path / "x.gguf", "--type", "q8_0", "--lora", f"high={root / e['file']}") == 1
    assert "--expert" in capsys.readouterr().err
    bad = next(e for e in manifest["files"] if not e["patched_tensors"])
    assert convert(base_path, tmp_path / "y.gguf", "--type", "q8_0", "--lora", str(root / bad["file"])) == 1
    err = capsys.readouterr().err
    assert "does not fit" in err and err.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()

"""open_checkpoint: every format gives the official names and the same values."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quant.checkpoint import GGUF, PTH, SAFETENSORS, SHARDED, CheckpointError, expert_from_path, open_checkpoint
from quant.packed import PackedTensor
from quant.pth import UnsafePickleError, load_state_dict
from quant.wan_names import T5, VAE, WAN_DIT

COMFY = "model.diffusion_model."


@pytest.fixture(scope="module")
def tiny(golden):
    return golden / "gguf/wan_tiny"


@pytest.fixture(scope="module")
def reference(tiny):
    """The tiny model's float32 weights under official names, in file order."""
    return load_file(str(tiny / "wan_tiny.safetensors"))


def _values(ckpt):
    out = {}
    for n in ckpt.names():
        x = ckpt.load(n)
        out[n] = x.dequantize() if isinstance(x, PackedTensor) else x
    return out


def _assert_same(ckpt, expected, *, cast=False):
    assert sorted(ckpt.names()) == sorted(expected)
    got = _values(ckpt)
    for n, ref in expected.items():
        x = got[n]
        assert tuple(x.shape) == tuple(ref.shape), n
        assert tuple(ckpt.info(n).shape) == tuple(ref.shape), n
        want = ref.to(x.dtype) if cast else ref
        assert x.dtype == want.dtype, n
        assert torch.equal(x, want), n


@pytest.mark.golden
def test_official_safetensors(tiny, reference):
    with open_checkpoint(tiny / "wan_tiny.safetensors") as c:
        assert (c.format, c.naming, c.kind) == (SAFETENSORS, "official", WAN_DIT)
        assert c.names() == sorted(reference)
        _assert_same(c, reference)
        info = c.info("blocks.0.modulation")
        assert info.source_name == "blocks.0.modulation" and info.dtype == torch.float32
        assert info.nbytes == reference["blocks.0.modulation"].numel() * 4


@pytest.mark.golden
def test_comfyui_bf16_file_prefix_stripped(tiny, reference):
    with open_checkpoint(tiny / "wan_tiny_comfy_bf16.safetensors") as c:
        assert c.naming == "comfyui" and c.kind == WAN_DIT
        assert any(COMFY in note for note in c.notes)
        assert c.info("head.modulation").source_name == COMFY + "head.modulation"
        _assert_same(c, reference, cast=True)


@pytest.mark.golden
def test_diffusers_file_and_folder(golden, reference):
    for src in (golden / "gguf/diffusers/diffusers_weights.safetensors", golden / "gguf/diffusers"):
        with open_checkpoint(src) as c:
            assert c.naming == "diffusers" and c.kind == WAN_DIT
            assert c.names() == sorted(reference)
            _assert_same(c, reference)
            assert c.config["_class_name"] == "WanTransformer3DModel"


@pytest.mark.golden
def test_gguf_files(tiny, reference):
    with open_checkpoint(tiny / "wan_tiny-F16.gguf") as c:
        assert c.format == GGUF and c.kind == WAN_DIT
        assert c.metadata["general.architecture"] == "wan"
        _assert_same(c, reference, cast=True)
    dequant = load_file(str(tiny / "wan_tiny-Q8_0.dequant.safetensors"))
    with open_checkpoint(tiny / "wan_tiny-Q8_0.gguf") as c:
        assert c.info("blocks.0.self_attn.q.weight").dtype is None  # block-quantized
        got = _values(c)
        for n, ref in dequant.items():
            assert torch.equal(got[n].float(), ref), n


@pytest.mark.golden
def test_sharded_folder_index_and_shard_list_agree(golden):
    folder = golden / "pipeline/checkpoint/high_noise_model"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    expected = {}
    for shard in sorted(set(index["weight_map"].values())):
        expected.update(load_file(str(folder / shard)))
    assert set(expected) == set(index["weight_map"])
    config = json.loads((folder / "config.json").read_text())
    shards = sorted(folder.glob("*-of-*.safetensors"))
    for src in (folder, folder / "diffusion_pytorch_model.safetensors.index.json", shards):
        with open_checkpoint(src) as c:
            assert c.format == SHARDED and c.kind == WAN_DIT
            assert c.names() == sorted(expected)
            assert c.config == config
            assert c.expert == "high_noise"
            _assert_same(c, expected)


@pytest.mark.golden
@pytest.mark.parametrize("zip_format", [True, False])
def test_pth_with_prefix_and_nesting(tmp_path, reference, zip_format):
    sd = {COMFY + k: v.clone() for k, v in reference.items()}
    path = tmp_path / "wan.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path, _use_new_zipfile_serialization=zip_format)
    with open_checkpoint(path) as c:
        assert c.format == PTH and c.naming == "comfyui" and c.kind == WAN_DIT
        assert c.names() == list(reference)  # a pickle keeps its own order
        _assert_same(c, reference)
        assert any("'state_dict'" in n for n in c.notes)


def test_malicious_pth_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"blocks.0.self_attn.q.weight": torch.zeros(2, 2), "x": Payload()}, path)
    with pytest.raises(UnsafePickleError) as e:
        load_state_dict(path)
    assert "system" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="never executes pickled code"):
        open_checkpoint(path)
    assert not marker.exists()


@pytest.mark.golden
@pytest.mark.parametrize("relpath, kind", [("vae21/weights.safetensors", VAE), ("t5/weights.safetensors", T5)])
def test_other_models_are_recognised(golden, relpath, kind):
    with open_checkpoint(golden / relpath) as c:
        assert c.kind == kind
        assert kind.lower() in c.describe().lower()


def test_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "weights.dat"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        open_checkpoint(junk)
    cut = tmp_path / "cut.safetensors"
    save_file({"a": torch.ones(1000)}, str(cut))
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        open_checkpoint(cut)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        open_checkpoint(empty)


@pytest.mark.golden
def test_a14b_root_folder_asks_for_one_expert(tmp_path, golden):
    root = tmp_path / "Wan2.2-I2V-A14B"
    shutil.copytree(golden / "pipeline/checkpoint", root)
    with pytest.raises(CheckpointError, match="high_noise_model"):
        open_checkpoint(root)
    with open_checkpoint(root / "low_noise_model") as c:
        assert c.expert == "low_noise"


@pytest.mark.golden
def test_index_with_missing_shard(tmp_path, golden):
    folder = tmp_path / "expert"
    shutil.copytree(golden / "pipeline/checkpoint/high_noise_model", folder)
    shard = sorted(folder.glob("*-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        open_checkpoint(folder)


@pytest.mark.golden
def test_diffusers_names_without_an_official_name_are_refused(tmp_path, golden):
    sd = load_file(str(golden / "gguf/diffusers/diffusers_weights.safetensors"))
    sd["blocks.0.attn1.to_gate.weight"] = torch.zeros(2, 2)
    save_file(sd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match="to_gate"):
        open_checkpoint(tmp_path / "odd.safetensors")


def test_expert_from_path(tmp_path):
    assert expert_from_path(tmp_path / "high_noise_model") == "high_noise"
    assert expert_from_path(tmp_path / "Wan2.2-I2V-A14B-LowNoise-Q4_0.gguf") == "low_noise"
    assert expert_from_path(tmp_path / "wan2.2_i2v_high_noise_14B_Q4_K_M.gguf") == "high_noise"
    assert expert_from_path(tmp_path / "model.safetensors") is None


@pytest.mark.golden
def test_byte_reader_reads_stored_bytes_in_pieces(tiny, golden):
    """Safetensors tensors (also under ComfyUI and diffusers names) can be read in
    pieces that add up to load(); formats that hand out whole tensors have no reader."""
    for src in (tiny / "wan_tiny.safetensors", tiny / "wan_tiny_comfy_bf16.safetensors",
                golden / "gguf/diffusers/diffusers_weights.safetensors"):
        with open_checkpoint(src) as c:
            for n in c.names():
                whole = c.load(n).contiguous().reshape(-1).view(torch.uint8)
                read = c.byte_reader(n)
                got = torch.empty_like(whole)
                cut = whole.numel() // 3
                read(0, got[:cut])
                read(cut, got[cut:], threads=1)
                assert torch.equal(got, whole), (src.name, n)
            with pytest.raises(ValueError, match="outside"):
                c.byte_reader(n)(1, torch.empty(whole.numel(), dtype=torch.uint8))
    with open_checkpoint(tiny / "wan_tiny-F16.gguf") as c:
        assert all(c.byte_reader(n) is None for n in c.names())

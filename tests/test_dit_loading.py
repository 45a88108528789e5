"""load_dit: every checkpoint format gives the same model, quantized weights stay
quantized, and wrong checkpoints are refused by name."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quant.ggml_types import GGMLType
from runtime import load_dit
from runtime.dit_loading import DiTLoadError, check_expert_pair

COMFY = "model.diffusion_model."


@pytest.fixture(scope="module")
def tiny(golden):
    return golden / "gguf/wan_tiny"


@pytest.fixture(scope="module")
def tiny_heads(tiny):
    return json.loads((tiny / "wan_tiny_config.json").read_text())["num_heads"]


@pytest.fixture(scope="module")
def ref(tiny):
    """The official float32 forward of the tiny model: inputs, output, seq_len."""
    path = str(tiny / "ref_forward.safetensors")
    with safe_open(path, "pt") as f:
        seq_len = int(f.metadata()["seq_len"])
    return load_file(path), seq_len


def forward(model, ref):
    r, seq_len = ref
    return model([r["x"]], r["t"], [r["context"]], seq_len, y=[r["y"]])[0]


def max_abs(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.golden
def test_float32_file_matches_the_official_forward(tiny, tiny_heads, ref):
    m = load_dit(tiny / "wan_tiny.safetensors", num_heads=tiny_heads)
    assert max_abs(forward(m, ref), ref[0]["out"]) <= 1e-4


@pytest.mark.golden
def test_gguf_forward_equals_forward_on_the_dequantized_weights(tiny, tiny_heads, ref):
    """Packed weights decoded at the matmul give exactly the forward of their float32
    dequantization (the golden .dequant files, made the way ComfyUI-GGUF reads them)."""
    refs = sorted(tiny.glob("*.dequant.safetensors"))
    assert refs
    for dq in refs:
        gguf = tiny / dq.name.replace(".dequant.safetensors", ".gguf")
        packed = load_dit(gguf, num_heads=tiny_heads)
        dense = load_dit(dq, num_heads=tiny_heads)
        q = packed.blocks[0].self_attn.q
        assert q.ggml_type is not None and q.weight.dtype == torch.uint8, gguf.name  # still packed
        assert max_abs(forward(packed, ref), forward(dense, ref)) <= 1e-6, gguf.name


@pytest.mark.golden
def test_every_gguf_type_within_the_verified_error(tiny, tiny_heads, ref):
    report = json.loads((tiny / "verify_report.json").read_text())
    for name, checks in report.items():
        m = load_dit(tiny / name, num_heads=tiny_heads)
        err = max_abs(forward(m, ref), ref[0]["out"])
        # The official model on the same dequantized weights had this error.
        assert abs(err - checks["forward_max_abs_err"]) <= 1e-4, (name, err, checks["forward_max_abs_err"])


@pytest.mark.golden
def test_packed_weights_stay_views_of_the_file(tiny, tiny_heads):
    gguf = tiny / "wan_tiny-Q8_0.gguf"
    m = load_dit(gguf, num_heads=tiny_heads)
    w = m.blocks[0].ffn[0].weight
    assert m.blocks[0].ffn[0].ggml_type == GGMLType.Q8_0
    assert w.untyped_storage().nbytes() == gguf.stat().st_size  # no copy at load


def _five_formats(tmp_path, tiny, heads):
    """The same tensors (those of city96's F16 file) in the five formats load_dit reads."""
    from quant.checkpoint import open_checkpoint
    from quant.packed import PackedTensor

    city96 = tiny / "wan_tiny-F16.gguf"
    with open_checkpoint(city96) as c:
        tensors = {}
        for n in c.names():
            t = c.load(n)
            tensors[n] = (t.dequantize() if isinstance(t, PackedTensor) else t).clone()
    sources = {"city96 gguf": (city96, heads)}

    ours = tmp_path / "ours-F16.gguf"
    _write_our_gguf(city96, ours, heads)
    sources["our gguf"] = (ours, None)  # heads from the file's metadata

    folder = tmp_path / "official"
    folder.mkdir()
    names = sorted(tensors)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for shard, part in halves.items():
        save_file({n: tensors[n].float().contiguous() for n in part}, str(folder / shard))
        weight_map.update({n: shard for n in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "num_heads": heads, "model_type": "i2v"}))
    sources["official folder"] = (folder, None)

    comfy = tmp_path / "comfy.safetensors"
    extra = {"first_stage_model.decoder.conv.weight": torch.zeros(2)}  # another model in the same file
    save_file({**{COMFY + n: t.contiguous() for n, t in tensors.items()}, **extra}, str(comfy))
    sources["comfyui file"] = (comfy, heads)

    diffusers = tmp_path / "diffusers"
    diffusers.mkdir()
    name_map = {e["official"]: e["diffusers"] for e in json.loads((tiny.parent / "diffusers/name_map.json").read_text())}
    save_file({name_map[n]: t.float().contiguous() for n, t in tensors.items()}, str(diffusers / "diffusion_pytorch_model.safetensors"))
    (diffusers / "config.json").write_text((tiny.parent / "diffusers/config.json").read_text())
    sources["diffusers folder"] = (diffusers, None)
    return sources


def _write_our_gguf(src, out, heads):
    from quant.convert import ConvertOptions, convert

    convert(src, out, ConvertOptions(type=GGMLType.F16, num_heads=heads, progress=False))


@pytest.mark.golden
def test_five_formats_give_the_same_output(tmp_path, tiny, tiny_heads, ref):
    sources = _five_formats(tmp_path, tiny, tiny_heads)
    outs, heads_from = {}, {}
    for label, (src, heads) in sources.items():
        m = load_dit(src, num_heads=heads)
        assert m.config.num_heads == tiny_heads, label
        heads_from[label] = m.config.heads_source
        outs[label] = forward(m, ref)
    first = outs["city96 gguf"]
    for label, out in outs.items():
        assert max_abs(out, first) <= 1e-6, label
    assert heads_from["our gguf"] == "gguf metadata"
    assert heads_from["official folder"] == heads_from["diffusers folder"] == "config.json"
    # F16 weights: the verified error of the official model on them.
    report = json.loads((tiny / "verify_report.json").read_text())["wan_tiny-F16.gguf"]
    assert abs(max_abs(first, ref[0]["out"]) - report["forward_max_abs_err"]) <= 1e-4


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().max().float() / 448.0
    return (w / scale).to(torch.float8_e4m3fn), scale


@pytest.mark.golden
@pytest.mark.parametrize("style", ["scale_weight", "comfy_quant"])
def test_comfyui_scaled_fp8(tmp_path, tiny, tiny_heads, ref, style):
    """ComfyUI's fp8 files: fp8 block weights times a per-tensor scale (older files:
    `scaled_fp8` marker + `.scale_weight`/`.scale_input`; newer: `.weight_scale` +
    `.comfy_quant`). The forward equals the float32 forward on value·scale."""
    source = load_file(str(tiny / "wan_tiny.safetensors"))
    stored, dense = {}, dict(source)
    for n, w in source.items():
        if n.startswith("blocks.") and n.endswith(".weight") and w.dim() == 2:
            layer = n[: -len(".weight")]
            w8, s = _fp8(w)
            stored[COMFY + n] = w8
            dense[n] = w8.float() * s
            if style == "scale_weight":
                stored[COMFY + layer + ".scale_weight"] = s.reshape(1)
                stored[COMFY + layer + ".scale_input"] = torch.ones(1)
            else:
                stored[COMFY + layer + ".weight_scale"] = s.reshape(())
                conf = json.dumps({"format": "float8_e4m3fn"}).encode()
                stored[COMFY + layer + ".comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
        else:
            stored[COMFY + n] = w.to(torch.bfloat16) if w.dim() == 1 else w
            dense[n] = stored[COMFY + n].float()
    if style == "scale_weight":
        stored[COMFY + "scaled_fp8"] = torch.zeros(1, dtype=torch.float8_e4m3fn)
    save_file(stored, str(tmp_path / "fp8.safetensors"))
    save_file(dense, str(tmp_path / "dense.safetensors"))
    m = load_dit(tmp_path / "fp8.safetensors", num_heads=tiny_heads)
    q = m.blocks[0].self_attn.q
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale is not None  # stays fp8
    expected = forward(load_dit(tmp_path / "dense.safetensors", num_heads=tiny_heads), ref)
    assert max_abs(forward(m, ref), expected) <= 1e-5
    bf16 = load_dit(tmp_path / "fp8.safetensors", num_heads=tiny_heads, dtype=torch.bfloat16)
    out = forward(bf16, ref)
    assert ((out - expected).norm() / expected.norm()).item() <= 1e-2


@pytest.mark.golden
def test_plain_fp8_and_scaled_non_linear_tensors(tmp_path, tiny, tiny_heads, ref):
    """fp8 weights without a scale (older fp8_e4m3fn files) have scale 1; a scaled fp8
    tensor outside the linears (the patch embedding) is decoded once at load."""
    source = load_file(str(tiny / "wan_tiny.safetensors"))
    stored, dense = dict(source), dict(source)
    for n, w in source.items():
        if n.startswith("blocks.0.") and n.endswith(".weight") and w.dim() == 2:
            stored[n] = w.to(torch.float8_e4m3fn)
            dense[n] = stored[n].float()
    w8, s = _fp8(source["patch_embedding.weight"])
    stored["patch_embedding.weight"], stored["patch_embedding.scale_weight"] = w8, s.reshape(1)
    dense["patch_embedding.weight"] = w8.float() * s
    save_file(stored, str(tmp_path / "fp8.safetensors"))
    save_file(dense, str(tmp_path / "dense.safetensors"))
    got = forward(load_dit(tmp_path / "fp8.safetensors", num_heads=tiny_heads), ref)
    expected = forward(load_dit(tmp_path / "dense.safetensors", num_heads=tiny_heads), ref)
    assert max_abs(got, expected) <= 1e-5


@pytest.mark.golden
def test_bf16_compute_keeps_weights_compact(tiny, tiny_heads):
    m = load_dit(tiny / "wan_tiny.safetensors", num_heads=tiny_heads, dtype=torch.bfloat16)
    assert m.blocks[0].ffn[0].weight.dtype == torch.bfloat16  # narrowed as autocast would at each use
    assert m.text_embedding[0].weight.dtype == torch.bfloat16
    assert m.time_projection[1].weight.dtype == torch.float32  # runs in a float32 island
    assert m.head.head.weight.dtype == torch.float32
    assert m.blocks[0].modulation.dtype == torch.float32  # small tensors as stored
    q8 = load_dit(tiny / "wan_tiny-Q8_0.gguf", num_heads=tiny_heads, dtype=torch.bfloat16)
    assert q8.blocks[0].ffn[0].ggml_type == GGMLType.Q8_0
    assert q8.time_projection[1].weight.dtype == torch.float16  # city96 keeps it F16: decoded per use


@pytest.mark.golden
def test_heads_default_to_width_over_128(tiny):
    m = load_dit(tiny / "wan_tiny.safetensors")
    assert m.config.heads_source == "dim/128" and m.config.num_heads == max(1, m.config.dim // 128)


@pytest.mark.golden
def test_official_expert_folders_pair(golden):
    root = golden / "pipeline/checkpoint"
    high = load_dit(root / "high_noise_model")
    low = load_dit(root / "low_noise_model")
    assert high.config.heads_source == "config.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_expert_pair(high, low)
    with pytest.warns(UserWarning, match="same expert"):
        check_expert_pair(high, load_dit(root / "high_noise_model"))


@pytest.mark.golden
def test_experts_of_different_models_are_refused(golden):
    i2v = load_dit(golden / "dit/i2v/weights.safetensors", num_heads=4)
    t2v = load_dit(golden / "dit/t2v/weights.safetensors", num_heads=4)
    with pytest.raises(DiTLoadError, match=r"different models .*in_dim 36 vs 16"):
        check_expert_pair(i2v, t2v)


@pytest.mark.golden
def test_t2v_weights_asked_to_do_i2v(golden):
    bad = golden / "gguf/bad/wan_tiny_t2v-F16.gguf"
    with pytest.raises(DiTLoadError, match=r"this is a T2V checkpoint, in_dim 16; image-to-video needs the I2V-A14B experts, in_dim 36"):
        load_dit(bad, expect="i2v")
    assert load_dit(bad, expect="t2v").config.model_type == "t2v"
    with pytest.raises(DiTLoadError, match="this is an I2V checkpoint, in_dim 36; text-to-video"):
        load_dit(golden / "dit/i2v/weights.safetensors", expect="t2v")
    with pytest.raises(ValueError, match="expect="):
        load_dit(bad, expect="video")


@pytest.mark.golden
def test_city96_file_before_fix_5d_tensors(golden):
    with pytest.raises(DiTLoadError, match=r"patch_embedding.weight is missing.*convert.py output before fix_5d_tensors.py.*fix_5d_tensors.py --src"):
        load_dit(golden / "gguf/bad/wan_tiny-F16-unfixed.gguf")


@pytest.mark.golden
def test_other_models_are_refused(golden):
    with pytest.raises(DiTLoadError, match="'flux' model"):
        load_dit(golden / "gguf/bad/wrong_architecture.gguf")
    with pytest.raises(DiTLoadError, match="not a complete Wan 2.2 DiT: tensor.*missing: patch_embedding.weight.*no general.architecture"):
        load_dit(golden / "gguf/bad/missing_architecture.gguf")
    with pytest.raises(DiTLoadError, match="Wan VAE.*load_vae"):
        load_dit(golden / "pipeline/vae.safetensors")


@pytest.mark.golden
def test_wan21_i2v_checkpoint_is_named(tmp_path, tiny):
    tensors = load_file(str(tiny / "wan_tiny.safetensors"))
    d = tensors["patch_embedding.bias"].shape[0]
    tensors["img_emb.proj.1.weight"] = torch.zeros(d, 32)
    for i in range(2):
        tensors[f"blocks.{i}.cross_attn.k_img.weight"] = torch.zeros(d, d)
    save_file(tensors, str(tmp_path / "wan21.safetensors"))
    with pytest.raises(DiTLoadError, match=r"Wan 2.1 I2V checkpoint.*Wan 2.2"):
        load_dit(tmp_path / "wan21.safetensors")


@pytest.mark.golden
def test_missing_extra_and_misshapen_tensors_are_listed(tmp_path, tiny):
    source = load_file(str(tiny / "wan_tiny.safetensors"))
    dropped = dict(source)
    del dropped["blocks.1.ffn.2.bias"], dropped["blocks.0.self_attn.norm_k.weight"]
    save_file(dropped, str(tmp_path / "missing.safetensors"))
    with pytest.raises(DiTLoadError, match=r"2 tensor\(s\) missing: .*blocks.0.self_attn.norm_k.weight.*blocks.1.ffn.2.bias"):
        load_dit(tmp_path / "missing.safetensors")

    extra = dict(source, **{"blocks.0.self_attn.extra.weight": torch.zeros(4)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(DiTLoadError, match=r"1 unexpected tensor\(s\): blocks.0.self_attn.extra.weight"):
        load_dit(tmp_path / "extra.safetensors")

    bent = dict(source)
    bent["blocks.1.ffn.0.bias"] = torch.zeros(3)
    save_file(bent, str(tmp_path / "bent.safetensors"))
    with pytest.raises(DiTLoadError, match=r"blocks.1.ffn.0.bias has shape \[3\]"):
        load_dit(tmp_path / "bent.safetensors")

    gap = {n: t for n, t in source.items() if not n.startswith("blocks.0.")}
    save_file(gap, str(tmp_path / "gap.safetensors"))
    with pytest.raises(DiTLoadError, match=r"blocks \[0\] are missing|blocks.0"):
        load_dit(tmp_path / "gap.safetensors")


def test_unsupported_compute_dtype():
    with pytest.raises(ValueError, match="compute dtype"):
        load_dit("anything.gguf", dtype=torch.float16)


@pytest.mark.golden
def test_blocks_left_on_meta_for_a_streaming_engine(tiny, tiny_heads, ref):
    gguf = tiny / "wan_tiny-Q4_0.gguf"
    lazy = load_dit(gguf, num_heads=tiny_heads, load_blocks=False)
    full = load_dit(gguf, num_heads=tiny_heads)
    for (name, a), (_, b) in zip(lazy.blocks.named_buffers(), full.blocks.named_buffers()):
        assert a.device.type == "meta" and (a.dtype, a.shape) == (b.dtype, b.shape), name
    assert lazy.blocks[0].ffn[2].ggml_type == full.blocks[0].ffn[2].ggml_type == GGMLType.Q4_1
    assert all(t.device.type == "cpu" for n, t in lazy.named_buffers() if not n.startswith("blocks."))
    # Filling the buffers from the file (what an engine does) gives the full model's output.
    for block_l, block_f in zip(lazy.blocks, full.blocks):
        for mod_l, mod_f in zip(block_l.modules(), block_f.modules()):
            for key, buf in mod_f._buffers.items():
                if buf is not None:
                    mod_l._buffers[key] = buf
    assert torch.equal(forward(lazy, ref), forward(full, ref))

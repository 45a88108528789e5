"""python -m quant.convert: city96's files byte for byte, every source format, round trips,
and the behaviour around files (no overwrite, atomic output, one-line errors)."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from quant import codecs, inspect
from quant.convert import (
    EXPERT_KEY,
    HEAD_COUNT_KEY,
    ConvertError,
    ConvertOptions,
    cast_float,
    convert,
    main,
)
from quant.ggml_types import LEGACY_QUANTS, GGMLType
from quant.gguf_reader import GGUFFile

REQUIRED_KEYS = ("general.architecture", "general.quantization_version", "general.file_type")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(args) -> int:
    return main([*map(str, args), "--quiet"])


@pytest.mark.golden
def test_city96_route_is_reproduced_byte_for_byte(golden, tmp_path, city96_routes):
    tiny = golden / "gguf/wan_tiny"
    routes = city96_routes
    assert routes
    for file, (src, target, base) in routes.items():
        out = tmp_path / file
        rc = _run([tiny / src, out, "--type", target.name.lower(), "--via", base.name.lower(), "--no-extra-metadata"])
        assert rc == 0, file
        assert _sha(out) == _sha(tiny / file), file


def _tensors_and_required_metadata(path):
    with GGUFFile(path) as f:
        meta = {k: f.metadata[k] for k in REQUIRED_KEYS}
        tensors = {n: (t.ggml_type, t.shape, bytes(f.raw(n).numpy())) for n, t in f.tensors.items()}
        return meta, tensors, f.metadata


@pytest.mark.golden
def test_extras_change_only_metadata(golden, tmp_path):
    tiny = golden / "gguf/wan_tiny"
    out = tmp_path / "x.gguf"
    assert _run([tiny / "wan_tiny.safetensors", out, "--type", "q4_0", "--via", "f16", "--expert", "low_noise",
                 "--num-heads", "4"]) == 0
    meta, tensors, all_meta = _tensors_and_required_metadata(out)
    gmeta, gtensors, _ = _tensors_and_required_metadata(tiny / "wan_tiny-Q4_0.gguf")
    assert meta == gmeta and tensors == gtensors
    assert list(tensors) == list(gtensors)
    assert all_meta[EXPERT_KEY] == "low_noise" and all_meta[HEAD_COUNT_KEY] == 4


@pytest.mark.golden
def test_default_route_quantizes_the_source_precision(golden, tmp_path):
    """Without --via, block weights of a float32 source are gguf-py's bytes for the
    float32 data; everything else is as in city96's file."""
    tiny = golden / "gguf/wan_tiny"
    source = load_file(str(tiny / "wan_tiny.safetensors"))
    out = tmp_path / "q5_0.gguf"
    assert _run([tiny / "wan_tiny.safetensors", out, "--type", "q5_0", "--no-extra-metadata"]) == 0
    with GGUFFile(out) as f, GGUFFile(tiny / "wan_tiny-Q5_0.gguf") as g:
        assert list(f.tensors) == list(g.tensors)
        n_quant = 0
        for n, t in f.tensors.items():
            assert t.ggml_type == g.tensors[n].ggml_type, n
            got = f.raw(n).numpy()
            if t.ggml_type in LEGACY_QUANTS:
                n_quant += 1
                want = gguf.quants.quantize(source[n].numpy(), gguf.GGMLQuantizationType(int(t.ggml_type)))
                assert np.array_equal(got, want.reshape(-1)), n
            else:
                assert np.array_equal(got, g.raw(n).numpy()), n
        assert n_quant > 0


@pytest.mark.golden
def test_every_source_format_converts_to_the_same_file(golden, tmp_path):
    tiny = golden / "gguf/wan_tiny"
    reference = load_file(str(tiny / "wan_tiny.safetensors"))
    pth = tmp_path / "src" / "wan.pth"
    pth.parent.mkdir()
    torch.save({"model.diffusion_model." + k: v for k, v in reference.items()}, pth)
    sources = [
        tiny / "wan_tiny.safetensors",
        golden / "gguf/diffusers/diffusers_weights.safetensors",
        golden / "gguf/diffusers",
        pth,
    ]
    outputs = []
    for i, src in enumerate(sources):
        out = tmp_path / f"out{i}.gguf"
        assert _run([src, out, "--type", "q8_0", "--no-extra-metadata"]) == 0, src
        outputs.append(_sha(out))
    assert len(set(outputs)) == 1, sources


@pytest.mark.golden
def test_sharded_expert_round_trip(golden, tmp_path, capsys):
    """Official sharded folder -> GGUF with extras -> quant.inspect -> safetensors."""
    folder = golden / "pipeline/checkpoint/low_noise_model"
    config = json.loads((folder / "config.json").read_text())
    source = {}
    for shard in sorted(folder.glob("*-of-*.safetensors")):
        source.update(load_file(str(shard)))
    gguf_path = tmp_path / "low-Q8_0.gguf"
    assert _run([folder, gguf_path, "--type", "q8_0"]) == 0

    capsys.readouterr()
    assert inspect.main([str(gguf_path), "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    meta = {m["key"]: m["value"] for m in report["metadata"]}
    assert meta["general.architecture"] == "wan" and meta[EXPERT_KEY] == "low_noise"
    assert report["totals"]["tensors"] == len(source) and report["verify"]["problems"] == []
    types = {t["name"]: t["type"] for t in report["tensors"]}
    assert types["blocks.0.self_attn.q.weight"] == "Q8_0" and types["blocks.0.modulation"] == "F32"

    with GGUFFile(gguf_path) as f:
        assert f.metadata[EXPERT_KEY] == "low_noise"
        assert f.metadata[HEAD_COUNT_KEY] == config["num_heads"]
        assert f.metadata["general.file_type"] == 7
        assert sorted(f.tensors) == sorted(source)
        exact = {}
        for n, t in f.tensors.items():
            x = f.load(n)
            exact[n] = codecs.dequantize(x.data, x.ggml_type, x.shape) if t.ggml_type in LEGACY_QUANTS else x.float()

    back = tmp_path / "back.safetensors"
    assert _run(["--dequantize", gguf_path, back, "--dtype", "f32"]) == 0
    restored = load_file(str(back))
    assert sorted(restored) == sorted(source)
    for n, x in restored.items():
        assert x.dtype == torch.float32 and x.shape == source[n].shape
        assert torch.equal(x, exact[n]), n
        amax = source[n].abs().max().item()
        assert torch.allclose(x, source[n], atol=amax / 100 + 1e-6), n  # q8_0 error <= amax/254 per block


@pytest.mark.golden
def test_requantize_from_gguf_and_keep_overrides(golden, tmp_path):
    tiny = golden / "gguf/wan_tiny"
    out = tmp_path / "q4.gguf"
    assert _run([tiny / "wan_tiny-Q8_0.gguf", out, "--type", "q4_0", "--keep", "blocks.0.*=q8_0",
                 "--keep", "blocks.0.ffn.2.weight=f16"]) == 0
    with GGUFFile(out) as f:
        types = {n: t.ggml_type for n, t in f.tensors.items()}
    assert types["blocks.0.self_attn.q.weight"] == GGMLType.Q8_0
    assert types["blocks.0.ffn.2.weight"] == GGMLType.F16
    assert types["blocks.1.self_attn.q.weight"] == GGMLType.Q4_0
    assert types["blocks.1.ffn.2.weight"] == GGMLType.Q4_1

    # A BF16-based file keeps its unquantized 2-D tensors BF16 when requantized.
    out2 = tmp_path / "q5.gguf"
    assert _run([tiny / "wan_tiny-Q8_0-from-BF16.gguf", out2, "--type", "q5_1"]) == 0
    with GGUFFile(out2) as f, GGUFFile(tiny / "wan_tiny-Q8_0-from-BF16.gguf") as g:
        for n, t in g.tensors.items():
            want = GGMLType.Q5_1 if t.ggml_type == GGMLType.Q8_0 else t.ggml_type
            assert f.tensors[n].ggml_type == want, n
            if t.ggml_type != GGMLType.Q8_0:
                assert torch.equal(f.raw(n), g.raw(n)), n


@pytest.mark.golden
def test_k_quant_sources_are_decoded(golden, tmp_path):
    """Community files carry K-quants (Q4_K_M...): they decode through the torch decoder,
    both for --dequantize and for requantizing."""
    from quant.gguf_writer import GGUFWriter
    from quant.packed import PackedTensor

    src = golden / "gguf/wan_tiny/wan_tiny-Q8_0.gguf"
    name = "blocks.0.ffn.2.weight"  # rows of 256 weights: one Q4_K super-block
    mixed = tmp_path / "mixed.gguf"
    with GGUFFile(src) as f:
        shape = f.tensors[name].shape
        n_blocks = shape[0] * shape[1] // 256
        blocks = torch.randint(0, 256, (n_blocks, 144), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        blocks[:, 0:4] = torch.tensor([0x00, 0x14, 0x00, 0x10], dtype=torch.uint8)  # d, dmin: small fp16 scales
        k_bytes = blocks.reshape(-1)
        w = GGUFWriter(mixed, arch="wan")
        w.add_quantization_info(GGMLType.Q8_0)
        for n, t in f.tensors.items():
            if n == name:
                w.add_tensor(n, t.shape, GGMLType.Q4_K, lambda: k_bytes)
            else:
                w.add_tensor(n, t.shape, t.ggml_type, (lambda n=n: f.raw(n).clone()))
        w.write()
    expected = PackedTensor(k_bytes, GGMLType.Q4_K, shape).dequantize(torch.float32)
    assert torch.isfinite(expected).all()

    back = tmp_path / "back.safetensors"
    assert _run(["--dequantize", mixed, back, "--dtype", "f32"]) == 0
    assert torch.equal(load_file(str(back))[name], expected)
    q = tmp_path / "q.gguf"
    assert _run([mixed, q, "--type", "q8_0"]) == 0
    with GGUFFile(q) as f:
        assert f.tensors[name].ggml_type == GGMLType.Q8_0
        assert torch.equal(f.raw(name), codecs.quantize(expected, GGMLType.Q8_0).reshape(-1))


@pytest.mark.golden
def test_refuses_to_overwrite_and_leaves_input_alone(golden, tmp_path, capsys):
    src = tmp_path / "wan.safetensors"
    shutil.copy(golden / "gguf/wan_tiny/wan_tiny.safetensors", src)
    before = _sha(src)
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    assert _run([src, out, "--type", "q8_0"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert out.read_bytes() == b"precious"
    assert _run([src, out, "--type", "q8_0", "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert _run([src, src, "--type", "q8_0", "--force"]) == 1
    assert _sha(src) == before


@pytest.mark.golden
def test_failed_convert_leaves_no_file(golden, tmp_path):
    calls = []

    def failing_hook(name, x):
        calls.append(name)
        if len(calls) == 10:
            raise RuntimeError("disk on fire")
        return x

    out = tmp_path / "out.gguf"
    opts = ConvertOptions(type=GGMLType.Q8_0, progress=False, weight_hooks=(failing_hook,))
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(golden / "gguf/wan_tiny/wan_tiny.safetensors", out, opts)
    assert len(calls) == 10
    assert list(tmp_path.iterdir()) == []


@pytest.mark.golden
def test_ctrl_c_leaves_no_file(golden, tmp_path, monkeypatch, capsys):
    import quant.convert as convert_module

    real = convert_module.tensor_bytes
    calls = []

    def interrupted(plan, x, **kw):
        calls.append(plan.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(plan, x, **kw)

    monkeypatch.setattr(convert_module, "tensor_bytes", interrupted)
    out = tmp_path / "out.gguf"
    assert _run([golden / "gguf/wan_tiny/wan_tiny.safetensors", out, "--type", "q4_0"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.golden
def test_weight_hooks_see_float32_by_official_name(golden, tmp_path):
    seen = {}

    def double(name, x):
        seen[name] = x.dtype
        return x * 2

    src = golden / "gguf/wan_tiny/wan_tiny_comfy_bf16.safetensors"
    out = tmp_path / "x.gguf"
    convert(src, out, ConvertOptions(type=GGMLType.F32, progress=False, weight_hooks=(double,)))
    reference = load_file(str(golden / "gguf/wan_tiny/wan_tiny.safetensors"))
    assert set(seen) == set(reference) and set(seen.values()) == {torch.float32}
    with GGUFFile(out) as f:
        for n, ref in reference.items():
            assert torch.equal(f.load(n), ref.to(torch.bfloat16).float() * 2), n


@pytest.mark.golden
def test_one_line_errors(golden, tmp_path, capsys):
    tiny = golden / "gguf/wan_tiny/wan_tiny.safetensors"
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x01" * 100)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        ([tmp_path / "missing.safetensors", tmp_path / "o.gguf", "--type", "q8_0"], "no such file"),
        ([junk, tmp_path / "o.gguf", "--type", "q8_0"], "unknown checkpoint format"),
        ([golden / "vae21/weights.safetensors", tmp_path / "o.gguf", "--type", "q8_0"], "VAE, not a Wan DiT"),
        ([tiny, tmp_path / "no/such/dir/o.gguf", "--type", "q8_0"], "does not exist"),
        ([tiny, a_file / "o.gguf", "--type", "q8_0"], "not a folder"),
        ([tiny, tmp_path / "o.gguf", "--type", "q4_k"], "q8_0"),
        ([tiny, tmp_path / "o.gguf"], "--type is required"),
        ([tiny, tmp_path / "o.gguf", "--type", "q8_0", "--keep", "blocks.*"], "PATTERN=TYPE"),
    ]
    for args, expected in cases:
        assert _run(args) == 1, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert expected in err, (expected, err)
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "junk.dat"]


@pytest.mark.golden
def test_module_entry_point(golden, tmp_path):
    out = tmp_path / "x.gguf"
    run = subprocess.run(
        [sys.executable, "-m", "quant.convert", str(golden / "gguf/wan_tiny/wan_tiny.safetensors"), str(out),
         "--type", "q4_1", "--quiet"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and out.is_file()


def test_cast_float_matches_gguf_py_bf16_including_nan():
    x = torch.randn(4096) * torch.logspace(-30, 30, 4096)
    x[:4] = torch.tensor([float("nan"), -float("nan"), float("inf"), 3.4e38])
    x[4:8] = torch.from_numpy(np.array([0x7FC12345, 0xFFA00001, 0x7F800001, 0x00000001], dtype=np.uint32).view(np.float32))
    want = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.BF16)
    got = cast_float(x, GGMLType.BF16)
    assert np.array_equal(got.view(torch.uint8).numpy(), want.view(np.uint8))
    # bf16 input: bits unchanged except NaNs made quiet, as gguf-py's float32 round trip does.
    b = got.clone()
    b.view(torch.int16)[6] = 0x7F81  # a signalling NaN
    want_b = gguf.quants.quantize(b.float().numpy(), gguf.GGMLQuantizationType.BF16)
    assert np.array_equal(cast_float(b, GGMLType.BF16).view(torch.uint8).numpy(), want_b.view(np.uint8))


def test_convert_rejects_bad_options(tmp_path):
    with pytest.raises(ConvertError, match="--via"):
        convert(tmp_path / "x", tmp_path / "o.gguf", ConvertOptions(type=GGMLType.Q8_0, via=GGMLType.Q8_0))
    with pytest.raises(ConvertError, match="cannot write"):
        convert(tmp_path / "x", tmp_path / "o.gguf", ConvertOptions(type=GGMLType.Q4_K))


@pytest.mark.golden
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_dequantize_to_half_precision_rounds_the_float32_values_once(golden, tmp_path, dtype):
    """--dtype bf16/f16: each value is the float32 decoding rounded once (as .to())."""
    src = golden / "gguf/wan_tiny/wan_tiny-Q4_0.gguf"
    back = tmp_path / "back.safetensors"
    assert _run(["--dequantize", src, back, "--dtype", dtype]) == 0
    torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    restored = load_file(str(back))
    with GGUFFile(src) as f:
        assert sorted(restored) == sorted(f.tensors)
        for n, t in f.tensors.items():
            x = f.load(n)
            exact = codecs.dequantize(x.data, x.ggml_type, x.shape) if t.ggml_type in LEGACY_QUANTS else x.float()
            assert restored[n].dtype == torch_dtype and torch.equal(restored[n], exact.to(torch_dtype)), n


def _scaled_fp8_pair(reference: dict, style: str) -> tuple[dict, dict]:
    """A ComfyUI scaled fp8 file of the reference's block linears (`style`: the older
    scale_weight + scaled_fp8 layout, or weight_scale + comfy_quant with one scale per
    row) and the dense file of the values it stands for (fp8 value x scale, float32)."""
    stored, dense = {}, {}
    for n, w in reference.items():
        prefixed = "model.diffusion_model." + n
        if not (n.startswith("blocks.") and n.endswith(".weight") and w.dim() == 2):
            stored[prefixed], dense[n] = w, w
            continue
        layer = prefixed.removesuffix(".weight")
        if style == "scale_weight":
            scale = w.abs().max().float().reshape(1) / 448
            stored[layer + ".scale_weight"], stored[layer + ".scale_input"] = scale, torch.ones(1)
        else:
            scale = w.abs().amax(dim=1).float().clamp_min(1e-6) / 448
            stored[layer + ".weight_scale"] = scale
            stored[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        w8 = (w.float() / scale.reshape(-1, 1)).to(torch.float8_e4m3fn)
        stored[prefixed], dense[n] = w8, w8.float() * scale.reshape(-1, 1)
    if style == "scale_weight":
        stored["model.diffusion_model.scaled_fp8"] = torch.zeros(1, dtype=torch.float8_e4m3fn)
    return stored, dense


@pytest.mark.golden
@pytest.mark.parametrize("style", ["scale_weight", "weight_scale"])
def test_comfyui_scaled_fp8_converts_to_its_values(golden, tmp_path, capsys, style):
    """The scale is applied (not written as a tensor of its own beside an unscaled
    weight), and what only serves ComfyUI's fp8 matmul is left out with a note: the
    file equals the one converted from the dense values, for a quantized and a float type."""
    from safetensors.torch import save_file

    stored, dense = _scaled_fp8_pair(load_file(str(golden / "gguf/wan_tiny/wan_tiny.safetensors")), style)
    save_file(stored, str(tmp_path / "fp8_scaled.safetensors"))
    save_file(dense, str(tmp_path / "dense.safetensors"))
    for kind in ("q8_0", "f16"):
        got, want = tmp_path / f"fp8-{kind}.gguf", tmp_path / f"dense-{kind}.gguf"
        assert main([str(tmp_path / "fp8_scaled.safetensors"), str(got), "--type", kind]) == 0
        note = "".join(capsys.readouterr())
        scaled = sum(k.endswith((".scale_weight", ".weight_scale")) for k in stored)
        assert f"ComfyUI scaled fp8: {scaled} weights are written as fp8 value x scale" in note
        assert "left out" in note  # input scales and the marker, or the layer descriptions
        assert _run([tmp_path / "dense.safetensors", want, "--type", kind]) == 0
        with GGUFFile(got) as a, GGUFFile(want) as b:
            assert list(a.tensors) == list(b.tensors)
            for name in a.tensors:
                assert a.tensors[name].ggml_type == b.tensors[name].ggml_type, name
                assert torch.equal(a.raw(name), b.raw(name)), name


@pytest.mark.golden
def test_comfyui_layer_format_other_than_fp8_is_refused(golden, tmp_path, capsys):
    from safetensors.torch import save_file

    stored, _ = _scaled_fp8_pair(load_file(str(golden / "gguf/wan_tiny/wan_tiny.safetensors")), "weight_scale")
    key = next(k for k in stored if k.endswith(".comfy_quant"))
    stored[key] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file(stored, str(tmp_path / "nvfp4.safetensors"))
    assert main([str(tmp_path / "nvfp4.safetensors"), str(tmp_path / "out.gguf"), "--type", "q8_0"]) != 0
    assert "'nvfp4'" in "".join(capsys.readouterr()) and not (tmp_path / "out.gguf").exists()

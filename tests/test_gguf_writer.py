"""GGUF writer: byte-identical rebuilds of the golden files, gguf-py compatibility,
streaming one tensor at a time, atomic output."""
from __future__ import annotations

import collections
import gc
import weakref

import numpy as np
import pytest
import torch

from quant.ggml_types import GGMLType, tensor_nbytes
from quant.gguf_format import LLAMA_FILE_TYPES, ValueType
from quant.gguf_reader import GGUFFile
from quant.gguf_writer import GGUFWriter, infer_value_type


def _golden_ggufs(golden):
    paths = sorted((golden / "gguf" / "wan_tiny").glob("*.gguf"))
    assert paths
    return paths


def _main_type(f: GGUFFile) -> GGMLType:
    """The type most 2-D weights of the file are stored in (what file_type names)."""
    counts = collections.Counter(t.ggml_type for t in f.tensors.values() if t.n_dims == 2)
    return counts.most_common(1)[0][0]


@pytest.mark.golden
def test_rebuild_golden_files_byte_identical(golden, tmp_path):
    """Tensors, order and metadata of each golden file, written again: same bytes."""
    for path in _golden_ggufs(golden):
        out = tmp_path / path.name
        with GGUFFile(path) as f:
            w = GGUFWriter(out, arch=f.architecture, alignment=f.alignment)
            for key, value in f.metadata.items():
                if key in ("general.architecture", "general.alignment"):
                    continue
                vtype, item_type = f.metadata_types[key]
                w.add_metadata(key, value, vtype, item_type=item_type)
            for name, info in f.tensors.items():
                w.add_tensor(name, info.shape, info.ggml_type, lambda name=name: f.raw(name))
            assert w.total_bytes == f.file_size
            w.write()
        assert out.read_bytes() == path.read_bytes(), path.name


@pytest.mark.golden
def test_quantization_info_matches_city96_metadata(golden, tmp_path):
    """arch + add_quantization_info(main type) alone rebuilds each golden file."""
    for path in _golden_ggufs(golden):
        out = tmp_path / path.name
        with GGUFFile(path) as f:
            main = _main_type(f)
            assert LLAMA_FILE_TYPES[main] == f.metadata["general.file_type"], path.name
            w = GGUFWriter(out, arch="wan")
            w.add_quantization_info(main)
            for name, info in f.tensors.items():
                w.add_tensor(name, info.shape, info.ggml_type, lambda name=name: f.raw(name).clone())
            w.write()
        assert out.read_bytes() == path.read_bytes(), path.name


def _sample_tensors():
    """Wan-like shapes: a 5-D conv weight, a [1, 6, dim] modulation, a quantized linear."""
    g = torch.Generator().manual_seed(0)
    dim = 64
    q8 = torch.randint(0, 256, (tensor_nbytes(GGMLType.Q8_0, (dim, dim)),), dtype=torch.uint8, generator=g)
    q8.view(-1, 34)[:, 1] = 0  # keep every fp16 scale finite (high byte < 0x7c)
    return {
        "patch_embedding.weight": (GGMLType.F32, torch.randn(dim, 36, 1, 2, 2, generator=g)),
        "blocks.0.modulation": (GGMLType.F32, torch.randn(1, 6, dim, generator=g)),
        "blocks.0.norm3.bias": (GGMLType.F16, torch.randn(dim, generator=g).half()),
        "blocks.0.ffn.0.weight": (GGMLType.BF16, torch.randn(2 * dim, dim, generator=g).bfloat16()),
        "blocks.0.self_attn.q.weight": (GGMLType.Q8_0, q8),
    }


def _write_sample(path, alignment=32):
    tensors = _sample_tensors()
    w = GGUFWriter(path, arch="wan", alignment=alignment)
    w.add_quantization_info(GGMLType.Q8_0)
    w.add_metadata("test.name", "wanrt ü")
    w.add_metadata("test.flag", True)
    w.add_metadata("test.count", -3)
    w.add_metadata("test.big", 2**40)
    w.add_metadata("test.scale", 0.5)
    w.add_metadata("test.f64", 0.1, ValueType.FLOAT64)
    w.add_metadata("test.u8", 200, "uint8")
    w.add_metadata("test.ints", [3, 1, 4])
    w.add_metadata("test.words", ["a", "bc"])
    w.add_metadata("test.empty", [], item_type=ValueType.UINT64)
    for name, (t, x) in tensors.items():
        shape = x.shape if t != GGMLType.Q8_0 else (64, 64)
        w.add_tensor(name, shape, t, lambda x=x: x)
    w.write()
    return tensors


def test_gguf_py_reads_our_files(tmp_path):
    from gguf import GGUFReader

    path = tmp_path / "sample.gguf"
    for alignment in (32, 64):
        path.unlink(missing_ok=True)
        tensors = _write_sample(path, alignment)
        r = GGUFReader(path)
        fields = {k: f.contents() for k, f in r.fields.items()}
        assert fields["general.architecture"] == "wan"
        assert fields["general.file_type"] == LLAMA_FILE_TYPES[GGMLType.Q8_0]
        assert fields["test.name"] == "wanrt ü" and fields["test.ints"] == [3, 1, 4]
        assert fields["test.words"] == ["a", "bc"] and fields["test.big"] == 2**40
        assert r.alignment == alignment
        by_name = {t.name: t for t in r.tensors}
        assert list(by_name) == list(tensors)
        for name, (t, x) in tensors.items():
            rt = by_name[name]
            assert rt.tensor_type.value == t.value
            if t != GGMLType.Q8_0:
                assert list(rt.shape) == list(reversed(x.shape))  # no size-1 dimension dropped
            got = np.asarray(rt.data).reshape(-1).view(np.uint8)
            assert bytes(got) == x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_our_reader_round_trip(tmp_path):
    path = tmp_path / "sample.gguf"
    tensors = _write_sample(path)
    with GGUFFile(path) as f:
        assert f.metadata["test.name"] == "wanrt ü"
        assert f.metadata_types["test.count"] == (ValueType.INT32, None)
        assert f.metadata_types["test.big"] == (ValueType.INT64, None)
        assert f.metadata_types["test.scale"] == (ValueType.FLOAT32, None)
        assert f.metadata_types["test.u8"] == (ValueType.UINT8, None)
        assert f.metadata_types["test.ints"] == (ValueType.ARRAY, ValueType.INT32)
        assert f.metadata["test.empty"] == [] and f.metadata["test.f64"] == 0.1
        assert f.metadata["test.flag"] is True
        for name, (t, x) in tensors.items():
            y = f.load(name)
            if t == GGMLType.Q8_0:
                assert torch.equal(y.data, x) and y.shape == (64, 64)
            else:
                assert y.dtype == x.dtype and torch.equal(y, x)


def test_value_type_inference():
    assert infer_value_type("x") == ValueType.STRING
    assert infer_value_type(True) == ValueType.BOOL
    assert infer_value_type(np.bool_(False)) == ValueType.BOOL
    assert infer_value_type(7) == ValueType.INT32
    assert infer_value_type(np.int64(-(2**31))) == ValueType.INT32
    assert infer_value_type(2**31) == ValueType.INT64
    assert infer_value_type(2**63) == ValueType.UINT64
    assert infer_value_type(1.5) == ValueType.FLOAT32
    assert infer_value_type([1, 2]) == ValueType.ARRAY
    with pytest.raises(ValueError):
        infer_value_type(2**64)
    with pytest.raises(ValueError):
        infer_value_type(b"bytes")


def test_metadata_checks(tmp_path):
    w = GGUFWriter(tmp_path / "m.gguf", arch="wan")
    with pytest.raises(ValueError, match="already"):
        w.add_metadata("general.architecture", "flux")
    with pytest.raises(ValueError, match="UINT32"):
        w.add_metadata("k1", -1, ValueType.UINT32)
    with pytest.raises(ValueError, match="UINT8"):
        w.add_metadata("k2", 256, ValueType.UINT8)
    with pytest.raises(ValueError, match="share one type"):
        w.add_metadata("k3", [1, "a"])
    with pytest.raises(ValueError, match="empty array"):
        w.add_metadata("k4", [])
    with pytest.raises(ValueError, match="too large"):
        w.add_metadata("k5", 1e300, ValueType.FLOAT32)
    with pytest.raises(ValueError, match="alignment"):
        w.add_metadata("general.alignment", 64, ValueType.UINT32)
    with pytest.raises(ValueError, match="file_type"):
        w.add_quantization_info(GGMLType.Q4_K)
    with pytest.raises(ValueError):
        GGUFWriter(tmp_path / "x.gguf", arch="wan", alignment=48)


def test_tensor_declaration_checks(tmp_path):
    w = GGUFWriter(tmp_path / "t.gguf", arch="wan")
    ok = lambda: b""  # noqa: E731
    with pytest.raises(ValueError, match="multiple"):
        w.add_tensor("a", (4, 48), GGMLType.Q8_0, ok)
    with pytest.raises(ValueError, match="dimensions"):
        w.add_tensor("b", (1, 1, 1, 1, 1, 1), GGMLType.F32, ok)
    with pytest.raises(ValueError, match="at least 1"):
        w.add_tensor("c", (0, 4), GGMLType.F32, ok)
    with pytest.raises(ValueError, match="removed"):
        w.add_tensor("d", (4,), 4, ok)
    w.add_tensor("e", (4,), "f32", ok)
    with pytest.raises(ValueError, match="already"):
        w.add_tensor("e", (4,), GGMLType.F32, ok)


def test_streams_one_tensor_at_a_time(tmp_path):
    """Each buffer is released before the next is produced; the header is on disk first."""
    path = tmp_path / "stream.gguf"
    w = GGUFWriter(path, arch="wan")
    alive: list[weakref.ref] = []
    calls = []

    def produce(i):
        gc.collect()
        assert all(ref() is None for ref in alive), "a previous tensor's buffer is still held"
        partial = list(tmp_path.glob(".stream.gguf.*.partial"))
        assert len(partial) == 1 and partial[0].stat().st_size >= 24
        calls.append(i)
        x = np.full((16, 32), i, dtype=np.float32)
        alive.append(weakref.ref(x))
        return x

    for i in range(4):
        w.add_tensor(f"t{i}", (16, 32), GGMLType.F32, lambda i=i: produce(i))
    seen = []
    w.write(progress=lambda name, nbytes: seen.append((name, nbytes)))
    assert calls == [0, 1, 2, 3]
    assert seen == [(f"t{i}", 16 * 32 * 4) for i in range(4)]
    with GGUFFile(path) as f:
        for i in range(4):
            assert torch.equal(f.load(f"t{i}"), torch.full((16, 32), float(i)))
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("failure", ["wrong_size", "interrupt"])
def test_failed_write_leaves_nothing(tmp_path, failure):
    path = tmp_path / "fail.gguf"
    w = GGUFWriter(path, arch="wan")
    w.add_tensor("a", (8,), GGMLType.F32, lambda: np.zeros(8, np.float32))

    def bad():
        if failure == "interrupt":
            raise KeyboardInterrupt
        return np.zeros(9, np.float32)

    w.add_tensor("b", (8,), GGMLType.F32, bad)
    expected = KeyboardInterrupt if failure == "interrupt" else ValueError
    with pytest.raises(expected, match="36 bytes.*32" if failure == "wrong_size" else None):
        w.write()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "exists.gguf"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        GGUFWriter(path, arch="wan")
    w = GGUFWriter(path, arch="wan", overwrite=True)
    w.add_tensor("a", (32,), GGMLType.F16, lambda: torch.ones(32, dtype=torch.float16))
    w.write()
    with GGUFFile(path) as f:
        assert torch.equal(f.load("a"), torch.ones(32, dtype=torch.float16))
    # the check is repeated at write time, for a file that appeared meanwhile
    late = tmp_path / "late.gguf"
    w = GGUFWriter(late, arch="wan")
    w.add_tensor("a", (32,), GGMLType.F16, lambda: torch.ones(32, dtype=torch.float16))
    late.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        w.write()
    assert late.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf", "late.gguf"]


def test_pieces_write_the_same_file_as_whole_tensors(tmp_path):
    """A producer may yield consecutive pieces (a generator); the file is the same, and
    tensor_offsets() says where each tensor's bytes start."""
    gen = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(7, 64, generator=gen) for i in range(3)}
    files = {}
    for how in ("whole", "pieces"):
        path = tmp_path / f"{how}.gguf"
        w = GGUFWriter(path, arch="wan")
        for name, x in tensors.items():
            if how == "whole":
                w.add_tensor(name, x.shape, GGMLType.F32, lambda x=x: x)
            else:
                w.add_tensor(name, x.shape, GGMLType.F32, lambda x=x: (x[r : r + 3] for r in range(0, 7, 3)))
        offsets = w.tensor_offsets()
        w.write()
        files[how] = path.read_bytes()
        with GGUFFile(path) as f:
            assert offsets == {n: t.offset for n, t in f.tensors.items()}
            for name, x in tensors.items():
                assert torch.equal(f.load(name), x)
    assert files["pieces"] == files["whole"]


@pytest.mark.parametrize("pieces", [[4, 4, 4], [4, 3]], ids=["too many bytes", "too few bytes"])
def test_pieces_of_the_wrong_total_size_leave_nothing(tmp_path, pieces):
    w = GGUFWriter(tmp_path / "bad.gguf", arch="wan")
    w.add_tensor("a", (8,), GGMLType.F32, lambda: (np.zeros(n, np.float32) for n in pieces))
    with pytest.raises(ValueError, match=r"tensor 'a': produce\(\) returned .* bytes, but a F32 tensor of shape \[8\] takes 32"):
        w.write()
    assert list(tmp_path.iterdir()) == []

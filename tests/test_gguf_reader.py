"""GGUF reader: golden files read back exactly, hostile files give one clear GGUFError."""
from __future__ import annotations

import hashlib
import json
import random
import re
import struct
import warnings

import pytest
import torch

from quant.ggml_types import GGMLType
from quant.gguf_format import ValueType
from quant.gguf_reader import GGUFError, GGUFFile
from quant.gguf_writer import GGUFWriter
from quant.packed import PackedTensor

pytestmark = pytest.mark.golden

_ERROR_TAIL = re.compile(r"^(?P<what>.+) at byte (?P<at>\d+)$")


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_error(err: GGUFError, path) -> None:
    """One line, `<file>: <what> at byte <n>`, with n inside the file (or at its end)."""
    text = str(err)
    assert "\n" not in text
    prefix = f"{path}: "
    assert text.startswith(prefix), text
    m = _ERROR_TAIL.match(text[len(prefix):])
    assert m, text
    assert 0 <= int(m["at"]) <= path.stat().st_size
    assert err.at == int(m["at"]) and err.path == str(path)


def _touch_all(f: GGUFFile) -> None:
    for name in f.tensors:
        x = f.load(name)
        if isinstance(x, PackedTensor):
            assert x.nbytes == f.tensors[name].nbytes


# -- golden/gguf/bad ----------------------------------------------------------------


def _manifest(golden):
    return json.loads((golden / "gguf" / "bad" / "manifest.json").read_text())


def test_bad_files_as_the_manifest_says(golden):
    bad = golden / "gguf" / "bad"
    entries = _manifest(golden)
    kinds_seen = set()
    for entry in entries:
        path = bad / entry["file"]
        assert _sha256(path) == entry["sha256"], entry["file"]
        kind = entry["kind"].split(":")[0]
        kinds_seen.add(kind)
        if kind == "container":
            with pytest.raises(GGUFError) as exc:
                GGUFFile(path)
            _check_error(exc.value, path)
        elif kind == "control":
            with GGUFFile(path) as f:
                assert f.tensors
                _touch_all(f)
        elif kind == "model":
            # Well-formed containers: the model loader refuses them, so what it needs
            # to decide (architecture, tensor names and shapes) must be readable.
            with GGUFFile(path) as f:
                assert f.tensors
                assert f.architecture is None or isinstance(f.architecture, str)
                assert f.architecture == f.metadata.get("general.architecture")
                _touch_all(f)
        else:
            pytest.fail(f"manifest kind {entry['kind']!r} of {entry['file']} is not handled by this test")
    assert {"container", "control", "model"} <= kinds_seen


def test_bad_containers_without_require_data(golden):
    """Header-only mode tolerates only missing data, and then refuses to hand it out."""
    bad = golden / "gguf" / "bad"
    for entry in _manifest(golden):
        if not entry["kind"].startswith("container"):
            continue
        path = bad / entry["file"]
        try:
            f = GGUFFile(path, require_data=False)
        except GGUFError as e:
            _check_error(e, path)
            continue
        with f:
            assert f.missing_bytes > 0, entry["file"]
            with pytest.raises(GGUFError) as exc:
                _touch_all(f)
            _check_error(exc.value, path)


def test_every_cut_of_a_valid_file_is_refused(golden, tmp_path):
    """A file cut anywhere (inside the header, the tensor infos, the data) gives a
    GGUFError, never another exception."""
    path = golden / "gguf" / "bad" / "valid_base.gguf"
    full = path.read_bytes()
    with GGUFFile(path) as f:
        data_offset, data_end = f.data_offset, f.data_end
    cut_path = tmp_path / "cut.gguf"
    for n in [*range(0, data_offset + 1), *range(data_offset, data_end, 97)]:
        cut_path.write_bytes(full[:n])
        with pytest.raises(GGUFError) as exc:
            GGUFFile(cut_path)
        _check_error(exc.value, cut_path)


def test_random_corruption_never_crashes(golden, tmp_path):
    """Bytes flipped anywhere in the header: the file loads or gives a GGUFError."""
    path = golden / "gguf" / "bad" / "valid_base.gguf"
    full = path.read_bytes()
    with GGUFFile(path) as f:
        header_end = f.data_offset
    rng = random.Random(0)
    out = tmp_path / "mutated.gguf"
    for _ in range(1000):
        data = bytearray(full)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(header_end - 8)
            if rng.random() < 0.5:
                data[at] = rng.randrange(256)
            else:  # a large or wrapping count, length or offset
                value = (2 ** rng.randrange(65) + rng.randrange(-64, 64)) % 2**64
                struct.pack_into("<Q", data, at, value)
        out.write_bytes(bytes(data))
        try:
            with GGUFFile(out) as f:
                _touch_all(f)
        except GGUFError as e:
            _check_error(e, out)


def test_version_2_is_read(golden, tmp_path):
    path = golden / "gguf" / "bad" / "valid_base.gguf"
    data = bytearray(path.read_bytes())
    assert struct.unpack_from("<I", data, 4)[0] == 3
    struct.pack_into("<I", data, 4, 2)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(data))
    with GGUFFile(path) as a, GGUFFile(v2) as b:
        assert b.version == 2
        assert a.tensors == {n: t for n, t in b.tensors.items()}
        for name in a.tensors:
            assert torch.equal(a.raw(name), b.raw(name))


def test_version_errors_say_which(golden):
    bad = golden / "gguf" / "bad"
    for entry in _manifest(golden):
        path = bad / entry["file"]
        data = path.read_bytes()
        if len(data) < 8 or data[:4] != b"GGUF":
            continue
        version = struct.unpack_from("<I", data, 4)[0]
        if version in (2, 3):
            continue
        with pytest.raises(GGUFError, match=rf"version {version}\b"):
            GGUFFile(path)


# -- golden/gguf/wan_tiny -------------------------------------------------------------


def _listing(golden):
    return json.loads((golden / "gguf" / "wan_tiny" / "listing.json").read_text())


def test_wan_tiny_files_match_listing(golden):
    root = golden / "gguf" / "wan_tiny"
    listing = _listing(golden)
    assert listing
    for entry in listing:
        with GGUFFile(root / entry["file"]) as f:
            assert f.version == entry["version"]
            assert f.alignment == entry["alignment"]
            assert f.data_offset == entry["data_offset"]
            assert f.file_size == entry["file_size"]
            assert f.missing_bytes == 0
            assert len(f.tensors) == entry["n_tensors"]
            assert len(f.metadata) == entry["n_kv"]
            for kv in entry["metadata"]:
                assert f.metadata[kv["key"]] == kv["value"]
                assert f.metadata_types[kv["key"]][0] == ValueType[kv["type"]]
            assert f.architecture == f.metadata.get("general.architecture")
            assert list(f.tensors) == [t["name"] for t in entry["tensors"]]
            for t in entry["tensors"]:
                info = f.tensors[t["name"]]
                assert info.ggml_type == GGMLType(t["ggml_type_id"]) and info.ggml_type.name == t["ggml_type"]
                assert info.n_dims == t["n_dims"]
                assert list(info.ne) == t["ne"]
                assert list(info.shape) == t["torch_shape"]
                assert info.offset == t["file_offset"] == f.data_offset + t["offset_in_data"]
                assert info.nbytes == t["nbytes"]
                assert hashlib.sha256(f.raw(t["name"]).numpy().tobytes()).hexdigest() == t["sha256"]
                x = f.load(t["name"])
                assert tuple(x.shape) == tuple(t["torch_shape"])


def test_wan_tiny_dequantizes_to_references(golden):
    from safetensors.torch import load_file

    root = golden / "gguf" / "wan_tiny"
    refs = sorted(root.glob("*.dequant.safetensors"))
    assert refs
    for ref_path in refs:
        gguf_path = root / ref_path.name.replace(".dequant.safetensors", ".gguf")
        ref = load_file(ref_path)
        with GGUFFile(gguf_path) as f:
            assert set(ref) == set(f.tensors)
            for name, expected in ref.items():
                x = f.load(name)
                x = x.dequantize(torch.float32) if isinstance(x, PackedTensor) else x.to(torch.float32)
                assert x.shape == expected.shape, name
                assert torch.equal(x, expected), name


def test_views_are_private_and_warning_free(golden):
    path = golden / "gguf" / "wan_tiny" / "wan_tiny-F16.gguf"
    before = _sha256(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = GGUFFile(path)
        name = next(n for n, t in f.tensors.items() if t.ggml_type == GGMLType.F32)
        x = f.load(name)
        original = x.clone()
        x.add_(1.0)  # copy-on-write: stays in this process
        raw = f.raw(name)
        f.close()
    # the views outlive close(): the mapping stays until they are freed
    assert torch.equal(x, original + 1.0)
    assert raw.numel() == f.tensors[name].nbytes
    del x, raw
    assert _sha256(path) == before
    with GGUFFile(path) as g:
        assert torch.equal(g.load(name), original)


def test_raw_after_close_and_unknown_name(golden):
    path = golden / "gguf" / "bad" / "valid_base.gguf"
    f = GGUFFile(path)
    name = next(iter(f.tensors))
    with pytest.raises(KeyError, match="no tensor named"):
        f.raw("not.a.tensor")
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.raw(name)


# -- golden/gguf/a14b_layout ------------------------------------------------------------


def test_a14b_headers_plan_and_refuse_data(golden):
    root = golden / "gguf" / "a14b_layout"
    layout = json.loads((root / "a14b_layout.json").read_text())
    with_header = {v["header_file"]: v for v in layout["files"].values() if v.get("header_file")}
    assert with_header
    for header_file, expected in with_header.items():
        path = root / header_file
        with pytest.raises(GGUFError, match="truncated") as exc:
            GGUFFile(path)
        _check_error(exc.value, path)
        with GGUFFile(path, require_data=False) as f:
            assert len(f.tensors) == expected["n_tensors"]
            assert f.data_offset == expected["data_offset"] == f.file_size
            assert f.data_end == expected["file_size"]
            assert f.missing_bytes == expected["data_bytes"]
            assert f.architecture == "wan"
            assert list(f.tensors) == [t["name"] for t in expected["tensors"]]
            for t in expected["tensors"]:
                info = f.tensors[t["name"]]
                assert info.ggml_type.name == t["ggml_type"]
                assert list(info.ne) == t["ne"] and list(info.shape) == t["torch_shape"]
                assert info.offset == f.data_offset + t["offset_in_data"]
                assert info.nbytes == t["nbytes"]
            name = expected["tensors"][-1]["name"]
            with pytest.raises(GGUFError, match=r"truncated.*[\d,]+ bytes") as exc:
                f.load(name)
            _check_error(exc.value, path)
            assert exc.value.at == f.file_size


# -- shapes and layouts the golden files do not cover -------------------------------------


def _write(path, tensors, metadata=(), alignment=32):
    w = GGUFWriter(path, arch="wan", alignment=alignment)
    for key, value, vtype, item in metadata:
        w.add_metadata(key, value, vtype, item_type=item)
    for name, t in tensors.items():
        w.add_tensor(name, t.shape, GGMLType.F32 if t.dtype == torch.float32 else GGMLType.F16, lambda t=t: t)
    w.write()
    return path


def test_orig_shape_metadata(tmp_path):
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    key = "comfy.gguf.orig_shape.w"
    path = _write(tmp_path / "ok.gguf", {"w": t}, [(key, [2, 3, 4], ValueType.ARRAY, ValueType.INT32)])
    with GGUFFile(path) as f:
        assert f.tensors["w"].shape == (2, 3, 4)
        assert f.tensors["w"].stored_shape == (4, 6)
        assert torch.equal(f.load("w"), t.reshape(2, 3, 4))
    bad = [
        ("uint32", [2, 3, 4], ValueType.ARRAY, ValueType.UINT32),
        ("product", [5, 5], ValueType.ARRAY, ValueType.INT32),
        ("scalar", 24, ValueType.INT32, None),
    ]
    for label, value, vtype, item in bad:
        path = _write(tmp_path / f"{label}.gguf", {"w": t}, [(key, value, vtype, item)])
        with pytest.raises(GGUFError, match=re.escape(key)) as exc:
            GGUFFile(path)
        _check_error(exc.value, path)


def test_small_alignment_misaligned_views(tmp_path):
    """With alignment 1 a float32 tensor may start at an odd offset: load() still works."""
    misaligned = 0
    for n in (1, 2):  # one of the two puts b off a 4-byte boundary
        tensors = {"a": torch.arange(n, dtype=torch.float16), "b": torch.randn(5, 7)}
        path = _write(tmp_path / f"a1_{n}.gguf", tensors, alignment=1)
        with GGUFFile(path) as f:
            assert f.alignment == 1 and f.metadata["general.alignment"] == 1
            misaligned += f.tensors["b"].offset % 4 != 0
            for name, t in tensors.items():
                assert torch.equal(f.load(name), t)
    assert misaligned == 1


def test_tensor_data_in_any_order(tmp_path):
    """Offsets need not follow the info order; only overlap is refused."""
    tensors = {"a": torch.randn(8), "b": torch.randn(16)}
    path = _write(tmp_path / "swap.gguf", tensors)
    data = bytearray(path.read_bytes())
    with GGUFFile(path) as f:
        a, b = f.tensors["a"], f.tensors["b"]
        base = f.data_offset
    # swap the data: b first, then a (a starts after b, padded to 32)
    new_a = b.nbytes + (-b.nbytes % 32)
    blob = bytes(data[b.offset : b.end]) + bytes(new_a - b.nbytes) + bytes(data[a.offset : a.end])
    data[base : base + len(blob)] = blob
    for name, rel in (("a", new_a), ("b", 0)):
        at = data.index(name.encode() + struct.pack("<I", 1)) + 1 + 4 + 8 + 4
        struct.pack_into("<Q", data, at, rel)
    path.write_bytes(bytes(data))
    with GGUFFile(path) as f:
        assert list(f.tensors) == ["a", "b"]
        for name, t in tensors.items():
            assert torch.equal(f.load(name), t)


def test_string_arrays(tmp_path):
    """Vocabulary-sized string arrays read back; a bad element is named in the error."""
    tokens = [f"\u2581tok{i}" for i in range(5000)]
    path = _write(tmp_path / "vocab.gguf", {"x": torch.zeros(32)}, [("tokenizer.ggml.tokens", tokens, None, None)])
    with GGUFFile(path) as f:
        assert f.metadata["tokenizer.ggml.tokens"] == tokens
        assert f.metadata_types["tokenizer.ggml.tokens"] == (ValueType.ARRAY, ValueType.STRING)
    full = path.read_bytes()
    at = full.index("\u2581tok100".encode())
    for label, patch in (("utf8", (at, b"\xff")), ("length", (at - 8, struct.pack("<Q", 2**40)))):
        data = bytearray(full)
        data[patch[0] : patch[0] + len(patch[1])] = patch[1]
        bad = tmp_path / f"{label}.gguf"
        bad.write_bytes(bytes(data))
        with pytest.raises(GGUFError, match="element 100 of metadata 'tokenizer.ggml.tokens'") as exc:
            GGUFFile(bad)
        _check_error(exc.value, bad)

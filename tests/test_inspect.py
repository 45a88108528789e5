"""`python -m quant.inspect`: report contents, --verify, exit codes and one-line errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from quant.ggml_types import GGMLType, tensor_nbytes
from quant.gguf_writer import GGUFWriter
from quant.inspect import main

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_error_line(err: str, path) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert str(path) in lines[0]
    assert "Traceback" not in err


@pytest.mark.golden
def test_json_report_matches_listing(golden, capsys):
    root = golden / "gguf" / "wan_tiny"
    for entry in json.loads((root / "listing.json").read_text()):
        rc, out, _ = _run(capsys, root / entry["file"], "--json")
        assert rc == 0
        report = json.loads(out)
        assert report["version"] == entry["version"] and report["data_offset"] == entry["data_offset"]
        assert [(t["name"], t["type"], t["shape"], t["bytes"]) for t in report["tensors"]] == [
            (t["name"], t["ggml_type"], t["torch_shape"], t["nbytes"]) for t in entry["tensors"]
        ]
        per_type = defaultdict(int)
        per_block = defaultdict(int)
        for t in entry["tensors"]:
            per_type[t["ggml_type"]] += t["nbytes"]
            m = _BLOCK.match(t["name"])
            if m:
                per_block[int(m.group(1))] += t["nbytes"]
        assert {r["type"]: r["bytes"] for r in report["per_type"]} == per_type
        assert {r["block"]: r["bytes"] for r in report["per_block"]} == per_block
        assert report["totals"]["bytes"] == sum(t["nbytes"] for t in entry["tensors"])
        assert {m["key"]: m["value"] for m in report["metadata"]} == {m["key"]: m["value"] for m in entry["metadata"]}


@pytest.mark.golden
def test_text_report_and_verify(golden, capsys):
    path = golden / "gguf" / "wan_tiny" / "wan_tiny-Q4_0.gguf"
    rc, out, _ = _run(capsys, path, "--verify")
    assert rc == 0
    assert "per type" in out and "per transformer block" in out
    assert "patch_embedding.weight" in out
    assert re.search(r"verify: all \d+ tensors decode to finite values", out)


@pytest.mark.golden
def test_header_only_file(golden, capsys):
    root = golden / "gguf" / "a14b_layout"
    layout = json.loads((root / "a14b_layout.json").read_text())
    for spec in layout["files"].values():
        if not spec.get("header_file"):
            continue
        path = root / spec["header_file"]
        rc, out, err = _run(capsys, path, "--json")
        assert rc == 2
        _assert_one_error_line(err, path)
        assert "truncated" in err
        report = json.loads(out)
        assert report["missing_bytes"] == spec["data_bytes"]
        assert {r["bytes"] for r in report["per_block"]} == {spec["bytes_per_block"]}
        rc, out, err = _run(capsys, path, "--verify")
        assert rc == 2 and out == ""
        _assert_one_error_line(err, path)


@pytest.mark.golden
def test_bad_containers_exit_2_with_one_line(golden, capsys):
    bad = golden / "gguf" / "bad"
    for entry in json.loads((bad / "manifest.json").read_text()):
        if not entry["kind"].startswith("container"):
            continue
        path = bad / entry["file"]
        rc, _, err = _run(capsys, path)
        assert rc == 2, entry["file"]
        _assert_one_error_line(err, path)


def test_missing_file(tmp_path, capsys):
    path = tmp_path / "absent.gguf"
    rc, out, err = _run(capsys, path)
    assert rc == 2 and out == ""
    _assert_one_error_line(err, path)


def test_verify_finds_non_finite_tensors(tmp_path, capsys):
    path = tmp_path / "nan.gguf"
    good = torch.randn(4, 32)
    inf = torch.randn(64).half()
    inf[7] = float("inf")
    q8 = np.zeros(tensor_nbytes(GGMLType.Q8_0, (2, 64)), dtype=np.uint8)
    q8.reshape(-1, 34)[1, :2] = np.array([0x7E00], dtype="<u2").view(np.uint8)  # scale NaN in block 1
    w = GGUFWriter(path, arch="wan")
    w.add_tensor("good", good.shape, GGMLType.F32, lambda: good)
    w.add_tensor("has_inf", inf.shape, GGMLType.F16, lambda: inf)
    w.add_tensor("has_nan", (2, 64), GGMLType.Q8_0, lambda: q8)
    w.write()
    rc, out, _ = _run(capsys, path, "--verify")
    assert rc == 1
    assert re.search(r"has_inf \(F16\): 1 of 64 values", out)
    assert re.search(r"has_nan \(Q8_0\): 32 of 128 values", out)
    assert "good (" not in out
    rc, out, _ = _run(capsys, path, "--verify", "--json")
    assert rc == 1
    assert {p["name"] for p in json.loads(out)["verify"]["problems"]} == {"has_inf", "has_nan"}


def test_long_arrays_are_summarised(tmp_path, capsys):
    path = tmp_path / "meta.gguf"
    w = GGUFWriter(path, arch="wan")
    w.add_metadata("test.tokens", [f"tok{i}" for i in range(1000)])
    w.add_metadata("test.short", [1, 2, 3])
    w.add_tensor("x", (32,), GGMLType.F32, lambda: torch.zeros(32))
    w.write()
    rc, out, _ = _run(capsys, path)
    assert rc == 0
    assert "STRING x 1,000" in out and "tok7" in out and "tok8" not in out
    assert "[INT32 x 3: 1, 2, 3]" in out


def test_runs_as_a_module(tmp_path):
    path = tmp_path / "absent.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "quant.inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1

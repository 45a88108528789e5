"""Shared test fixtures: where the golden reference data lives, and the gpu marker.

The golden data is not part of this repository. It is found through the WANRT_GOLDEN
environment variable, else in a `shared/golden` folder beside or inside the checkout.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_golden() -> Path | None:
    env = os.environ.get("WANRT_GOLDEN")
    if env:
        return Path(env)
    for candidate in (REPO.parent / "shared" / "golden", REPO / "shared" / "golden"):
        if candidate.is_dir():
            return candidate
    return None


GOLDEN = _find_golden()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "golden: compares against the golden reference data")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a CPU")


def pytest_collection_modifyitems(config, items):
    import torch

    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)


@pytest.fixture(scope="session")
def golden() -> Path:
    """Root of the golden data; a test that needs it fails loudly when it is missing
    unless WANRT_ALLOW_NO_GOLDEN=1 turns that into a skip."""
    if GOLDEN is None or not GOLDEN.is_dir():
        msg = "golden data not found: set WANRT_GOLDEN to the folder that holds dit/, gguf/, ..."
        if os.environ.get("WANRT_ALLOW_NO_GOLDEN") == "1":
            pytest.skip(msg)
        pytest.fail(msg)
    return GOLDEN


@pytest.fixture(scope="session")
def city96_routes(golden):
    """Golden GGUF file name -> (source file, target type, base type), from the commands
    in gguf/wan_tiny/routes.json that made it."""
    from quant.ggml_types import GGMLType

    routes = json.loads((golden / "gguf/wan_tiny/routes.json").read_text())
    out = {}
    for name, steps in routes.items():
        src = re.search(r"--src (\S+)", steps[0]).group(1)
        base = GGMLType[re.search(r"-> (\w+) base", steps[0]).group(1)]
        target = base
        for step in steps[1:]:
            m = re.search(r"llama-quantize <\w+ base> (\w+)", step)
            if m:
                target = GGMLType[m.group(1)]
        out[name] = (src, target, base)
    return out

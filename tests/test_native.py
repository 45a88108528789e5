"""The binding mirrors the C ABI; failures become exceptions; the fallback warns once;
CUDA kernels equal the torch twin (GPU tests: `python -m pytest tests/test_native.py -m gpu`)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quant import _native, diagnose
from quant.dequant_torch import dequantize as torch_dequantize
from quant.ggml_types import FLOAT_TYPES, LEGACY_QUANTS, GGMLType, traits

REPO = Path(__file__).resolve().parents[1]
REQUIRE = bool(os.environ.get("WANRT_REQUIRE_NATIVE"))
needs_native = pytest.mark.skipif(
    not _native.available() and not REQUIRE,
    reason=f"native C library absent ({_native.load_error()}); set WANRT_REQUIRE_NATIVE=1 to fail instead",
)
needs_cuda_lib = pytest.mark.skipif(
    not _native.cuda_available() and not REQUIRE,
    reason=f"CUDA library absent ({_native.cuda_load_error()}); set WANRT_REQUIRE_NATIVE=1 to fail instead",
)


def header_functions() -> dict[str, set[str]]:
    """Exported function names per wanrt-cdef section of csrc/wanrt.h."""
    text = (REPO / "csrc" / "wanrt.h").read_text()
    sections = re.findall(r"/\* wanrt-cdef begin (\w+) \*/\n(.*?)/\* wanrt-cdef end \*/", text, re.S)
    return {name: set(re.findall(r"\b(wanrt_\w+)\(", body)) for name, body in sections}


def test_binding_mirrors_the_header_one_to_one():
    sections = header_functions()
    assert set(sections) == {"common", "core", "cuda"}
    assert sections["common"] == set()  # types only
    assert sections["core"] == set(_native.CORE_FUNCTIONS)
    assert sections["cuda"] == set(_native.CUDA_FUNCTIONS)
    for name in sections["core"] | sections["cuda"]:
        assert callable(getattr(_native, name.removeprefix("wanrt_"))), f"no Python mirror of {name}"


@needs_native
def test_error_status_becomes_exception_with_the_c_message():
    x = torch.zeros(2, 32)
    out = torch.empty(2, 34, dtype=torch.uint8)
    with pytest.raises(_native.NativeError) as e:
        _native.quantize(GGMLType.Q4_K, GGMLType.F32, x.data_ptr(), out.data_ptr(), 2, 32, 1)
    assert e.value.status == "WANRT_ERR_UNSUPPORTED"
    assert "not a legacy block quant" in e.value.message
    assert e.value.message == _native.last_error()
    with pytest.raises(_native.NativeError, match="WANRT_ERR_INVALID_ARGUMENT.*whole number of 32-value blocks"):
        _native.quantize(GGMLType.Q8_0, GGMLType.F32, x.data_ptr(), out.data_ptr(), 2, 31, 1)
    with pytest.raises(_native.NativeError, match="not aligned"):
        _native.quantize(GGMLType.Q8_0, GGMLType.F32, x.data_ptr() + 1, out.data_ptr(), 1, 32, 1)
    with pytest.raises(_native.NativeError, match="float type id 2"):
        _native.dequantize(GGMLType.Q8_0, out.data_ptr(), GGMLType.Q4_0, x.data_ptr(), 1, 32, 1)


@needs_native
def test_build_info_and_cpu_count():
    assert "-ffp-contract=off" in _native.build_info()
    assert _native.cpu_count() >= 1


def test_diagnose_reports_both_libraries():
    text = diagnose.report()
    assert "C library" in text and "CUDA library" in text
    assert ("loaded from" in text) == (_native.available() or _native.cuda_available())
    if not _native.available():
        assert _native.load_error() in text


BLOCK_NATIVE = """
import sys, warnings
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name in ("quant._wanrt_c", "quant._wanrt_cuda"):
            raise ModuleNotFoundError("simulated: not built", name=name)
sys.meta_path.insert(0, Refuse())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from quant import _native, codecs, fileio
    for _ in range(3):
        data = codecs.quantize(torch.ones(2, 64), "q8_0")
        codecs.dequantize(data, "q8_0", (2, 64))
    try:
        codecs.quantize(torch.ones(2, 64), "q8_0", backend="native")
    except _native.NativeUnavailable as e:
        print("refused:", e)
print("warnings:", sum("native codecs unavailable" in str(w.message) for w in caught))
print("available:", _native.available(), _native.load_error())
"""


def test_without_native_library_twins_run_and_one_warning_says_so():
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_NATIVE], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "warnings: 1" in proc.stdout
    assert "available: False quant._wanrt_c was not built" in proc.stdout
    assert "refused: backend='native' asked for" in proc.stdout


# ---------------------------------------------------------------------- GPU


def random_valid_blocks(t: GGMLType, n_blocks: int, seed: int) -> torch.Tensor:
    """Random quant bytes with finite fp16 scales of mixed magnitude (fp16 fields
    at the block start: d, and m for Q4_1/Q5_1)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n_blocks, traits(t).type_size), generator=g, dtype=torch.uint8)
    n_scales = 2 if t in (GGMLType.Q4_1, GGMLType.Q5_1) else 1
    mags = 10.0 ** torch.randint(-6, 3, (n_blocks, n_scales), generator=g)
    scales = (torch.randn(n_blocks, n_scales, generator=g) * mags).to(torch.float16)
    blocks[:, : 2 * n_scales] = scales.view(torch.uint8)
    return blocks.reshape(-1)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return bool(((a.view(ints) == b.view(ints)) | (torch.isnan(a) & torch.isnan(b))).all())


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUT_IDS = {torch.float32: GGMLType.F32, torch.float16: GGMLType.F16, torch.bfloat16: GGMLType.BF16}


@pytest.mark.gpu
@needs_cuda_lib
def test_cuda_library_sees_the_device_and_runs_its_kernels():
    assert _native.cuda_ready(), _native.cuda_unready_reason()
    assert _native.cuda_device_count() == torch.cuda.device_count()
    binary, ptx = _native.cuda_kernel_arch(0)
    assert binary or ptx
    buf = torch.zeros(3 * 2**20 + 5, dtype=torch.uint8, device="cuda")
    _native.cuda_fill_u8(0, buf.data_ptr() + 1, 0xA5, buf.numel() - 2, torch.cuda.current_stream().cuda_stream)
    expected = torch.full_like(buf, 0xA5)
    expected[0] = expected[-1] = 0
    assert torch.equal(buf, expected)


@pytest.mark.gpu
@needs_cuda_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", LEGACY_QUANTS, ids=lambda t: t.name)
def test_cuda_dequantize_equals_torch_twin(t, dtype):
    shape = (37, 3 * 32 * 11)  # odd rows; a few thousand blocks
    stream = torch.cuda.current_stream().cuda_stream
    for bytes_ in (
        random_valid_blocks(t, 37 * 33, seed=int(t)),
        torch.randint(0, 256, (37 * 33 * traits(t).type_size,), dtype=torch.uint8),  # any scale, inf/NaN too
    ):
        data = bytes_.cuda()
        out = torch.full(shape, 7.0, dtype=dtype, device="cuda")
        _native.cuda_dequantize(0, t, data.data_ptr(), OUT_IDS[dtype], out.data_ptr(), out.numel(), stream)
        assert same_values(out.cpu(), torch_dequantize(bytes_, t, shape, dtype))
        # unaligned source: a view starting at an odd byte
        odd = torch.empty(data.numel() + 1, dtype=torch.uint8, device="cuda")[1:]
        odd.copy_(data)
        out2 = torch.empty_like(out)
        _native.cuda_dequantize(0, t, odd.data_ptr(), OUT_IDS[dtype], out2.data_ptr(), out2.numel(), stream)
        assert torch.equal(out2.view(torch.uint8), out.view(torch.uint8))


@pytest.mark.gpu
@needs_cuda_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", FLOAT_TYPES, ids=lambda t: t.name)
def test_cuda_float_conversion_equals_torch(t, dtype):
    src_dtype = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}[t]
    x = torch.randn(1000, 77) * 10.0 ** torch.randint(-8, 6, (1000, 1))
    x[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    x = x.to(src_dtype).cuda()
    out = torch.empty(x.shape, dtype=dtype, device="cuda")
    _native.cuda_dequantize(
        0, t, x.data_ptr(), OUT_IDS[dtype], out.data_ptr(), x.numel(), torch.cuda.current_stream().cuda_stream
    )
    assert same_values(out.cpu(), x.cpu().to(dtype))


@pytest.mark.gpu
@needs_cuda_lib
def test_cuda_rejects_bad_arguments():
    out = torch.empty(64, dtype=torch.float32, device="cuda")
    src = torch.zeros(68, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(_native.NativeError, match="WANRT_ERR_UNSUPPORTED"):
        _native.cuda_dequantize(0, GGMLType.Q4_K, src.data_ptr(), GGMLType.F32, out.data_ptr(), 64, stream)
    with pytest.raises(_native.NativeError, match="not 4-byte aligned"):
        _native.cuda_dequantize(0, GGMLType.Q8_0, src.data_ptr(), GGMLType.F32, out.data_ptr() + 2, 32, stream)
    with pytest.raises(_native.NativeError, match="whole 32-value blocks"):
        _native.cuda_dequantize(0, GGMLType.Q8_0, src.data_ptr(), GGMLType.F32, out.data_ptr(), 33, stream)


@pytest.mark.gpu
@needs_cuda_lib
@pytest.mark.parametrize("t", [*LEGACY_QUANTS, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_K], ids=lambda t: t.name)
def test_runtime_decode_on_cuda_equals_cpu_reference(t):
    from runtime.dequant import decode

    shape = (24, 512)
    if t in (GGMLType.F16, GGMLType.BF16):
        data = torch.randn(shape).to(torch.float16 if t == GGMLType.F16 else torch.bfloat16).view(-1).view(torch.uint8)
    elif t == GGMLType.Q4_K:  # no native kernel: the torch path on the GPU
        data = torch.randint(0, 256, (24 * 2 * traits(t).type_size,), dtype=torch.uint8)
        data.view(-1, traits(t).type_size)[:, :4] = torch.full((24 * 2, 2), 0.01).half().view(torch.uint8)
    else:
        data = random_valid_blocks(t, 24 * 16, seed=1)
    for dtype in DTYPES:
        expected = torch_dequantize(data, t, shape, dtype)
        got = decode(data.cuda(), t, shape, dtype)
        assert same_values(got.cpu(), expected)
        scratch = torch.empty(shape, dtype=dtype, device="cuda")
        assert decode(data.cuda(), t, shape, dtype, out=scratch) is scratch
        assert same_values(scratch.cpu(), expected)

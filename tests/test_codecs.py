"""Block codecs: byte identity with the golden vectors and with gguf-py, native == numpy twin."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from quant import _native, codecs, codecs_ref
from quant.ggml_types import LEGACY_QUANTS, GGMLType, row_nbytes

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

needs_native = pytest.mark.skipif(
    not _native.available() and not os.environ.get("WANRT_REQUIRE_NATIVE"),
    reason=f"native C library absent ({_native.load_error()}); set WANRT_REQUIRE_NATIVE=1 to fail instead",
)
BACKENDS = [pytest.param("native", marks=needs_native), "reference"]
TYPES = [t.name for t in LEGACY_QUANTS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that any NaN equals any NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
    same_bits = a.view(ints) == b.view(ints)
    return bool((same_bits | (torch.isnan(a) & torch.isnan(b))).all())


def gguf_py_bytes(x: torch.Tensor, name: str) -> np.ndarray:
    return gguf_quants.quantize(x.float().numpy(), GGMLQuantizationType[name])


# ------------------------------------------------------------------- golden


def golden_cases(golden):
    root = golden / "gguf" / "quant"
    meta = json.loads((root / "quant_vectors.json").read_text())
    tensors = load_file(str(root / "quant_vectors.safetensors"))
    cases = [c for c in meta["cases"] if c.get("qtypes")]
    assert cases, "quant_vectors.json lists no cases"
    return cases, tensors


@pytest.mark.golden
@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_vectors_quantize_byte_exact(golden, backend):
    cases, tensors = golden_cases(golden)
    for case in cases:
        x = tensors[f"{case['name']}.f32"]
        assert list(x.shape) == case["shape"]
        for name in case["qtypes"]:
            got = codecs.quantize(x, name, backend=backend).numpy()
            expected = tensors[f"{case['name']}.{name}.bytes"]
            ggml_c = tensors.get(f"{case['name']}.{name}.bytes_ggml_c")
            # gguf-py and ggml C legitimately differ only in the sign of a zero scale/min
            ok = np.array_equal(got, expected) or (ggml_c is not None and np.array_equal(got, ggml_c))
            assert ok, f"{case['name']} {name}: {int((got != expected).sum())} bytes differ"


@pytest.mark.golden
@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_vectors_dequantize_exact(golden, backend):
    cases, tensors = golden_cases(golden)
    for case in cases:
        for name in case["qtypes"]:
            expected = torch.from_numpy(tensors[f"{case['name']}.{name}.deq"])
            for key in ("bytes", "bytes_ggml_c"):
                data = tensors.get(f"{case['name']}.{name}.{key}")
                if data is None:
                    continue
                got = codecs.dequantize(data, name, case["shape"], backend=backend)
                assert bool(torch.isfinite(got).all()) == (not case["qtypes"][name]["deq_has_nonfinite"])
                # values equal (NaN == NaN; -0 == +0 since the two byte variants differ in that sign)
                torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------ gguf-py

SHAPES = [(1, 32), (3, 32), (7, 96), (33, 64), (2, 5, 128)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TYPES)
def test_quantize_matches_gguf_py(name, dtype, backend):
    g = torch.Generator().manual_seed(10 * TYPES.index(name) + DTYPES.index(dtype))
    for i, shape in enumerate(SHAPES):
        scale = 10.0 ** (i - 2)  # 0.01 .. 100
        x = (torch.randn(shape, generator=g) * scale).to(dtype)
        got = codecs.quantize(x, name, backend=backend)
        assert got.shape == (*shape[:-1], row_nbytes(GGMLType[name], shape[-1]))
        np.testing.assert_array_equal(got.numpy(), gguf_py_bytes(x, name), err_msg=f"{name} {dtype} {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_gguf_py(name, backend):
    x = torch.randn(9, 160, generator=torch.Generator().manual_seed(3))
    data = gguf_py_bytes(x, name)
    expected = torch.from_numpy(gguf_quants.dequantize(data, GGMLQuantizationType[name]))
    for dtype in DTYPES:
        got = codecs.dequantize(torch.from_numpy(data), name, (9, 160), dtype=dtype, backend=backend)
        assert same_values(got, expected.to(dtype)), f"{name} -> {dtype}"


# -------------------------------------------------------- native == twin


def hard_values(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Values that stress every rule: signed zeros, ties, equal extremes, constant and
    all-zero blocks, fp16-overflowing and fp16-subnormal scales, float32 subnormals, inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    blocks = x.view(-1, 32)
    n = blocks.shape[0]
    kind = torch.randint(0, 10, (n,), generator=g)
    blocks[kind == 1] = 0.0
    blocks[kind == 2] = -0.0
    zeros = kind == 3  # a mix of +0 and -0, and positive values: min is a zero
    blocks[zeros] = blocks[zeros].abs() * (torch.rand(int(zeros.sum()), 32, generator=g) > 0.5)
    blocks[zeros, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0])
    blocks[kind == 4] = 0.75  # constant
    blocks[kind == 5] = torch.randint(-16, 17, (int((kind == 5).sum()), 32), generator=g).float() / 2  # ties
    blocks[kind == 6] *= 1e6  # fp16 scale overflows
    blocks[kind == 7] *= 1e-6  # fp16 subnormal scale
    blocks[kind == 8] *= 1e-39  # float32 subnormals
    pm = kind == 9  # equal magnitude, both signs
    blocks[pm, 3], blocks[pm, 9] = 50.0, -50.0
    blocks[0, 5] = float("inf")
    blocks[1, 7] = float("-inf")
    return x


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TYPES)
def test_native_quantize_equals_twin(name, dtype):
    x = hard_values(48, 320, seed=11).to(dtype)
    native = codecs.quantize(x, name, backend="native")
    twin = codecs.quantize(x, name, backend="reference")
    assert torch.equal(native, twin), f"{int((native != twin).sum())} bytes differ"


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TYPES)
def test_native_dequantize_equals_twin(name, dtype):
    data = codecs.quantize(hard_values(24, 256, seed=5), name, backend="reference")
    # and raw random bytes: any scale, including inf and NaN
    t = GGMLType[name]
    noise = torch.randint(0, 256, (24, row_nbytes(t, 256)), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    for bytes_ in (data, noise):
        native = codecs.dequantize(bytes_, name, (24, 256), dtype=dtype, backend="native")
        twin = codecs.dequantize(bytes_, name, (24, 256), dtype=dtype, backend="reference")
        assert same_values(native, twin)


@needs_native
@pytest.mark.parametrize("name", TYPES)
def test_threads_do_not_change_results(name):
    # large enough to be split over several threads (thousands of blocks each)
    x = torch.randn(300, 2048, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    one = codecs.quantize(x, name, threads=1, backend="native")
    for threads in (2, 3, 7, None):
        assert torch.equal(codecs.quantize(x, name, threads=threads, backend="native"), one)
    dense = codecs.dequantize(one, name, x.shape, threads=1, backend="native")
    for threads in (2, 5, None):
        assert torch.equal(codecs.dequantize(one, name, x.shape, threads=threads, backend="native"), dense)


TRAITS_BYTES = {t.name: row_nbytes(t, 32) for t in LEGACY_QUANTS}


def clear_sign_of_zero_min(blocks: np.ndarray) -> np.ndarray:
    """Q4_1/Q5_1 blocks (one per row) with the sign bit of a zero `m` (bytes 2-3) cleared."""
    blocks = blocks.copy()
    zero_min = (blocks[:, 2] == 0) & ((blocks[:, 3] & 0x7F) == 0)
    blocks[zero_min, 3] = 0
    return blocks


def lane_values(dtype: torch.dtype) -> torch.Tensor:
    """Blocks whose deciding element sits in every position of the 32 (the vector code
    keeps element 8k+i in lane i of register k): a lone extreme of either sign, two
    equal-magnitude extremes of opposite signs (the first must win) at every ordered
    pair of positions, min and max at every pair, and a +0/-0 pair in a block of
    positive (or negative) values, whose zero extreme takes the sign of the first zero."""
    g = torch.Generator().manual_seed(17)
    pairs = [(i, j) for i in range(32) for j in range(32) if i != j]
    n = 2 * 32 + 3 * len(pairs)
    x = torch.rand(n, 32, generator=g) * 0.5 + 0.25  # magnitudes 0.25 .. 0.75, away from the extremes
    x *= torch.where(torch.rand(n, 32, generator=g) < 0.5, -1.0, 1.0)
    row = 0
    for i in range(32):
        for v in (3.0, -3.0):
            x[row, i] = v
            row += 1
    for i, j in pairs:
        x[row, i], x[row, j] = 3.0, -3.0  # tie of magnitudes: position i is first when i < j
        x[row + 1, i], x[row + 1, j] = -2.0, 5.0  # min at i, max at j
        x[row + 2] = x[row + 2].abs() * (1 if (i + j) % 2 else -1)
        x[row + 2, i], x[row + 2, j] = 0.0, -0.0  # min (or max) is a zero; its sign comes from position min(i, j)
        row += 3
    return x.reshape(-1, 256).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TYPES)
def test_extremes_in_every_position(name, dtype, backend):
    x = lane_values(dtype)
    got = codecs.quantize(x, name, backend=backend)
    if backend == "native":
        twin = codecs.quantize(x, name, backend="reference")
        assert torch.equal(got, twin), f"{int((got != twin).any(-1).sum())} rows differ from the twin"
    expected = gguf_py_bytes(x, name)
    if name in ("Q4_1", "Q5_1"):
        # gguf-py may take -0.0 for a zero minimum where ggml's loops keep the first zero (see codecs_ref)
        got, expected = (clear_sign_of_zero_min(b.reshape(-1, TRAITS_BYTES[name])) for b in (got.numpy(), expected))
    np.testing.assert_array_equal(got, expected)


@needs_native
def test_portable_loops_equal_the_simd_ones(tmp_path):
    """WANRT_NO_AVX2 keeps the portable C loops; on a CPU with AVX2 this compares the two."""
    inputs = {f"{dt}": hard_values(24, 256, seed=13).to(dt) for dt in DTYPES}
    inputs.update({f"lanes_{dt}": lane_values(dt) for dt in DTYPES})
    torch.save(inputs, tmp_path / "in.pt")
    script = (
        "import sys, torch\n"
        "from quant import codecs\n"
        "xs = torch.load(sys.argv[1])\n"
        "out = {f'{k}.{t}': codecs.quantize(x, t, backend='native') for k, x in xs.items() for t in sys.argv[3:]}\n"
        "torch.save(out, sys.argv[2])\n"
    )
    env = dict(os.environ, WANRT_NO_AVX2="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.pt"), str(tmp_path / "out.pt"), *TYPES],
                   env=env, cwd=root, check=True)
    portable = torch.load(tmp_path / "out.pt")
    for key, x in inputs.items():
        for name in TYPES:
            assert torch.equal(codecs.quantize(x, name, backend="native"), portable[f"{key}.{name}"]), f"{key} {name}"


# ---------------------------------------------------------------- API edges


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_of_every_kind_agree(backend):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    expected = codecs.quantize(x, "q4_0", backend=backend)
    assert torch.equal(codecs.quantize(x.float().numpy(), "Q4_0", backend=backend), expected)
    assert torch.equal(codecs.quantize(x.t().contiguous().t(), GGMLType.Q4_0, backend=backend), expected)
    assert torch.equal(codecs.quantize(x.float().t().contiguous().t(), 2, backend=backend), expected)
    back = codecs.dequantize(expected.numpy(), "q4_0", (4, 64), backend=backend)
    assert torch.equal(codecs.dequantize(bytes(expected.numpy()), "q4_0", [4, 64], backend=backend), back)


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_written_into_out(backend):
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(4))
    expected = codecs.quantize(x, "q5_0", backend=backend)
    buf = torch.full_like(expected, 0xEE)
    assert codecs.quantize(x, "q5_0", backend=backend, out=buf) is buf
    assert torch.equal(buf, expected)
    dense = torch.empty(6, 96, dtype=torch.bfloat16)
    assert codecs.dequantize(buf, "q5_0", (6, 96), dtype=torch.bfloat16, backend=backend, out=dense) is dense
    assert same_values(dense, codecs.dequantize(buf, "q5_0", (6, 96), backend=backend).to(torch.bfloat16))
    with pytest.raises(ValueError, match="out is torch.uint8 \\[6, 65\\], expected torch.uint8 \\[6, 66\\]"):
        codecs.quantize(x, "q5_0", backend=backend, out=torch.empty(6, 65, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out is torch.float32"):
        codecs.dequantize(buf, "q5_0", (6, 96), dtype=torch.float16, backend=backend, out=torch.empty(6, 96))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tensors(backend):
    assert codecs.quantize(torch.zeros(0, 64), "q8_0", backend=backend).shape == (0, 68)
    assert codecs.dequantize(torch.zeros(0, dtype=torch.uint8), "q8_0", (0, 64), backend=backend).shape == (0, 64)


def test_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="multiple"):
        codecs.quantize(torch.zeros(2, 48), "q8_0")
    with pytest.raises(ValueError, match="cannot block-quantize to q4_k"):
        codecs.quantize(torch.zeros(2, 256), "q4_k")
    with pytest.raises(ValueError, match="unknown tensor type"):
        codecs.quantize(torch.zeros(2, 32), "q3_0")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        codecs.quantize(torch.zeros(2, 32, dtype=torch.float64), "q8_0")
    with pytest.raises(ValueError, match="needs 68 bytes, got 67"):
        codecs.dequantize(torch.zeros(67, dtype=torch.uint8), "q8_0", (1, 64))
    with pytest.raises(ValueError, match="backend"):
        codecs.quantize(torch.zeros(1, 32), "q8_0", backend="fast")
    with pytest.raises(ValueError, match="threads"):
        codecs.quantize(torch.zeros(1, 32), "q8_0", threads=0)


def test_twin_is_plain_numpy():
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    data = codecs_ref.quantize(x, GGMLType.Q5_1)
    assert data.dtype == np.uint8 and data.shape == (2, 24)
    np.testing.assert_array_equal(data, gguf_py_bytes(torch.from_numpy(x), "Q5_1"))
    assert codecs_ref.dequantize(data, GGMLType.Q5_1, (2, 32)).dtype == np.float32

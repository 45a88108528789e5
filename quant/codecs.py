"""Block quantization to ggml's legacy formats (q8_0, q4_0, q4_1, q5_0, q5_1) and back.

    quantize(x, "q8_0")                    float [..., n] -> uint8 [..., n/32 * 34]
    dequantize(data, "q8_0", shape, dtype) uint8 bytes -> float tensor of `shape`

Both are byte-identical to gguf-py's `gguf.quants` (see codecs_ref for the one
sign-of-zero case where ggml's C loops are followed). `backend="native"` runs the C
library over `threads` threads (None: every CPU), `"reference"` the numpy twin,
`"auto"` the native one when it is built. Everything runs on the CPU; `out=` takes a
preallocated result buffer (reusing one saves faulting in fresh pages on every call).
"""
from __future__ import annotations

import numpy as np
import torch

from . import _native, codecs_ref
from .ggml_types import LEGACY_QUANTS, GGMLType, parse_type, row_nbytes, tensor_nbytes

FLOAT_IDS = {torch.float32: GGMLType.F32, torch.float16: GGMLType.F16, torch.bfloat16: GGMLType.BF16}
BACKENDS = ("auto", "native", "reference")


def _block_type(ggml_type) -> GGMLType:
    t = parse_type(ggml_type)
    if t not in LEGACY_QUANTS:
        names = ", ".join(q.name.lower() for q in LEGACY_QUANTS)
        raise ValueError(f"cannot block-quantize to {t.name.lower()}; expected one of {names}")
    return t


def _use_native(backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "native" and not _native.available():
        raise _native.NativeUnavailable(
            f"backend='native' asked for, but {_native.load_error()}; use backend='auto' or 'reference', "
            f"or {_native.REBUILD_HINT}"
        )
    return backend == "native" or (backend == "auto" and _native.available())


def _n_threads(threads: int | None) -> int:
    if threads is None:
        return 0  # every CPU
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads={threads!r}; expected a positive integer or None (all CPUs)")
    return threads


def _float_tensor(x) -> torch.Tensor:
    """A contiguous CPU float32/float16/bfloat16 tensor sharing x's memory where possible."""
    if isinstance(x, np.ndarray):
        if x.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, which torch cannot import directly
            x = torch.from_numpy(np.ascontiguousarray(x).view(np.uint16)).view(torch.bfloat16)
        elif x.dtype in (np.float32, np.float16):
            x = torch.from_numpy(np.ascontiguousarray(x))
        else:
            raise TypeError(f"quantize takes float32, float16 or bfloat16 values, got a numpy {x.dtype} array")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize takes a torch tensor or numpy array, got {type(x).__name__}")
    if x.dtype not in FLOAT_IDS:
        raise TypeError(f"quantize takes float32, float16 or bfloat16 values, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"quantize runs on the CPU; the tensor is on {x.device} (move it with .cpu())")
    return x.contiguous()


def _byte_tensor(data) -> torch.Tensor:
    """Packed bytes as a contiguous 1-D CPU uint8 tensor."""
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise TypeError(f"packed data must be uint8 bytes, got a {data.dtype} tensor")
        if data.device.type != "cpu":
            raise ValueError(f"dequantize runs on the CPU; the bytes are on {data.device}")
        return data.contiguous().reshape(-1)
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"packed data must be uint8 bytes, got a numpy {data.dtype} array")
        return torch.from_numpy(np.ascontiguousarray(data).reshape(-1))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype)
    if not (isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.is_contiguous()):
        raise ValueError(f"{what}: out must be a contiguous CPU tensor")
    if out.dtype != dtype or tuple(out.shape) != tuple(shape):
        raise ValueError(f"{what}: out is {out.dtype} {list(out.shape)}, expected {dtype} {list(shape)}")
    return out


def quantize(
    x, ggml_type, *, threads: int | None = None, backend: str = "auto", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize float values along their last dimension (a multiple of 32) to `ggml_type`
    blocks; returns uint8 [..., row bytes], each row's blocks back to back (written into
    `out` when given: reusing a buffer saves faulting in fresh pages)."""
    t = _block_type(ggml_type)
    n_threads = _n_threads(threads)
    native = _use_native(backend)
    x = _float_tensor(x)
    if x.dim() == 0:
        raise ValueError("quantize needs at least one dimension (rows run along the last one)")
    n_per_row = x.shape[-1]
    try:
        row_bytes = row_nbytes(t, n_per_row)
    except ValueError as e:
        raise ValueError(f"cannot quantize a tensor of shape {list(x.shape)}: {e}") from None
    out = _check_out(out, (*x.shape[:-1], row_bytes), torch.uint8, "quantize")
    if x.numel() == 0:
        return out
    if native:
        n_rows = x.numel() // n_per_row
        _native.quantize(t, FLOAT_IDS[x.dtype], x.data_ptr(), out.data_ptr(), n_rows, n_per_row, n_threads)
    else:
        out.numpy()[...] = codecs_ref.quantize(x.float().numpy(), t)
    return out


def dequantize(
    data,
    ggml_type,
    shape,
    *,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode the bytes of a `ggml_type` tensor of torch `shape` to a CPU `dtype` tensor:
    the float32 value, rounded once to `dtype` (exactly torch's `.to(dtype)`); written
    into `out` when given."""
    t = _block_type(ggml_type)
    n_threads = _n_threads(threads)
    native = _use_native(backend)
    if dtype not in FLOAT_IDS:
        raise TypeError(f"dequantize produces float32, float16 or bfloat16, not {dtype}")
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise ValueError("dequantize needs a shape of at least one dimension (blocks run along the last one)")
    try:
        expected = tensor_nbytes(t, shape)
    except ValueError as e:
        raise ValueError(f"cannot dequantize to shape {list(shape)}: {e}") from None
    data = _byte_tensor(data)
    if data.numel() != expected:
        raise ValueError(f"{t.name} tensor of shape {list(shape)} needs {expected} bytes, got {data.numel()}")
    out = _check_out(out, shape, dtype, "dequantize")
    if data.numel() == 0:
        return out
    if native:
        n_per_row = shape[-1]
        n_rows = out.numel() // n_per_row
        _native.dequantize(t, data.data_ptr(), FLOAT_IDS[dtype], out.data_ptr(), n_rows, n_per_row, n_threads)
        return out
    out.copy_(torch.from_numpy(codecs_ref.dequantize(data.numpy(), t, shape)))
    return out

"""The one place where runtime weights are decoded from their stored format.

Every quantized linear calls `decode`. On a CUDA tensor, the native kernels of the
CUDA library decode legacy blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and convert
16-bit floats on the current torch stream, into memory torch allocated. Everything
else, and everything when that library is absent, goes through the pure torch
decoder, which is the reference: both decode in float32 and round once.
"""
from __future__ import annotations

import math
import warnings

import torch

from quant import _native
from quant.dequant_torch import PLAIN_DTYPES, dequantize
from quant.ggml_types import FLOAT_TYPES, LEGACY_QUANTS, GGMLType, tensor_nbytes

_NATIVE_OUT = {torch.float32: GGMLType.F32, torch.float16: GGMLType.F16, torch.bfloat16: GGMLType.BF16}
_NATIVE_IN = frozenset((*LEGACY_QUANTS, *FLOAT_TYPES))
_warned = False


def _native_cuda_ready() -> bool:
    """Whether the CUDA kernels can run; says once why not when they cannot."""
    global _warned
    if _native.cuda_ready():
        return True
    if not _warned:
        _warned = True
        warnings.warn(
            f"wanrt: CUDA kernels unavailable ({_native.cuda_unready_reason()}); decoding weights with "
            "torch instead (same values, slower). `python -m quant.diagnose` shows details.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def _decode_cuda(data: torch.Tensor, ggml_type: GGMLType, shape, dtype, out) -> torch.Tensor:
    n = math.prod(shape)
    expected = tensor_nbytes(ggml_type, tuple(shape))
    nbytes = data.numel() * data.element_size()
    if nbytes != expected:
        raise ValueError(f"{ggml_type.name} tensor of shape {list(shape)} needs {expected} bytes, got {nbytes}")
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=data.device)
    src = data.contiguous()
    _native.cuda_dequantize(
        data.device.index,
        ggml_type,
        src.data_ptr(),
        _NATIVE_OUT[dtype],
        out.data_ptr(),
        n,
        torch.cuda.current_stream(data.device).cuda_stream,
    )
    return out


def _native_fits(data: torch.Tensor, ggml_type: GGMLType, shape, dtype, out) -> bool:
    if not data.is_cuda or ggml_type not in _NATIVE_IN or dtype not in _NATIVE_OUT:
        return False
    if out is not None and not (
        out.device == data.device and out.dtype == dtype and out.is_contiguous() and out.numel() == math.prod(shape)
    ):
        return False
    return _native_cuda_ready()


def decode(
    data: torch.Tensor,
    ggml_type: GGMLType | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`data` in `ggml_type` (None: already a float tensor of `shape`) -> `dtype`,
    written into `out` when given."""
    if ggml_type is None:
        w = data
    else:
        ggml_type = GGMLType(ggml_type)
        converts = ggml_type not in PLAIN_DTYPES or PLAIN_DTYPES[ggml_type] != dtype
        if converts and _native_fits(data, ggml_type, shape, dtype, out):
            return _decode_cuda(data, ggml_type, shape, dtype, out)
        if ggml_type not in PLAIN_DTYPES:
            return dequantize(data, ggml_type, shape, dtype, out=out)
        w = data.view(PLAIN_DTYPES[ggml_type]).view(shape)
    if out is not None:
        return out.copy_(w.view(out.shape))
    return w if w.dtype == dtype else w.to(dtype)

"""The one place where runtime weights are decoded from their stored format.

Every quantized linear calls `decode`; native kernels plug in here when present,
the pure torch decoder is the reference and the fallback.
"""
from __future__ import annotations

import torch

from quant.dequant_torch import PLAIN_DTYPES, dequantize
from quant.ggml_types import GGMLType


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
    elif ggml_type in PLAIN_DTYPES:
        w = data.view(PLAIN_DTYPES[ggml_type]).view(shape)
    else:
        return dequantize(data, ggml_type, shape, dtype, out=out)
    if out is not None:
        return out.copy_(w.view(out.shape))
    return w if w.dtype == dtype else w.to(dtype)

"""A linear layer whose weight stays in its stored format until the matmul."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant.ggml_types import GGMLType
from quant.packed import PackedTensor

from .dequant import decode


class QLinear(nn.Module):
    """y = x·Wᵀ + b. `weight` is a registered buffer holding either a float tensor
    [out, in] (ggml_type None) or the raw uint8 bytes of a packed tensor; replacing
    the buffer (e.g. with a view into a streaming slot) is all it takes to move it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.ggml_type: GGMLType | None = None
        self.register_buffer("weight", torch.empty(out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def set_weight(self, weight: torch.Tensor | PackedTensor) -> None:
        shape = (self.out_features, self.in_features)
        if isinstance(weight, PackedTensor):
            if weight.shape != shape:
                raise ValueError(f"weight of shape {list(weight.shape)} given to a linear of shape {list(shape)}")
            self.ggml_type, self.weight = weight.ggml_type, weight.data
        else:
            if tuple(weight.shape) != shape:
                raise ValueError(f"weight of shape {list(weight.shape)} given to a linear of shape {list(shape)}")
            self.ggml_type, self.weight = None, weight

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return decode(self.weight, self.ggml_type, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        kind = "dense" if self.ggml_type is None else self.ggml_type.name
        return f"in={self.in_features}, out={self.out_features}, weight={kind}, bias={self.bias is not None}"

"""A tensor kept in its stored ggml block format: raw bytes plus a logical shape."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ggml_types import GGMLType, tensor_nbytes, traits


@dataclass
class PackedTensor:
    """`data` holds exactly `tensor_nbytes(ggml_type, shape)` bytes (uint8, 1-D);
    `shape` is the torch shape of the tensor the bytes decode to."""

    data: torch.Tensor
    ggml_type: GGMLType
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.ggml_type = GGMLType(self.ggml_type)
        self.shape = tuple(int(d) for d in self.shape)
        if self.data.dtype != torch.uint8 or self.data.dim() != 1:
            raise ValueError(f"packed data must be a 1-D uint8 tensor, got {self.data.dtype} {tuple(self.data.shape)}")
        expected = tensor_nbytes(self.ggml_type, self.shape)
        if self.data.numel() != expected:
            raise ValueError(
                f"{traits(self.ggml_type).name} tensor of shape {list(self.shape)} needs {expected} bytes, "
                f"got {self.data.numel()}"
            )

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device, non_blocking: bool = False) -> "PackedTensor":
        return PackedTensor(self.data.to(device, non_blocking=non_blocking), self.ggml_type, self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from .dequant_torch import dequantize

        return dequantize(self.data, self.ggml_type, self.shape, dtype)

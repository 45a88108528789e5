"""Pure torch dequantization of ggml blocks, on any device.

Products d·q are exact in float32 for every legacy type, so decoding in float32 and
rounding once to the requested dtype gives the same values as gguf-py and ggml.
"""
from __future__ import annotations

import torch

from .ggml_types import GGMLType, tensor_nbytes, traits


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of every block, as float32 [n_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values: byte j holds element j (low) and element j+16 (high)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes (uint32 little-endian) -> bit j of it for j = 0..31, as uint8 [n, 32]."""
    bits = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> bits) & 1).reshape(qh.shape[0], 32)


def _decode_q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).to(torch.float32)


def _decode_q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_nibbles(b[:, 2:]).to(torch.float32) - 8.0)


def _decode_q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _nibbles(b[:, 4:]).to(torch.float32) + _f16(b, 2)


def _decode_q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.to(torch.float32) - 16.0)


def _decode_q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.to(torch.float32) + _f16(b, 2)


BLOCK_DECODERS = {
    GGMLType.Q8_0: _decode_q8_0,
    GGMLType.Q4_0: _decode_q4_0,
    GGMLType.Q4_1: _decode_q4_1,
    GGMLType.Q5_0: _decode_q5_0,
    GGMLType.Q5_1: _decode_q5_1,
}

PLAIN_DTYPES = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


def dequantize(
    data: torch.Tensor,
    ggml_type: GGMLType,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode `data` (uint8 bytes of a tensor in `ggml_type`) to a `dtype` tensor of
    torch `shape` on the device of `data`; written into `out` when given."""
    ggml_type = GGMLType(ggml_type)
    expected = tensor_nbytes(ggml_type, tuple(shape))
    if data.numel() != expected:
        raise ValueError(f"{ggml_type.name} tensor of shape {list(shape)} needs {expected} bytes, got {data.numel()}")
    data = data.reshape(-1)
    if ggml_type in PLAIN_DTYPES:
        values = data.view(PLAIN_DTYPES[ggml_type]).reshape(shape)
    elif ggml_type in BLOCK_DECODERS:
        blocks = data.view(-1, traits(ggml_type).type_size)
        values = BLOCK_DECODERS[ggml_type](blocks).reshape(shape)
    else:
        raise NotImplementedError(f"no decoder for {ggml_type.name} tensors")
    if out is None:
        return values.to(dtype)
    out.copy_(values.reshape(out.shape))
    return out

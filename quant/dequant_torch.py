"""Pure torch dequantization of ggml blocks, on any device.

Products d·q are exact in float32 for every legacy type, so decoding in float32 and
rounding once to the requested dtype gives the same values as gguf-py and ggml.
K-quants (256-weight super-blocks, in real community Wan files: Q4_K_M = Q4_K with
Q6_K, etc.) follow gguf-py's operation order, `(d·sc)·q − dmin·m`, whose products
are exact as well, so they match gguf-py bit for bit too.
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


# ------------------------------------------------------------------ K-quants
# Layouts from ggml-common.h; every block is 256 weights in 16 or 8 sub-blocks.


def _shifted(x: torch.Tensor, shifts: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """x [n, ..., 1, k] shifted right by each of `shifts` (along the 1-axis), then reshaped."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=x.device).view(*([1] * (x.dim() - 2)), -1, 1)
    return (x >> s).reshape(x.shape[0], *shape)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, as float32 [n, 8, 1].
    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7
    the same for mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc.to(torch.float32).unsqueeze(-1), mn.to(torch.float32).unsqueeze(-1)


def _decode_q2_k(b: torch.Tensor) -> torch.Tensor:
    # scales[16] | qs[64] | d | dmin: x = (d·sc)·q − dmin·m per 16 weights, q 2-bit
    n = b.shape[0]
    scales = b[:, 0:16]
    dl = (_f16(b, 80) * (scales & 0x0F).to(torch.float32)).unsqueeze(-1)
    ml = (_f16(b, 82) * (scales >> 4).to(torch.float32)).unsqueeze(-1)
    q = _shifted(b[:, 16:80].reshape(n, 2, 1, 32), [0, 2, 4, 6], (16, 16)) & 3
    return (dl * q.to(torch.float32) - ml).reshape(n, 256)


def _decode_q3_k(b: torch.Tensor) -> torch.Tensor:
    # hmask[32] | qs[64] | scales[12] | d: x = (d·(sc − 32))·q, q = low 2 bits − 4·(high bit clear)
    n = b.shape[0]
    scales = b[:, 96:108]
    low = _shifted(scales[:, 0:8].reshape(n, 1, 8), [0, 4], (16,)) & 0x0F
    high = _shifted(scales[:, 8:12].reshape(n, 1, 4), [0, 2, 4, 6], (16,)) & 0x03
    sc = ((low | (high << 4)).view(torch.int8) - 32).to(torch.float32)
    dl = (_f16(b, 108) * sc).unsqueeze(-1)
    ql = _shifted(b[:, 32:96].reshape(n, 2, 1, 32), [0, 2, 4, 6], (16, 16)) & 3
    qh = (_shifted(b[:, 0:32].reshape(n, 1, 1, 32), list(range(8)), (16, 16)) & 1) ^ 1
    q = ql.view(torch.int8) - (qh << 2).view(torch.int8)
    return (dl * q.to(torch.float32)).reshape(n, 256)


def _decode_q4_k(b: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales[12] | qs[128]: x = (d·sc)·q − dmin·m per 32 weights, q 4-bit;
    # each 32 bytes of qs hold 64 weights: low nibbles first, then high nibbles
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d, dm = _f16(b, 0).unsqueeze(-1) * sc, _f16(b, 2).unsqueeze(-1) * mn
    q = _shifted(b[:, 16:144].reshape(n, 4, 1, 32), [0, 4], (8, 32)) & 0x0F
    return (d * q.to(torch.float32) - dm).reshape(n, 256)


def _decode_q5_k(b: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales[12] | qh[32] | qs[128]: Q4_K plus a fifth bit, bit i of qh for sub-block i
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d, dm = _f16(b, 0).unsqueeze(-1) * sc, _f16(b, 2).unsqueeze(-1) * mn
    ql = _shifted(b[:, 48:176].reshape(n, 4, 1, 32), [0, 4], (8, 32)) & 0x0F
    qh = _shifted(b[:, 16:48].reshape(n, 1, 1, 32), list(range(8)), (8, 32)) & 1
    q = ql | (qh << 4)
    return (d * q.to(torch.float32) - dm).reshape(n, 256)


def _decode_q6_k(b: torch.Tensor) -> torch.Tensor:
    # ql[128] | qh[64] | scales[16] int8 | d: x = (d·sc)·(q − 32) per 16 weights, q 6-bit
    n = b.shape[0]
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(b, 208) * sc).unsqueeze(-1)
    ql = _shifted(b[:, 0:128].reshape(n, 2, 1, 64), [0, 4], (8, 32)) & 0x0F
    qh = _shifted(b[:, 128:192].reshape(n, 2, 1, 32), [0, 2, 4, 6], (8, 32)) & 3
    q = (ql | (qh << 4)).view(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).to(torch.float32)).reshape(n, 256)


BLOCK_DECODERS = {
    GGMLType.Q8_0: _decode_q8_0,
    GGMLType.Q4_0: _decode_q4_0,
    GGMLType.Q4_1: _decode_q4_1,
    GGMLType.Q5_0: _decode_q5_0,
    GGMLType.Q5_1: _decode_q5_1,
}

# Rows of these are multiples of 256 weights.
K_QUANT_DECODERS = {
    GGMLType.Q2_K: _decode_q2_k,
    GGMLType.Q3_K: _decode_q3_k,
    GGMLType.Q4_K: _decode_q4_k,
    GGMLType.Q5_K: _decode_q5_k,
    GGMLType.Q6_K: _decode_q6_k,
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
    elif ggml_type in BLOCK_DECODERS or ggml_type in K_QUANT_DECODERS:
        blocks = data.view(-1, traits(ggml_type).type_size)
        decoder = BLOCK_DECODERS.get(ggml_type) or K_QUANT_DECODERS[ggml_type]
        values = decoder(blocks).reshape(shape)
    else:
        raise NotImplementedError(f"no decoder for {ggml_type.name} tensors")
    if out is None:
        return values.to(dtype)
    out.copy_(values.reshape(out.shape))
    return out

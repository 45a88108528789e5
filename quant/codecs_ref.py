"""The numpy twin of the native block codecs: ggml's legacy quants, vectorised.

Byte-identical to ggml's `quantize_row_<type>_ref` and to gguf-py: float32
arithmetic in the same order, the float32 reciprocal `id = 1/d` (not the fp16 `d`),
Q8_0 rounding half away from zero, Q4/Q5 truncation of `x*id + offset + 0.5`.
Where ggml's loops and numpy's reductions may disagree (only the sign of a zero
fp16 scale or minimum), the loops win: the all-zero Q4_0/Q5_0 block has `d = -0`,
and a zero minimum/maximum takes the sign of the first zero in the block. The
native library follows the same rules, so the two agree on every input.
"""
from __future__ import annotations

import numpy as np

from .ggml_types import LEGACY_QUANTS, GGMLType, row_nbytes, traits

QK = 32
# Blocks handled per step: bounds the temporaries to a few MB.
CHUNK_BLOCKS = 1 << 15


def _reciprocal(d: np.ndarray) -> np.ndarray:
    """1/d in float32, 0 where d is zero (ggml: `id = d ? 1.0f/d : 0.0f`)."""
    with np.errstate(divide="ignore"):
        r = np.float32(1) / d
    r[d == 0] = 0
    return r


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 [n] -> the little-endian bytes of its fp16 rounding, [n, 2]."""
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def _fp16_at(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte `start` of each block as float32 [n, 1]."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view("<f2").astype(np.float32)


def _trunc(v: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """C's (int) truncation toward zero, as int32. Non-finite values can only occur in
    the blocks flagged `bad`; there they give 0, the low byte of what x86 returns for
    them (INT_MIN), as the native code does on every platform."""
    with np.errstate(invalid="ignore"):
        q = v.astype(np.int32)
    if bad.any():
        q[bad] = np.where(np.isfinite(v[bad]), q[bad], 0)
    return q


def _round_half_away(v: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """C's roundf (ties away from zero) as int32: truncate v plus the float just below
    0.5 with v's sign, which is exact for every float."""
    below_half = np.float32(np.nextafter(np.float32(0.5), np.float32(0)))
    return _trunc(v + np.copysign(below_half, v), bad)


def _first_zero_sign(blocks: np.ndarray, extreme: np.ndarray) -> np.ndarray:
    """Where a block's min or max is zero, give it the sign of the block's first zero,
    as ggml's `if (v < min) min = v` loop does (numpy's reductions may pick either)."""
    rows = np.flatnonzero(extreme == 0)
    if rows.size:
        first = (blocks[rows] == 0).argmax(axis=1)
        extreme[rows] = blocks[rows, first]
    return extreme


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q [n, 32] in 0..15 (low nibbles used) -> [n, 16]: byte j = q[j] | q[j+16] << 4."""
    return (q[:, : QK // 2] & 0x0F) | (q[:, QK // 2 :] << 4)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each q [n, 32] -> a little-endian uint32 [n, 4 bytes], bit j for element j."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


# ------------------------------------------------------------------ encoders


def _encode_q8_0(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=1)
    d = amax / np.float32(127)
    id_ = _reciprocal(d)
    bad = ~(np.isfinite(amax) & np.isfinite(id_))  # blocks where x*id may be non-finite
    q = _round_half_away(x * id_[:, None], bad)
    return np.concatenate([_fp16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


def _encode_symmetric(x: np.ndarray, half: int, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0: the element of largest magnitude (first on ties) maps to q = 0."""
    a = np.abs(x)
    i = a.argmax(axis=1)[:, None]
    amax = np.take_along_axis(a, i, axis=1)[:, 0]
    extreme = np.take_along_axis(x, i, axis=1)[:, 0]
    extreme[amax == 0] = 0  # all-zero block: +0, so d = -0
    d = extreme / np.float32(-half)
    id_ = _reciprocal(d)
    bad = ~(np.isfinite(amax) & np.isfinite(id_))
    q = _trunc(x * id_[:, None] + np.float32(half + 0.5), bad)
    return d, np.minimum(q.astype(np.int8), top).astype(np.uint8)


def _encode_asymmetric(x: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1: q = (x - min)/d with d = (max - min)/top."""
    lo = _first_zero_sign(x, x.min(axis=1))
    hi = _first_zero_sign(x, x.max(axis=1))
    span = hi - lo
    d = span / np.float32(top)
    id_ = _reciprocal(d)
    bad = ~(np.isfinite(span) & np.isfinite(id_))  # else every x - lo is finite too
    q = _trunc((x - lo[:, None]) * id_[:, None] + np.float32(0.5), bad)
    return d, lo, np.minimum(q.astype(np.int8), top).astype(np.uint8)


def _encode_q4_0(x: np.ndarray) -> np.ndarray:
    d, q = _encode_symmetric(x, 8, 15)
    return np.concatenate([_fp16_bytes(d), _pack_nibbles(q)], axis=1)


def _encode_q5_0(x: np.ndarray) -> np.ndarray:
    d, q = _encode_symmetric(x, 16, 31)
    return np.concatenate([_fp16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)], axis=1)


def _encode_q4_1(x: np.ndarray) -> np.ndarray:
    d, m, q = _encode_asymmetric(x, 15)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _pack_nibbles(q)], axis=1)


def _encode_q5_1(x: np.ndarray) -> np.ndarray:
    d, m, q = _encode_asymmetric(x, 31)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _pack_high_bits(q), _pack_nibbles(q)], axis=1)


# ------------------------------------------------------------------ decoders


def _nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little") << 4


def _decode_q8_0(b: np.ndarray) -> np.ndarray:
    return _fp16_at(b, 0) * np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)


def _decode_q4_0(b: np.ndarray) -> np.ndarray:
    return _fp16_at(b, 0) * (_nibbles(b[:, 2:]).astype(np.float32) - 8)


def _decode_q4_1(b: np.ndarray) -> np.ndarray:
    return _fp16_at(b, 0) * _nibbles(b[:, 4:]).astype(np.float32) + _fp16_at(b, 2)


def _decode_q5_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])
    return _fp16_at(b, 0) * (q.astype(np.float32) - 16)


def _decode_q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])
    return _fp16_at(b, 0) * q.astype(np.float32) + _fp16_at(b, 2)


ENCODERS = {
    GGMLType.Q8_0: _encode_q8_0,
    GGMLType.Q4_0: _encode_q4_0,
    GGMLType.Q4_1: _encode_q4_1,
    GGMLType.Q5_0: _encode_q5_0,
    GGMLType.Q5_1: _encode_q5_1,
}
DECODERS = {
    GGMLType.Q8_0: _decode_q8_0,
    GGMLType.Q4_0: _decode_q4_0,
    GGMLType.Q4_1: _decode_q4_1,
    GGMLType.Q5_0: _decode_q5_0,
    GGMLType.Q5_1: _decode_q5_1,
}


def _legacy(ggml_type: int) -> GGMLType:
    t = GGMLType(ggml_type)
    if t not in LEGACY_QUANTS:
        raise ValueError(f"{t.name} is not a legacy block quant; expected one of {[q.name for q in LEGACY_QUANTS]}")
    return t


def quantize(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """float array [..., n] (n a multiple of 32) -> uint8 [..., n/32 * block bytes]."""
    t = _legacy(ggml_type)
    x = np.ascontiguousarray(x, dtype=np.float32)
    row_bytes = row_nbytes(t, x.shape[-1])
    blocks = x.reshape(-1, QK)
    out = np.empty((blocks.shape[0], traits(t).type_size), dtype=np.uint8)
    with np.errstate(over="ignore", invalid="ignore"):  # fp16 scales may overflow to inf, as in ggml
        for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
            out[start : start + CHUNK_BLOCKS] = ENCODERS[t](blocks[start : start + CHUNK_BLOCKS])
    return out.reshape(*x.shape[:-1], row_bytes)


def dequantize(data: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 bytes of a tensor of torch `shape` -> float32 array of that shape."""
    t = _legacy(ggml_type)
    size = traits(t).type_size
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, size)
    out = np.empty((blocks.shape[0], QK), dtype=np.float32)
    with np.errstate(invalid="ignore"):  # an inf scale times q = 0 is NaN, as in ggml
        for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
            out[start : start + CHUNK_BLOCKS] = DECODERS[t](blocks[start : start + CHUNK_BLOCKS])
    return out.reshape(shape)

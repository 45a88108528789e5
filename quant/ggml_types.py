"""The ggml tensor types as one table: on-disk ids, block geometry, names.

Ids and (block size, bytes per block) follow ggml's `type_traits` and gguf-py's
`GGML_QUANT_SIZES`; a block of `block_size` weights along the last torch dimension
(ggml's ne[0]) is stored in `type_size` bytes.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class GGMLType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# Ids ggml once used and removed (Q4_2, Q4_3, Q4_0_4_4, ...): a file carrying one is
# from an obsolete tool, not a corrupt one, and deserves its own message.
REMOVED_TYPE_IDS = frozenset({4, 5, 31, 32, 33, 36, 37, 38})


@dataclass(frozen=True)
class TypeTraits:
    name: str
    block_size: int  # weights per block
    type_size: int  # bytes per block


TRAITS: dict[GGMLType, TypeTraits] = {
    GGMLType.F32: TypeTraits("F32", 1, 4),
    GGMLType.F16: TypeTraits("F16", 1, 2),
    GGMLType.BF16: TypeTraits("BF16", 1, 2),
    GGMLType.F64: TypeTraits("F64", 1, 8),
    GGMLType.I8: TypeTraits("I8", 1, 1),
    GGMLType.I16: TypeTraits("I16", 1, 2),
    GGMLType.I32: TypeTraits("I32", 1, 4),
    GGMLType.I64: TypeTraits("I64", 1, 8),
    GGMLType.Q4_0: TypeTraits("Q4_0", 32, 18),
    GGMLType.Q4_1: TypeTraits("Q4_1", 32, 20),
    GGMLType.Q5_0: TypeTraits("Q5_0", 32, 22),
    GGMLType.Q5_1: TypeTraits("Q5_1", 32, 24),
    GGMLType.Q8_0: TypeTraits("Q8_0", 32, 34),
    GGMLType.Q8_1: TypeTraits("Q8_1", 32, 40),
    GGMLType.Q2_K: TypeTraits("Q2_K", 256, 84),
    GGMLType.Q3_K: TypeTraits("Q3_K", 256, 110),
    GGMLType.Q4_K: TypeTraits("Q4_K", 256, 144),
    GGMLType.Q5_K: TypeTraits("Q5_K", 256, 176),
    GGMLType.Q6_K: TypeTraits("Q6_K", 256, 210),
    GGMLType.Q8_K: TypeTraits("Q8_K", 256, 292),
    GGMLType.IQ2_XXS: TypeTraits("IQ2_XXS", 256, 66),
    GGMLType.IQ2_XS: TypeTraits("IQ2_XS", 256, 74),
    GGMLType.IQ3_XXS: TypeTraits("IQ3_XXS", 256, 98),
    GGMLType.IQ1_S: TypeTraits("IQ1_S", 256, 50),
    GGMLType.IQ4_NL: TypeTraits("IQ4_NL", 32, 18),
    GGMLType.IQ3_S: TypeTraits("IQ3_S", 256, 110),
    GGMLType.IQ2_S: TypeTraits("IQ2_S", 256, 82),
    GGMLType.IQ4_XS: TypeTraits("IQ4_XS", 256, 136),
    GGMLType.IQ1_M: TypeTraits("IQ1_M", 256, 56),
    GGMLType.TQ1_0: TypeTraits("TQ1_0", 256, 54),
    GGMLType.TQ2_0: TypeTraits("TQ2_0", 256, 66),
    GGMLType.MXFP4: TypeTraits("MXFP4", 32, 17),
}

# The block formats wanrt can both write and compute with.
LEGACY_QUANTS = (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1)
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def traits(ggml_type: int) -> TypeTraits:
    return TRAITS[GGMLType(ggml_type)]


def parse_type(name: str | int | GGMLType) -> GGMLType:
    """'q8_0', 'Q8_0', 8 or GGMLType.Q8_0 -> GGMLType.Q8_0."""
    if isinstance(name, GGMLType):
        return name
    if isinstance(name, int):
        return GGMLType(name)
    key = name.strip().upper()
    try:
        return GGMLType[key]
    except KeyError:
        known = ", ".join(t.name.lower() for t in (*LEGACY_QUANTS, *FLOAT_TYPES))
        raise ValueError(f"unknown tensor type {name!r}; expected one of {known}") from None


def row_nbytes(ggml_type: int, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` weights; the row must be whole blocks."""
    t = traits(ggml_type)
    if n_per_row % t.block_size:
        raise ValueError(
            f"{t.name} stores rows in blocks of {t.block_size} weights; "
            f"a row of {n_per_row} is not a multiple"
        )
    return n_per_row // t.block_size * t.type_size


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of torch `shape` (blocks run along the last dimension)."""
    if not shape:
        return traits(ggml_type).type_size
    n_rows = 1
    for d in shape[:-1]:
        n_rows *= d
    return n_rows * row_nbytes(ggml_type, shape[-1])

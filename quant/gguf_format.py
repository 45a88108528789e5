"""The GGUF container as one table: magic, versions, metadata value types, file types.

Facts from ggml `docs/gguf.md` / `src/gguf.cpp` and gguf-py `constants.py`. The
reader and the writer both take their numbers from here, so they cannot disagree.
"""
from __future__ import annotations

import enum
import struct

from .ggml_types import GGMLType

MAGIC = b"GGUF"
VERSION = 3  # what the writer produces
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts; neither ggml nor gguf-py reads it
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
ARCHITECTURE_KEY = "general.architecture"
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."

# ggml stops at 4 dimensions, but city96's Wan files carry a 5-D F32
# patch_embedding.weight (Conv3d), so wanrt reads and writes up to 5.
MAX_DIMS = 5


class ValueType(enum.IntEnum):
    """Metadata value types, with their on-disk ids."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size value types: struct format (little-endian) and inclusive integer range.
SCALAR_FORMATS: dict[ValueType, struct.Struct] = {
    ValueType.UINT8: struct.Struct("<B"),
    ValueType.INT8: struct.Struct("<b"),
    ValueType.UINT16: struct.Struct("<H"),
    ValueType.INT16: struct.Struct("<h"),
    ValueType.UINT32: struct.Struct("<I"),
    ValueType.INT32: struct.Struct("<i"),
    ValueType.FLOAT32: struct.Struct("<f"),
    ValueType.BOOL: struct.Struct("<B"),
    ValueType.UINT64: struct.Struct("<Q"),
    ValueType.INT64: struct.Struct("<q"),
    ValueType.FLOAT64: struct.Struct("<d"),
}

# numpy dtype strings for reading whole arrays of a fixed-size type at once.
NUMPY_DTYPES: dict[ValueType, str] = {
    ValueType.UINT8: "<u1",
    ValueType.INT8: "<i1",
    ValueType.UINT16: "<u2",
    ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4",
    ValueType.INT32: "<i4",
    ValueType.FLOAT32: "<f4",
    ValueType.BOOL: "<u1",
    ValueType.UINT64: "<u8",
    ValueType.INT64: "<i8",
    ValueType.FLOAT64: "<f8",
}

INT_RANGES: dict[ValueType, tuple[int, int]] = {
    ValueType.UINT8: (0, 2**8 - 1),
    ValueType.INT8: (-(2**7), 2**7 - 1),
    ValueType.UINT16: (0, 2**16 - 1),
    ValueType.INT16: (-(2**15), 2**15 - 1),
    ValueType.UINT32: (0, 2**32 - 1),
    ValueType.INT32: (-(2**31), 2**31 - 1),
    ValueType.UINT64: (0, 2**64 - 1),
    ValueType.INT64: (-(2**63), 2**63 - 1),
}

FLOAT_VALUE_TYPES = (ValueType.FLOAT32, ValueType.FLOAT64)

# Smallest encoding of a value of each type: a string is at least its 8-byte length,
# an array at least its element type and count. Used to bound counts read from a file.
MIN_VALUE_SIZE: dict[ValueType, int] = {
    **{t: f.size for t, f in SCALAR_FORMATS.items()},
    ValueType.STRING: 8,
    ValueType.ARRAY: 12,
}

# Names of ids ggml has removed, for a message that says the file is obsolete.
REMOVED_TYPE_NAMES = {
    4: "Q4_2",
    5: "Q4_3",
    31: "Q4_0_4_4",
    32: "Q4_0_4_8",
    33: "Q4_0_8_8",
    36: "IQ4_NL_4_4",
    37: "IQ4_NL_4_8",
    38: "IQ4_NL_8_8",
}

# `general.file_type` (llama.cpp's LlamaFileType) for a file whose main weights are
# of the given type, as city96's tools write it for Wan.
QUANTIZATION_VERSION = 2
LLAMA_FILE_TYPES: dict[GGMLType, int] = {
    GGMLType.F32: 0,
    GGMLType.F16: 1,
    GGMLType.Q4_0: 2,
    GGMLType.Q4_1: 3,
    GGMLType.Q8_0: 7,
    GGMLType.Q5_0: 8,
    GGMLType.Q5_1: 9,
    GGMLType.BF16: 32,
}

# All LlamaFileType names (gguf-py constants), to show what a file_type value means.
FILE_TYPE_NAMES = {
    0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 7: "MOSTLY_Q8_0",
    8: "MOSTLY_Q5_0", 9: "MOSTLY_Q5_1", 10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S",
    12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L", 14: "MOSTLY_Q4_K_S", 15: "MOSTLY_Q4_K_M",
    16: "MOSTLY_Q5_K_S", 17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K", 19: "MOSTLY_IQ2_XXS",
    20: "MOSTLY_IQ2_XS", 21: "MOSTLY_Q2_K_S", 22: "MOSTLY_IQ3_XS", 23: "MOSTLY_IQ3_XXS",
    24: "MOSTLY_IQ1_S", 25: "MOSTLY_IQ4_NL", 26: "MOSTLY_IQ3_S", 27: "MOSTLY_IQ3_M",
    28: "MOSTLY_IQ2_S", 29: "MOSTLY_IQ2_M", 30: "MOSTLY_IQ4_XS", 31: "MOSTLY_IQ1_M",
    32: "MOSTLY_BF16", 36: "MOSTLY_TQ1_0", 37: "MOSTLY_TQ2_0",
}  # fmt: skip


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0

"""Which ggml type each tensor of a Wan DiT gets in a GGUF file.

The table follows the files the community runs (city96's route, GGUF.md 3.1-3.3):

1. A float base, as city96's convert.py makes it: tensors of an f32/bf16 source that
   are 1-D, have <= 1024 elements, or are `.modulation` stay F32; everything else
   takes the base float type: the route's (`via`) or the file's float type when one
   is given, else BF16 for a bf16 tensor and F16 for any other. An f16 source keeps
   every tensor F16 (convert.py applies the F32 rules only to f32/bf16 sources).
   `patch_embedding.weight` (5-D Conv3d) is F32 (city96's fix_5d_tensors.py).
2. Quantization, as city96's patched llama-quantize does it for arch "wan": only
   2-D tensors whose name ends in "weight" and lies outside the embeddings, the
   head and the modulation are quantized, i.e. the block linear weights
   `blocks.N.{self_attn,cross_attn}.{q,k,v,o}.weight` and `blocks.N.ffn.{0,2}.weight`.
   `ffn.2.weight` (the down projection) takes Q4_1 in a Q4_0 file, Q5_1 in a Q5_0 file.
3. Overrides by fnmatch pattern on the official name (`blocks.0.*=q8_0`), last match wins.
4. A tensor whose rows are not whole blocks falls back to F16, with a note.

`via` reproduces city96's route exactly: a quantized tensor is first rounded to its
base type (F16 or BF16) and quantized from that, as llama-quantize reads the F16 base.
Without it, tensors are quantized from the source's own precision.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from .ggml_types import FLOAT_TYPES, LEGACY_QUANTS, GGMLType, parse_type, traits

QUANTIZATION_THRESHOLD = 1024  # convert.py: tensors this small stay F32
HIPREC_SOURCE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)

# llama-quantize (lcpp.patch, arch wan): names containing these are never quantized.
_NEVER_QUANTIZED = (
    "modulation.",
    "patch_embedding.",
    "text_embedding.",
    "time_projection.",
    "time_embedding.",
    "img_emb.",
    "head.",
)
# The FFN down projection is bumped one step up in the _0 types (lcpp.patch "Rules for ffn").
_FFN_DOWN_BUMP = {GGMLType.Q4_0: GGMLType.Q4_1, GGMLType.Q5_0: GGMLType.Q5_1}

WRITABLE_TYPES = (*LEGACY_QUANTS, *FLOAT_TYPES)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType  # type written to the file
    round_via: GGMLType | None  # F16/BF16 to round the data through first (city96's route), else None
    reason: str  # why this type, for the conversion log


@dataclass(frozen=True)
class Override:
    pattern: str
    ggml_type: GGMLType


def parse_override(text: str) -> Override:
    """'blocks.0.*=q8_0' -> Override('blocks.0.*', Q8_0)."""
    pattern, sep, type_name = text.rpartition("=")
    if not sep or not pattern.strip():
        raise ValueError(f"--keep {text!r}: expected PATTERN=TYPE, e.g. 'blocks.0.*=q8_0'")
    ggml_type = parse_type(type_name)
    if ggml_type not in WRITABLE_TYPES:
        names = ", ".join(t.name.lower() for t in WRITABLE_TYPES)
        raise ValueError(f"--keep {text!r}: {type_name} cannot be written; expected one of {names}")
    return Override(pattern.strip(), ggml_type)


def base_float_type(target: GGMLType, via: GGMLType | None) -> GGMLType | None:
    """Float type of the 2-D tensors that are not quantized (embeddings, head): the
    target itself for a float file, else the route's base (`via`), else None: each
    tensor's own, BF16 for a bf16 tensor and F16 otherwise, as city96's convert.py types
    every tensor by its source dtype."""
    if target in FLOAT_TYPES:
        return target
    return via


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama-quantize's rule for Wan: 2-D, named *weight, outside embeddings/head/modulation."""
    return len(shape) == 2 and name.endswith("weight") and not any(s in name for s in _NEVER_QUANTIZED)


def plan_tensor(
    name: str,
    shape: tuple[int, ...],
    source_dtype: torch.dtype,
    *,
    target: GGMLType,
    base: GGMLType | None,
    via: GGMLType | None = None,
    overrides: tuple[Override, ...] = (),
) -> TensorPlan:
    """The type of one tensor. `source_dtype` is the dtype the source stores it in
    (float32 for a tensor that was block-quantized), `base` the float type of
    unquantized 2-D tensors (`base_float_type`; None: by the tensor's own dtype)."""
    shape = tuple(shape)
    if base is None:
        base = GGMLType.BF16 if source_dtype == torch.bfloat16 else GGMLType.F16
    n = 1
    for d in shape:
        n *= d
    hiprec_source = source_dtype in HIPREC_SOURCE_DTYPES

    # 1. The float base.
    if len(shape) > 4:
        base_type, why = GGMLType.F32, f"{len(shape)}-D, F32 as in city96's files"
    elif target == GGMLType.F32:
        base_type, why = GGMLType.F32, "f32 file"
    elif hiprec_source and len(shape) <= 1:
        base_type, why = GGMLType.F32, "1-D, kept F32"
    elif hiprec_source and n <= QUANTIZATION_THRESHOLD:
        base_type, why = GGMLType.F32, f"<= {QUANTIZATION_THRESHOLD} elements, kept F32"
    elif hiprec_source and ".modulation" in name:
        base_type, why = GGMLType.F32, "modulation, kept F32"
    else:
        base_type, why = base, f"{base.name}, not quantized (as city96's files keep it)"

    # 2. Quantization of the block linear weights.
    ggml_type = base_type
    if target in LEGACY_QUANTS and is_quantizable(name, shape):
        ggml_type, why = target, "block linear weight"
        if ".ffn.2.weight" in name and target in _FFN_DOWN_BUMP:
            ggml_type = _FFN_DOWN_BUMP[target]
            why = f"FFN down projection: {ggml_type.name} in a {target.name} file"

    # 3. Overrides, last match wins.
    for o in overrides:
        if fnmatch.fnmatchcase(name, o.pattern):
            ggml_type, why = o.ggml_type, f"--keep {o.pattern}={o.ggml_type.name.lower()}"

    # 4. Rows that are not whole blocks cannot be stored in a block type.
    block = traits(ggml_type).block_size
    if block > 1 and (not shape or shape[-1] % block):
        row = shape[-1] if shape else 1
        why = f"rows of {row} are not a multiple of {block}: F16 instead of {ggml_type.name}"
        ggml_type = GGMLType.F16

    # city96's route quantizes the base values (F16/BF16), not the source's.
    round_via = None
    if via is not None and ggml_type in LEGACY_QUANTS and base_type in (GGMLType.F16, GGMLType.BF16):
        round_via = base_type
    return TensorPlan(name, shape, ggml_type, round_via, why)

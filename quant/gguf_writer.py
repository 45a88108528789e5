"""Write GGUF files tensor by tensor, so a converter holds one tensor in memory at a time.

Tensors are declared first (name, torch shape, ggml type, and a callback that makes
the bytes); the header, metadata and every tensor info are written from those
declarations, then each callback is called in turn and its bytes written at once.
The layout is ggml's: data section and every tensor padded to the alignment,
`n_dims = len(shape)` with the shape reversed to ggml order, no size-1 dimension
dropped (Wan's `modulation` stays 3-D, `patch_embedding.weight` 5-D). With the same
metadata, order and bytes the file is byte-identical to gguf-py's `GGUFWriter`.

The file appears under its name only when complete: it is written to a temporary
name in the target folder and renamed; on any error (or Ctrl-C) the temporary file
is removed. The bytes bypass the page cache where the file system allows
(`atomic_file`), which keeps writing a 15 GB file from costing more CPU than
making it.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .atomic_file import AtomicFile
from .ggml_types import REMOVED_TYPE_IDS, GGMLType, parse_type, tensor_nbytes
from .gguf_format import (
    ALIGNMENT_KEY,
    ARCHITECTURE_KEY,
    DEFAULT_ALIGNMENT,
    FLOAT_VALUE_TYPES,
    INT_RANGES,
    LLAMA_FILE_TYPES,
    MAGIC,
    MAX_DIMS,
    QUANTIZATION_VERSION,
    SCALAR_FORMATS,
    VERSION,
    ValueType,
    align_up,
    is_power_of_two,
)

# returns bytes, bytearray, memoryview, a numpy array or a CPU torch tensor; or an
# iterator (a generator) of such pieces, written one after the other
Producer = Callable[[], Any]

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    nbytes: int
    produce: Producer


class GGUFWriter:
    """Declare metadata and tensors, then `write()` streams the file.

    >>> w = GGUFWriter("model-Q8_0.gguf", arch="wan")
    >>> w.add_quantization_info(GGMLType.Q8_0)
    >>> w.add_tensor("head.head.weight", (64, 128), GGMLType.Q8_0, lambda: quantize(...))
    >>> w.write(progress=True)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        arch: str | None,
        alignment: int = DEFAULT_ALIGNMENT,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.overwrite = overwrite
        if not (is_power_of_two(alignment) and alignment < 2**32):
            raise ValueError(f"alignment must be a power of two below 2**32, got {alignment}")
        self.alignment = alignment
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"cannot write {self.path}: folder {self.path.parent} does not exist")
        self._check_target()
        self._metadata: dict[str, bytes] = {}  # key -> encoded value type + value
        self._tensors: dict[str, _Tensor] = {}
        self._written = False
        if arch is not None:
            self.add_metadata(ARCHITECTURE_KEY, arch, ValueType.STRING)
        if alignment != DEFAULT_ALIGNMENT:
            self._metadata[ALIGNMENT_KEY] = _encode_typed(alignment, ValueType.UINT32, None, ALIGNMENT_KEY)

    # -- declarations -------------------------------------------------------------

    def add_metadata(
        self,
        key: str,
        value: Any,
        value_type: ValueType | int | str | None = None,
        *,
        item_type: ValueType | int | str | None = None,
    ) -> None:
        """Add one metadata pair. Without `value_type` it is inferred as gguf-py does:
        str -> STRING, bool -> BOOL, int -> INT32 (INT64/UINT64 when it does not fit),
        float -> FLOAT32, list/tuple -> ARRAY of the elements' type (or `item_type`)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"metadata key must be a non-empty string, got {key!r}")
        if key in self._metadata:
            raise ValueError(f"metadata key {key!r} was already added")
        if key == ALIGNMENT_KEY:
            raise ValueError(f"{ALIGNMENT_KEY} is written from GGUFWriter(alignment=...); do not add it by hand")
        vtype = _value_type(value_type) if value_type is not None else infer_value_type(value, key)
        itype = _value_type(item_type) if item_type is not None else None
        if itype is not None and vtype != ValueType.ARRAY:
            raise ValueError(f"metadata {key!r}: item_type is only for ARRAY values, not {vtype.name}")
        self._metadata[key] = _encode_typed(value, vtype, itype, key)

    def add_quantization_info(self, main_type: GGMLType | int | str) -> None:
        """`general.quantization_version` = 2 and `general.file_type` for a file whose
        main weights are `main_type` (F32 0, F16 1, Q4_0 2, Q4_1 3, Q8_0 7, Q5_0 8,
        Q5_1 9, BF16 32): the keys ComfyUI-GGUF's Wan files carry after the architecture."""
        ggml_type = parse_type(main_type)
        if ggml_type not in LLAMA_FILE_TYPES:
            known = ", ".join(t.name for t in LLAMA_FILE_TYPES)
            raise ValueError(f"no general.file_type for a {ggml_type.name} file; expected one of {known}")
        self.add_metadata("general.quantization_version", QUANTIZATION_VERSION, ValueType.UINT32)
        self.add_metadata("general.file_type", LLAMA_FILE_TYPES[ggml_type], ValueType.UINT32)

    def add_tensor(
        self, name: str, shape: Sequence[int], ggml_type: GGMLType | int | str, produce: Producer
    ) -> None:
        """Declare a tensor of torch `shape` stored as `ggml_type`; `produce()` is called
        once, during `write()`, and must return exactly its bytes, whole or as an
        iterator of consecutive pieces (each piece is written before the next is asked
        for, so a producer may reuse a piece's memory once it asks for the next)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        if name in self._tensors:
            raise ValueError(f"tensor {name!r} was already added")
        shape = tuple(int(d) for d in shape)
        if not 1 <= len(shape) <= MAX_DIMS or any(d < 1 for d in shape):
            raise ValueError(
                f"tensor {name!r}: shape {list(shape)} must have 1 to {MAX_DIMS} dimensions, each at least 1"
            )
        if isinstance(ggml_type, int) and not isinstance(ggml_type, GGMLType) and ggml_type in REMOVED_TYPE_IDS:
            raise ValueError(f"tensor {name!r}: ggml type id {ggml_type} was removed from ggml")
        ggml_type = parse_type(ggml_type)
        try:
            nbytes = tensor_nbytes(ggml_type, shape)
        except ValueError as e:
            raise ValueError(f"tensor {name!r} of shape {list(shape)}: {e}") from None
        if not callable(produce):
            raise TypeError(f"tensor {name!r}: produce must be a callable returning the bytes")
        self._tensors[name] = _Tensor(name, shape, ggml_type, nbytes, produce)

    # -- output -------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Size of the file `write()` will produce."""
        return len(self._header()) + sum(align_up(t.nbytes, self.alignment) for t in self._tensors.values())

    def tensor_offsets(self) -> dict[str, int]:
        """File offset of each declared tensor's first byte, as `write()` will lay them
        out (valid once every tensor and metadata pair is declared)."""
        offset = len(self._header())
        out = {}
        for t in self._tensors.values():
            out[t.name] = offset
            offset += align_up(t.nbytes, self.alignment)
        return out

    def write(self, progress: bool | Callable[[str, int], None] | None = None) -> Path:
        """Write the file; `progress=True` shows a tqdm bar over the bytes, a callable
        is called as `progress(tensor_name, nbytes)` after each tensor."""
        if self._written:
            raise RuntimeError(f"{self.path} was already written by this writer")
        self._written = True
        self._check_target()
        header = self._header()
        bar = None
        if progress is True:
            from tqdm import tqdm

            total = sum(t.nbytes for t in self._tensors.values())
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {self.path.name}")
        try:
            with AtomicFile(self.path, overwrite=self.overwrite) as f:
                f.write(header)
                f.flush()
                for t in self._tensors.values():
                    _write_tensor(f, t)
                    f.write_zeros(align_up(t.nbytes, self.alignment) - t.nbytes)
                    if bar is not None:
                        bar.update(t.nbytes)
                    elif callable(progress):
                        progress(t.name, t.nbytes)
                self._check_target()
                f.commit()
        finally:
            if bar is not None:
                bar.close()
        return self.path

    def _check_target(self) -> None:
        if not self.overwrite and (self.path.exists() or self.path.is_symlink()):
            raise FileExistsError(f"{self.path} already exists; pass overwrite=True to replace it")

    def _header(self) -> bytes:
        out = bytearray(MAGIC)
        out += _U32.pack(VERSION)
        out += _U64.pack(len(self._tensors))
        out += _U64.pack(len(self._metadata))
        for key, encoded in self._metadata.items():
            out += _encode_string(key)
            out += encoded
        offset = 0
        for t in self._tensors.values():
            out += _encode_string(t.name)
            out += _U32.pack(len(t.shape))
            out += struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape))
            out += _U32.pack(t.ggml_type)
            out += _U64.pack(offset)
            offset += align_up(t.nbytes, self.alignment)
        out += bytes(align_up(len(out), self.alignment) - len(out))
        return bytes(out)


# -- metadata encoding ------------------------------------------------------------


def _value_type(t: ValueType | int | str) -> ValueType:
    if isinstance(t, str):
        try:
            return ValueType[t.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown GGUF value type {t!r}; expected one of {[v.name for v in ValueType]}") from None
    return ValueType(t)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _int_type(values: Sequence[int]) -> ValueType:
    lo, hi = min(values), max(values)
    for t in (ValueType.INT32, ValueType.INT64, ValueType.UINT64):
        if INT_RANGES[t][0] <= lo and hi <= INT_RANGES[t][1]:
            return t
    raise ValueError(f"integer {lo if lo < INT_RANGES[ValueType.INT64][0] else hi} does not fit in 64 bits")


def infer_value_type(value: Any, key: str = "value") -> ValueType:
    """The GGUF type gguf-py would pick for a Python value (wider ints when needed)."""
    if isinstance(value, str):
        return ValueType.STRING
    if isinstance(value, (bool, np.bool_)):
        return ValueType.BOOL
    if _is_int(value):
        return _int_type([int(value)])
    if isinstance(value, (float, np.floating)):
        return ValueType.FLOAT32
    if isinstance(value, (list, tuple)):
        return ValueType.ARRAY
    raise ValueError(f"metadata {key!r}: cannot store a {type(value).__name__} in GGUF; give a str, bool, int, float or list")


def _infer_item_type(values: Sequence[Any], key: str) -> ValueType:
    if not values:
        raise ValueError(f"metadata {key!r}: an empty array needs an explicit item_type")
    kinds = {infer_value_type(v, key) for v in values}
    ints = {ValueType.INT32, ValueType.INT64, ValueType.UINT64}
    if kinds <= ints:
        return _int_type([int(v) for v in values])
    if len(kinds) != 1:
        raise ValueError(f"metadata {key!r}: array elements must share one type, got {sorted(k.name for k in kinds)}")
    return kinds.pop()


def _encode_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return _U64.pack(len(raw)) + raw


def _encode_typed(value: Any, vtype: ValueType, item_type: ValueType | None, key: str) -> bytes:
    return _U32.pack(vtype) + _encode_value(value, vtype, item_type, key)


def _encode_value(value: Any, vtype: ValueType, item_type: ValueType | None, key: str) -> bytes:
    if vtype == ValueType.STRING:
        if not isinstance(value, str):
            raise ValueError(f"metadata {key!r}: STRING needs a str, got {type(value).__name__}")
        return _encode_string(value)
    if vtype == ValueType.ARRAY:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"metadata {key!r}: ARRAY needs a list or tuple, got {type(value).__name__}")
        item_type = item_type if item_type is not None else _infer_item_type(value, key)
        parts = [_U32.pack(item_type), _U64.pack(len(value))]
        parts += [_encode_value(v, item_type, None, key) for v in value]
        return b"".join(parts)
    fmt = SCALAR_FORMATS[vtype]
    if vtype == ValueType.BOOL:
        if not isinstance(value, (bool, np.bool_)) and value not in (0, 1):
            raise ValueError(f"metadata {key!r}: BOOL needs True or False, got {value!r}")
        return fmt.pack(1 if value else 0)
    if vtype in FLOAT_VALUE_TYPES:
        if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
            raise ValueError(f"metadata {key!r}: {vtype.name} needs a number, got {value!r}")
        try:
            return fmt.pack(float(value))
        except OverflowError:
            raise ValueError(f"metadata {key!r}: {value!r} is too large for {vtype.name}") from None
    lo, hi = INT_RANGES[vtype]
    if not _is_int(value) or not lo <= int(value) <= hi:
        raise ValueError(f"metadata {key!r}: {vtype.name} needs an integer in [{lo}, {hi}], got {value!r}")
    return fmt.pack(int(value))


# -- tensor bytes -----------------------------------------------------------------


def _write_tensor(f: AtomicFile, t: _Tensor) -> None:
    produced = t.produce()
    if not isinstance(produced, Iterator):
        f.write(_as_bytes(produced, t, t.nbytes))
        return
    done = 0
    for piece in produced:
        view = _as_bytes(piece, t, None)
        if done + view.nbytes > t.nbytes:
            produced.close()
            _wrong_size(t, f"more than {done + view.nbytes:,}")
        f.write(view)
        done += view.nbytes
        del piece, view  # the producer may reuse the memory for its next piece
    if done != t.nbytes:
        _wrong_size(t, f"{done:,}")


def _wrong_size(t: _Tensor, produced: str) -> None:
    raise ValueError(
        f"tensor {t.name!r}: produce() returned {produced} bytes, but a {t.ggml_type.name} tensor "
        f"of shape {list(t.shape)} takes {t.nbytes:,}"
    )


def _as_bytes(data: Any, t: _Tensor, nbytes: int | None) -> memoryview:
    """The produced object as a flat byte view, checked against `nbytes` when given."""
    if isinstance(data, torch.Tensor):
        data = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            f"tensor {t.name!r}: produce() returned a {type(data).__name__}; expected bytes, a numpy "
            "array or a torch tensor"
        ) from None
    view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    if nbytes is not None and view.nbytes != nbytes:
        _wrong_size(t, f"{view.nbytes:,}")
    return view

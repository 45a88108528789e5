"""Read GGUF files: a validating header parser and zero-copy tensor views over mmap.

Every number in a GGUF header comes from an untrusted file, so each one is checked
against what the file can hold before it is used: counts and lengths against the
bytes left, dimensions and types against the ggml tables, offsets against the
alignment, the file size and each other. A malformed file gives exactly one
`GGUFError("<file>: <what> at byte <n>")`; nothing is allocated from a length that
has not been checked.

Decisions beyond the GGUF text (docs/gguf.md):
* versions 2 and 3 are read (v2 differs from v3 only in semantics ggml dropped);
* tensors have 1 to 5 dimensions (ggml allows 4, city96's Wan files need 5 for the
  Conv3d `patch_embedding.weight`), each dimension >= 1: a dimension of 0 (an empty
  tensor) is refused, as no model file stores one and it would make zero-byte
  "tensors" that overlap anything;
* tensor data may come in any order, but ranges must not overlap and every offset
  must be a multiple of the alignment (gguf-py checks neither);
* metadata strings, keys and tensor names must be UTF-8 and unique.

Tensor bytes are exposed through a private (copy-on-write) mapping: torch gets a
writable buffer and never warns, and a write into a returned tensor stays in this
process's memory and never reaches the file.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .ggml_types import REMOVED_TYPE_IDS, TRAITS, GGMLType, tensor_nbytes
from .gguf_format import (
    ALIGNMENT_KEY,
    ARCHITECTURE_KEY,
    DEFAULT_ALIGNMENT,
    MAGIC,
    MAX_DIMS,
    MIN_VALUE_SIZE,
    NUMPY_DTYPES,
    ORIG_SHAPE_PREFIX,
    REMOVED_TYPE_NAMES,
    SCALAR_FORMATS,
    SUPPORTED_VERSIONS,
    ValueType,
    align_up,
    is_power_of_two,
)
from .packed import PackedTensor

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_INT64_MAX = 2**63 - 1
_MAX_STRING = 2**30  # ggml's GGUF_MAX_STRING_LENGTH
_MAX_ARRAY_NESTING = 8
_MIN_KV_SIZE = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, smallest value
_MIN_TENSOR_INFO_SIZE = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one ne, type, offset

# Types whose bytes are a plain torch dtype, viewed without decoding.
_VIEW_DTYPES = {
    GGMLType.F32: torch.float32,
    GGMLType.F16: torch.float16,
    GGMLType.BF16: torch.bfloat16,
    GGMLType.F64: torch.float64,
    GGMLType.I8: torch.int8,
    GGMLType.I16: torch.int16,
    GGMLType.I32: torch.int32,
    GGMLType.I64: torch.int64,
}


class GGUFError(ValueError):
    """A malformed or unusable GGUF file: `<file>: <what> at byte <n>`."""

    def __init__(self, path: str | os.PathLike, what: str, at: int):
        self.path = str(path)
        self.what = what
        self.at = at
        super().__init__(f"{self.path}: {what} at byte {at}")

    def __reduce__(self):
        return (type(self), (self.path, self.what, self.at))


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file. `shape` is the torch shape (reversed `ne`, or the
    `comfy.gguf.orig_shape.<name>` metadata when present); `ne` is ggml's order as
    stored; `offset` is absolute in the file; `nbytes` is the stored byte size."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    ne: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_dims(self) -> int:
        return len(self.ne)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The torch shape the bytes are laid out in (reversed `ne`)."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


class _Cursor:
    """Bounds-checked little-endian reads from the start of a buffer."""

    def __init__(self, buf, size: int, path: Path):
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 0

    def error(self, what: str, at: int | None = None) -> GGUFError:
        return GGUFError(self.path, what, self.pos if at is None else at)

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        """Reserve the next `n` bytes for `what`; return where they start."""
        if n > self.remaining:
            raise self.error(
                f"file ends inside {what}: {_plural(n, 'byte')} needed, {self.remaining:,} left "
                f"(file is {_plural(self.size, 'byte')}; truncated or damaged)"
            )
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str) -> str:
        at = self.pos
        n = self.u64(f"the length of {what}")
        if n > min(self.remaining, _MAX_STRING):
            raise self.error(
                f"{what} claims a length of {_plural(n, 'byte')}, but only {self.remaining:,} bytes "
                f"are left in the file",
                at,
            )
        start = self.take(n, what)
        raw = bytes(self.buf[start : start + n])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(
                f"{what} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start} of "
                f"{raw[:40]!r})",
                start + e.start,
            ) from None


class GGUFFile:
    """A GGUF file opened for reading.

    `require_data=True` refuses, at open, a file whose tensor data does not all lie
    inside it; `require_data=False` also opens header-only or cut files (to plan a
    load or inspect them), and raises a GGUFError only when a missing tensor's bytes
    are asked for.
    """

    def __init__(self, path: str | os.PathLike, *, require_data: bool = True):
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None
        self.file_size = os.stat(self.path).st_size
        if self.file_size == 0:
            raise GGUFError(self.path, f"the file is empty (0 bytes); expected a GGUF file starting with {MAGIC!r}", 0)
        with open(self.path, "rb") as f:
            self._mm = _map_private(f.fileno(), self.file_size)
        try:
            self._parse(require_data)
        except BaseException:
            self.close()
            raise

    # -- header -------------------------------------------------------------------

    def _parse(self, require_data: bool) -> None:
        cur = _Cursor(self._mm, self.file_size, self.path)
        magic = bytes(self._mm[:4])
        if magic != MAGIC[: len(magic)]:
            raise cur.error(f"not a GGUF file: it starts with {magic!r}, expected {MAGIC!r}", 0)
        cur.take(4, "the magic number")
        self.version = cur.u32("the GGUF version")
        self._check_version(cur, self.version)
        tensor_count = cur.u64("the tensor count")
        kv_count = cur.u64("the metadata count")
        self._check_count(cur, kv_count, _MIN_KV_SIZE, "metadata pairs", 16)
        self._check_count(cur, tensor_count, _MIN_TENSOR_INFO_SIZE, "tensor infos", 8)

        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[ValueType, ValueType | None]] = {}
        key_pos: dict[str, int] = {}
        for i in range(kv_count):
            at = cur.pos
            key = cur.string(f"the key of metadata pair {i + 1} of {kv_count}")
            if not key:
                raise cur.error(f"metadata pair {i + 1} of {kv_count} has an empty key", at)
            if key in self.metadata:
                raise cur.error(f"metadata key {key!r} appears twice (first at byte {key_pos[key]})", at)
            key_pos[key] = at
            vtype_at = cur.pos
            vtype = self._value_type(cur, cur.u32(f"the value type of {key!r}"), f"metadata {key!r}", vtype_at)
            value, item_type = self._value(cur, vtype, f"metadata {key!r}", 0)
            self.metadata[key] = value
            self.metadata_types[key] = (vtype, item_type)

        self.alignment = self._alignment(cur, key_pos)
        self._check_count(cur, tensor_count, _MIN_TENSOR_INFO_SIZE, "tensor infos", 8)
        infos = [self._tensor_info(cur, i, tensor_count) for i in range(tensor_count)]
        self.data_offset = align_up(cur.pos, self.alignment)

        self.tensors: dict[str, GGUFTensorInfo] = {}
        for at, _, name, ne, ggml_type, rel_offset, nbytes in infos:
            if name in self.tensors:
                raise cur.error(f"tensor name {name!r} appears twice", at)
            shape = self._torch_shape(cur, name, ne, key_pos)
            self.tensors[name] = GGUFTensorInfo(
                name, ggml_type, shape, ne, self.data_offset + rel_offset, nbytes
            )
        self._check_layout(cur, infos)
        self.data_end = max((t.end for t in self.tensors.values()), default=self.data_offset)
        if require_data:
            self._require_data(cur)

    def _check_version(self, cur: _Cursor, version: int) -> None:
        if version in SUPPORTED_VERSIONS:
            return
        supported = " and ".join(str(v) for v in SUPPORTED_VERSIONS)
        if version == 1:
            what = (
                "GGUF version 1 is not supported (the first, 32-bit-count layout); "
                f"versions {supported} are read: convert the model again with a current tool"
            )
        elif version & 0xFFFF == 0 and (version >> 16) in (*SUPPORTED_VERSIONS, 1):
            what = f"GGUF version field is 0x{version:08x}: a big-endian file, only little-endian GGUF is read"
        elif version == 0:
            what = f"GGUF version 0 does not exist; versions {supported} are read"
        else:
            what = f"GGUF version {version} is newer than this reader supports (versions {supported})"
        raise cur.error(what, 4)

    def _check_count(self, cur: _Cursor, count: int, min_size: int, what: str, at: int) -> None:
        if count > cur.remaining // min_size:
            raise cur.error(
                f"the header claims {_plural(count, what[:-1])}, but the {cur.remaining:,} bytes that "
                f"follow can hold at most {cur.remaining // min_size:,} (each takes at least {min_size} bytes)",
                at,
            )

    def _value_type(self, cur: _Cursor, type_id: int, what: str, at: int) -> ValueType:
        try:
            return ValueType(type_id)
        except ValueError:
            known = ", ".join(f"{t.value} {t.name}" for t in ValueType)
            raise cur.error(f"{what} has value type {type_id}, which is not a GGUF type ({known})", at) from None

    def _value(self, cur: _Cursor, vtype: ValueType, what: str, depth: int) -> tuple[Any, ValueType | None]:
        fmt = SCALAR_FORMATS.get(vtype)
        if fmt is not None:
            value = fmt.unpack_from(self._mm, cur.take(fmt.size, f"the value of {what}"))[0]
            return (bool(value) if vtype == ValueType.BOOL else value), None
        if vtype == ValueType.STRING:
            return cur.string(f"the value of {what}"), None
        # ARRAY: element type, element count, elements
        if depth >= _MAX_ARRAY_NESTING:
            raise cur.error(f"{what} nests arrays more than {_MAX_ARRAY_NESTING} deep")
        at = cur.pos
        item_type = self._value_type(cur, cur.u32(f"the element type of {what}"), f"an array in {what}", at)
        count_at = cur.pos
        count = cur.u64(f"the element count of {what}")
        min_size = MIN_VALUE_SIZE[item_type]
        if count > cur.remaining // min_size:
            raise cur.error(
                f"{what} claims an array of {_plural(count, item_type.name + ' element')}, "
                f"but only {cur.remaining:,} bytes are left in the file",
                count_at,
            )
        dtype = NUMPY_DTYPES.get(item_type)
        if dtype is not None:
            start = cur.take(count * min_size, f"the elements of {what}")
            values = np.frombuffer(self._mm, dtype=dtype, count=count, offset=start).tolist()
            if item_type == ValueType.BOOL:
                values = [bool(v) for v in values]
            return values, item_type
        if item_type == ValueType.STRING:
            return self._strings(cur, count, what), item_type
        values = [self._value(cur, item_type, f"element {j} of {what}", depth + 1)[0] for j in range(count)]
        return values, item_type

    def _strings(self, cur: _Cursor, count: int, what: str) -> list[str]:
        """An array of strings (a tokenizer vocabulary holds 256k): a tight loop, which
        hands any element that is cut, too long or not UTF-8 to the checked reader
        for its error message."""
        buf, end, pos = self._mm, cur.size, cur.pos
        unpack = _U64.unpack_from
        values = []
        for j in range(count):
            if end - pos >= 8:
                n = unpack(buf, pos)[0]
                if n <= min(end - pos - 8, _MAX_STRING):
                    try:
                        values.append(buf[pos + 8 : pos + 8 + n].decode("utf-8"))
                        pos += 8 + n
                        continue
                    except UnicodeDecodeError:
                        pass
            cur.pos = pos
            cur.string(f"element {j} of {what}")  # raises
            raise AssertionError("unreachable: the checked reader accepted what the fast path refused")
        cur.pos = pos
        return values

    def _alignment(self, cur: _Cursor, key_pos: dict[str, int]) -> int:
        if ALIGNMENT_KEY not in self.metadata:
            return DEFAULT_ALIGNMENT
        at = key_pos[ALIGNMENT_KEY]
        vtype, _ = self.metadata_types[ALIGNMENT_KEY]
        if vtype != ValueType.UINT32:
            raise cur.error(f"{ALIGNMENT_KEY} has type {vtype.name}; it must be UINT32", at)
        value = self.metadata[ALIGNMENT_KEY]
        if not is_power_of_two(value):
            raise cur.error(f"{ALIGNMENT_KEY} is {value}; it must be a power of two (ggml's default is 32)", at)
        return value

    def _tensor_info(self, cur: _Cursor, i: int, count: int) -> tuple:
        label = f"tensor info {i + 1} of {count}"
        at = cur.pos
        name = cur.string(f"the name of {label}")
        if not name:
            raise cur.error(f"{label} has an empty name", at)
        label = f"tensor {name!r}"
        dims_at = cur.pos
        n_dims = cur.u32(f"the dimension count of {label}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.error(
                f"{label} has {n_dims} dimensions; 1 to {MAX_DIMS} are supported "
                f"(ggml itself allows 4, Wan's patch_embedding.weight needs 5)",
                dims_at,
            )
        ne_at = cur.take(8 * n_dims, f"the shape of {label}")
        ne = struct.unpack_from(f"<{n_dims}Q", self._mm, ne_at)
        for j, d in enumerate(ne):
            if d == 0:
                raise cur.error(f"{label} has ne[{j}] = 0; empty tensors are not supported", ne_at + 8 * j)
            if d > _INT64_MAX:
                raise cur.error(
                    f"{label} has ne[{j}] = {d} ({d - 2**64} as a signed 64-bit value); "
                    "dimensions must be positive",
                    ne_at + 8 * j,
                )
        type_at = cur.pos
        type_id = cur.u32(f"the type of {label}")
        ggml_type = self._ggml_type(cur, label, type_id, type_at)
        offset_at = cur.pos
        rel_offset = cur.u64(f"the data offset of {label}")

        traits = TRAITS[ggml_type]
        if ne[0] % traits.block_size:
            raise cur.error(
                f"{label} is {traits.name}, stored in blocks of {traits.block_size} values along ne[0], "
                f"but ne[0] = {ne[0]} is not a multiple of {traits.block_size}",
                ne_at,
            )
        n_elements = 1
        for d in ne:
            n_elements *= d
        nbytes = n_elements // traits.block_size * traits.type_size
        if n_elements > _INT64_MAX or nbytes > _INT64_MAX:
            raise cur.error(
                f"{label} has shape ne={list(ne)}: {n_elements} elements, whose size overflows 64 bits", ne_at
            )
        if rel_offset % self.alignment:
            raise cur.error(
                f"{label} has data offset {rel_offset}, not a multiple of the alignment {self.alignment}",
                offset_at,
            )
        # The data section starts within one alignment step of the file's end at most,
        # so this keeps every absolute offset a valid int64 (no wrap-around).
        if rel_offset + nbytes > _INT64_MAX - self.file_size - self.alignment:
            raise cur.error(f"{label} has data offset {rel_offset}, beyond any possible file size", offset_at)
        return at, offset_at, name, ne, ggml_type, rel_offset, nbytes

    def _ggml_type(self, cur: _Cursor, label: str, type_id: int, at: int) -> GGMLType:
        if type_id in REMOVED_TYPE_IDS:
            old = REMOVED_TYPE_NAMES.get(type_id, "a removed type")
            raise cur.error(
                f"{label} has ggml type id {type_id} ({old}), which ggml has removed: the file was "
                "written by an obsolete tool; convert the model again with a current one",
                at,
            )
        try:
            ggml_type = GGMLType(type_id)
        except ValueError:
            raise cur.error(
                f"{label} has ggml type id {type_id}, which is not a known ggml type "
                f"(known ids: {min(GGMLType)}..{max(GGMLType)}); the file is damaged or newer than this reader",
                at,
            ) from None
        return ggml_type

    def _torch_shape(self, cur: _Cursor, name: str, ne: tuple[int, ...], key_pos: dict[str, int]) -> tuple[int, ...]:
        key = ORIG_SHAPE_PREFIX + name
        if key not in self.metadata:
            return tuple(reversed(ne))
        at = key_pos[key]
        if self.metadata_types[key] != (ValueType.ARRAY, ValueType.INT32):
            vtype, item = self.metadata_types[key]
            got = vtype.name + (f" of {item.name}" if item is not None else "")
            raise cur.error(f"{key} is {got}; it must be an ARRAY of INT32 (the torch shape)", at)
        shape = tuple(self.metadata[key])
        n_stored = 1
        for d in ne:
            n_stored *= d
        n_orig = 1
        for d in shape:
            n_orig *= d
        if not shape or any(d < 1 for d in shape) or n_orig != n_stored:
            raise cur.error(
                f"{key} = {list(shape)} does not describe the {n_stored:,} elements of tensor {name!r} "
                f"(stored shape {list(reversed(ne))})",
                at,
            )
        return shape

    def _check_layout(self, cur: _Cursor, infos: list) -> None:
        """Tensor data ranges must not overlap (they may come in any order)."""
        by_offset = sorted(infos, key=lambda info: info[5])
        prev_name, prev_end = None, 0
        for _, at, name, _, _, rel_offset, nbytes in by_offset:
            if prev_name is not None and rel_offset < prev_end:
                raise cur.error(
                    f"tensor {name!r} data [{rel_offset}, {rel_offset + nbytes}) overlaps tensor "
                    f"{prev_name!r}, which ends at {prev_end} (offsets relative to the data section)",
                    at,
                )
            prev_name, prev_end = name, rel_offset + nbytes

    def _require_data(self, cur: _Cursor) -> None:
        if not self.tensors:
            return
        if self.data_offset > self.file_size:
            raise cur.error(
                f"the file ends before its data section: the header ends at byte {cur.pos}, data would "
                f"start at byte {self.data_offset} and needs {self.data_end - self.data_offset:,} bytes "
                f"(file is truncated, {self.data_end - self.file_size:,} bytes missing)",
                self.file_size,
            )
        for info in sorted(self.tensors.values(), key=lambda t: t.offset):
            if info.offset >= self.file_size:
                raise cur.error(
                    f"the file is truncated or damaged: tensor {info.name!r} data starts at byte "
                    f"{info.offset}, past the end of the file ({self.file_size:,} bytes); the data section "
                    f"needs {self.data_end - self.file_size:,} bytes more",
                    self.file_size,
                )
            if info.end > self.file_size:
                raise cur.error(self._truncation(info), self.file_size)

    def _truncation(self, info: GGUFTensorInfo) -> str:
        missing = info.end - max(info.offset, self.file_size)
        return (
            f"the file is truncated: tensor {info.name!r} needs bytes [{info.offset}, {info.end}) but the "
            f"file ends at byte {self.file_size} ({missing:,} of its {info.nbytes:,} bytes missing; "
            f"the data section needs {self.data_end - self.file_size:,} bytes more)"
        )

    # -- data ---------------------------------------------------------------------

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get(ARCHITECTURE_KEY)
        return arch if isinstance(arch, str) else None

    @property
    def missing_bytes(self) -> int:
        """How many bytes of tensor data lie beyond the end of the file (0 if complete)."""
        return max(0, self.data_end - self.file_size)

    def info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r} ({len(self.tensors)} tensors in the file)") from None

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's stored bytes: a uint8 view over the file mapping (no copy)."""
        info = self.info(name)
        if self._mm is None:
            raise ValueError(f"{self.path}: the file is closed")
        if info.end > self.file_size:
            raise GGUFError(self.path, self._truncation(info), self.file_size)
        if self._bytes is None:
            # Through a memoryview: torch keeps it alive, and while it lives the mapping
            # cannot be unmapped under a tensor (close() then leaves it to the last view).
            self._bytes = torch.frombuffer(memoryview(self._mm), dtype=torch.uint8)
        return self._bytes[info.offset : info.end]

    def load(self, name: str) -> torch.Tensor | PackedTensor:
        """F32/F16/BF16 (and integer) tensors as torch tensors in torch shape, viewing
        the mapping; block-quantized tensors as a PackedTensor over their bytes.

        A block tensor whose `orig_shape` does not split into whole blocks along its
        last dimension (the SD-family reshape) is returned in its stored shape:
        `.dequantize().reshape(info.shape)` gives the tensor.
        """
        info = self.info(name)
        data = self.raw(name)
        dtype = _VIEW_DTYPES.get(info.ggml_type)
        if dtype is not None:
            itemsize = torch.empty((), dtype=dtype).element_size()
            if data.data_ptr() % itemsize:  # only with an alignment below the item size
                data = data.clone()
            return data.view(dtype).reshape(info.shape)
        try:
            tensor_nbytes(info.ggml_type, info.shape)
            shape = info.shape
        except ValueError:
            shape = info.stored_shape
        return PackedTensor(data, info.ggml_type, shape)

    def close(self) -> None:
        """Release the mapping. Tensors returned earlier keep it alive until they are freed."""
        self._bytes = None
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views are still alive; the mapping goes when the last one does

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, version={self.version}, architecture={self.architecture!r}, "
            f"tensors={len(self.tensors)}, file_size={self.file_size})"
        )


def _map_private(fd: int, size: int) -> mmap.mmap:
    """A copy-on-write mapping of the whole file. MAP_NORESERVE keeps a file larger
    than RAM + swap mappable (a private writable mapping is otherwise charged in full)."""
    if hasattr(mmap, "MAP_PRIVATE"):
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0)
        return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return mmap.mmap(fd, size, access=mmap.ACCESS_COPY)

"""The safetensors format, read tensor by tensor and written as a stream.

Layout: 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`),
then the data; offsets are relative to the end of the header.

Tensors are read with positioned reads (threaded, `fileio.read_into`) into a tensor
rather than through a memory map: mapped pages stay counted in the process's resident
memory until the map goes, so converting a 30 GB file through a map looks like (and
under pressure behaves like) a 30 GB process. A read costs one copy from the page
cache and keeps memory at one tensor; `read(name, buffer)` reuses the caller's memory.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .atomic_file import AtomicFile
from .fileio import ShortReadError, read_into

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# A header larger than this is not a real checkpoint (the 14B expert's is ~100 kB).
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    pass


@dataclass(frozen=True)
class SafetensorsEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int


class SafetensorsFile:
    """A .safetensors file opened for reading: `.entries` (name -> SafetensorsEntry, in
    name order, as safetensors' own loaders list them), `.metadata`, `.read(name)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.entries, self.metadata = self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self) -> tuple[dict[str, SafetensorsEntry], dict[str, str]]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise SafetensorsError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{self.path}: not a safetensors file (header length {n} at byte 0, file is {size} bytes)"
            )
        raw = _pread_exact(self._fd, n, 8)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        entries = {}
        for name in sorted(header):
            entries[name] = self._entry(name, header[name], data_start, size)
        return entries, {str(k): str(v) for k, v in metadata.items()}

    def _entry(self, name: str, info, data_start: int, size: int) -> SafetensorsEntry:
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(d) for d in shape)
        except (TypeError, KeyError, ValueError):
            raise SafetensorsError(f"{self.path}: malformed header entry for {name!r}: {info!r}") from None
        if dtype_name not in DTYPES:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} has dtype {dtype_name}, which wanrt does not read "
                f"(known: {', '.join(DTYPES)})"
            )
        dtype = DTYPES[dtype_name]
        numel = 1
        for d in shape:
            if d < 0:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has a negative dimension {list(shape)}")
            numel *= d
        nbytes = numel * dtype.itemsize
        if end - begin != nbytes or begin < 0 or data_start + end > size:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} ({dtype_name} {list(shape)}, {nbytes} bytes) has data offsets "
                f"[{begin}, {end}] that do not fit a file of {size} bytes (truncated or corrupt)"
            )
        return SafetensorsEntry(name, dtype, shape, data_start + begin, nbytes)

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name` as a CPU tensor: new, or viewing the start of `buffer` (a
        uint8 CPU tensor of at least the tensor's bytes, so a caller can reuse memory)."""
        e = self.entries[name]
        if buffer is None:
            out = torch.empty(e.shape, dtype=e.dtype)
        else:
            if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < e.nbytes:
                raise ValueError(f"buffer must be a 1-D uint8 tensor of at least {e.nbytes} bytes")
            out = buffer[: e.nbytes].view(e.dtype).view(e.shape)
        if e.nbytes:
            try:
                read_into(self._fd, e.offset, out)
            except ShortReadError as err:
                raise SafetensorsError(f"{self.path}: tensor {name!r}: {err}") from None
        return out

    def read_range(self, name: str, start: int, out: torch.Tensor, *, threads: int | None = None) -> torch.Tensor:
        """Copy the stored bytes [start, start + out.nbytes) of tensor `name` into `out`
        (a contiguous CPU tensor of any dtype), to read a large tensor in pieces.
        `threads`: reader threads (None: every CPU)."""
        e = self.entries[name]
        nbytes = out.numel() * out.element_size()
        if start < 0 or start + nbytes > e.nbytes:
            raise ValueError(f"{name!r}: bytes [{start}, {start + nbytes}) lie outside its {e.nbytes} bytes")
        if nbytes:
            try:
                read_into(self._fd, e.offset + start, out, threads=threads)
            except ShortReadError as err:
                raise SafetensorsError(f"{self.path}: tensor {name!r}: {err}") from None
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    return read_into(fd, offset, torch.empty(n, dtype=torch.uint8), threads=1).numpy().tobytes()


# ---- writing ----------------------------------------------------------------------

@dataclass(frozen=True)
class TensorToWrite:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]  # called once, when the tensor's turn comes


def write_safetensors(
    path: str | Path,
    tensors: Iterable[TensorToWrite],
    metadata: dict[str, str] | None = None,
    *,
    overwrite: bool = False,
    on_tensor: Callable[[TensorToWrite], None] | None = None,
) -> None:
    """Stream tensors into `path`, one in memory at a time: the header is laid out from
    the declared shapes, each `produce()` result is checked against its declaration and
    written (past the page cache, `atomic_file`). The file appears under its name only
    when complete."""
    path = Path(path)
    tensors = list(tensors)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        numel = 1
        for d in t.shape:
            numel *= d
        nbytes = numel * t.dtype.itemsize
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned

    with AtomicFile(path, overwrite=overwrite) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            x = t.produce()
            if x.dtype != t.dtype or tuple(x.shape) != tuple(t.shape):
                raise ValueError(f"{t.name}: produced {x.dtype} {list(x.shape)}, declared {t.dtype} {list(t.shape)}")
            x = x.contiguous()
            if x.numel():
                f.write(x.reshape(-1).view(torch.uint8).numpy())
            del x
            if on_tensor is not None:
                on_tensor(t)
        f.commit()

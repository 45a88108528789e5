"""Stream a conversion's tensors to the writer in pieces, reading, encoding and writing at once.

    stream = TensorStream(plans, read_whole=..., byte_reader=..., encode=..., source_nbytes=...)
    with stream:
        writer.add_tensor(plan.name, ..., stream.producer(plan))   # for every plan, in order
        writer.write()

A piece is a run of whole rows of one tensor (rows are what block quantization works
on). While the writer writes piece k, one thread encodes piece k+1 and another reads
piece k+2 (file I/O and the native codec release the GIL, so the three run on
separate cores). Given the tensors' file offsets, each piece is encoded at the
address from which the file can write it without a copy (`atomic_file`).

Pieces move through a few reused buffers of ~16 MB: fresh memory costs a page fault
and a zeroed page per 4 KiB, which on a busy or virtualized machine costs more than
converting the bytes, and small buffers keep memory near nothing.

Tensors stored as plain float bytes in a file (safetensors) are read piece by piece
with positioned reads. Others (GGUF, .pth, block-quantized sources, tensors that a
weight hook changes) are loaded whole by `read_whole` and then cut into pieces.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .atomic_file import ALIGN, in_place_skip
from .ggml_types import GGMLType, row_nbytes
from .type_policy import TensorPlan

# Elements per piece: 16 MB of bf16. Per-piece costs (a pread, a codec call, a few
# Python calls, ~0.2 ms) stay near 1% of the piece's work.
PIECE_ELEMENTS = 8 << 20
# Buffers per stage: one being filled, one being used, one of slack for the busier side.
SLOTS = 3

ByteReader = Callable[..., torch.Tensor]  # read(start, out, threads=...) -> out


@dataclass
class _Piece:
    index: int  # the tensor's position in the plans
    last: bool  # the tensor's last piece
    source_bytes: int  # share of the tensor's stored bytes, for progress
    first_row: int
    slot: int  # read slot (holding x when read from the file; a token bounding the work ahead otherwise)
    from_file: bool
    x: torch.Tensor | None  # rows to encode
    data: torch.Tensor | None = None  # encoded bytes
    out_slot: int = -1


@dataclass
class _Failure:
    error: BaseException


_STOP = object()
_TORCH_ITEMSIZE = {GGMLType.F32: 4, GGMLType.F16: 2, GGMLType.BF16: 2}


class TensorStream:
    """Three-stage pipeline over `plans`; `producer(plan)` hands the writer an iterator
    of the tensor's encoded pieces. Threads start at the first request and are
    stopped, whatever happened, when the `with` block ends."""

    def __init__(
        self,
        plans: list[TensorPlan],
        *,
        read_whole: Callable[[TensorPlan], torch.Tensor],
        byte_reader: Callable[[TensorPlan], ByteReader | None],
        encode: Callable[[TensorPlan, torch.Tensor, torch.Tensor], torch.Tensor],
        source_nbytes: Callable[[TensorPlan], int],
        source_dtype: Callable[[TensorPlan], torch.dtype],
        progress: Callable[[int], None] | None = None,
    ):
        self.plans = plans
        self.order = {p.name: i for i, p in enumerate(plans)}
        self.read_whole, self.encode, self.progress = read_whole, encode, progress
        self.source_nbytes = source_nbytes
        self.readers = [byte_reader(p) for p in plans]
        self.dtypes = [source_dtype(p) for p in plans]  # of the bytes a byte reader reads
        # Buffer sizes: the largest piece read from a file, the largest encoded piece.
        read_size = out_size = 0
        for i, plan in enumerate(plans):
            n = _row_length(plan)
            rows = min(_rows(plan), _piece_rows(n))
            if self.readers[i] is not None:
                read_size = max(read_size, rows * n * self.dtypes[i].itemsize)
            out_size = max(out_size, rows * row_nbytes(plan.ggml_type, n))
        self.read_buffers = [_LazyBuffer(read_size) for _ in range(SLOTS)]
        self.out_buffers = [_LazyBuffer(out_size + ALIGN) for _ in range(SLOTS)]
        self.file_offsets: list[int] | None = None
        self.free_reads: queue.SimpleQueue = queue.SimpleQueue()
        self.free_outs: queue.SimpleQueue = queue.SimpleQueue()
        for s in range(SLOTS):
            self.free_reads.put(s)
            self.free_outs.put(s)
        self.to_encode: queue.SimpleQueue = queue.SimpleQueue()
        self.to_write: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = False
        self.threads: list[threading.Thread] = []

    def producer(self, plan: TensorPlan) -> Callable[[], Iterator[torch.Tensor]]:
        i = self.order[plan.name]
        return lambda: self._pieces_of(i)

    def place_for(self, offsets: dict[str, int]) -> None:
        """Where each tensor starts in the output file (`GGUFWriter.tensor_offsets()`):
        pieces are then encoded at the same offset within a disk block as in the
        file, which lets the file write them without copying them first."""
        self.file_offsets = [offsets[p.name] for p in self.plans]

    # -- writer side -------------------------------------------------------------------

    def _pieces_of(self, i: int) -> Iterator[torch.Tensor]:
        self._start()
        while True:
            piece = self.to_write.get()
            if isinstance(piece, _Failure):
                self.to_write.put(piece)  # every later request fails the same way
                raise piece.error
            assert piece.index == i, f"the writer asked for tensor {i}, the stream is at {piece.index}"
            yield piece.data
            piece.data = None
            self.free_outs.put(piece.out_slot)
            if self.progress is not None:
                self.progress(piece.source_bytes)
            if piece.last:
                return

    def _start(self) -> None:
        if not self.threads:
            for target, downstream, name in (
                (self._read_all, self.to_encode, "convert-read"),
                (self._encode_all, self.to_write, "convert-encode"),
            ):
                t = threading.Thread(target=self._guarded, args=(target, downstream), name=name, daemon=True)
                self.threads.append(t)
                t.start()

    def _guarded(self, target: Callable[[], None], downstream: queue.SimpleQueue) -> None:
        try:
            target()
        except BaseException as e:  # handed to the writer's thread, which raises it
            downstream.put(_Failure(e))

    # -- reading -------------------------------------------------------------------------

    def _take(self, free: queue.SimpleQueue) -> int | None:
        slot = free.get()
        return None if slot is None or self.stopping else slot

    def _read_all(self) -> None:
        for i, plan in enumerate(self.plans):
            if not self._read_tensor(i, plan):
                return
        self.to_encode.put(_STOP)

    def _read_tensor(self, i: int, plan: TensorPlan) -> bool:
        reader, dtype = self.readers[i], self.dtypes[i]
        n, rows = _row_length(plan), _rows(plan)
        if reader is None:
            x = self.read_whole(plan).reshape(rows, n)
        total = self.source_nbytes(plan)
        step = _piece_rows(n)
        for r in range(0, rows, step) or [0]:
            k = min(step, rows - r)
            slot = self._take(self.free_reads)
            if slot is None:
                return False
            if reader is not None:
                nbytes = k * n * dtype.itemsize
                rows_x = reader(r * n * dtype.itemsize, self.read_buffers[slot].get(nbytes), threads=1)
                piece_x = rows_x.view(dtype).view(k, n)
            else:
                piece_x = x[r : r + k]
            share = total * (r + k) // rows - total * r // rows if rows else total
            self.to_encode.put(_Piece(i, r + k >= rows, share, r, slot, reader is not None, piece_x))
        return True

    # -- encoding ------------------------------------------------------------------------

    def _encode_all(self) -> None:
        while True:
            piece = self.to_encode.get()
            if piece is _STOP:
                return
            if isinstance(piece, _Failure):
                self.to_write.put(piece)
                return
            out_slot = self._take(self.free_outs)
            if out_slot is None:
                return
            plan = self.plans[piece.index]
            out = self.out_buffers[out_slot].get(None)
            if self.file_offsets is not None:
                position = self.file_offsets[piece.index] + piece.first_row * row_nbytes(plan.ggml_type, _row_length(plan))
                skip = in_place_skip(out.data_ptr(), position)
                if skip % _TORCH_ITEMSIZE.get(plan.ggml_type, 1) == 0:  # floats need aligned elements
                    out = out[skip:]
            data = self.encode(plan, piece.x, out)
            if piece.from_file and _shares_memory(data, piece.x):
                # kept as stored (a bf16 tensor written as BF16): its read slot is reused next
                data = out[: data.numel() * data.element_size()].copy_(data.reshape(-1).view(torch.uint8))
            piece.x = None
            self.free_reads.put(piece.slot)
            piece.data, piece.out_slot = data, out_slot
            self.to_write.put(piece)

    # -- teardown ------------------------------------------------------------------------

    def __enter__(self) -> "TensorStream":
        return self

    def __exit__(self, *exc) -> None:
        self.stopping = True
        self.free_reads.put(None)
        self.free_outs.put(None)
        self.to_encode.put(_STOP)
        for t in self.threads:
            t.join()


class _LazyBuffer:
    """A uint8 buffer allocated at its first use, then reused."""

    def __init__(self, size: int):
        self.size = size
        self.tensor: torch.Tensor | None = None

    def get(self, nbytes: int | None) -> torch.Tensor:
        if self.tensor is None:
            self.tensor = torch.empty(self.size, dtype=torch.uint8)
        return self.tensor if nbytes is None else self.tensor[:nbytes]


def _row_length(plan: TensorPlan) -> int:
    return max(1, plan.shape[-1]) if plan.shape else 1


def _rows(plan: TensorPlan) -> int:
    numel = 1
    for d in plan.shape:
        numel *= d
    return numel // _row_length(plan)


def _piece_rows(n: int) -> int:
    return max(1, PIECE_ELEMENTS // n)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()

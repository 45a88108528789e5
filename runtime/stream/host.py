"""Host side of streaming: where each block's bytes live between their trips to the GPU.

A block is one flat byte range (its `BlockLayout`): every weight of the block (each a
registered buffer or parameter of a submodule) sits at an offset in it, so one read and
one host-to-device copy move the whole block, and binding a block to any copy of those
bytes is a matter of views. When the weights come from a GGUF file the layout is the
file's own (a block's tensors are contiguous there, padding included): the bytes are
read with one pread per block. Tensors that are not in the file, or that the model keeps
in another dtype than the file, are packed after the file bytes from the module's own
tensors.

Where the bytes live (`HostStore`), per block:
  "pinned"  one page-locked buffer holding the whole layout (the fast path);
  "staged"  nothing held: a `StagingReader` thread reads the block from the file into a
            ring of page-locked staging buffers just before it is needed;
  "dropped" nothing held: a resident block, uploaded once, reread from the file if the
            expert is ever activated again.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from quant.fileio import read_into
from quant.ggml_types import GGMLType

from .budget import _count_pinned

ALIGN = 256  # layout offsets of packed-from-module tensors (and of runs): cuBLAS-friendly
_RUN_GAP = 1 << 16  # file tensors further apart than this start a new read run
_PAGE = 4096

_FLOAT_TYPES = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


# -- where tensors lie in a file ----------------------------------------------------


@dataclass(frozen=True)
class FileTensor:
    offset: int  # absolute byte offset in the file
    nbytes: int
    ggml_type: GGMLType


@dataclass
class FileSource:
    """The bytes of a model's tensors in one file: module name -> where they lie.

    Names are the module's own (`blocks.3.ffn.0.weight`); `from_gguf` maps file names
    to module names with `rename` (None keeps them; a name mapped to None is skipped)."""

    path: Path
    tensors: dict[str, FileTensor] = field(default_factory=dict)

    @classmethod
    def from_gguf(cls, path, rename: Callable[[str], str | None] | Mapping[str, str] | None = None) -> "FileSource":
        from quant.gguf_reader import GGUFFile

        if isinstance(rename, Mapping):
            table = rename
            rename = table.get
        out = {}
        with GGUFFile(path) as f:
            for name, info in f.tensors.items():
                key = rename(name) if rename is not None else name
                if key is not None:
                    out[key] = FileTensor(info.offset, info.nbytes, info.ggml_type)
        return cls(Path(path), out)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors


# -- one block as a flat byte range ---------------------------------------------------


@dataclass
class TensorPlace:
    """One weight of a block: the module attribute it is bound to and its bytes."""

    name: str  # full module name, e.g. "blocks.3.ffn.0.weight"
    module: nn.Module
    attr: str
    is_param: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # in the block layout
    file_offset: int | None = None  # absolute, when the bytes are read from the file
    host: torch.Tensor | None = None  # the module's own tensor, when they are not

    def view(self, base: torch.Tensor) -> torch.Tensor:
        """This tensor inside `base` (a uint8 tensor holding the block layout)."""
        raw = base[self.offset : self.offset + self.nbytes]
        if self.dtype != torch.uint8:
            raw = raw.view(self.dtype)
        return raw.view(self.shape)


@dataclass
class BlockLayout:
    index: int
    places: list[TensorPlace]
    nbytes: int
    runs: list[tuple[int, int, int]]  # (file offset, layout offset, nbytes): one pread each

    @property
    def from_file(self) -> bool:
        """Every byte of the block can be read again from the file."""
        return all(p.file_offset is not None for p in self.places)


def _tensors_of(block: nn.Module) -> Iterable[tuple[str, nn.Module, str, bool, torch.Tensor]]:
    for mod_name, mod in block.named_modules():
        for attr, t in mod._parameters.items():
            if t is not None:
                yield mod_name, mod, attr, True, t
        for attr, t in mod._buffers.items():
            if t is not None:
                yield mod_name, mod, attr, False, t


def _file_match(t: torch.Tensor, module: nn.Module, attr: str, ft: FileTensor) -> str | None:
    """None when the file's bytes are exactly what the module holds, else why not."""
    nbytes = t.numel() * t.element_size()
    packed_type = getattr(module, "ggml_type", None) if attr == "weight" and t.dtype == torch.uint8 else None
    if packed_type is not None:
        if GGMLType(packed_type) != ft.ggml_type:
            return f"the model holds {GGMLType(packed_type).name}, the file {ft.ggml_type.name}"
    elif _FLOAT_TYPES.get(ft.ggml_type) != t.dtype:
        return f"the model holds {t.dtype}, the file {ft.ggml_type.name}"
    if nbytes != ft.nbytes:
        return f"the model holds {nbytes} bytes, the file {ft.nbytes}"
    return None


def build_layouts(blocks: nn.ModuleList, prefix: str, source: FileSource | None) -> list[BlockLayout]:
    """The flat layout of every block. A tensor on the meta device must be in `source`
    with matching bytes (it has no other home); others are read from the file when it
    holds exactly their bytes, else packed from the module."""
    layouts = []
    for i, block in enumerate(blocks):
        from_file, from_module = [], []
        for mod_name, mod, attr, is_param, t in _tensors_of(block):
            name = ".".join(x for x in (prefix, str(i), mod_name, attr) if x)
            nbytes = t.numel() * t.element_size()
            place = TensorPlace(name, mod, attr, is_param, t.dtype, tuple(t.shape), nbytes)
            ft = source.tensors.get(name) if source is not None else None
            why = "it is not in the file" if ft is None else _file_match(t, mod, attr, ft)
            if why is None:
                place.file_offset = ft.offset
                from_file.append(place)
            elif t.is_meta:
                where = source.path if source is not None else "no file was given"
                raise ValueError(f"{name} has no weights in memory and cannot be read from {where}: {why}")
            else:
                if not t.is_contiguous():
                    t = t.contiguous()
                place.host = t
                from_module.append(place)
        runs: list[tuple[int, int, int]] = []
        size = 0
        from_file.sort(key=lambda p: p.file_offset)
        run_start = run_end = None
        for p in from_file:
            if run_start is None or p.file_offset - run_end > _RUN_GAP or p.file_offset < run_end:
                if run_start is not None:
                    runs.append((run_start, size, run_end - run_start))
                    size = _align(size + run_end - run_start)
                run_start = run_end = p.file_offset
            p.offset = size + (p.file_offset - run_start)
            run_end = max(run_end, p.file_offset + p.nbytes)
        if run_start is not None:
            runs.append((run_start, size, run_end - run_start))
            size = _align(size + run_end - run_start)
        for p in from_module:
            p.offset = size
            size = _align(size + p.nbytes)
        layouts.append(BlockLayout(i, from_file + from_module, size, runs))
    return layouts


def bind(layout: BlockLayout, base: torch.Tensor | None, cache: dict | None = None) -> None:
    """Point every weight of the block at its bytes inside `base`. With None, weights the
    file holds become meta tensors (they can be read again) and the others go back to
    their own tensors in memory, so the model stays whole for a later engine. `cache`
    keeps the views made for a base so that rebinding costs no allocation."""
    views = None if cache is None else cache.get(id(base))
    if views is None:
        views = []
        for p in layout.places:
            if base is not None:
                t = p.view(base)
            elif p.host is not None:
                t = p.host
            else:
                t = torch.empty(p.shape, dtype=p.dtype, device="meta")
            views.append(nn.Parameter(t, requires_grad=False) if p.is_param else t)
        if cache is not None:
            cache[id(base)] = views
    for p, v in zip(layout.places, views):
        (p.module._parameters if p.is_param else p.module._buffers)[p.attr] = v


# -- page-locked host memory ------------------------------------------------------------


class PinnedBuffer:
    """`nbytes` of page-locked host memory as a uint8 tensor, exactly that size.

    torch's pinned allocator rounds every request up to a power of two (a 373 MB block
    would take 512 MB), so the memory is allocated plainly and registered with the
    driver instead. Without CUDA the buffer is ordinary memory."""

    def __init__(self, nbytes: int, pin: bool = True):
        self.nbytes = int(nbytes)
        raw = torch.empty(self.nbytes + _PAGE, dtype=torch.uint8)
        skip = (-raw.data_ptr()) % _PAGE  # registration works on whole pages
        self.tensor = raw[skip : skip + self.nbytes]
        self.pinned = False
        if pin and torch.cuda.is_available() and self.nbytes:
            # cudaHostRegisterPortable: pinned for every context, whichever thread registers
            err = int(torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.nbytes, 1))
            if err != 0:
                raise RuntimeError(
                    f"could not page-lock {self.nbytes / 2**20:.0f} MiB of host memory (cudaError {err}); "
                    "lower --ram so that blocks are staged from the file instead"
                )
            self.pinned = True
            _count_pinned(self.nbytes)

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            _count_pinned(-self.nbytes)
            self.pinned = False
        self.tensor = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def fill(layout: BlockLayout, fd: int | None, out: torch.Tensor) -> None:
    """Write the block's bytes into `out` (uint8, at least `layout.nbytes`): one pread
    per file run, one copy per tensor packed from the module."""
    for file_offset, offset, nbytes in layout.runs:
        read_into(fd, file_offset, out[offset : offset + nbytes])
    for p in layout.places:
        if p.host is not None:
            out[p.offset : p.offset + p.nbytes].copy_(p.host.reshape(-1).view(torch.uint8))


# -- all blocks of one model ------------------------------------------------------------

PINNED, STAGED, DROPPED = "pinned", "staged", "dropped"


class HostStore:
    """The host copies of one model's blocks, per the plan's placement ("pinned",
    "staged" or "dropped" per block). `load()` reads the pinned ones; `fill(i, out)`
    writes any block into a buffer (for staging and for the one-time upload of resident
    blocks); `view(i)` is a pinned block's bytes; `release()` gives the pinned memory
    back (a later `load()` reads it again from the file).

    Tensors packed from the module (not in the file) stay referenced when there is a
    file, so that the store can be released and loaded again (they are small: norms or
    biases the model keeps in another dtype); without a file the pinned copy becomes the
    only copy."""

    def __init__(self, layouts: list[BlockLayout], placement: list[str], source: FileSource | None, pin: bool):
        if len(layouts) != len(placement):
            raise ValueError(f"{len(placement)} placements for {len(layouts)} blocks")
        self.layouts = layouts
        self.placement = list(placement)
        self.source = source
        self.pin = pin
        self.buffers: dict[int, PinnedBuffer] = {}
        self._fd: int | None = None
        self._lock = threading.Lock()

    @property
    def fd(self) -> int | None:
        if self._fd is None and self.source is not None:
            self._fd = os.open(self.source.path, os.O_RDONLY)
        return self._fd

    @property
    def pinned_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    @property
    def reloadable(self) -> bool:
        return self.source is not None

    def load(self, progress: Callable[[int], None] | None = None, stop: threading.Event | None = None) -> None:
        """Read every "pinned" block into its own page-locked buffer. `progress(nbytes)`
        after each block; `stop` (set from another thread) ends the load early."""
        for layout, where in zip(self.layouts, self.placement):
            if stop is not None and stop.is_set():
                return
            if where != PINNED or layout.index in self.buffers:
                continue
            buf = PinnedBuffer(layout.nbytes, self.pin)
            fill(layout, self.fd, buf.tensor)
            with self._lock:
                self.buffers[layout.index] = buf
            if not self.reloadable:
                for p in layout.places:
                    p.host = None  # the pinned copy is the only copy now
                # the module reads it too, so its own tensors are freed block by block
                # (host memory holds one copy of the model while loading, not two)
                bind(layout, buf.tensor)
            if progress is not None:
                progress(layout.nbytes)

    def view(self, i: int) -> torch.Tensor:
        return self.buffers[i].tensor

    def fill(self, i: int, out: torch.Tensor) -> None:
        if i in self.buffers:
            out[: self.layouts[i].nbytes].copy_(self.buffers[i].tensor)
        else:
            fill(self.layouts[i], self.fd, out)

    def release(self) -> None:
        """Give the pinned memory and the file descriptor back."""
        if not self.reloadable:
            raise RuntimeError("these blocks exist only in host memory; releasing them would lose the weights")
        with self._lock:
            for buf in self.buffers.values():
                buf.close()
            self.buffers.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Give every host byte back, module tensors included; the store is unusable after."""
        with self._lock:
            for buf in self.buffers.values():
                buf.close()
            self.buffers.clear()
        for layout in self.layouts:
            for p in layout.places:
                p.host = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StagingReader:
    """A thread that reads the "staged" blocks, in the order they run (cyclically, one
    forward after the other), into a ring of page-locked staging buffers.

    The compute thread `take`s the buffer holding the block it needs next, enqueues the
    host-to-device copy from it and `release`s it with the event that marks the copy
    done; only this thread ever waits on that event. A request out of order (a forward
    cut short, a block skipped) restarts the reader at the requested block."""

    FREE, FILLING, READY, TAKEN, INFLIGHT = range(5)

    def __init__(self, store: HostStore, order: list[int], slots: int, slot_bytes: int, pin: bool, events: bool):
        if not order:
            raise ValueError("a staging reader needs at least one staged block")
        self.store = store
        self.order = list(order)
        self._pos_of = {b: i for i, b in enumerate(self.order)}
        self.buffers = [PinnedBuffer(slot_bytes, pin) for _ in range(slots)]
        self._state = [self.FREE] * slots
        self._block = [-1] * slots
        self._event: list = [None] * slots
        # one "copy out of this buffer done" event per buffer, recorded by the compute
        # thread's copy and waited on here only
        self.done_events = [torch.cuda.Event(blocking=True) for _ in range(slots)] if events else None
        self._ready: list[int] = []
        self._next = 0
        self._pos = 0  # position in `order` of the next block to become ready
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.waits = 0  # times the compute thread had to wait for the disk

    @property
    def pinned_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def start(self, first_block: int) -> None:
        self._stop = False
        self._pos = self._pos_of[first_block]
        self._thread = threading.Thread(target=self._run, name="wanrt-staging", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                k = self._next
                with self._cond:
                    while not self._stop and self._state[k] not in (self.FREE, self.INFLIGHT):
                        self._cond.wait()
                    if self._stop:
                        return
                    event = self._event[k] if self._state[k] == self.INFLIGHT else None
                    self._state[k], self._event[k] = self.FILLING, None
                    block = self.order[self._pos % len(self.order)]
                if event is not None:
                    event.synchronize()  # the previous copy out of this buffer is done
                self.store.fill(block, self.buffers[k].tensor)
                with self._cond:
                    self._state[k], self._block[k] = self.READY, block
                    self._ready.append(k)
                    self._pos += 1
                    self._next = (k + 1) % len(self.buffers)
                    self._cond.notify_all()
        except BaseException as e:  # surfaced to the compute thread by take()
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def take(self, block: int, wait: bool) -> tuple[int, torch.Tensor] | None:
        """The staging buffer holding `block`, if it is the next one read; with `wait`
        block until it is (restarting the reader if it reads something else)."""
        with self._cond:
            while True:
                if self.error is not None:
                    raise RuntimeError(f"reading {self.store.source.path} failed: {self.error}") from self.error
                if self._ready:
                    k = self._ready[0]
                    if self._block[k] == block:
                        self._ready.pop(0)
                        self._state[k] = self.TAKEN
                        return k, self.buffers[k].tensor
                    if not wait:
                        return None
                    break  # the reader is on another path: restart it below
                if not wait:
                    return None
                if self._thread is None or not self._thread.is_alive():
                    break
                if self._expects(block):
                    self.waits += 1
                    self._cond.wait()
                    continue
                break
        self.restart(block)
        return self.take(block, wait=True)

    def _expects(self, block: int) -> bool:
        """Whether, with nothing ready, `block` is the next one the reader delivers."""
        return self.order[self._pos % len(self.order)] == block

    def done_event(self, k: int):
        """The event to record after the copy out of buffer `k` (None: copies are synchronous)."""
        return None if self.done_events is None else self.done_events[k]

    def release(self, k: int) -> None:
        """The copy out of buffer `k` is enqueued (and `done_event(k)` recorded after it)."""
        event = self.done_event(k)
        with self._cond:
            self._state[k] = self.INFLIGHT if event is not None else self.FREE
            self._event[k] = event
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def restart(self, first_block: int) -> None:
        self.stop()
        with self._cond:
            for k in self._ready:
                self._state[k] = self.FREE
            for k, s in enumerate(self._state):
                if s == self.FILLING:
                    self._state[k] = self.FREE
            self._ready.clear()
        self.start(first_block)

    def close(self) -> None:
        self.stop()
        for k, event in enumerate(self._event):
            if event is not None:
                event.synchronize()
        for b in self.buffers:
            b.close()
        self.buffers = []

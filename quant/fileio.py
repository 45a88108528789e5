"""Threaded copy of a file region into a CPU tensor (pinned staging buffers included).

The streaming engine fills pinned buffers from memory-mapped GGUF files with
`read_into`; the native library reads the region in parallel chunks with pread,
the Python twin with one os.preadv loop.
"""
from __future__ import annotations

import os

import torch

from . import _native

BACKENDS = ("auto", "native", "reference")


class ShortReadError(EOFError):
    """The file ends before the requested region does (a truncated file)."""


def _file_name(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"file descriptor {fd}"


def _truncated(name: str, offset: int, nbytes: int, available: int) -> ShortReadError:
    return ShortReadError(
        f"{name}: needs {nbytes} bytes at offset {offset} (up to byte {offset + nbytes}), "
        f"but the file ends at byte {offset + available}; it is truncated "
        "(an interrupted download or copy?): fetch or copy it again"
    )


def _read_python(fd: int, offset: int, view: memoryview) -> int:
    """The twin: os.preadv until the region is full or the file ends; bytes read."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def read_into(fd_or_path, offset: int, out: torch.Tensor, *, threads: int | None = None, backend: str = "auto"):
    """Copy `out.nbytes` bytes of a file, starting at byte `offset`, into the CPU tensor
    `out` (contiguous, any dtype, pinned or not). `fd_or_path` is an open file
    descriptor or a path. `threads`: native reader threads (None: every CPU).
    Raises ShortReadError, naming the file, offset and sizes, if the file is too short.
    Returns `out`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "native" and not _native.available():
        raise _native.NativeUnavailable(f"backend='native' asked for, but {_native.load_error()}")
    if not isinstance(out, torch.Tensor) or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError("read_into needs a contiguous CPU tensor to fill")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset={offset!r}; expected a non-negative byte offset")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r}; expected a positive integer or None (all CPUs)")

    own_fd = not isinstance(fd_or_path, int)
    fd = os.open(os.fspath(fd_or_path), os.O_RDONLY | os.O_CLOEXEC) if own_fd else fd_or_path
    try:
        name = os.fspath(fd_or_path) if own_fd else _file_name(fd)
        nbytes = out.numel() * out.element_size()
        if nbytes == 0:
            return out
        size = os.fstat(fd).st_size
        if offset + nbytes > size:
            raise _truncated(name, offset, nbytes, max(0, size - offset))
        if backend == "reference" or not _native.available():
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            done = _read_python(fd, offset, view)
        else:
            try:
                done = _native.pread(fd, offset, out.data_ptr(), nbytes, threads or 0)
            except _native.ShortReadError as e:
                done = e.n_read
            except _native.NativeError as e:
                raise OSError(f"{name}: {e.message}") from None
        if done < nbytes:  # the file shrank since fstat
            raise _truncated(name, offset, nbytes, done)
        return out
    finally:
        if own_fd:
            os.close(fd)

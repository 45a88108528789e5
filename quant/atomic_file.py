"""Write a new file front to back under a temporary name, renamed when complete.

    with AtomicFile(path, overwrite=False) as f:
        f.write(header)
        f.write(tensor_bytes)   # bytes, memoryview, numpy array, ...
        f.commit()              # synced and renamed; without it the file is removed

The bytes go to the disk without piling up in the page cache. A file written through
the cache leaves gigabytes of dirty pages for the kernel to find memory for, copy and
write back; on a small machine that costs more CPU than quantizing the weights. So
where the file system takes O_DIRECT (ext4, xfs, btrfs...) the disk reads the bytes
straight from memory: large pieces from where they lie when the producer put them at
the file position's offset within a block (`in_place_skip`), everything else through
a page-aligned staging buffer written in aligned chunks. Where it does not (tmpfs,
many network and FUSE file systems, macOS) the chunks are written through the cache,
each handed to writeback as soon as it is written and dropped from the cache once
clean (posix_fadvise), so dirty pages still never pile up. The file ends up the same
either way.

On any error, Ctrl-C included, before `commit()` the temporary file is removed.
"""
from __future__ import annotations

import errno
import mmap
import os
import secrets
from pathlib import Path

import numpy as np

# Direct I/O needs buffer address, file offset and length aligned to the device's
# logical block (512 or 4096 bytes); a page satisfies both.
ALIGN = mmap.PAGESIZE
# Staging buffer: large enough that the disk streams, small enough to stay in cache.
CHUNK_BYTES = 8 << 20
# Smaller pieces are copied into the staging buffer even when they could be written in place.
ZERO_COPY_MIN = 256 << 10
# Buffered fallback: a written chunk is dropped from the cache this many chunks later
# (by then its writeback has finished).
_DROP_LAG = 4

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_FADVISE = hasattr(os, "posix_fadvise")


class AtomicFile:
    """A file under construction at `.{name}.{random}.partial` beside `path`.

    `direct=False` writes through the page cache (still with early writeback);
    `direct` (the default) uses O_DIRECT where the file system takes it and falls
    back silently where it does not. `.direct` says which one is in use."""

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, direct: bool = True,
                 chunk_bytes: int = CHUNK_BYTES):
        if chunk_bytes < ALIGN or chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGN}, got {chunk_bytes}")
        self.path = Path(path)
        self.overwrite = overwrite
        self.tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.partial")
        self._buf = mmap.mmap(-1, chunk_bytes)  # page-aligned, as direct I/O needs
        self._view = memoryview(self._buf)
        self._fill = 0  # bytes staged in the buffer
        self._base = 0  # file offset of the buffer's first byte (a multiple of ALIGN)
        self._closed = False
        self._committed = False
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
        self.direct = bool(direct and _O_DIRECT)
        try:
            self._fd = os.open(self.tmp, flags | (_O_DIRECT if self.direct else 0), 0o666)
        except OSError as e:
            if not self.direct or e.errno != errno.EINVAL:  # EINVAL: no O_DIRECT on this file system
                self._release_buffer()
                raise
            self.direct = False
            self._fd = os.open(self.tmp, flags, 0o666)

    # -- writing --------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Bytes written so far (the file's size once committed)."""
        return self._base + self._fill

    def write(self, data) -> None:
        """Append a bytes-like object (anything with the buffer protocol, contiguous).
        With direct I/O, a large piece that lies in memory at the file position's
        offset within a block (address % ALIGN == position % ALIGN) is written from
        where it is, without a copy (`in_place_skip` says where a producer should put it)."""
        src = memoryview(data)
        if not src.c_contiguous:
            raise ValueError("AtomicFile.write needs contiguous memory")
        src = src.cast("B")
        if self.direct and len(src) >= ZERO_COPY_MIN and (_address(src) - self.position) % ALIGN == 0:
            head = -self.position % ALIGN
            self._stage(src[:head])  # the staged bytes now end on a block boundary
            body = (len(src) - head) // ALIGN * ALIGN
            self._write_from(src[head : head + body])
            src = src[head + body :]
        self._stage(src)

    def write_zeros(self, n: int) -> None:
        """Append n zero bytes (padding)."""
        if n > 0:
            self.write(bytes(n))

    def flush(self) -> None:
        """Put the staged bytes on disk now (a reader sees them in the partial file)."""
        if self._fill:
            self._write_out(self._fill)

    def commit(self) -> Path:
        """Write what is staged, sync, and rename to `path`; returns `path`."""
        try:
            size = self.position
            self.flush()
            os.ftruncate(self._fd, size)  # direct writes are rounded up to a whole block
            os.fsync(self._fd)
            os.close(self._fd)
            self._closed = True
            if not self.overwrite and (self.path.exists() or self.path.is_symlink()):
                raise FileExistsError(f"{self.path} already exists; pass overwrite=True to replace it")
            os.replace(self.tmp, self.path)
            self._committed = True
        except BaseException:
            self.discard()
            raise
        self._release_buffer()
        return self.path

    def discard(self) -> None:
        """Close and remove the temporary file (a no-op after commit)."""
        if self._committed:
            return
        if not self._closed:
            self._closed = True
            os.close(self._fd)
        self.tmp.unlink(missing_ok=True)
        self._release_buffer()

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, *exc) -> None:
        if not self._committed:
            self.discard()  # an error, or the caller never finished

    # -- internals ------------------------------------------------------------------

    def _write_out(self, n: int) -> None:
        """Write the first n staged bytes at the buffer's file offset (the buffer
        stays: a partial chunk is written again when it fills)."""
        if self.direct:
            padded = -(-n // ALIGN) * ALIGN
            self._view[n:padded] = bytes(padded - n)  # the rounding never leaves stale bytes
            try:
                self._pwrite_one(self._view[:padded], self._base)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._go_buffered()  # opened with O_DIRECT, but writes are refused
        self._pwrite_one(self._view[:n], self._base)
        if _FADVISE:
            # start writeback of this chunk now; drop an older one, whose writeback is done
            os.posix_fadvise(self._fd, self._base, n, os.POSIX_FADV_DONTNEED)
            old = self._base - _DROP_LAG * len(self._view)
            if old >= 0:
                os.posix_fadvise(self._fd, old, len(self._view), os.POSIX_FADV_DONTNEED)

    def _stage(self, src: memoryview) -> None:
        size = len(self._view)
        at = 0
        while at < len(src):
            n = min(size - self._fill, len(src) - at)
            self._view[self._fill : self._fill + n] = src[at : at + n]
            self._fill += n
            at += n
            if self._fill == size:
                self._write_out(size)
                self._base += size
                self._fill = 0

    def _write_from(self, view: memoryview) -> None:
        """Write the staged whole blocks and then the caller's aligned bytes, in one
        request, at the buffer's offset; the buffer is left empty."""
        staged = self._view[: self._fill]
        try:
            self._pwrite_all(staged, view, self._base)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._go_buffered()
            self._pwrite_all(staged, view, self._base)
        self._base += self._fill + len(view)
        self._fill = 0

    def _pwrite_all(self, first: memoryview, second: memoryview, offset: int) -> None:
        """Write first then second at offset (a vectored write where there is one)."""
        if len(first) and hasattr(os, "pwritev"):
            n = os.pwritev(self._fd, [first, second], offset)
            if n >= len(first):
                self._pwrite_one(second[n - len(first) :], offset + n)
                return
            first, second, offset = first[n:], second, offset + n
        self._pwrite_one(first, offset)
        self._pwrite_one(second, offset + len(first))

    def _pwrite_one(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = _pwrite(self._fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"cannot write {self.tmp}: the write made no progress")
            done += n

    def _go_buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self.direct = False

    def _release_buffer(self) -> None:
        if self._buf is not None:
            self._view.release()
            self._buf.close()
            self._buf = None


def in_place_skip(address: int, position: int) -> int:
    """Bytes to skip from a buffer at `address` so that a piece put there and written at
    file offset `position` is written from where it lies, without a copy."""
    return (position - address) % ALIGN


def _pwrite(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, view, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows: no pwrite
    return os.write(fd, view)


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0

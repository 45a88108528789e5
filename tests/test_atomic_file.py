"""AtomicFile: the same bytes through direct I/O, in-place writes and the buffered
fallback; nothing left behind on failure; no replacing a file that appeared meanwhile."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from quant import atomic_file
from quant.atomic_file import ALIGN, ZERO_COPY_MIN, AtomicFile, in_place_skip

O_DIRECT = getattr(os, "O_DIRECT", 0)


def _direct_io_works(folder) -> bool:
    """Whether this file system takes aligned O_DIRECT writes (tmpfs does not)."""
    if not O_DIRECT:
        return False
    import mmap

    probe = folder / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.pwrite(fd, mmap.mmap(-1, ALIGN), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def _pieces(seed: int) -> list[np.ndarray]:
    """Sizes around every boundary the writer cares about: blocks, the staging chunk,
    the in-place threshold; random bytes."""
    rng = np.random.default_rng(seed)
    sizes = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN + 17, ZERO_COPY_MIN + 123, 5 * ALIGN, 2 * ZERO_COPY_MIN, 9]
    rng.shuffle(sizes)
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]


def _write(path, pieces, *, direct: bool, in_place: bool, chunk_bytes: int = 2 * ALIGN) -> AtomicFile:
    """Each piece copied into a buffer at the offset a producer would choose."""
    arena = np.empty(max(len(p) for p in pieces) + 2 * ALIGN, dtype=np.uint8)
    with AtomicFile(path, direct=direct, chunk_bytes=chunk_bytes) as f:
        for p in pieces:
            skip = in_place_skip(arena.ctypes.data, f.position) if in_place else 1
            dst = arena[skip : skip + len(p)]
            dst[:] = p
            f.write(dst)
        assert f.position == sum(len(p) for p in pieces)
        f.commit()
    return f


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("in_place", [True, False])
def test_every_way_writes_the_same_bytes(tmp_path, direct, in_place):
    pieces = _pieces(seed=len(str(tmp_path)))
    path = tmp_path / "out.bin"
    f = _write(path, pieces, direct=direct, in_place=in_place)
    assert path.read_bytes() == b"".join(p.tobytes() for p in pieces)
    assert list(tmp_path.iterdir()) == [path]
    # a misaligned direct write would be refused and fall back silently: check it stayed direct
    assert f.direct == (direct and _direct_io_works(tmp_path))


def test_placed_pieces_are_written_without_a_copy(tmp_path, monkeypatch):
    """With direct I/O, a piece put where `in_place_skip` says is not staged (only
    its head and tail, less than a block each, are)."""
    staged = []
    stage = AtomicFile._stage
    monkeypatch.setattr(AtomicFile, "_stage", lambda self, src: (staged.append(len(src)), stage(self, src))[1])
    pieces = [np.full(n, i, dtype=np.uint8) for i, n in enumerate([100, ZERO_COPY_MIN + 5, 3, 2 * ZERO_COPY_MIN])]
    if not _direct_io_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    f = _write(tmp_path / "out.bin", pieces, direct=True, in_place=True)
    assert f.direct
    assert sum(staged) < 100 + 3 + 4 * ALIGN
    assert (tmp_path / "out.bin").read_bytes() == b"".join(p.tobytes() for p in pieces)


def test_flush_puts_the_bytes_in_the_partial_file(tmp_path):
    with AtomicFile(tmp_path / "out.bin") as f:
        f.write(b"header")
        f.flush()
        (partial,) = tmp_path.glob(".out.bin.*.partial")
        assert partial.read_bytes()[:6] == b"header"
        f.write(b"!")
        f.commit()
    assert (tmp_path / "out.bin").read_bytes() == b"header!"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_nothing(tmp_path, error):
    with pytest.raises(error):
        with AtomicFile(tmp_path / "out.bin") as f:
            f.write(bytes(3 * ALIGN + 1))
            raise error()
    assert list(tmp_path.iterdir()) == []


def test_uncommitted_file_is_removed(tmp_path):
    with AtomicFile(tmp_path / "out.bin") as f:
        f.write(b"abc")
    assert list(tmp_path.iterdir()) == []


def test_does_not_replace_a_file_that_appeared(tmp_path):
    path = tmp_path / "out.bin"
    with AtomicFile(path) as f:
        f.write(b"new")
        path.write_bytes(b"keep me")
        with pytest.raises(FileExistsError, match="overwrite"):
            f.commit()
    assert path.read_bytes() == b"keep me"
    assert list(tmp_path.iterdir()) == [path]
    with AtomicFile(path, overwrite=True) as f:
        f.write(b"new")
        f.commit()
    assert path.read_bytes() == b"new"


@pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this platform")
def test_falls_back_when_open_refuses_direct_io(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs says
        return real_open(path, flags, *args)

    monkeypatch.setattr(atomic_file.os, "open", no_direct)
    pieces = _pieces(seed=1)
    f = _write(tmp_path / "out.bin", pieces, direct=True, in_place=True)
    assert not f.direct
    assert (tmp_path / "out.bin").read_bytes() == b"".join(p.tobytes() for p in pieces)


@pytest.mark.skipif(not O_DIRECT, reason="no O_DIRECT on this platform")
@pytest.mark.parametrize("in_place", [True, False])
def test_falls_back_when_direct_writes_are_refused(tmp_path, monkeypatch, in_place):
    import fcntl

    direct_works = _direct_io_works(tmp_path)
    refused = []

    def refuse_direct(real):
        def write(fd, data, offset):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
                refused.append(offset)
                raise OSError(errno.EINVAL, "Invalid argument")  # file systems that accept the flag, not the writes
            return real(fd, data, offset)
        return write

    monkeypatch.setattr(atomic_file.os, "pwrite", refuse_direct(os.pwrite))
    monkeypatch.setattr(atomic_file.os, "pwritev", refuse_direct(os.pwritev))
    pieces = _pieces(seed=2)
    f = _write(tmp_path / "out.bin", pieces, direct=True, in_place=in_place)
    assert not f.direct
    assert bool(refused) == direct_works
    assert (tmp_path / "out.bin").read_bytes() == b"".join(p.tobytes() for p in pieces)


def test_rejects_a_staging_size_that_is_not_whole_blocks(tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        AtomicFile(tmp_path / "out.bin", chunk_bytes=ALIGN + 1)
    assert list(tmp_path.iterdir()) == []

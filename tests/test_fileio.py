"""Threaded file-region copies: native == Python twin, round trips, truncated files."""
from __future__ import annotations

import os

import pytest
import torch

from quant import _native
from quant.fileio import ShortReadError, read_into

needs_native = pytest.mark.skipif(
    not _native.available() and not os.environ.get("WANRT_REQUIRE_NATIVE"),
    reason=f"native C library absent ({_native.load_error()}); set WANRT_REQUIRE_NATIVE=1 to fail instead",
)
BACKENDS = [pytest.param("native", marks=needs_native), "reference"]


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    """A file of 9 MiB + 123 bytes of random content: large enough for several reader threads."""
    data = torch.randint(0, 256, (9 * 2**20 + 123,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path = tmp_path_factory.mktemp("fileio") / "blob.bin"
    path.write_bytes(data.numpy().tobytes())
    return path, data


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 3, None])
def test_round_trip_by_path(blob, backend, threads):
    path, data = blob
    for offset, n in [(0, data.numel()), (1, 4097), (12345, 9 * 2**20 - 12345), (data.numel() - 7, 7)]:
        out = torch.empty(n, dtype=torch.uint8)
        assert read_into(path, offset, out, threads=threads, backend=backend) is out
        assert torch.equal(out, data[offset : offset + n])


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_by_fd_into_typed_tensor(blob, backend):
    path, data = blob
    out = torch.empty(1000, 33, dtype=torch.float16)  # any dtype: filled byte for byte
    fd = os.open(path, os.O_RDONLY)
    try:
        read_into(fd, 64, out, backend=backend)
        os.fstat(fd)  # still open: read_into leaves a caller's descriptor alone
    finally:
        os.close(fd)
    assert torch.equal(out.view(-1).view(torch.uint8), data[64 : 64 + out.numel() * 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_and_twin_fill_the_same_bytes(blob, backend):
    path, data = blob
    views = torch.zeros(3, 2**20, dtype=torch.uint8)
    for i in range(3):  # slices of one staging buffer, as the streaming engine uses them
        read_into(path, 100_000 * i + 5, views[i], backend=backend)
        assert torch.equal(views[i], data[100_000 * i + 5 : 100_000 * i + 5 + 2**20])


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_file_names_file_offset_and_sizes(blob, backend):
    path, data = blob
    out = torch.empty(1000, dtype=torch.uint8)
    offset = data.numel() - 400
    with pytest.raises(ShortReadError) as e:
        read_into(path, offset, out, backend=backend)
    msg = str(e.value)
    assert str(path) in msg
    assert f"1000 bytes at offset {offset}" in msg
    assert f"ends at byte {data.numel()}" in msg
    assert "truncated" in msg
    with pytest.raises(ShortReadError, match="ends at byte"):
        read_into(path, data.numel() + 10, out, backend=backend)


@needs_native
def test_native_short_read_reports_bytes_read(blob):
    # below the fstat check: the C reader itself stops at the end of the file
    path, data = blob
    out = torch.zeros(5 * 2**20, dtype=torch.uint8)
    offset = data.numel() - 3 * 2**20
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(_native.ShortReadError, match="end of file") as e:
            _native.pread(fd, offset, out.data_ptr(), out.numel(), 4)
    finally:
        os.close(fd)
    assert e.value.n_read == 3 * 2**20
    assert e.value.status == "WANRT_ERR_SHORT_READ"
    assert torch.equal(out[: 3 * 2**20], data[offset:])


@needs_native
def test_native_io_error_is_reported(blob, tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: pread fails with EISDIR
    try:
        with pytest.raises(_native.NativeError, match="WANRT_ERR_IO.*read failed at byte 0"):
            _native.pread(fd, 0, torch.empty(10, dtype=torch.uint8).data_ptr(), 10, 1)
    finally:
        os.close(fd)


def test_bad_arguments_are_refused(blob):
    path, _ = blob
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        read_into(path, 0, torch.empty(4, 4, dtype=torch.uint8).t())
    with pytest.raises(ValueError, match="offset"):
        read_into(path, -1, torch.empty(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="threads"):
        read_into(path, 0, torch.empty(4, dtype=torch.uint8), threads=0)
    with pytest.raises(FileNotFoundError):
        read_into(path.with_name("missing.bin"), 0, torch.empty(4, dtype=torch.uint8))
    assert read_into(path, 0, torch.empty(0)).numel() == 0


@pytest.mark.gpu
def test_pinned_staging_buffer(blob):
    path, data = blob
    out = torch.empty(2**20, dtype=torch.uint8, pin_memory=True)
    read_into(path, 77, out)
    assert torch.equal(out, data[77 : 77 + 2**20])

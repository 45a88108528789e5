"""The C ABI of csrc/wanrt.h, one Python function per C function.

Pointers are passed as integers (`tensor.data_ptr()`), streams as the raw handle
(`torch.cuda.current_stream().cuda_stream`). A status other than WANRT_OK raises
`NativeError` carrying the C library's own message.

Loading never raises: a library that was not built or does not load is recorded
with the reason (`load_error()`, `cuda_load_error()`), the pure Python twins take
over, and one warning says so when the C library is missing.
`python -m quant.diagnose` prints the whole picture.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType

CORE_FUNCTIONS = (
    "wanrt_last_error",
    "wanrt_build_info",
    "wanrt_cpu_count",
    "wanrt_quantize",
    "wanrt_dequantize",
    "wanrt_pread",
)
CUDA_FUNCTIONS = (
    "wanrt_cuda_last_error",
    "wanrt_cuda_build_info",
    "wanrt_cuda_runtime_version",
    "wanrt_cuda_driver_version",
    "wanrt_cuda_device_count",
    "wanrt_cuda_kernel_arch",
    "wanrt_cuda_fill_u8",
    "wanrt_cuda_dequantize",
    "wanrt_cuda_layer_norm_mul_add",
    "wanrt_cuda_rms_norm_rope",
    "wanrt_cuda_gated_add",
)

REBUILD_HINT = "reinstall with a C compiler present (`pip install -e . -v` shows the build log)"


class NativeError(RuntimeError):
    """A native function returned an error status."""

    def __init__(self, function: str, status: str, message: str):
        super().__init__(f"{function}: {status}: {message}")
        self.function = function
        self.status = status
        self.message = message


class ShortReadError(NativeError):
    """wanrt_pread reached the end of the file; `n_read` bytes arrived before it."""

    def __init__(self, function: str, status: str, message: str, n_read: int):
        super().__init__(function, status, message)
        self.n_read = n_read


class NativeUnavailable(RuntimeError):
    """The native library needed for a call is not loaded."""


def _load(module: str, functions: tuple[str, ...]) -> tuple[ModuleType | None, str | None]:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None, f"{module} was not built"
        return None, f"{module} failed to load: {e}"
    except ImportError as e:  # present but unloadable: a missing symbol or library
        return None, f"{module} failed to load: {e}"
    except Exception as e:  # a broken shared object can raise anything on import
        return None, f"{module} failed to load: {type(e).__name__}: {e}"
    missing = [f for f in functions if not hasattr(mod.lib, f)]
    if missing:
        return None, f"{module} is a stale build without {', '.join(missing)}"
    return mod, None


_core, _core_error = _load("quant._wanrt_c", CORE_FUNCTIONS)
_cuda, _cuda_error = _load("quant._wanrt_cuda", CUDA_FUNCTIONS)

if _core is None:
    warnings.warn(
        f"wanrt: native codecs unavailable ({_core_error}); using the pure Python twins, which are "
        f"much slower. To fix, {REBUILD_HINT}; `python -m quant.diagnose` shows details.",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    """Whether the C library is loaded."""
    return _core is not None


def cuda_available() -> bool:
    """Whether the CUDA library is loaded (a usable device is another matter)."""
    return _cuda is not None


def load_error() -> str | None:
    return _core_error


def cuda_load_error() -> str | None:
    return _cuda_error


def library_path() -> str | None:
    return _core.__file__ if _core else None


def cuda_library_path() -> str | None:
    return _cuda.__file__ if _cuda else None


def _core_lib():
    if _core is None:
        raise NativeUnavailable(f"the wanrt C library is not available: {_core_error}; to fix, {REBUILD_HINT}")
    return _core.ffi, _core.lib


def _cuda_lib():
    if _cuda is None:
        raise NativeUnavailable(
            f"the wanrt CUDA library is not available: {_cuda_error}; to fix, reinstall where nvcc is found "
            "(CUDA_HOME or PATH)"
        )
    return _cuda.ffi, _cuda.lib


def _raise(ffi, function: str, status: int, message: str, error=NativeError, **extra) -> None:
    name = ffi.string(ffi.cast("wanrt_status", status))
    raise error(function, name, message, **extra)


def _ptr(ffi, address: int):
    return ffi.cast("void *", address)


# ------------------------------------------------------------------ C library


def last_error() -> str:
    ffi, lib = _core_lib()
    return ffi.string(lib.wanrt_last_error()).decode()


def build_info() -> str:
    ffi, lib = _core_lib()
    return ffi.string(lib.wanrt_build_info()).decode()


def cpu_count() -> int:
    _, lib = _core_lib()
    return lib.wanrt_cpu_count()


def quantize(type_: int, src_type: int, src: int, dst: int, n_rows: int, n_per_row: int, n_threads: int) -> None:
    ffi, lib = _core_lib()
    status = lib.wanrt_quantize(type_, src_type, _ptr(ffi, src), _ptr(ffi, dst), n_rows, n_per_row, n_threads)
    if status:
        _raise(ffi, "wanrt_quantize", status, last_error())


def dequantize(type_: int, src: int, dst_type: int, dst: int, n_rows: int, n_per_row: int, n_threads: int) -> None:
    ffi, lib = _core_lib()
    status = lib.wanrt_dequantize(type_, _ptr(ffi, src), dst_type, _ptr(ffi, dst), n_rows, n_per_row, n_threads)
    if status:
        _raise(ffi, "wanrt_dequantize", status, last_error())


def pread(fd: int, offset: int, dst: int, nbytes: int, n_threads: int) -> int:
    """Bytes read (always nbytes: a short read raises ShortReadError with n_read)."""
    ffi, lib = _core_lib()
    n_read = ffi.new("uint64_t *")
    status = lib.wanrt_pread(fd, offset, _ptr(ffi, dst), nbytes, n_threads, n_read)
    if status == lib.WANRT_ERR_SHORT_READ:
        _raise(ffi, "wanrt_pread", status, last_error(), ShortReadError, n_read=int(n_read[0]))
    if status:
        _raise(ffi, "wanrt_pread", status, last_error())
    return int(n_read[0])


# --------------------------------------------------------------- CUDA library


def cuda_last_error() -> str:
    ffi, lib = _cuda_lib()
    return ffi.string(lib.wanrt_cuda_last_error()).decode()


def cuda_build_info() -> str:
    ffi, lib = _cuda_lib()
    return ffi.string(lib.wanrt_cuda_build_info()).decode()


def _cuda_int(function: str) -> int:
    ffi, lib = _cuda_lib()
    value = ffi.new("int *")
    status = getattr(lib, function)(value)
    if status:
        _raise(ffi, function, status, cuda_last_error())
    return int(value[0])


def cuda_runtime_version() -> int:
    return _cuda_int("wanrt_cuda_runtime_version")


def cuda_driver_version() -> int:
    return _cuda_int("wanrt_cuda_driver_version")


def cuda_device_count() -> int:
    return _cuda_int("wanrt_cuda_device_count")


def cuda_kernel_arch(device: int) -> tuple[int, int]:
    """(SASS version, PTX version) of the kernel image `device` runs, e.g. (90, 90)."""
    ffi, lib = _cuda_lib()
    binary, ptx = ffi.new("int *"), ffi.new("int *")
    status = lib.wanrt_cuda_kernel_arch(device, binary, ptx)
    if status:
        _raise(ffi, "wanrt_cuda_kernel_arch", status, cuda_last_error())
    return int(binary[0]), int(ptx[0])


def cuda_fill_u8(device: int, dst: int, value: int, nbytes: int, stream: int) -> None:
    ffi, lib = _cuda_lib()
    status = lib.wanrt_cuda_fill_u8(device, _ptr(ffi, dst), value, nbytes, _ptr(ffi, stream))
    if status:
        _raise(ffi, "wanrt_cuda_fill_u8", status, cuda_last_error())


def cuda_dequantize(device: int, type_: int, src: int, dst_type: int, dst: int, n_elements: int, stream: int) -> None:
    ffi, lib = _cuda_lib()
    status = lib.wanrt_cuda_dequantize(
        device, type_, _ptr(ffi, src), dst_type, _ptr(ffi, dst), n_elements, _ptr(ffi, stream)
    )
    if status:
        _raise(ffi, "wanrt_cuda_dequantize", status, cuda_last_error())


def cuda_layer_norm_mul_add(
    device: int, x_type: int, x: int, out_type: int, out: int, n_rows: int, dim: int, mul: int, add: int,
    row_stride: int, eps: float, round_norm: bool, stream: int,
) -> None:
    ffi, lib = _cuda_lib()
    status = lib.wanrt_cuda_layer_norm_mul_add(
        device, x_type, _ptr(ffi, x), out_type, _ptr(ffi, out), n_rows, dim, _ptr(ffi, mul), _ptr(ffi, add),
        row_stride, eps, int(round_norm), _ptr(ffi, stream),
    )
    if status:
        _raise(ffi, "wanrt_cuda_layer_norm_mul_add", status, cuda_last_error())


def cuda_rms_norm_rope(
    device: int, type_: int, x: int, n_rows: int, dim: int, weight: int, eps: float, rot: int, n_rot: int,
    head_dim: int, stream: int,
) -> None:
    ffi, lib = _cuda_lib()
    status = lib.wanrt_cuda_rms_norm_rope(
        device, type_, _ptr(ffi, x), n_rows, dim, _ptr(ffi, weight), eps, _ptr(ffi, rot), n_rot, head_dim,
        _ptr(ffi, stream),
    )
    if status:
        _raise(ffi, "wanrt_cuda_rms_norm_rope", status, cuda_last_error())


def cuda_gated_add(
    device: int, x: int, y_type: int, y: int, gate: int, gate_row_stride: int, n_rows: int, dim: int, stream: int
) -> None:
    """gate 0: x += y."""
    ffi, lib = _cuda_lib()
    status = lib.wanrt_cuda_gated_add(
        device, _ptr(ffi, x), y_type, _ptr(ffi, y), _ptr(ffi, gate), gate_row_stride, n_rows, dim, _ptr(ffi, stream)
    )
    if status:
        _raise(ffi, "wanrt_cuda_gated_add", status, cuda_last_error())


# ------------------------------------------------------- CUDA usability, once

_cuda_ready: bool | None = None
_cuda_unready_reason: str | None = None


def cuda_ready() -> bool:
    """Whether the CUDA library is loaded and its runtime sees a device (checked once;
    this starts the CUDA runtime, so it is asked only when a CUDA tensor is decoded)."""
    global _cuda_ready, _cuda_unready_reason
    if _cuda_ready is None:
        if _cuda is None:
            _cuda_ready, _cuda_unready_reason = False, _cuda_error
        else:
            try:
                _cuda_ready = cuda_device_count() > 0
                _cuda_unready_reason = None if _cuda_ready else "the CUDA runtime sees no device"
            except NativeError as e:
                _cuda_ready, _cuda_unready_reason = False, str(e)
    return _cuda_ready


def cuda_unready_reason() -> str | None:
    cuda_ready()
    return _cuda_unready_reason

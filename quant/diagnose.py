"""What of wanrt's native build is here: `python -m quant.diagnose`.

Prints which libraries were built and loaded (and why not), how they were
compiled, which GPU architectures the CUDA library carries, and whether each GPU
can run them. Exits with status 1 when the C library is missing.
"""
from __future__ import annotations

import platform
import sys

from . import _native


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _core_report() -> list[str]:
    if not _native.available():
        return [
            f"C library     NOT LOADED: {_native.load_error()}",
            "              the pure Python codecs and file reader are used instead (much slower)",
            f"              fix: {_native.REBUILD_HINT}",
        ]
    return [
        f"C library     loaded from {_native.library_path()}",
        f"              {_native.build_info()}",
        f"              {_native.cpu_count()} CPUs for codec and file-reading threads",
    ]


def _device_lines(count: int) -> list[str]:
    import torch

    torch_cuda = torch.cuda.is_available()
    lines = []
    for i in range(count):
        name = torch.cuda.get_device_name(i) if torch_cuda else "?"
        cap = "sm_%d%d" % torch.cuda.get_device_capability(i) if torch_cuda else "sm_?"
        try:
            binary, ptx = _native.cuda_kernel_arch(i)
            image = f"runs SASS sm_{binary}" if binary else f"runs PTX compute_{ptx} (JIT-compiled)"
        except _native.NativeError as e:
            image = f"CANNOT RUN the kernels: {e.message}"
        lines.append(f"              device {i}: {name} ({cap}): {image}")
    return lines


def _cuda_report() -> list[str]:
    if not _native.cuda_available():
        return [
            f"CUDA library  not loaded: {_native.cuda_load_error()}",
            "              CUDA weights are decoded with torch instead (same values)",
            "              to build it: have nvcc (CUDA_HOME or PATH) when installing; "
            "WANRT_CUDA_ARCHS picks the GPUs",
        ]
    lines = [
        f"CUDA library  loaded from {_native.cuda_library_path()}",
        f"              {_native.cuda_build_info()}",
        f"              CUDA runtime {_cuda_version(_native.cuda_runtime_version())}",
    ]
    try:
        driver = _native.cuda_driver_version()
        lines.append(f"              CUDA driver supports {_cuda_version(driver)}" if driver else "              no CUDA driver")
        count = _native.cuda_device_count()
        lines.append(f"              {count} device(s)")
        lines += _device_lines(count)
    except _native.NativeError as e:
        lines.append(f"              NOT USABLE here: {e.message}")
        lines.append("              CUDA weights are decoded with torch instead (same values)")
    return lines


def _torch_report() -> list[str]:
    import torch

    cuda = torch.version.cuda or "none"
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"torch         {torch.__version__} (CUDA {cuda}, {devices} device(s) visible)"]


def report() -> str:
    lines = [
        "wanrt native build",
        f"python        {platform.python_version()} on {platform.platform()}",
        *_core_report(),
        *_cuda_report(),
        *_torch_report(),
    ]
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0 if _native.available() else 1


if __name__ == "__main__":
    sys.exit(main())

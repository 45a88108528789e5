"""Memory budgets and the measurements behind them: what the GPU and the host can give.

A VRAM budget means what the driver shows for this process (nvidia-smi), not what
torch's allocator holds: the CUDA context and the kernels of cuBLAS/cuDNN live outside
the allocator (0.5-1 GiB), so they are measured once and charged to every plan.

    parse_memory("auto") / parse_memory("7.5") / parse_memory(8)   -> AUTO or bytes
    DeviceInfo.probe(device)        free/total memory and the overhead outside the allocator
    host_available()                bytes the host can still give (MemAvailable)
    rss_bytes(), peak_rss_bytes()   this process's resident set, now and at its peak
    pinned_bytes()                  host memory this package has page-locked
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass

import torch

GiB = 1 << 30
MiB = 1 << 20

AUTO = "auto"

# When the overhead outside torch's allocator cannot be measured (no GPU at hand, or
# CUDA already busy): a CUDA 12/13 context plus lazily loaded cuBLAS/cuDNN kernels.
DEFAULT_DEVICE_OVERHEAD = int(0.9 * GiB)
# What `--vram auto` leaves free: other processes' growth, driver-side allocations.
AUTO_VRAM_MARGIN = int(0.5 * GiB)
# What `--ram auto` leaves to the rest of the process (python, torch, the VAE, text).
AUTO_RAM_MARGIN = 3 * GiB

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|b)?\s*$", re.IGNORECASE)


def parse_memory(value, what: str = "--vram") -> str | int | None:
    """`"auto"` -> AUTO; a number or a string like "8", "7.5", "7.5GiB", "6144MiB",
    "123456B" -> bytes (a bare number is GiB); None -> None. Raises ValueError with the
    expected forms."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), "gib"
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ValueError(f"{what} expects 'auto' or a size in GiB such as 8, 7.5 or 6144MiB; got {value!r}")
        number, unit = float(m.group(1)), (m.group(2) or "gib").lower()
    scale = {"m": MiB, "b": 1}.get(unit[0], GiB)
    if number <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return int(number * scale)


def fmt_gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


# -- device ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """What the planner needs to know about the GPU, measured once.

    `overhead` is the memory the driver holds for this process outside torch's caching
    allocator (context, module images of cuBLAS/cuDNN, their handles), measured after a
    small bf16 matmul and attention have loaded those kernels. `free` is what the driver
    can still give; `reserved`/`allocated` are torch's allocator totals at probe time
    (tensors already allocated, e.g. a VAE kept on the GPU, stay out of the plan's room);
    `allocator_limit` is torch's per-process cap (set_per_process_memory_fraction)."""

    name: str
    total: int
    free: int
    reserved: int
    allocated: int
    overhead: int
    overhead_source: str  # "measured" or "assumed (...)"
    allocator_limit: int | None = None

    @classmethod
    def probe(cls, device: torch.device | str | None = None) -> "DeviceInfo":
        device = torch.device(device or "cuda")
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("DeviceInfo.probe needs a CUDA device")
        idx = device.index if device.index is not None else torch.cuda.current_device()
        others = _nvml_used_by_others(idx) if not torch.cuda.is_initialized() else None
        _warm_up_libraries(torch.device("cuda", idx))
        free, total = torch.cuda.mem_get_info(idx)
        reserved = torch.cuda.memory_reserved(idx)
        allocated = torch.cuda.memory_allocated(idx)
        outside = total - free - reserved
        if others is not None:
            overhead, source = max(0, outside - others), "measured"
        elif outside < 3 * GiB:
            # The GPU is ours alone (or nearly): everything outside the allocator is ours.
            overhead, source = outside, "measured"
        else:
            overhead, source = DEFAULT_DEVICE_OVERHEAD, "assumed (another process uses the GPU)"
        limit = None
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if get_fraction is not None:
            fraction = float(get_fraction(idx))
            limit = int(fraction * total) if fraction < 1.0 else None
        return cls(torch.cuda.get_device_name(idx), total, free, reserved, allocated, overhead, source, limit)

    def room(self, vram: str | int) -> int:
        """Bytes the plan may take in torch's allocator under the budget `vram` (AUTO or
        bytes of driver-visible memory for the whole process)."""
        available = self.free + self.reserved - self.allocated
        if self.allocator_limit is not None:
            available = min(available, self.allocator_limit - self.allocated)
        if vram == AUTO:
            return available - AUTO_VRAM_MARGIN
        return min(int(vram) - self.overhead - self.allocated, available)


def _warm_up_libraries(device: torch.device) -> None:
    """Load cuBLAS and attention kernels of the kind a DiT forward uses (large bf16 tiles,
    head size 128) so that their driver memory is counted (~100 MB of temporaries)."""
    with torch.cuda.device(device):
        a = torch.zeros(4096, 4096, device=device, dtype=torch.bfloat16)
        (a @ a).sum().item()
        del a
        from runtime.attention import sdpa  # the backend order the models use

        q = torch.zeros(1, 4096, 8, 128, device=device, dtype=torch.bfloat16)
        sdpa(q, q, q).sum().item()
        del q


def _nvml_used_by_others(index: int) -> int | None:
    """Driver memory in use on the device before this process touched it, via NVML;
    None when NVML is not available."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(_physical_index(index))
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML present but refusing (containers, sandboxes): no measurement
        return None


def _physical_index(index: int) -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return index
    items = [v.strip() for v in visible.split(",") if v.strip()]
    if index < len(items) and items[index].isdigit():
        return int(items[index])
    raise LookupError("CUDA_VISIBLE_DEVICES does not name plain indices")


def driver_used(device: torch.device | int | None = None) -> int:
    """Bytes in use on the device as the driver reports it (all processes)."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free


# -- host -----------------------------------------------------------------------------


def _proc_kib(path: str, key: str) -> int | None:
    """Bytes of a `key:  <n> kB` line of a /proc file (None where there is none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_available() -> int:
    """Bytes the host can still give without swapping (MemAvailable); psutil's figure
    where /proc is absent."""
    n = _proc_kib("/proc/meminfo", "MemAvailable")
    if n is not None:
        return n
    import psutil  # not a dependency: only non-Linux hosts get here

    return int(psutil.virtual_memory().available)


def rss_bytes() -> int:
    """Resident set of this process now (0 where /proc is absent)."""
    return _proc_kib("/proc/self/status", "VmRSS") or 0


def peak_rss_bytes() -> int:
    """Peak resident set since start or since the last `reset_peak_rss()`."""
    return _proc_kib("/proc/self/status", "VmHWM") or 0


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux: clear_refs 5). False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_pinned_lock = threading.Lock()
_pinned_total = 0


def _count_pinned(delta: int) -> None:
    global _pinned_total
    with _pinned_lock:
        _pinned_total += delta


def pinned_bytes() -> int:
    """Host bytes currently page-locked by this package (pinned arenas and staging)."""
    return _pinned_total

"""Softmax attention for the DiT: torch SDPA with the fastest backend of the device, or an
opt-in kernel (SageAttention) chosen by name.

Layout everywhere is the official one: q [B, Lq, N, D], k and v [B, Lk, N, D]. `k_lens`
gives, per sample, how many leading keys are real (the official flash-attn varlen call):
padding keys are excluded and every query row, padding included, is computed. Samples
of equal length take one unmasked call (the fast path); a sample with padding is run
alone on its real keys, which needs no mask and so keeps the fast kernels.

Choose the kernel with `set_kernel("sdpa" | "sage")` or the WANRT_ATTENTION environment
variable; `register_kernel(name, fn)` adds another (fn(q, k, v) -> out, [B, L, N, D]).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_BACKEND_NAMES = {
    SDPBackend.CUDNN_ATTENTION: "cudnn",
    SDPBackend.FLASH_ATTENTION: "flash",
    SDPBackend.EFFICIENT_ATTENTION: "mem-efficient",
    SDPBackend.MATH: "math",
}


def sdpa_priority(device: torch.device) -> list[SDPBackend]:
    """Backends in the order to try them. On Hopper and newer, cuDNN's fused attention
    is the fastest (1.6x flash at 32k tokens on an H200); elsewhere flash leads."""
    if device.type != "cuda":
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


_chosen_backend: dict[tuple, str] = {}


def sdpa_backend_name(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Which SDPA backend runs unmasked attention for this device, dtype and head size
    (found once by trying each in priority order on a small probe)."""
    key = (device.type, device.index, dtype, head_dim)
    if key not in _chosen_backend:
        probe = torch.zeros(1, 1, 64, head_dim, device=device, dtype=dtype)
        name = "default"
        for backend in sdpa_priority(device):
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(probe, probe, probe)
            except RuntimeError:
                continue
            name = _BACKEND_NAMES[backend]
            break
        _chosen_backend[key] = name
    return _chosen_backend[key]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention, [B, L, N, D] in and out, scale 1/sqrt(D)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if q.device.type == "cuda":
        with sdpa_kernel(sdpa_priority(q.device), set_priority=True):
            out = F.scaled_dot_product_attention(qt, kt, vt)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt)
    return out.transpose(1, 2)


def sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention (8-bit q/k, installed separately as `sageattention`)."""
    from sageattention import sageattn  # imported here: optional dependency

    dtype = q.dtype
    half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q, k, v = (t.to(half).contiguous() for t in (q, k, v))  # its kernels want dense inputs
    out = sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=1.0 / math.sqrt(q.shape[-1]))
    return out.to(dtype)


KERNELS: dict[str, Kernel] = {"sdpa": sdpa, "sage": sage}


def register_kernel(name: str, fn: Kernel) -> None:
    KERNELS[name] = fn


def resolve_kernel(name: str | None = None) -> str:
    """The kernel name to use: `name`, else WANRT_ATTENTION, else "sdpa"; checked now so a
    typo or a missing package is reported before a long run starts."""
    name = name or os.environ.get("WANRT_ATTENTION") or "sdpa"
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; expected one of {', '.join(sorted(KERNELS))}")
    if name == "sage":
        try:
            import sageattention  # noqa: F401
        except ImportError:
            raise ValueError(
                "attention kernel 'sage' needs the sageattention package: pip install sageattention "
                "(or use the default 'sdpa')"
            ) from None
    return name


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_lens: Sequence[int] | None = None,
    *,
    kernel: str = "sdpa",
    heads_per_chunk: int | None = None,
) -> torch.Tensor:
    """out [B, Lq, N, D] in q's dtype. `k_lens` (python ints) limits each sample's keys;
    `heads_per_chunk` bounds the working set of kernels whose memory grows with heads."""
    fn = KERNELS[kernel]
    B, Lq, N, D = q.shape
    Lk = k.shape[1]
    full = k_lens is None or all(n == Lk for n in k_lens)
    step = N if heads_per_chunk is None else max(1, min(N, heads_per_chunk))
    if full and step == N:
        return fn(q, k, v)
    out = torch.empty_like(q)
    samples = [(slice(0, B), Lk)] if full else [(slice(i, i + 1), int(n)) for i, n in enumerate(k_lens)]
    for rows, n_keys in samples:
        for h in range(0, N, step):
            heads = slice(h, h + step)
            out[rows, :, heads] = fn(q[rows, :, heads], k[rows, :n_keys, heads], v[rows, :n_keys, heads])
    return out

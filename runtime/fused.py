"""Fused elementwise stages of the DiT block: CUDA kernels with their torch twins.

Around its matmuls a block normalizes, modulates, rotates and adds in float32 (the
rope in float64), as the official code does. Op by op in torch, that work reads and
writes each activation many times over: 23 of the 88 ms of a 480p block on an H200
(bench/dit_profile.py). Each kernel here does one stage in a single pass over memory,
4 ms in all, and the block takes 69-72 ms:

    modulated_layer_norm   out = LN(x)·(1 + scale) + shift     (LN1, LN2, the head)
    affine_layer_norm      out = LN(x)·weight + bias           (norm3)
    rms_norm_rope_         x = rope(RMSNorm(x)·weight)         (q and k), in place
    gated_add_             x += y·gate, or x += y              (the residual updates)

Each function runs the kernel when the CUDA library is loaded and every tensor is
dense, on one CUDA device, in a dtype it takes (float32 or bfloat16; the modulation
and norm vectors float32), and its torch twin otherwise: the reference, the code the
block ran before the kernels. Kernel and twin do the same operations in the same
precision with the same roundings; they differ where a float32 sum over a row is added
up in another order and a last bit moves, which a bf16 rounding then carries into at
most 4 values in 10^5 (one bf16 step), and in the gated add, where the kernel rounds y·gate
before adding as the official `x + y * gate` does and torch's addcmul_ rounds once
(15% of the float32 results one ulp apart).

`WANRT_FUSED=0` in the environment, or `set_enabled(False)`, keeps to the twins.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from quant import _native
from quant.ggml_types import GGMLType

from .rope import rotate

_TYPES = {torch.float32: GGMLType.F32, torch.bfloat16: GGMLType.BF16}
# The norm kernels keep a row in one thread block; rows up to this long always fit.
MAX_ROW = 16384
_enabled = os.environ.get("WANRT_FUSED", "1") != "0"


def set_enabled(flag: bool) -> bool:
    """Use the kernels where they apply (True) or the torch twins only; returns the
    previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def enabled() -> bool:
    return _enabled


def takes(*tensors: torch.Tensor) -> bool:
    """Whether the kernels run on these activations: dense, on one CUDA device, float32
    or bfloat16, with the CUDA library ready. (They keep no temporaries, so callers
    need not split their work into chunks for them.)"""
    if not _enabled or not tensors or not tensors[0].is_cuda:
        return False
    device = tensors[0].device
    for t in tensors:
        if t.device != device or t.dtype not in _TYPES or not t.is_contiguous():
            return False
    return _native.cuda_ready()


def _vectors_fit(rows: int, dim: int, *vectors: torch.Tensor) -> bool:
    """float32 [dim] vectors, or [rows, dim] tables of one vector per row, all alike."""
    shape = vectors[0].shape
    return shape in ((dim,), (rows, dim)) and all(
        v.shape == shape and v.dtype == torch.float32 and v.is_contiguous() for v in vectors
    )


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _layer_norm_native(x, mul, add, eps: float, out, round_norm: bool) -> torch.Tensor:
    rows, dim = x.shape
    _native.cuda_layer_norm_mul_add(
        x.device.index, _TYPES[x.dtype], x.data_ptr(), _TYPES[out.dtype], out.data_ptr(), rows, dim,
        mul.data_ptr(), add.data_ptr(), 0 if mul.dim() == 1 else dim, eps, round_norm, _stream(x),
    )
    return out


def _layer_norm_fits(x, out, *vectors) -> bool:
    return (
        x.dim() == 2
        and out.shape == x.shape
        and x.shape[1] <= MAX_ROW
        and takes(x, out, *vectors)
        and _vectors_fit(*x.shape, *vectors)
    )


# ---- LayerNorms --------------------------------------------------------------------------


def modulated_layer_norm(
    x: torch.Tensor, scale1p: torch.Tensor, shift: torch.Tensor, eps: float, out: torch.Tensor
) -> torch.Tensor:
    """out = LN(x)·scale1p + shift over the rows of x [T, D] (scale1p = 1 + scale):
    LN without affine in float32, its result rounded to x's dtype when x is not
    float32 (as the official WanLayerNorm returns it), the modulation in float32;
    written into `out` [T, D] (float32 or bfloat16). scale1p and shift: float32 [D],
    or [T, D] per row."""
    if _layer_norm_fits(x, out, scale1p, shift):
        return _layer_norm_native(x, scale1p, shift, eps, out, round_norm=True)
    n = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    if x.dtype != torch.float32:
        n = n.to(x.dtype).float()
    return out.copy_(n.mul_(scale1p).add_(shift))


def affine_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out: torch.Tensor
) -> torch.Tensor:
    """out = LayerNorm(x) with weight and bias [D], all float32 math, into `out`."""
    w, b = weight.float(), bias.float()
    if _layer_norm_fits(x, out, w, b):
        return _layer_norm_native(x, w, b, eps, out, round_norm=False)
    return out.copy_(F.layer_norm(x.float(), x.shape[-1:], w, b, eps))


# ---- RMSNorm and rope --------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The official WanRMSNorm over the last dim: x·rsqrt(mean(x²) + eps) in float32,
    rounded to x's dtype, times the weight promoted to float32 (a float32 result)."""
    v = x.float()
    n = v * torch.rsqrt(v.pow(2).mean(dim=-1, keepdim=True) + eps)
    return n.to(x.dtype) * weight.float()


def rms_norm_rope_(
    x: torch.Tensor, weight: torch.Tensor, eps: float, rot: torch.Tensor | None = None
) -> torch.Tensor:
    """In place over the rows of x [T, D]: x = rms_norm(x), and with `rot` (complex128
    [n, head_dim/2], n <= T) its first n rows rotated as the official rope_apply does:
    the heads' value pairs times rot, in float64, rounded to float32 then to x's
    dtype. Rows from n on (padding) are only normalized."""
    T, D = x.shape
    n = 0 if rot is None else rot.shape[0]
    if n > T:
        raise ValueError(f"{n} rotations for {T} rows")
    w = weight.float()
    if (
        D <= MAX_ROW
        and takes(x, w)
        and w.shape == (D,)
        and (n == 0 or (rot.dtype == torch.complex128 and rot.is_contiguous()))
    ):
        head_dim = 2 * rot.shape[1] if n else 0
        rot_ptr = torch.view_as_real(rot).data_ptr() if n else 0
        _native.cuda_rms_norm_rope(
            x.device.index, _TYPES[x.dtype], x.data_ptr(), T, D, w.data_ptr(), eps, rot_ptr, n, head_dim, _stream(x)
        )
        return x
    y = rms_norm(x, w, eps)
    if n:
        x[:n] = rotate(y[:n].view(n, -1, 2 * rot.shape[1]), rot).view(n, D)
    if n < T:
        x[n:] = y[n:]
    return x


# ---- residual updates --------------------------------------------------------------------


def gated_add_(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """x += y·gate (gate None: x += y) in float32, in place: x float32 [T, D], y [T, D]
    float32 or bfloat16, gate float32 [D] or [T, D]."""
    T, D = x.shape
    if (
        x.dtype == torch.float32
        and y.shape == x.shape
        and takes(x, y, *(() if gate is None else (gate,)))
        and (gate is None or _vectors_fit(T, D, gate))
    ):
        gate_ptr, gate_stride = (0, 0) if gate is None else (gate.data_ptr(), 0 if gate.dim() == 1 else D)
        _native.cuda_gated_add(
            x.device.index, x.data_ptr(), _TYPES[y.dtype], y.data_ptr(), gate_ptr, gate_stride, T, D, _stream(x)
        )
        return x
    return x.add_(y) if gate is None else x.addcmul_(y, gate)

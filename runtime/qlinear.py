"""A linear layer whose weight stays in its stored format until the matmul.

The weight is decoded right before use into a reusable scratch buffer (one per device
and slot, shared by every layer of a model), so a forward never holds more than one or
two dense copies of weights that live quantized: q8_0/q4_0/... GGUF blocks, f16/bf16,
or ComfyUI's scaled fp8 (float8_e4m3fn values times a scale).

LoRAs never rewrite the stored weight. Their factors are three more buffers of the
layer (so they move with it): `lora_down` [R, in] and `lora_up` [out, R], the factors of
every LoRA on this layer stacked along the rank, and `lora_scale` [R] float32, the
strength · alpha / rank of the LoRA each rank row belongs to. Each call applies them
one of two ways, both exact to float32 rounding:
  merge: W' = W + up·diag(scale)·down added to the decoded weight right after decoding
         (float32 product), before the one matmul;
  side:  y = x·Wᵀ + b + ((x·downᵀ)·scale)·upᵀ, two thin matmuls beside the big one.
`lora_mode` picks: "merge", "side", or "auto" (default), whichever does fewer
multiply-adds for this call: the merge costs out·in·R, the side path tokens·(in+out)·R.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant.ggml_types import GGMLType, row_nbytes
from quant.packed import PackedTensor

from .dequant import decode

FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# Packed weights are decoded this many values at a time.
DECODE_CHUNK_VALUES = 1 << 24

LORA_MODES = ("auto", "merge", "side")

# torch.mm(..., out_dtype=) (CUDA, torch >= 2.8): a 16-bit GEMM with a float32 result.
MM_FLOAT32_OUT = hasattr(torch.ops.aten.mm, "dtype")


class ScratchPool:
    """Byte buffers reused for decoded weights, keyed by (device, slot), grown on demand.

    `limit_bytes` caps what one decode may take: a larger weight is decoded and applied
    in row chunks, so a few oversized layers (the time projection: 6·dim x dim) do not
    set the size of the buffer every layer shares. Uses on one CUDA stream are ordered,
    so a buffer can be overwritten as soon as the next kernel is queued."""

    def __init__(self, limit_bytes: int | None = None):
        self.limit_bytes = limit_bytes
        self._buffers: dict[tuple[torch.device, int], torch.Tensor] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        key = (torch.device(device), slot)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            self._buffers.pop(key, None)  # free the old one before growing
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._buffers[key] = buf
        return buf[:nbytes].view(dtype)

    def nbytes(self, device: torch.device | None = None) -> int:
        return sum(b.numel() for (d, _), b in self._buffers.items() if device is None or d == torch.device(device))

    def clear(self) -> None:
        self._buffers.clear()


def attach_scratch(module: nn.Module, pool: ScratchPool | None) -> None:
    """Make every QLinear inside `module` decode into `pool`."""
    for m in module.modules():
        if isinstance(m, QLinear):
            m.scratch = pool


class QLinear(nn.Module):
    """y = x·Wᵀ + b. `weight` is a registered buffer holding a float tensor [out, in]
    (ggml_type None; fp8 with a `weight_scale`), or the raw uint8 bytes of a packed
    tensor; replacing the buffer (e.g. with a view into a streaming slot) is all it
    takes to move it. `bias` and `weight_scale` are buffers too."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.ggml_type: GGMLType | None = None
        self.scratch: ScratchPool | None = None
        # device="meta" builds a shell whose buffers a loader fills in later.
        self.register_buffer("weight", torch.empty(out_features, in_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("weight_scale", None)
        self.register_buffer("lora_down", None)
        self.register_buffer("lora_up", None)
        self.register_buffer("lora_scale", None)
        self.lora_mode = "auto"
        self.lora_alpha: float | None = None  # the scale when every rank row has the same one

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def set_weight(self, weight: torch.Tensor | PackedTensor, scale: torch.Tensor | None = None) -> None:
        """A dense tensor [out, in], a PackedTensor, or fp8 values with their `scale`
        (a scalar, or one per output row) as ComfyUI's scaled fp8 files store them."""
        shape = self.shape
        if tuple(weight.shape) != shape:
            raise ValueError(f"weight of shape {list(weight.shape)} given to a linear of shape {list(shape)}")
        if isinstance(weight, PackedTensor):
            if scale is not None:
                raise ValueError("a scale only applies to fp8 weights")
            self.ggml_type, self.weight, self.weight_scale = weight.ggml_type, weight.data, None
            return
        if (scale is not None) != (weight.dtype in FP8_TYPES):
            raise ValueError(f"{weight.dtype} weight {'needs' if scale is None else 'takes no'} scale")
        if scale is not None:
            scale = scale.to(torch.float32)
            if scale.numel() == self.out_features and scale.numel() != 1:
                scale = scale.reshape(self.out_features, 1)
            elif scale.numel() == 1:
                scale = scale.reshape(())
            else:
                raise ValueError(f"fp8 scale of shape {list(scale.shape)} fits neither one scale nor one per row")
        self.ggml_type, self.weight, self.weight_scale = None, weight, scale

    @property
    def stored_dtype(self) -> torch.dtype | None:
        """The dtype of a dense weight; None when it is packed."""
        return self.weight.dtype if self.ggml_type is None else None

    def _decode_rows(self, r0: int, r1: int, dtype: torch.dtype, out: torch.Tensor | None,
                     copy: bool = False) -> torch.Tensor:
        """Rows [r0, r1) as `dtype`, in `out` when given; `copy` forbids returning the
        stored tensor itself (the result is about to be written to)."""
        n_in = self.in_features
        if self.ggml_type is None:
            w = self.weight[r0:r1]
            if self.weight_scale is None:
                if w.dtype == dtype and not copy:
                    return w
                if out is None:
                    return w.to(dtype, copy=True)
                return decode(w, None, (r1 - r0, n_in), dtype, out=out)
            # fp8: value·scale computed in float32, rounded once to `dtype`.
            s = self.weight_scale if self.weight_scale.dim() == 0 else self.weight_scale[r0:r1]
            w = w.to(torch.float32).mul_(s)
            return w.to(dtype) if out is None else out.copy_(w)
        row = row_nbytes(self.ggml_type, n_in)
        if out is None:
            out = torch.empty(r1 - r0, n_in, dtype=dtype, device=self.weight.device)
        # A few million values per call bounds the decoder's float32 temporaries.
        step = max(1, DECODE_CHUNK_VALUES // n_in)
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            decode(self.weight[a * row : b * row], self.ggml_type, (b - a, n_in), dtype, out=out[a - r0 : b - r0])
        return out

    def _row_chunk(self, dtype: torch.dtype) -> int:
        pool = self.scratch
        if pool is None or pool.limit_bytes is None:
            return self.out_features
        per_row = self.in_features * torch.empty((), dtype=dtype).element_size()
        return max(1, min(self.out_features, pool.limit_bytes // per_row))

    def needs_decode(self, dtype: torch.dtype) -> bool:
        return not (self.ggml_type is None and self.weight_scale is None and self.weight.dtype == dtype)

    def dense_weight(self, dtype: torch.dtype, slot: int = 0, *, lora: bool = True) -> torch.Tensor:
        """The whole weight as `dtype` [out, in], with the LoRAs merged in unless `lora`
        is False: the stored tensor itself when it already is that dtype and nothing is
        merged, else a scratch view valid until the next decode into `slot`."""
        merge = lora and self.lora_down is not None
        if not merge and not self.needs_decode(dtype):
            return self.weight
        out = None
        if self.scratch is not None:
            out = self.scratch.take(self.weight_numel, dtype, self.weight.device, slot).view(self.shape)
        w = self._decode_rows(0, self.out_features, dtype, out, copy=merge)
        if merge:
            self._merge_lora_(w, 0, self.out_features)
        return w

    def decoded(self, dtype: torch.dtype) -> torch.Tensor:
        """A new tensor holding the stored weight (no LoRA) as `dtype`, outside the scratch."""
        return self._decode_rows(0, self.out_features, dtype, None, copy=True)

    @property
    def weight_numel(self) -> int:
        return self.out_features * self.in_features

    def forward(self, x: torch.Tensor, slot: int = 0) -> torch.Tensor:
        dtype = x.dtype
        b = None if self.bias is None else self.bias.to(dtype)
        has_lora = self.lora_down is not None
        merge = has_lora and self.lora_merges(x.numel() // self.in_features)
        chunk = self._row_chunk(dtype)
        if (not self.needs_decode(dtype) and not merge) or chunk >= self.out_features:
            y = F.linear(x, self.dense_weight(dtype, slot, lora=merge), b)
        else:
            # Too large for the shared scratch: decode and apply a block of output rows at a time.
            y = x.new_empty(*x.shape[:-1], self.out_features)
            for r0 in range(0, self.out_features, chunk):
                r1 = min(self.out_features, r0 + chunk)
                out = self.scratch.take((r1 - r0) * self.in_features, dtype, self.weight.device, slot).view(r1 - r0, -1)
                w = self._decode_rows(r0, r1, dtype, out, copy=merge)
                if merge:
                    self._merge_lora_(w, r0, r1)
                y[..., r0:r1] = F.linear(x, w, None if b is None else b[r0:r1])
        if has_lora and not merge:
            self.lora_side_(x, y)
        return y

    # -- LoRA ------------------------------------------------------------------------------

    def set_lora(self, down: torch.Tensor, up: torch.Tensor, scale: torch.Tensor, mode: str = "auto") -> None:
        """Factors [R, in] and [out, R] (float, any width) and the float32 scale of each of
        the R rank rows; they replace any earlier ones. The stored weight is not touched."""
        if mode not in LORA_MODES:
            raise ValueError(f"LoRA mode {mode!r}: expected one of {', '.join(LORA_MODES)}")
        r = down.shape[0]
        if down.shape != (r, self.in_features) or up.shape != (self.out_features, r) or scale.shape != (r,):
            raise ValueError(
                f"LoRA factors {list(down.shape)} / {list(up.shape)} / scale {list(scale.shape)} do not fit a "
                f"linear of shape {list(self.shape)}: expected [R, {self.in_features}] / [{self.out_features}, R] / [R]")
        scale = scale.to(torch.float32)
        values = scale.cpu()
        self.lora_alpha = float(values[0]) if bool((values == values[0]).all()) else None
        self.lora_down, self.lora_up, self.lora_scale = down, up, scale
        self.lora_mode = mode

    def clear_lora(self) -> None:
        self.lora_down = self.lora_up = self.lora_scale = None
        self.lora_alpha = None

    @property
    def lora_rank(self) -> int:
        return 0 if self.lora_down is None else int(self.lora_down.shape[0])

    def lora_merges(self, tokens: int) -> bool:
        """Whether a call on `tokens` input rows merges the LoRA into the decoded weight
        (else it runs the side path)."""
        if self.lora_mode == "merge":
            return True
        if self.lora_mode == "side":
            return False
        return tokens * (self.in_features + self.out_features) >= self.in_features * self.out_features

    def lora_beside(self, tokens: int) -> bool:
        """Whether a call on `tokens` rows runs a LoRA as the side path (False: no LoRA,
        or merged into the weight that `dense_weight` returns)."""
        return self.lora_down is not None and not self.lora_merges(tokens)

    def _merge_lora_(self, w: torch.Tensor, r0: int, r1: int) -> None:
        """w (rows [r0, r1) of the decoded weight) += up·diag(scale)·down, the products and
        their sum in float32, added to w and rounded once."""
        # A 16-bit GEMM into w would let cuBLAS round the sum to 16 bits before adding it
        # (16-32 ulp off on the H200); a GEMM with a float32 output keeps the tensor cores
        # (16-bit products are exact in its float32 accumulator) and the one rounding.
        alpha = self.lora_alpha
        float32_out = (alpha is not None and w.is_cuda and MM_FLOAT32_OUT
                       and self.lora_up.dtype == self.lora_down.dtype in (torch.bfloat16, torch.float16))
        down = self.lora_down if float32_out else self.lora_down.to(torch.float32)
        step = max(1, DECODE_CHUNK_VALUES // self.in_features)
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            rows = w[a - r0 : b - r0]
            if float32_out:
                rows.add_(torch.mm(self.lora_up[a:b], down, out_dtype=torch.float32), alpha=alpha)
                continue
            up = self.lora_up[a:b].to(torch.float32) * self.lora_scale
            if rows.dtype == torch.float32:
                rows.addmm_(up, down)
            else:
                rows += up @ down  # added in float32, rounded once to the weight's dtype

    def lora_side_(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y += ((x·downᵀ)·scale)·upᵀ in place, in x's dtype; y = this layer's output for x."""
        dtype = x.dtype
        t = F.linear(x.reshape(-1, self.in_features), self.lora_down.to(dtype))  # [tokens, R]
        alpha = self.lora_alpha
        if alpha is None:
            t.mul_(self.lora_scale.to(dtype))
        y.view(-1, self.out_features).addmm_(t, self.lora_up.to(dtype).t(), alpha=1.0 if alpha is None else alpha)
        return y

    def extra_repr(self) -> str:
        if self.ggml_type is not None:
            kind = self.ggml_type.name
        elif self.weight_scale is not None:
            kind = f"scaled {self.weight.dtype}"
        else:
            kind = str(self.weight.dtype)
        lora = f", lora rank {self.lora_rank} ({self.lora_mode})" if self.lora_down is not None else ""
        return f"in={self.in_features}, out={self.out_features}, weight={kind}, bias={self.bias is not None}{lora}"

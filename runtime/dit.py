"""The Wan 2.2 diffusion transformer (the official `WanModel`), over quantized weights.

    x ⊕ y ─Conv3d patches─► tokens [B, S, dim]           (S = seq_len, zero-padded)
    t ─sinusoid (float64)─► time_embedding ─► e ─► time_projection ─► e0 [6, dim]
    context ─pad to 512─► text_embedding ─► [B, 512, dim]
    40 × block:  x += gate_sa · SelfAttn(LN(x)·(1+scale_sa)+shift_sa, rope)
                 x += CrossAttn(LN3(x), context)
                 x += gate_ff · FFN(LN(x)·(1+scale_ff)+shift_ff)
    head: Linear(LN(x)·(1+scale)+shift) with (shift, scale) = head.modulation + e ─► unpatchify

Numerics follow the official code (WAN22.md 2.7): in a bfloat16 run the linears, the patch
Conv3d and attention run in bfloat16 while the sinusoid (float64), time embedding,
modulation, every norm, rope (float64), the gated residual updates (float32 residual
stream) and the whole head stay float32, as under the official bf16 autocast.

Memory is kept lean without changing a number. The official code computes the time
embedding per token ([B, L, 6, dim] float32, 4 GB at 480p); here it is computed once per
distinct timestep and applied to the runs of tokens that share it. Inside a block only
the float32 residual stream x [B, S, dim] and one sample's keys and values ([L, dim]
each) are whole: self-attention runs one sample at a time, its keys and values first
(so the rows of x that a query chunk then updates are not read again), then its queries
in chunks of `attn_chunk_tokens`, each chunk's rows of x updated once attended;
cross-attention, the FFN and the head go over token chunks too. Norms and rope work in
place or over small chunks, and every residual update is in place.

For a streaming engine: `model.blocks` is an nn.ModuleList; every weight of a block is a
buffer of that block (QLinear keeps packed bytes as its `weight` buffer), and the forward
calls each block through `model.run_block(i, block, x, ctx)`, which an engine may replace
(assign a callable to the instance attribute) to make block i resident before it runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .attention import attention, resolve_kernel
from .dit_config import DiTConfig
from .qlinear import QLinear, ScratchPool, attach_scratch
from .rope import RopeTable

# Elementwise float32/float64 work (norms, rope, modulation) runs over token chunks of
# about this many values, so its temporaries stay small next to the activations.
DEFAULT_CHUNK_VALUES = 1 << 23

# FFN chunks of this many tokens run as fast as the whole FFN (an A14B block at 480p and
# 720p on an H200, bench/dit.py --chunks) and hold a small part of its hidden layer.
# Attention is split only when memory asks for it (the planner): whole samples are the
# fastest, query chunks of 16384 cost 1-1.5%, of 8192 about 2%.
DEFAULT_FFN_CHUNK_TOKENS = 16384

# The head goes over chunks of this many tokens whatever the settings: its float32
# product (out 64 wide) is one that cuBLAS computes with other kernels, and other sums,
# for other row counts, so a chunk that followed a plan would make outputs depend on it.
HEAD_CHUNK_TOKENS = 8192

# Beyond this many runs of equal timesteps per sample, per-token tables are gathered
# instead of walking the runs (arbitrary per-token t; TI2V has two runs).
MAX_RUNS_PER_SAMPLE = 64


@dataclass
class ComputeSettings:
    """How to compute, not what: every choice here gives the same numbers."""

    dtype: torch.dtype = torch.float32  # linears, conv and attention; float32 or bfloat16
    attention: str = "sdpa"  # attention kernel name (runtime.attention.KERNELS)
    # Queries per attention call (self and cross, one sample at a time); also the token
    # chunk of the keys/values and the norms before the projections. None: a whole sample.
    attn_chunk_tokens: int | None = None
    ffn_chunk_tokens: int | None = DEFAULT_FFN_CHUNK_TOKENS  # FFN tokens at a time (None: all)
    attn_heads_per_chunk: int | None = None  # run attention over this many heads at a time
    chunk_values: int = DEFAULT_CHUNK_VALUES  # elementwise work per chunk (values)

    def chunk_tokens(self, width: int) -> int:
        return max(1, self.chunk_values // width)


def spans(n: int, step: int | None):
    """[s, e) pieces of range(n), at most `step` long (None: one piece)."""
    step = n if step is None else max(1, step)
    for s in range(0, n, step):
        yield s, min(n, s + step)


# ---- timesteps: one embedding per distinct value ------------------------------------


def sinusoid(freq_dim: int, t: torch.Tensor) -> torch.Tensor:
    """[cos(t·w_j) for all j, then sin(t·w_j)], w_j = 10000^(-j/half), in float64 -> float32."""
    half = freq_dim // 2
    t = t.to(torch.float64)
    angles = torch.outer(t, torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half)))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


@dataclass
class Segment:
    """Tokens [start, end) of the flattened [B·S] sequence and which timestep they use:
    an index into the distinct values, or per-token indices (a LongTensor)."""

    start: int
    end: int
    which: int | torch.Tensor

    def rows(self, table: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """table [U, ...] -> the rows for tokens [s, e) of this segment (broadcastable)."""
        if isinstance(self.which, int):
            return table[self.which]
        return table[self.which[s - self.start : e - self.start]]

    def piece(self, s: int, e: int) -> "Segment":
        """Tokens [s, e) of this segment, renumbered from 0."""
        which = self.which if isinstance(self.which, int) else self.which[s - self.start : e - self.start]
        return Segment(0, e - s, which)


def timestep_segments(t: torch.Tensor, batch: int, seq_len: int, device) -> tuple[torch.Tensor, list[Segment]]:
    """Distinct timesteps (float64 [U]) and the runs of tokens that use each.
    `t` is [B] (one per sample), [B, seq_len] (per token), or one value for all."""
    t = t.detach().to("cpu")
    if t.numel() == 1 and t.dim() <= 1:  # one timestep for the whole batch (both CFG passes)
        t = t.reshape(1).expand(batch)
    if t.dim() == 1:
        if t.numel() != batch:
            raise ValueError(f"t has {t.numel()} values for a batch of {batch}; pass [B] or [B, seq_len]")
        t = t[:, None].expand(batch, seq_len)
    if t.dim() != 2 or tuple(t.shape) != (batch, seq_len):
        raise ValueError(f"t of shape {list(t.shape)}: expected [{batch}] or [{batch}, {seq_len}]")
    values, inverse = torch.unique(t.to(torch.float64), return_inverse=True)
    segments: list[Segment] = []
    for b in range(batch):
        row = inverse[b]
        cuts = [0, *((row[1:] != row[:-1]).nonzero().flatten() + 1).tolist(), seq_len]
        if len(cuts) - 1 > MAX_RUNS_PER_SAMPLE:
            segments.append(Segment(b * seq_len, (b + 1) * seq_len, row.to(device)))
            continue
        for s, e in zip(cuts[:-1], cuts[1:]):
            u, start = int(row[s]), b * seq_len + s
            last = segments[-1] if segments else None
            if last is not None and isinstance(last.which, int) and last.which == u and last.end == start:
                last.end = b * seq_len + e  # same timestep continues into the next sample
            else:
                segments.append(Segment(start, b * seq_len + e, u))
    return values, segments


def chunks(segments: Sequence[Segment], max_tokens: int | None):
    """(segment, s, e) pieces of at most `max_tokens` tokens (None: whole segments)."""
    for seg in segments:
        step = seg.end - seg.start if max_tokens is None else max_tokens
        for s in range(seg.start, seg.end, step):
            yield seg, s, min(seg.end, s + step)


def segments_in(segments: Sequence[Segment], start: int, end: int) -> list[Segment]:
    """The runs that cover tokens [start, end) of the flattened sequence, cut to that
    range and renumbered from `start` (for norms and updates over a chunk of rows)."""
    out = []
    for seg in segments:
        s, e = max(seg.start, start), min(seg.end, end)
        if s < e:
            out.append(Segment(s - start, e - start, seg.piece(s, e).which))
    return out


@dataclass
class TimeEmbedding:
    e: torch.Tensor  # [U, dim] float32: time_embedding output (the head's modulation input)
    e0: torch.Tensor  # [U, 6, dim] float32: time_projection output (every block's)
    segments: list[Segment]

    def per_token(self, batch: int, seq_len: int, table: torch.Tensor) -> torch.Tensor:
        """A [U, ...] table expanded to [B, seq_len, ...] as the official code holds it
        (for inspection and tests; the forward never builds it)."""
        out = table.new_empty(batch * seq_len, *table.shape[1:])
        for seg, s, e in chunks(self.segments, None):
            out[s:e] = seg.rows(table, s, e)
        return out.view(batch, seq_len, *table.shape[1:])


# ---- norms ---------------------------------------------------------------------------


def elementwise_step(segments, chunk: int | None, *tensors: torch.Tensor) -> int | None:
    """Tokens per elementwise call: the fused kernels keep no temporaries and take whole
    runs of one timestep; the torch twins, and per-token tables, go by chunks."""
    if fused.takes(*tensors) and all(isinstance(seg.which, int) for seg in segments):
        return None
    return chunk


def modulated_norm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, segments, out_dtype, eps: float, chunk: int | None,
    stream_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LN(x)·(1 + scale) + shift over x [T, dim], float32 math, written as `out_dtype`.
    LN has no affine weights and, like the official WanLayerNorm, rounds its float32
    result to the stream's dtype (bf16 in the first block of a bf16 run) before the
    modulation: x's dtype, or `stream_dtype` when x holds such values widened to float32."""
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    narrow = stream_dtype is not None and stream_dtype != x.dtype
    for seg, s, e in chunks(segments, elementwise_step(segments, chunk, x, out)):
        rows = x[s:e].to(stream_dtype) if narrow else x[s:e]  # exact: the values are of that dtype
        fused.modulated_layer_norm(rows, 1 + seg.rows(scale, s, e), seg.rows(shift, s, e), eps, out[s:e])
    return out


def gated_add_(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, segments, chunk: int | None) -> None:
    """x += y·gate in float32, in place (x [T, dim] float32)."""
    for seg, s, e in chunks(segments, elementwise_step(segments, chunk, x, y)):
        fused.gated_add_(x[s:e], y[s:e], seg.rows(gate, s, e))


class RMSNorm(nn.Module):
    """Official WanRMSNorm over the full width (all heads together): the norm in float32,
    rounded to the input dtype, times the weight (promoted to float32)."""

    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps)

    def normalize_(self, x: torch.Tensor, chunk: int, rope: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """In place over x [B, S, dim] in token chunks; with `rope` (per sample, the
        complex128 [L_i, head_dim/2] rotations of its real tokens) the normed heads are
        also rotated in float64 as the official rope_apply does, padding left unrotated."""
        for b in range(x.shape[0]):
            self.rows_(x[b], None if rope is None else rope[b], chunk)
        return x

    def rows_(self, x: torch.Tensor, rot: torch.Tensor | None, chunk: int) -> torch.Tensor:
        """In place over the rows of x [T, dim]; `rot` (complex128 [n, head_dim/2], n may
        exceed T) rotates its first rows, rows past n (padding) are only normed. The kernel
        takes all rows at once, the torch twin goes by `chunk` rows."""
        T = x.shape[0]
        for s, e in spans(T, None if fused.takes(x) else chunk):
            fused.rms_norm_rope_(x[s:e], self.weight, self.eps, None if rot is None else rot[s:e])
        return x


class AffineLayerNorm(nn.Module):
    """LayerNorm with weight and bias (the block's norm3, cross_attn_norm), float32 math."""

    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim, device=device))
        self.register_buffer("bias", torch.zeros(dim, device=device))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype, chunk: int | None = None) -> torch.Tensor:
        T = x.shape[0]
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        step = max(1, T if chunk is None or fused.takes(x, out) else chunk)
        for s in range(0, T, step):
            fused.affine_layer_norm(x[s : s + step], self.weight, self.bias, self.eps, out[s : s + step])
        return out


# ---- attention -----------------------------------------------------------------------


@dataclass
class BlockInputs:
    """What every block needs besides the residual stream."""

    time: TimeEmbedding
    context: torch.Tensor  # [B, text_len, dim] compute dtype
    seq_lens: list[int]  # real tokens per sample
    rope: list[torch.Tensor]  # per sample: complex128 [L_i, head_dim/2] rotations of its tokens
    settings: ComputeSettings
    # The dtype of the official residual stream as the next block receives it: the
    # compute dtype before the first block (the patch tokens, held here widened to
    # float32), float32 once a block has updated it (WAN22.md 2.7). Only the rounding
    # of the first block's LN1 depends on it.
    stream_dtype: torch.dtype = torch.float32


class Projection:
    """A QLinear's weight decoded once (into scratch slot `slot`) for calls on chunks of
    rows: y = x·Wᵀ + b, with a LoRA merged or run beside as the layer would do for
    `tokens` rows in one call. Valid until the next decode into that slot."""

    def __init__(self, linear: QLinear, dtype: torch.dtype, slot: int, tokens: int):
        self.linear = linear
        self.side = linear.lora_beside(tokens)
        self.weight = linear.dense_weight(dtype, slot, lora=not self.side)
        self.bias = None if linear.bias is None else linear.bias.to(dtype)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] -> [T, out], written into `out` (contiguous rows) when given."""
        if out is None:
            y = F.linear(x, self.weight, self.bias)
        elif self.bias is None:
            y = torch.mm(x, self.weight.t(), out=out)
        else:
            y = torch.addmm(self.bias, x, self.weight.t(), out=out)  # what F.linear runs on 2-D x
        if self.side:
            self.linear.lora_side_(x, y)
        return y


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float, device=None):
        super().__init__()
        self.num_heads = num_heads
        self.q = QLinear(dim, dim, device=device)
        self.k = QLinear(dim, dim, device=device)
        self.v = QLinear(dim, dim, device=device)
        self.o = QLinear(dim, dim, device=device)
        self.norm_q = RMSNorm(dim, eps, device)
        self.norm_k = RMSNorm(dim, eps, device)

    def projections(self, names: Sequence[str], dtype: torch.dtype, tokens: int) -> list[Projection]:
        """The named linears decoded into scratch slots 0, 1, ... for a pass over `tokens` rows."""
        return [Projection(getattr(self, name), dtype, slot, tokens) for slot, name in enumerate(names)]

    def keys_values_(self, h, keys, values, rot, k: Projection, v: Projection, chunk: int) -> None:
        """h [c, dim] -> keys = rope(RMSNorm(h·Wkᵀ + bk)), values = h·Wvᵀ + bv, written
        into the rows given ([c, dim] each); `rot` rotates the first rows of keys."""
        k(h, out=keys)
        v(h, out=values)
        del h
        self.norm_k.rows_(keys, rot, chunk)

    def attend(self, h, keys, values, rot, q: Projection, o: Projection, st: ComputeSettings) -> torch.Tensor:
        """h [c, dim] (freed once projected) -> o(attention(q, keys, values)) [c, dim] with
        q = rope(RMSNorm(h·Wqᵀ + bq)) (`rot`: rotations of its first rows, None: no rope)
        over keys and values [L, dim] of one sample, every row of them attended."""
        c, D = h.shape
        n = self.num_heads
        queries = q(h)
        del h
        self.norm_q.rows_(queries, rot, st.chunk_tokens(D))
        a = attention(
            queries.view(1, c, n, -1), keys.view(1, -1, n, D // n), values.view(1, -1, n, D // n),
            kernel=st.attention, heads_per_chunk=st.attn_heads_per_chunk,
        )
        del queries
        return o(a.reshape(c, D))

    def forward(self, h: torch.Tensor, ctx: BlockInputs) -> torch.Tensor:
        """h [B, S, dim] -> [B, S, dim], a sample at a time (the block takes the same steps
        over chunks of rows); keys beyond each sample's real length are excluded."""
        B, S, D = h.shape
        st = ctx.settings
        out = torch.empty_like(h)
        for b in range(B):
            n = ctx.seq_lens[b]
            k, v = self.projections(("k", "v"), st.dtype, B * S)
            keys, values = h.new_empty(n, D), h.new_empty(n, D)
            self.keys_values_(h[b, :n], keys, values, ctx.rope[b], k, v, st.chunk_tokens(D))
            q, o = self.projections(("q", "o"), st.dtype, B * S)
            out[b] = self.attend(h[b], keys, values, ctx.rope[b], q, o, st)
        return out


class CrossAttention(SelfAttention):
    """Queries from the video tokens, keys and values from all text_len context rows
    (padding included, as official); no rope."""

    def context_keys_values(self, context: torch.Tensor, st: ComputeSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, text_len, dim] -> RMSNorm(context·Wkᵀ + bk), context·Wvᵀ + bv."""
        keys = self.norm_k.normalize_(self.k(context), st.chunk_tokens(context.shape[-1]))
        return keys, self.v(context)

    def forward(self, h: torch.Tensor, ctx: BlockInputs) -> torch.Tensor:
        """h [B, S, dim] -> [B, S, dim], a sample at a time."""
        B, S, D = h.shape
        st = ctx.settings
        keys, values = self.context_keys_values(ctx.context, st)
        q, o = self.projections(("q", "o"), st.dtype, B * S)
        out = torch.empty_like(h)
        for b in range(B):
            out[b] = self.attend(h[b], keys[b], values[b], None, q, o, st)
        return out


# ---- the block -----------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig, device=None):
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps, device)
        self.norm3 = AffineLayerNorm(d, cfg.eps, device)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps, device)
        self.ffn = nn.Sequential(
            QLinear(d, cfg.ffn_dim, device=device), nn.GELU(approximate="tanh"), QLinear(cfg.ffn_dim, d, device=device)
        )
        self.register_buffer("modulation", torch.zeros(1, 6, d, device=device))

    def forward(self, x: torch.Tensor, ctx: BlockInputs) -> torch.Tensor:
        """x [B, S, dim] float32 -> x, updated in place (an x of another dtype is widened
        first, and its dtype is then the stream's)."""
        B, S, D = x.shape
        stream = ctx.stream_dtype
        if x.dtype != torch.float32:
            stream, x = x.dtype, x.float()
        # modulation = table + e0, float32 [U, 6, dim]
        mod = self.modulation.float().view(6, D) + ctx.time.e0
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod.unbind(1)
        xf = x.view(-1, D)
        # 1-2. x += SelfAttn(LN1(x)·(1 + scale) + shift)·gate; the stream is float32 after it
        self.self_attention_residual_(xf, B, S, shift_sa, scale_sa, gate_sa, stream, ctx)
        ctx.stream_dtype = torch.float32
        # 3. x += CrossAttn(LN3(x), context): affine LN3, no modulation, no gate
        self.cross_attention_residual_(xf, B, S, ctx)
        # 4. x += FFN(LN2(x)·(1 + scale) + shift)·gate
        self.ffn_residual_(xf, shift_ff, scale_ff, gate_ff, ctx.time.segments, ctx.settings)
        return x

    def self_attention_residual_(self, x, B: int, S: int, shift, scale, gate, stream, ctx: BlockInputs) -> None:
        """x [B·S, dim] float32, in place, one sample at a time: the keys and values of all
        its real tokens first, then its queries by chunks of `attn_chunk_tokens`, each
        chunk's rows of x updated as soon as they are attended (nothing later in this
        sample reads them). Only x and one sample's keys and values are whole."""
        st, sa, D = ctx.settings, self.self_attn, x.shape[1]
        segs, elem, step = ctx.time.segments, st.chunk_tokens(D), st.attn_chunk_tokens

        def h(s: int, e: int) -> torch.Tensor:  # LN1(x)·(1 + scale) + shift of rows [s, e)
            return modulated_norm(x[s:e], shift, scale, segments_in(segs, s, e), st.dtype, self.eps, elem, stream)

        for b in range(B):
            n, rot, first = ctx.seq_lens[b], ctx.rope[b], b * S
            k, v = sa.projections(("k", "v"), st.dtype, B * S)
            keys = x.new_empty((n, D), dtype=st.dtype)
            values = x.new_empty((n, D), dtype=st.dtype)
            for s, e in spans(n, step):
                sa.keys_values_(h(first + s, first + e), keys[s:e], values[s:e], rot[s:e], k, v, elem)
            q, o = sa.projections(("q", "o"), st.dtype, B * S)
            for s, e in spans(S, step):
                y = sa.attend(h(first + s, first + e), keys, values, rot[s:e], q, o, st)
                rows = x[first + s : first + e]
                gated_add_(rows, y, gate, segments_in(segs, first + s, first + e), elem)
                del y
            del keys, values

    def cross_attention_residual_(self, x, B: int, S: int, ctx: BlockInputs) -> None:
        """x [B·S, dim] float32, in place, by chunks of rows of each sample."""
        st, ca, D = ctx.settings, self.cross_attn, x.shape[1]
        elem = st.chunk_tokens(D)
        keys, values = ca.context_keys_values(ctx.context, st)
        q, o = ca.projections(("q", "o"), st.dtype, B * S)
        for b in range(B):
            for s, e in spans(S, st.attn_chunk_tokens):
                rows = x[b * S + s : b * S + e]
                y = ca.attend(self.norm3(rows, st.dtype, elem), keys[b], values[b], None, q, o, st)
                fused.gated_add_(rows, y)
                del y

    def ffn_residual_(self, x: torch.Tensor, shift, scale, gate, segments, st: ComputeSettings) -> None:
        """Linear -> GELU(tanh) -> Linear, over `st.ffn_chunk_tokens` tokens at a time (of
        the whole batch, whatever their timesteps); both weights are decoded once (two
        scratch slots) and reused by every chunk."""
        up, down = self.ffn[0], self.ffn[2]
        # A LoRA is merged into the decoded weight, or runs beside the matmul (QLinear).
        side_up, side_down = up.lora_beside(x.shape[0]), down.lora_beside(x.shape[0])
        w_up = up.dense_weight(st.dtype, slot=0, lora=not side_up)
        w_down = down.dense_weight(st.dtype, slot=1, lora=not side_down)
        b_up, b_down = up.bias.to(st.dtype), down.bias.to(st.dtype)
        chunk = st.chunk_tokens(x.shape[-1])
        for s, e in spans(x.shape[0], st.ffn_chunk_tokens):
            segs = segments_in(segments, s, e)
            h = modulated_norm(x[s:e], shift, scale, segs, st.dtype, self.eps, chunk)
            a = F.linear(h, w_up, b_up)
            if side_up:
                up.lora_side_(h, a)
            a = torch.ops.aten.gelu_(a, approximate="tanh")
            del h
            out = F.linear(a, w_down, b_down)
            if side_down:
                down.lora_side_(a, out)
            del a
            gated_add_(x[s:e], out, gate, segs, chunk)


# ---- embeddings and head -------------------------------------------------------------


class PatchEmbedding(nn.Module):
    """Conv3d(in_dim, dim, kernel = stride = patch)."""

    def __init__(self, cfg: DiTConfig, device=None):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.register_buffer("weight", torch.zeros(cfg.dim, cfg.in_dim, *cfg.patch_size, device=device))
        self.register_buffer("bias", torch.zeros(cfg.dim, device=device))

    def forward(self, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """u [C, F, H, W] -> [1, dim, F/pt, H/ph, W/pw]."""
        return F.conv3d(u[None].to(dtype), self.weight.to(dtype), self.bias.to(dtype), stride=self.patch_size)


class Head(nn.Module):
    """Linear(LN(x)·(1 + scale) + shift), (shift, scale) = modulation + e; all float32."""

    def __init__(self, cfg: DiTConfig, device=None):
        super().__init__()
        self.eps = cfg.eps
        self.head = QLinear(cfg.dim, cfg.patch_numel * cfg.out_dim, device=device)
        self.register_buffer("modulation", torch.zeros(1, 2, cfg.dim, device=device))

    def forward(self, x: torch.Tensor, time: TimeEmbedding, settings: ComputeSettings) -> torch.Tensor:
        """x [B, S, dim] -> [B, S, prod(patch)·out_dim] float32, by HEAD_CHUNK_TOKENS tokens."""
        B, S, D = x.shape
        mod = self.modulation.float().view(2, D) + time.e[:, None, :]  # [U, 2, dim]
        shift, scale = mod.unbind(1)
        xf = x.reshape(-1, D)
        head = Projection(self.head, torch.float32, 0, B * S)
        out = torch.empty(B * S, self.head.out_features, dtype=torch.float32, device=x.device)
        for s, e in spans(B * S, HEAD_CHUNK_TOKENS):
            segs = segments_in(time.segments, s, e)
            h = modulated_norm(xf[s:e], shift, scale, segs, torch.float32, self.eps, settings.chunk_tokens(D))
            head(h, out=out[s:e])
            del h
        return out.view(B, S, -1)


class WanDiT(nn.Module):
    """The official WanModel: `model(x, t, context, seq_len, y=None)` takes and returns
    what WanModel.forward does (lists of per-sample tensors; t as [B] or [B, seq_len])."""

    def __init__(self, config: DiTConfig, settings: ComputeSettings | None = None, device=None):
        super().__init__()
        cfg = self.config = config
        self.settings = settings or ComputeSettings()
        d = cfg.dim
        self.patch_embedding = PatchEmbedding(cfg, device)
        self.text_embedding = nn.Sequential(
            QLinear(cfg.text_dim, d, device=device), nn.GELU(approximate="tanh"), QLinear(d, d, device=device)
        )
        self.time_embedding = nn.Sequential(QLinear(cfg.freq_dim, d, device=device), nn.SiLU(), QLinear(d, d, device=device))
        self.time_projection = nn.Sequential(nn.SiLU(), QLinear(d, 6 * d, device=device))
        self.blocks = nn.ModuleList(Block(cfg, device) for _ in range(cfg.num_layers))
        self.head = Head(cfg, device)
        self._rope: RopeTable | None = None
        # One dense-weight buffer per device and slot, sized for the largest block linear.
        self.scratch = ScratchPool(limit_bytes=max(d * d, d * cfg.ffn_dim) * 2)
        attach_scratch(self, self.scratch)

    @property
    def dtype(self) -> torch.dtype:
        return self.settings.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def set_attention(self, kernel: str | None) -> None:
        """"sdpa" (default), "sage", or a name given to runtime.attention.register_kernel."""
        self.settings.attention = resolve_kernel(kernel)

    def rope_table(self, device) -> RopeTable:
        if self._rope is None or self._rope.cos.device != torch.device(device):
            self._rope = RopeTable(self.config.head_dim, device)
        return self._rope

    # -- the forward, step by step --

    def embed_video(self, x: Sequence[torch.Tensor], y, seq_len: int):
        """1. x ⊕ y -> patch tokens, zero-padded to seq_len, and the per-sample grids
        (F, H, W) in patches. The tokens come out of the Conv3d in the compute dtype and
        are held widened to float32 [B, S, dim] (exact), the residual stream's own dtype
        from the first update on, so the first block need not hold both."""
        cfg, dtype = self.config, self.dtype
        if y is not None:
            if len(y) != len(x):
                raise ValueError(f"{len(x)} latents but {len(y)} conditions y")
            x = [torch.cat([u, v.to(u.dtype)], dim=0) for u, v in zip(x, y)]
        tokens = torch.zeros(len(x), seq_len, cfg.dim, dtype=torch.float32, device=self.device)
        grids = []
        for i, u in enumerate(x):
            if u.dim() != 4 or u.shape[0] != cfg.in_dim:
                have = f"{list(u.shape)}" + ("" if y is None else " after concatenating y")
                raise ValueError(
                    f"sample {i}: input of shape {have}, expected [{cfg.in_dim}, F, H, W] for this {cfg.model_type} model"
                )
            p = self.patch_embedding(u.to(self.device), dtype)  # [1, dim, F, H', W']
            grid = tuple(p.shape[2:])
            n = math.prod(grid)
            if n > seq_len:
                raise ValueError(f"sample {i} has {n} tokens, more than seq_len {seq_len}")
            tokens[i, :n] = p.flatten(2).transpose(1, 2)[0]
            del p  # before the next sample's convolution
            grids.append(grid)
        return tokens, grids

    def embed_time(self, t: torch.Tensor, batch: int, seq_len: int) -> TimeEmbedding:
        """2. e = time_embedding(sinusoid(t)), e0 = time_projection(e), float32, computed
        once per distinct timestep (the official code does it per token)."""
        values, segments = timestep_segments(t, batch, seq_len, self.device)
        s = sinusoid(self.config.freq_dim, values.to(self.device))
        lin1, _, lin2 = self.time_embedding
        e = lin2(F.silu(lin1(s)))
        e0 = self.time_projection[1](F.silu(e)).unflatten(1, (6, self.config.dim))
        return TimeEmbedding(e, e0, segments)

    def embed_text(self, context: Sequence[torch.Tensor]) -> torch.Tensor:
        """3. contexts zero-padded to text_len rows -> Linear, GELU(tanh), Linear: [B, text_len, dim]."""
        cfg = self.config
        padded = torch.zeros(len(context), cfg.text_len, cfg.text_dim, dtype=self.dtype, device=self.device)
        for i, c in enumerate(context):
            if c.dim() != 2 or c.shape[1] != cfg.text_dim or c.shape[0] > cfg.text_len:
                raise ValueError(
                    f"context {i} has shape {list(c.shape)}, expected [L <= {cfg.text_len}, {cfg.text_dim}] "
                    "(the trimmed text encoder output)"
                )
            padded[i, : c.shape[0]] = c
        lin1, _, lin2 = self.text_embedding
        return lin2(F.gelu(lin1(padded), approximate="tanh"))

    def block_inputs(self, time: TimeEmbedding, context: torch.Tensor, grids) -> BlockInputs:
        table, cache = self.rope_table(self.device), {}
        rope = []
        for g in grids:
            if g not in cache:
                cache[g] = table.for_grid(*g)
            rope.append(cache[g])
        return BlockInputs(time, context, [math.prod(g) for g in grids], rope, self.settings, stream_dtype=self.dtype)

    def run_block(self, i: int, block: Block, x: torch.Tensor, ctx: BlockInputs) -> torch.Tensor:
        """4. one block; the single point an engine replaces to stream weights."""
        return block(x, ctx)

    def unpatchify(self, out: torch.Tensor, grids) -> list[torch.Tensor]:
        """6. [B, S, prod(patch)·out_dim] -> per sample [out_dim, F·pt, H·ph, W·pw] float32."""
        c, (pt, ph, pw) = self.config.out_dim, self.config.patch_size
        videos = []
        for u, (f, h, w) in zip(out, grids):
            u = u[: f * h * w].view(f, h, w, pt, ph, pw, c)
            u = torch.einsum("fhwpqrc->cfphqwr", u).reshape(c, f * pt, h * ph, w * pw)
            videos.append(u.float())
        return videos

    def forward(self, x, t, context, seq_len, y=None) -> list[torch.Tensor]:
        if self.config.model_type == "i2v" and y is None:
            raise ValueError("the I2V model needs y (mask + encoded first frame) for every sample")
        if len(context) != len(x):
            raise ValueError(f"{len(x)} latents but {len(context)} contexts")
        seq_len = int(seq_len)
        with torch.no_grad():
            tokens, grids = self.embed_video(x, y, seq_len)
            time = self.embed_time(torch.as_tensor(t), len(x), seq_len)
            ctx = self.block_inputs(time, self.embed_text(context), grids)
            for i, block in enumerate(self.blocks):
                tokens = self.run_block(i, block, tokens, ctx)
            out = self.head(tokens, time, self.settings)  # 5. head, float32
            return self.unpatchify(out, grids)

"""What one forward allocates and computes, as formulas in the model's sizes.

The planner prices a request with these; each mirrors what its model's code allocates
(runtime/dit.py, runtime/t5.py), is checked against a measured forward in the tests
(tests/test_stream_plan.py) and against the GPU by bench/stream.py. A change to how a
model allocates its activations must come with a change here.
"""
from __future__ import annotations

from typing import NamedTuple

from ..dit import DEFAULT_CHUNK_VALUES, DEFAULT_FFN_CHUNK_TOKENS, HEAD_CHUNK_TOKENS


class Chunks(NamedTuple):
    """How a forward splits its work (None: not split), as `runtime.dit.ComputeSettings`
    names it: attention queries per call, FFN tokens per call, attention heads per call."""

    attn: int | None = None
    ffn: int | None = None
    heads: int | None = None


# Per value of an elementwise chunk done by the torch twins: their temporaries at the
# most, in the rope (the normed float32 row, its float64 copy and product, the float32
# result). The CUDA kernels (runtime/fused.py) keep none.
ELEMENTWISE_BYTES_PER_VALUE = 24


# -- the Wan DiT (runtime/dit.py) --------------------------------------------------------


def dit_activation_phases(
    *,
    dim: int,
    ffn_dim: int,
    heads: int,
    tokens: int,
    text_len: int,
    batch: int,
    dtype_bytes: int,
    attn_chunk: int | None = None,
    ffn_chunk: int | None = None,
    head_chunk: int | None = None,
    chunk_values: int = DEFAULT_CHUNK_VALUES,
    fused: bool = False,
    head_out: int = 64,
) -> dict[str, int]:
    """Bytes of activations in one forward of `runtime.dit.WanDiT` (weights, ring and
    decode scratch not included) by phase, for `tokens` per sample, `batch` samples per
    block call, split as `ComputeSettings` says (attn_chunk_tokens, ffn_chunk_tokens,
    attn_heads_per_chunk, chunk_values); `fused`: the norms, rope and residual adds run
    as CUDA kernels, without temporaries; head_out = prod(patch) · out_dim. "stream"
    and "persistent" are held throughout; each other phase adds its own bytes on top.

    With T = batch·tokens, e = dtype_bytes, c = the attention chunk and f = the FFN
    chunk (each at most what it splits), the forward holds the float32 residual stream
    x (4·T·dim) from the patch embedding on, the text context (e·batch·text_len·dim) and
    the rope rotations (complex128 [tokens, head_dim/2]); each phase adds, as allocated:
      patch embedding  one sample's Conv3d output (e·tokens·dim) while it is copied in,
                       and the convolution's workspace, about as much again (cuDNN on
                       an H200: 1.04-1.06x the output)
      self-attention   one sample's keys and values (2·e·tokens·dim); per query chunk two
                       [c, dim] tensors at a time (h and q, q and the attention output,
                       that output and its projection); chunking by heads adds a chunk's
                       result (it bounds only a kernel's own workspace)
      cross-attention  the text keys and values of the batch (2·e·batch·text_len·dim);
                       per chunk, as above
      FFN              per chunk e·f·(dim + ffn_dim): its input, then its output, beside
                       the hidden layer (GELU in place)
      head             its output (4·T·head_out) and a chunk's float32 norm (4·h·dim,
                       h = HEAD_CHUNK_TOKENS of the batch's tokens, whatever the settings)
    and, while a chunk's input is normed, the torch twins' temporaries
    (ELEMENTWISE_BYTES_PER_VALUE per value of a `chunk_values` piece)."""
    T = batch * tokens
    e = dtype_bytes
    c = tokens if attn_chunk is None else min(tokens, attn_chunk)
    f = T if ffn_chunk is None else min(T, ffn_chunk)
    x = 4 * T * dim
    text = e * batch * text_len * dim
    rope = tokens * (dim // heads // 2) * 16

    def twins(rows: int) -> int:  # temporaries of an elementwise pass over `rows` tokens
        return 0 if fused else ELEMENTWISE_BYTES_PER_VALUE * min(chunk_values, rows * dim)

    # a chunk of attention: its input being normed (the twins' temporaries beside it),
    # then two [c, dim] tensors at a time
    pair = 2 * e * c * dim
    if head_chunk is not None and head_chunk < heads:
        pair += e * c * dim * head_chunk // heads  # a heads chunk's result before it joins the output
    chunk = max(pair, e * c * dim + twins(c))
    embed = 2 * e * tokens * dim + e * tokens * dim // 8
    self_attn = 2 * e * tokens * dim + chunk
    cross = 2 * text + chunk
    ffn = max(e * f * (dim + ffn_dim), e * f * dim + twins(f))
    h = min(T, HEAD_CHUNK_TOKENS)
    head = 4 * T * head_out + 4 * h * dim + twins(h)
    return {"stream": x, "persistent": text + rope, "embed": embed, "self_attention": self_attn,
            "cross_attention": cross, "ffn": ffn, "head": head}


def dit_activation_bytes(**sizes) -> int:
    """Peak bytes of activations in one forward of `runtime.dit.WanDiT`, arguments as
    dit_activation_phases."""
    phases = dit_activation_phases(**sizes)
    held = phases.pop("stream") + phases.pop("persistent")
    return held + max(phases.values())




def dit_flops_per_block(*, dim: int, ffn_dim: int, tokens: int, text_len: int, batch: int) -> float:
    """Multiply-adds ×2 of one block call: projections, FFN, self- and cross-attention."""
    linear = tokens * (6 * dim * dim + 2 * dim * ffn_dim) + text_len * 2 * dim * dim
    attention = 2 * tokens * tokens * dim + 2 * tokens * text_len * dim
    return 2.0 * batch * (linear + attention)


# The chunkings the planner tries, in order of cost, as measured on an H200 (an A14B
# q8_0 block, 480p and 720p, CFG batch 1 and 2, bench/dit.py --chunks): attention over
# whole samples costs nothing against the unsplit block, query chunks of 16384 cost
# 1-1.5%, 8192 about 2%, 4096 2.5-4%, 2048 4-7% (cuDNN's last wave of tiles, paid once
# per call); FFN chunks of 8192 tokens and more cost under 1%, 4096 up to 7%. Every
# chunking gives the same numbers bit for bit (there and on the CPU).
ATTN_CHUNKS = (None, 16384, 8192, 4096, 2048, 1024, 512)
FFN_CHUNKS = (DEFAULT_FFN_CHUNK_TOKENS, 8192, 4096, 2048, 1024, 512)


def dit_chunk_options(tokens: int, batch: int) -> list[Chunks]:
    """Attention and FFN chunks worth trying; a chunk as large as what it splits stands
    for not splitting (attention: None; FFN: the whole batch)."""
    attn = [None] + [c for c in ATTN_CHUNKS if c is not None and c < tokens]
    ffn = list(dict.fromkeys(min(c, batch * tokens) for c in FFN_CHUNKS))
    return [Chunks(a, f) for a in attn for f in ffn]


def dit_chunk_cost(option: Chunks, tokens: int, batch: int) -> int:
    """How much a chunking slows a forward of `tokens` per sample, `batch` samples, in
    rank: the steps down each list above, attention by heads last."""
    attn = None if option.attn is None or option.attn >= tokens else option.attn
    a = ATTN_CHUNKS.index(attn) if attn in ATTN_CHUNKS else len(ATTN_CHUNKS)
    T = batch * tokens
    f = T if option.ffn is None else min(option.ffn, T)
    ffn = next((k for k, c in enumerate(FFN_CHUNKS) if f >= min(c, T)), len(FFN_CHUNKS))
    return a + ffn + 2 * (option.heads is not None)


def dit_scratch_bytes(dim: int, ffn_dim: int) -> int:
    """The DiT's decode scratch: two slots (the FFN's two weights) of the largest block
    linear in 2-byte elements (runtime.dit.WanDiT.scratch)."""
    return 2 * max(dim * dim, dim * ffn_dim) * 2


# -- the umt5 encoder (runtime/t5.py) -----------------------------------------------------


def t5_activation_bytes(
    *, dim: int, dim_attn: int, dim_ffn: int, heads: int, tokens: int, batch: int, dtype_bytes: int
) -> int:
    """Peak bytes of activations in one forward of `runtime.t5.UMT5Encoder` over `batch`
    prompts padded to `tokens`.

    With n = batch·tokens and e = dtype_bytes, a block holds its input and the norm's
    output (2·e·n·dim), the forward the position buckets (int64 [tokens, tokens]), and
    then either
      attention  q, k, v (3·e·n·dim_attn), the position bias (e·heads·tokens²) and the
                 scores [batch, heads, tokens, tokens] three times over at the softmax:
                 in the compute dtype, as float32, and the float32 softmax ((e+8) bytes
                 a score), or a float32 norm temporary (12·n·dim) while normalizing;
      FFN        fc1, the gate and the tanh-GELU's temporaries (5·e·n·dim_ffn);
    each linear decodes its weight to a dense temporary first (no shared scratch).
    The token embedding lookup and the final norm are smaller than a block."""
    n = batch * tokens
    e = dtype_bytes
    scores = batch * heads * tokens * tokens
    base = 2 * e * n * dim + 8 * tokens * tokens  # + the int64 position buckets, shared
    attention = 3 * e * n * dim_attn + e * heads * tokens * tokens + (e + 8) * scores + e * dim * dim_attn
    norm = 12 * n * dim
    ffn = 5 * e * n * dim_ffn + e * dim * dim_ffn
    return base + max(attention, norm, ffn)


def t5_flops_per_block(*, dim: int, dim_attn: int, dim_ffn: int, tokens: int, batch: int) -> float:
    linear = tokens * (4 * dim * dim_attn + 3 * dim * dim_ffn)
    attention = 2 * tokens * tokens * dim_attn
    return 2.0 * batch * (linear + attention)

"""What one forward allocates and computes, as formulas in the model's sizes.

The planner prices a request with these; each mirrors what its model's code allocates
(runtime/dit.py, runtime/t5.py), is checked against a measured forward in the tests
(tests/test_stream_plan.py) and against the GPU by bench/stream.py. A change to how a
model allocates its activations must come with a change here.
"""
from __future__ import annotations

Chunks = tuple[int | None, int | None]  # (ffn tokens, attention heads)

# Per value of an elementwise chunk (norm in float32, rope in float64): temporaries.
ELEMENTWISE_BYTES_PER_VALUE = 48
DEFAULT_CHUNK_VALUES = 1 << 23  # runtime.dit.DEFAULT_CHUNK_VALUES


# -- the Wan DiT (runtime/dit.py) --------------------------------------------------------


def dit_activation_bytes(
    *,
    dim: int,
    ffn_dim: int,
    heads: int,
    tokens: int,
    text_len: int,
    batch: int,
    dtype_bytes: int,
    ffn_chunk: int | None = None,
    head_chunk: int | None = None,
    chunk_values: int = DEFAULT_CHUNK_VALUES,
) -> int:
    """Peak bytes of activations in one forward of `runtime.dit.WanDiT` (weights, ring and
    decode scratch not included), `tokens` per sample, `batch` samples per block call.

    With T = batch·tokens and e = dtype_bytes, the forward holds the float32 residual
    stream x (4·T·dim) throughout; each phase of a block adds (as the code allocates):
      self-attention   h, q, k, v and the attention output: 5·e·T·dim (h stays alive
                       while the block's call into the attention runs); chunking by heads
                       adds one chunk's result (it bounds only a kernel's own workspace)
      cross-attention  LN3(x), q, the attention output, its reshaped copy, the
                       projection: 4·e·T·dim
      FFN              per chunk of c tokens: e·c·(dim + ffn_dim)
      head             LN(x)·(1+scale)+shift in float32: 4·T·dim
    block 0 also holds the bf16 patch tokens (e·T·dim) once x becomes float32; elementwise
    work (norms in float32, rope in float64) runs over chunks of `chunk_values` values with
    ELEMENTWISE_BYTES_PER_VALUE bytes of temporaries each; cross-attention adds the text
    k/v (2·e·batch·text_len·dim); the text context (e·batch·text_len·dim) and the rope
    table (complex128 [tokens, head_dim/2]) persist."""
    T = batch * tokens
    td = T * dim
    e = dtype_bytes
    x = 4 * td
    elementwise = ELEMENTWISE_BYTES_PER_VALUE * min(chunk_values, tokens * dim)
    attn = 5 * e * td
    if head_chunk is not None and head_chunk < heads:
        attn += e * td * head_chunk / heads  # a chunk's result before it joins the output
    self_attn = x + max(attn, 3 * e * td + elementwise)
    text = e * batch * text_len * dim
    # block 0 still holds the bf16 patch tokens; LN3(x), q, the output (and the text k/v
    # during the attention, its reshaped copy and the projection after)
    cross = x + e * td + max(4 * e * td, 3 * e * td + 2 * text)
    c = T if ffn_chunk is None else min(T, ffn_chunk)
    ffn = x + e * td + e * c * (dim + ffn_dim) + elementwise
    head = x + 4 * td + elementwise
    persistent = text + tokens * (dim // heads // 2) * 16
    return max(self_attn, cross, ffn, head) + persistent


def dit_flops_per_block(*, dim: int, ffn_dim: int, tokens: int, text_len: int, batch: int) -> float:
    """Multiply-adds ×2 of one block call: projections, FFN, self- and cross-attention."""
    linear = tokens * (6 * dim * dim + 2 * dim * ffn_dim) + text_len * 2 * dim * dim
    attention = 2 * tokens * tokens * dim + 2 * tokens * text_len * dim
    return 2.0 * batch * (linear + attention)


# FFN chunks of this many tokens or more run their GEMMs as fast as the whole FFN.
FREE_FFN_CHUNK = 16384


def dit_chunk_options(tokens: int, batch: int, heads: int) -> list[Chunks]:
    """(ffn tokens, attention heads) worth trying: none, halvings of the FFN down to 1024
    tokens, halvings of the heads."""
    T = batch * tokens
    ffn = [None] + [T >> k for k in range(1, 8) if (T >> k) >= 1024]
    hd = [None] + [heads >> k for k in range(1, 6) if (heads >> k) >= 1]
    return [(f, h) for f in ffn for h in hd]


def dit_chunk_cost(option: Chunks) -> int:
    """How much a chunking slows the forward, in rank: 0 free (none, or FFN chunks of
    FREE_FFN_CHUNK tokens and more), 1 small FFN chunks, 2 attention by heads."""
    ffn, heads = option
    return 2 * (heads is not None) + (ffn is not None and ffn < FREE_FFN_CHUNK)


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

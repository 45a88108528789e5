"""Splitting the DiT's work over samples and token chunks changes no number.

The block runs self-attention one sample at a time (keys and values of all its tokens
first, then its queries by chunks that update x as they go), and cross-attention, the
FFN and the head by chunks of tokens. On the CPU in float32 a chunked forward equals
the unchunked one bit for bit as long as every matrix product keeps at least 16 rows:
MKL's sgemm gives each row the same sum whatever the number of rows, except for its
small-M kernels (fewer than 12 rows and not a multiple of 4), which add in another
order. Chunks that leave such a remainder move the last bits, bounded here.

Weights and configurations come from the golden models; inputs are drawn here with
token counts that are multiples of the chunk."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runtime.dit import BlockInputs, ComputeSettings
from runtime.dit_loading import load_dit

CHUNK = 32  # rows per chunk where the results must be identical (a multiple of 16)


def _variants() -> list[str]:
    from conftest import GOLDEN

    root = None if GOLDEN is None else Path(GOLDEN) / "dit"
    if root is None or not root.is_dir():
        return ["i2v"]  # the golden fixture then fails or skips with its message
    return sorted(p.name for p in root.iterdir() if (p / "cases.json").is_file())


class Golden:
    def __init__(self, folder: Path):
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        self.cases = json.loads((folder / "cases.json").read_text())["cases"]
        self._models = {}

    def model(self, dtype=torch.float32):
        if dtype not in self._models:
            self._models[dtype] = load_dit(
                self.folder / "weights.safetensors", num_heads=self.config["num_heads"], dtype=dtype
            )
        return self._models[dtype]

    def inputs(self, per_token_t: bool = False, seed: int = 0):
        """Two samples, the second half as long (padded, its keys masked), every token
        count a multiple of CHUNK; channel counts as in the golden cases."""
        case = self.cases[0]
        x_ch = case["x_shapes"][0][0]
        y_ch = case["y_shapes"][0][0] if case["y_shapes"] else None
        pt, ph, pw = self.config["patch_size"]
        h, w = 8 * ph, CHUNK // 4 * pw  # 2·CHUNK tokens per frame of patches
        frames = (2 * pt, pt)
        gen = torch.Generator().manual_seed(seed)
        x = [torch.randn(x_ch, f, h, w, generator=gen) for f in frames]
        y = None if y_ch is None else [torch.randn(y_ch, f, h, w, generator=gen) for f in frames]
        text_dim, text_len = self.config["text_dim"], self.config["text_len"]
        context = [torch.randn(7, text_dim, generator=gen), torch.randn(text_len, text_dim, generator=gen)]
        seq_len = max(u.shape[1] // pt * (h // ph) * (w // pw) for u in x)
        t = torch.tensor([[937.0], [250.0]]).expand(2, seq_len).clone()
        if per_token_t:  # a first-frame run of another timestep, cut inside the chunks (as TI2V does)
            t[:, : (h // ph) * (w // pw) // 2 + 3] = 0.0
        return x, t, context, seq_len, y


_loaded: dict[str, Golden] = {}


@pytest.fixture(params=_variants())
def golden_model(request, golden) -> Golden:
    if request.param not in _loaded:
        _loaded[request.param] = Golden(golden / "dit" / request.param)
    return _loaded[request.param]


def run(model, inputs, **settings):
    x, t, context, seq_len, y = inputs
    saved = ComputeSettings(**vars(model.settings))
    try:
        for name, value in settings.items():
            setattr(model.settings, name, value)
        return model(x, t, context, seq_len, y=y)
    finally:
        model.settings = saved


def max_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((u - v).abs().max().item() for u, v in zip(a, b))


WHOLE = dict(attn_chunk_tokens=None, ffn_chunk_tokens=None)


@pytest.mark.golden
@pytest.mark.parametrize("per_token_t", [False, True])
def test_chunked_equals_unchunked_bit_for_bit(golden_model, per_token_t):
    m = golden_model.model()
    inputs = golden_model.inputs(per_token_t)
    whole = run(m, inputs, **WHOLE)
    for attn, ffn in ((CHUNK, CHUNK), (2 * CHUNK, None), (None, CHUNK)):
        chunked = run(m, inputs, attn_chunk_tokens=attn, ffn_chunk_tokens=ffn)
        for a, b in zip(chunked, whole):
            assert torch.equal(a, b), (attn, ffn, (a - b).abs().max().item())


def rel_l2(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((u - v).norm() / v.norm()).item() for u, v in zip(a, b))


@pytest.mark.golden
def test_odd_chunks_stay_within_rounding(golden_model):
    """Chunks of 5 and 7 rows run MKL's small-M kernels: in float32 last bits move; in
    bfloat16 such a bit can flip a bf16 rounding (a step of 2^-8 relative) that later
    layers carry, far below bf16's own distance from float32 (~1e-2)."""
    inputs = golden_model.inputs()
    for dtype in (torch.float32, torch.bfloat16):
        m = golden_model.model(dtype)
        whole = run(m, inputs, **WHOLE)
        scale = max(1.0, max(w.abs().max().item() for w in whole))
        for attn, ffn in ((5, 7), (7, None)):
            chunked = run(m, inputs, attn_chunk_tokens=attn, ffn_chunk_tokens=ffn)
            if dtype == torch.float32:
                assert max_abs(chunked, whole) <= 1e-5 * scale, (attn, ffn)
            else:
                assert rel_l2(chunked, whole) <= 1e-3, (attn, ffn)


@pytest.mark.golden
def test_golden_cases_chunked(golden_model):
    """The official outputs, with chunks smaller than every golden sample."""
    from safetensors.torch import load_file

    io = load_file(str(golden_model.folder / "io.safetensors"))
    m = golden_model.model()
    for case in golden_model.cases:
        name, n = case["name"], case["batch"]
        x = [io[f"{name}.x.{i}"] for i in range(n)]
        context = [io[f"{name}.context.{i}"] for i in range(n)]
        y = [io[f"{name}.y.{i}"] for i in range(n)] if case["y_shapes"] else None
        inputs = (x, io[f"{name}.t"], context, int(io[f"{name}.seq_len"]), y)
        out = run(m, inputs, attn_chunk_tokens=4, ffn_chunk_tokens=8)
        for i, got in enumerate(out):
            assert (got - io[f"{name}.out.{i}"]).abs().max().item() <= 1e-4, (name, i)


@pytest.mark.golden
@pytest.mark.parametrize("mode", ["side", "merge"])
def test_chunked_lora_equals_unchunked(golden_model, mode):
    """A LoRA on the attention projections runs beside each chunk's product, or merged
    into the weight decoded once for all chunks, as the layer chooses for the whole call."""
    m = golden_model.model()
    inputs = golden_model.inputs(seed=1)
    block = m.blocks[0]
    linears = [block.self_attn.q, block.self_attn.o, block.cross_attn.q, block.ffn[0]]
    gen = torch.Generator().manual_seed(2)
    try:
        for lin in linears:
            r = 4
            lin.set_lora(0.1 * torch.randn(r, lin.in_features, generator=gen),
                         0.1 * torch.randn(lin.out_features, r, generator=gen), torch.full((r,), 0.5), mode)
        whole = run(m, inputs, **WHOLE)
        chunked = run(m, inputs, attn_chunk_tokens=CHUNK, ffn_chunk_tokens=CHUNK)
    finally:
        for lin in linears:
            lin.clear_lora()
    plain = run(m, inputs, **WHOLE)
    assert max_abs(whole, plain) > 1e-4  # the LoRA does act
    for a, b in zip(chunked, whole):
        assert torch.equal(a, b)


@pytest.mark.golden
def test_first_block_rounds_as_a_bf16_stream(golden_model):
    """The patch tokens are held widened to float32; the first block's LN1 still rounds
    as the official bf16 stream does (the same numbers as handing it the bf16 tokens)."""
    m = golden_model.model(torch.bfloat16)
    x, t, context, seq_len, y = golden_model.inputs()
    with torch.no_grad():
        tokens, grids = m.embed_video(x, y, seq_len)
        assert tokens.dtype == torch.float32
        assert torch.equal(tokens, tokens.to(torch.bfloat16).float())  # bf16 values
        time = m.embed_time(t, len(x), seq_len)
        text = m.embed_text(context)
        ctx = m.block_inputs(time, text, grids)
        assert ctx.stream_dtype == torch.bfloat16
        widened = m.blocks[0](tokens.clone(), ctx)
        assert ctx.stream_dtype == torch.float32  # the block made the stream float32
        narrow = m.blocks[0](tokens.to(torch.bfloat16), m.block_inputs(time, text, grids))
        assert torch.equal(widened, narrow)
        # rounding as a float32 stream would not be the same
        other = m.blocks[0](tokens.clone(), BlockInputs(ctx.time, ctx.context, ctx.seq_lens, ctx.rope, ctx.settings))
        assert not torch.equal(other, widened)


@pytest.mark.gpu
@pytest.mark.golden
def test_cuda_chunks(golden_model):
    """On CUDA (bf16, fused kernels, cuBLAS, SDPA) chunked and whole samples agree to
    bf16 rounding; they are compared bit for bit at full size by bench/dit.py --chunks."""
    m = load_dit(golden_model.folder / "weights.safetensors", num_heads=golden_model.config["num_heads"],
                 dtype=torch.bfloat16, device="cuda")
    x, t, context, seq_len, y = golden_model.inputs()
    inputs = ([u.cuda() for u in x], t.cuda(), [c.cuda() for c in context], seq_len,
              None if y is None else [u.cuda() for u in y])
    whole = run(m, inputs, **WHOLE)
    for attn, ffn in ((CHUNK, CHUNK), (5, 7)):
        chunked = run(m, inputs, attn_chunk_tokens=attn, ffn_chunk_tokens=ffn)
        assert rel_l2(chunked, whole) <= 1e-3, (attn, ffn)

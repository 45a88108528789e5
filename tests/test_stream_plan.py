"""The planner: budgets parsed at the edge, block sizes read from the real A14B layout
(golden headers), plans that keep their promise, refusals that name ways out which do
fit, and the activation formula against the memory a DiT forward really allocates."""
from __future__ import annotations

import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from quant.gguf_reader import GGUFFile
from runtime.dit import ComputeSettings, WanDiT
from runtime.dit_config import DiTConfig, detect_config
from runtime.stream import BlockWeights, PlanError, Request, parse_memory, plan_dit
from runtime.stream.budget import AUTO, GiB, MiB, DeviceInfo
from runtime.stream.activations import dit_activation_bytes, t5_activation_bytes
from runtime.stream.plan import PINNED, STAGED, fused_kernels_ready

OVERHEAD = int(0.6 * GiB)


def device(total_gib: float = 141.0) -> DeviceInfo:
    """A GPU of that size with nothing allocated yet (measured values stand in)."""
    total = int(total_gib * GiB)
    return DeviceInfo("test GPU", total, total - OVERHEAD, 0, 0, OVERHEAD, "test")


@pytest.fixture(scope="module")
def a14b(golden):
    """(config, {type: BlockWeights}, layout json) from the golden A14B header files."""
    folder = golden / "gguf" / "a14b_layout"
    layout = json.loads((folder / "a14b_layout.json").read_text())
    weights, config = {}, None
    for key, entry in layout["files"].items():
        header = entry.get("header_file")
        if not header:
            continue
        with GGUFFile(folder / header, require_data=False) as f:
            shapes = {n: t.shape for n, t in f.tensors.items()}
        config = config or detect_config(shapes)
        weights[key.lower()] = BlockWeights.from_gguf(folder / header)
    return config, weights, layout


def test_parse_memory():
    assert parse_memory("auto") == AUTO
    assert parse_memory(8) == 8 * GiB
    assert parse_memory("7.5") == int(7.5 * GiB)
    assert parse_memory("6144MiB") == 6144 * MiB
    assert parse_memory("1000B") == 1000
    assert parse_memory(None) is None
    for bad in ("eight", "-1", "0", "8 TB"):
        with pytest.raises(ValueError, match="--vram expects|must be positive"):
            parse_memory(bad)


def test_block_sizes_from_the_real_layout(a14b):
    config, weights, layout = a14b
    for key, w in weights.items():
        entry = layout["files"][key.upper()]
        assert len(w.block_bytes) == config.num_layers
        # the layout of one block is its file span (tensors back to back, padding included)
        assert max(w.block_bytes) == pytest.approx(entry["bytes_per_block"], abs=256)
        assert w.other_bytes + sum(entry["bytes_per_block"] for _ in w.block_bytes) == pytest.approx(
            entry["data_bytes"], rel=1e-4
        )
        assert w.label == key
        d, f = config.dim, config.ffn_dim
        assert w.linear_params == 8 * d * d + 2 * d * f


def budgets(config, weights, req) -> list[int]:
    """Six budgets from the least the request needs to all blocks resident (bytes)."""
    with pytest.raises(PlanError) as err:
        plan_dit(config, req, weights=weights, vram=f"{OVERHEAD + 1}B", ram=64, device=device(4096))
    least = err.value.needed
    full = plan_dit(config, req, weights=weights, vram=4096, ram=64, device=device(4096)).device.driver_peak
    assert least < full
    return [least + (full - least) * k // 5 for k in range(6)]


@pytest.mark.parametrize("size", [(832, 480, 81), (1280, 720, 81)])
def test_plan_keeps_its_promise(a14b, size):
    config, weights, _ = a14b
    req = Request(*size)
    tokens = req.tokens(config.patch_size)
    for vram in budgets(config, weights["q8_0"], req):
        plan = plan_dit(config, req, weights=weights["q8_0"], vram=f"{vram}B", ram=64, device=device(4096))
        d = plan.device
        assert d.driver_peak <= vram
        assert d.allocator_peak <= d.room
        assert len(plan.resident) + len(plan.streamed) == config.num_layers
        if plan.streamed:
            assert plan.ring_slots >= 2
            assert plan.slot_bytes == max(weights["q8_0"].block_bytes[i] for i in plan.streamed)
        # the activation term is the formula's for this request and the chunking chosen
        assert d.activations == dit_activation_bytes(
            dim=config.dim, ffn_dim=config.ffn_dim, heads=config.num_heads, tokens=tokens, text_len=config.text_len,
            batch=2, dtype_bytes=2, attn_chunk=plan.attn_chunk, ffn_chunk=plan.ffn_chunk, head_chunk=plan.head_chunk,
            fused=fused_kernels_ready(), head_out=config.patch_numel * config.out_dim,
        )
        text = plan.describe()
        assert req.describe() in text and "predicted peak" in text and f"{tokens:,} tokens" in text


def test_resident_blocks_grow_with_the_budget(a14b):
    config, weights, _ = a14b
    req = Request(832, 480, 81)
    counts = [
        len(plan_dit(config, req, weights=weights["q8_0"], vram=f"{v}B", ram=64, device=device(4096),
                     resident="max").resident)
        for v in budgets(config, weights["q8_0"], req)
    ]
    assert counts == sorted(counts) and counts[0] < counts[-1] == config.num_layers
    # with everything in budget, nothing streams
    plan = plan_dit(config, req, weights=weights["q8_0"], vram=4096, ram=64, device=device(4096))
    assert plan.streamed == () and plan.ring_slots == 0
    # "auto" keeps only what hiding the copies needs: at this size, none
    plan = plan_dit(config, req, weights=weights["q8_0"], vram=f"{budgets(config, weights['q8_0'], req)[3]}B",
                    ram=64, device=device(4096))
    assert plan.resident == ()


def test_too_small_a_budget_is_refused_with_ways_out_that_fit(a14b):
    config, weights, _ = a14b
    req = Request(1280, 720, 81)
    with pytest.raises(PlanError) as err:  # a budget of nothing: the error says what it needs
        plan_dit(config, req, weights=weights["q8_0"], vram=f"{OVERHEAD + 1}B", ram=64, device=device())
    need = err.value.needed
    budget = int(need * 0.85) / GiB  # short of it by 15%
    with pytest.raises(PlanError) as err:
        plan_dit(config, req, weights=weights["q8_0"], vram=budget, ram=64, device=device())
    e = err.value
    msg = str(e)
    assert e.needed == need
    assert msg.startswith(f"needs {need / GiB:.1f} GiB at 1280×720×81 with q8_0; the budget is {budget:.1f} GiB")
    assert e.needed > budget * GiB and e.alternatives
    for way in e.alternatives:
        assert way in msg
        if way.startswith("use "):
            w = weights.get(way[4:]) or weights["q8_0"].with_linear_type(way[4:])
            plan_dit(config, req, weights=w, vram=budget, ram=64, device=device())
        elif "frames" in way:
            frames = int(way.split("→")[1].split()[0])
            assert (frames - 1) % 4 == 0 and frames < req.frames
            plan_dit(config, Request(1280, 720, frames), weights=weights["q8_0"], vram=budget, ram=64, device=device())
            with pytest.raises(PlanError):  # and it is the largest that fits
                plan_dit(config, Request(1280, 720, frames + 4), weights=weights["q8_0"], vram=budget, ram=64, device=device())
        else:
            w_, h_ = (int(v) for v in way.split("×"))
            assert w_ % 16 == 0 and h_ % 16 == 0 and w_ * h_ < 1280 * 720
            plan_dit(config, Request(w_, h_, 81), weights=weights["q8_0"], vram=budget, ram=64, device=device())


def test_estimated_lighter_file_matches_the_real_one(a14b):
    _, weights, _ = a14b
    est = weights["q8_0"].with_linear_type("q4_0")
    # the real Q4_0 file keeps ffn.2 in Q4_1 (a little larger): the estimate is close below it
    assert est.largest <= weights["q4_0"].largest
    assert est.largest == pytest.approx(weights["q4_0"].largest, rel=0.03)


def test_ram_below_the_expert_stages_blocks_from_disk(a14b):
    config, weights, _ = a14b
    w = weights["q8_0"]
    expert = sum(w.block_bytes)
    ram = expert // 2
    req = Request(832, 480, 81)
    vram = f"{budgets(config, w, req)[2]}B"
    plan = plan_dit(config, req, weights=w, vram=vram, ram=f"{ram}B", device=device(4096))
    staged = [i for i in plan.streamed if plan.host[i] == STAGED]
    pinned = [i for i in plan.streamed if plan.host[i] == PINNED]
    assert staged and pinned
    assert plan.ram.pinned + plan.ram.staging <= ram
    assert plan.staging_slots >= 2 and plan.ram.staging == plan.staging_slots * plan.slot_bytes
    with pytest.raises(PlanError, match="staging ring"):
        plan_dit(config, req, weights=w, vram=vram, ram=f"{plan.slot_bytes}B", device=device(4096))


def test_vram_auto_without_a_gpu_asks_for_a_size(a14b):
    config, weights, _ = a14b
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto measures it")
    with pytest.raises(PlanError, match="--vram auto needs a CUDA device"):
        plan_dit(config, Request(832, 480, 81), weights=weights["q8_0"], vram="auto", ram=64)


# -- the activation formula against a measured forward ---------------------------------------


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created while active (views and storages that
    existed before are not counted)."""

    def __init__(self, existing):
        super().__init__()
        self.existing = set(existing)
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
            if n == 0 or key in self.seen or key in self.existing or key in inputs:
                continue
            self.seen.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, n)
        return out

    def _free(self, key, n):
        self.live -= n
        self.seen.discard(key)


@pytest.mark.parametrize(
    "batch,attn_chunk,ffn_chunk,head_chunk",
    [(2, None, None, None), (2, 512, 1024, None), (2, 128, 256, None), (2, 256, None, 1), (2, None, 512, None),
     (1, 512, 1024, None), (1, None, None, None)],
)
def test_activation_formula_matches_a_measured_forward(batch, attn_chunk, ffn_chunk, head_chunk):
    dim, heads, ffn, grid = 256, 2, 688, (8, 16, 16)
    chunk_values = 1 << 15  # small, in proportion to these sizes as the default is to 14B ones
    cfg = DiTConfig("t2v", 16, 16, dim, ffn, 256, 64, heads, 1, (1, 2, 2), "argument")
    settings = ComputeSettings(
        dtype=torch.bfloat16, chunk_values=chunk_values, attn_chunk_tokens=attn_chunk, ffn_chunk_tokens=ffn_chunk,
        attn_heads_per_chunk=head_chunk,
    )
    torch.manual_seed(0)
    model = WanDiT(cfg, settings)
    for b in model.buffers():
        b.data.normal_(0, 0.02)
    f, h, w = grid
    x = [torch.randn(16, f, 2 * h, 2 * w) for _ in range(batch)]
    context = [torch.randn(9, 64) for _ in range(batch)]
    t = torch.full((batch,), 500.0)
    tokens = f * h * w
    with torch.no_grad():
        # the decode scratch and the rope table are made once, by any forward
        model([u[:, :1, :2, :2] for u in x], t, context, 1)
        mode = LiveBytes(s.untyped_storage().data_ptr() for s in model.buffers())
        with mode:
            model(x, t, context, tokens)
    predicted = dit_activation_bytes(
        dim=dim, ffn_dim=ffn, heads=heads, tokens=tokens, text_len=cfg.text_len, batch=batch, dtype_bytes=2,
        attn_chunk=attn_chunk, ffn_chunk=ffn_chunk, head_chunk=head_chunk, chunk_values=chunk_values,
        head_out=cfg.patch_numel * cfg.out_dim,
    )
    assert 0.97 <= predicted / mode.peak <= 1.15, (predicted, mode.peak)


def test_t5_activation_formula_matches_a_measured_forward():
    from runtime.t5 import T5Config, UMT5Encoder

    cfg = T5Config(vocab=512, dim=256, dim_attn=256, dim_ffn=640, num_heads=4, num_layers=1)
    torch.manual_seed(0)
    model = UMT5Encoder(cfg, torch.bfloat16)
    for name, b in model.named_buffers():
        b.data = torch.randn(b.shape).to(torch.bfloat16) * 0.05
    batch, tokens = 2, 256
    ids = torch.randint(0, cfg.vocab, (batch, tokens))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[1, 200:] = 0
    with torch.no_grad():
        mode = LiveBytes(s.untyped_storage().data_ptr() for s in model.buffers())
        with mode:
            model(ids, mask)
    predicted = t5_activation_bytes(
        dim=cfg.dim, dim_attn=cfg.dim_attn, dim_ffn=cfg.dim_ffn, heads=cfg.num_heads, tokens=tokens, batch=batch,
        dtype_bytes=2,
    )
    assert 0.97 <= predicted / mode.peak <= 1.2, (predicted, mode.peak)


def test_attention_is_split_only_when_memory_asks(a14b):
    """Whole samples when they fit (the fastest), query chunks under a tighter budget;
    the chunks the estimate assumed are what the model is set to run."""
    config, weights, _ = a14b
    req = Request(1280, 720, 81)
    w = weights["q8_0"]
    roomy = plan_dit(config, req, weights=w, vram=4096, ram=64, device=device(4096))
    assert roomy.attn_chunk is None
    least = budgets(config, w, req)[0]
    tight = plan_dit(config, req, weights=w, vram=f"{least}B", ram=64, device=device(4096))
    assert tight.attn_chunk is not None and tight.attn_chunk < req.tokens(config.patch_size)
    assert tight.device.activations < roomy.device.activations
    settings = ComputeSettings()
    tight.apply_chunks(settings)
    assert (settings.attn_chunk_tokens, settings.ffn_chunk_tokens, settings.attn_heads_per_chunk) == tuple(
        (tight.attn_chunk, tight.ffn_chunk, tight.head_chunk))


@pytest.mark.parametrize("size,quant,vram", [((1280, 720, 81), "q8_0", 8), ((1280, 720, 81), "q8_0", 12),
                                             ((832, 480, 81), "q4_0", 6), ((832, 480, 81), "q8_0", 6)])
def test_small_cards_take_the_full_expert(a14b, size, quant, vram):
    """The A14B expert at 720p on 8 GB and at 480p on 6 GB, both CFG passes per block
    (with this test's 0.6 GiB for the CUDA context)."""
    config, weights, _ = a14b
    plan = plan_dit(config, Request(*size), weights=weights[quant], vram=vram, ram=64, device=device())
    assert plan.device.driver_peak <= vram * GiB

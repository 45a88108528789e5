"""The streaming engine on a toy model of QLinear blocks (packed and dense weights):
a streamed forward must equal the plain forward bit for bit, whatever the plan (all
resident, ring only, pinned or staged from the file, a repeated block, a forward cut
short), and the expert swap must give host memory back. CPU tests run the same engine
with a CPU "device" (synchronous copies); the GPU tests run the real streams."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quant.ggml_types import GGMLType
from quant.gguf_writer import GGUFWriter
from quant.packed import PackedTensor
from runtime.qlinear import QLinear
from runtime.stream import BlockWeights, ExpertSet, FileSource, PlanError, StreamEngine, attach, plan_blocks
from runtime.stream.budget import MiB, DeviceInfo, pinned_bytes
from runtime.stream.host import DROPPED, PINNED, STAGED, build_layouts
from runtime.stream.plan import DeviceBudget, HostBudget, Plan

DIM, HIDDEN, N_BLOCKS = 64, 96, 5


def random_q8_0(rows: int, cols: int, gen: torch.Generator) -> PackedTensor:
    """Valid q8_0 bytes: per 32 values an fp16 scale and 32 int8."""
    n_blocks = rows * cols // 32
    scale = (torch.rand(n_blocks, 1, generator=gen) * 0.02 + 0.001).half().view(torch.uint8)
    qs = torch.randint(-127, 128, (n_blocks, 32), generator=gen, dtype=torch.int8).view(torch.uint8)
    return PackedTensor(torch.cat([scale, qs], dim=1).reshape(-1), GGMLType.Q8_0, (rows, cols))


class ToyBlock(nn.Module):
    def __init__(self, packed: bool):
        super().__init__()
        self.up = QLinear(DIM, HIDDEN)
        self.down = QLinear(HIDDEN, DIM)
        self.register_buffer("norm", torch.ones(DIM, dtype=torch.float16))
        self.packed = packed

    def forward(self, x):
        h = torch.nn.functional.layer_norm(x, (DIM,)) * self.norm.float()
        return x + self.down(torch.relu(self.up(h)))


class ToyModel(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Linear(8, DIM)
        self.blocks = nn.ModuleList(ToyBlock(packed=i % 2 == 0) for i in range(N_BLOCKS))
        for i, b in enumerate(self.blocks):
            if b.packed:
                b.up.set_weight(random_q8_0(HIDDEN, DIM, gen))
                b.down.set_weight(random_q8_0(DIM, HIDDEN, gen))
            else:
                b.up.set_weight(torch.randn(HIDDEN, DIM, generator=gen, dtype=torch.float32) / 8)
                b.down.set_weight(torch.randn(DIM, HIDDEN, generator=gen).to(torch.float16) / 8)
            b.up.bias = torch.randn(HIDDEN, generator=gen).half()
            b.down.bias = torch.randn(DIM, generator=gen).half()
            b.norm = (1 + 0.1 * torch.randn(DIM, generator=gen)).half()
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(DIM, 8, generator=gen))

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return x


def tensors_of(model: ToyModel) -> dict[str, torch.Tensor | PackedTensor]:
    out = {}
    for i, b in enumerate(model.blocks):
        for lin in ("up", "down"):
            q = getattr(b, lin)
            w = q.weight if q.ggml_type is None else PackedTensor(q.weight, q.ggml_type, q.shape)
            out[f"blocks.{i}.{lin}.weight"] = w
            out[f"blocks.{i}.{lin}.bias"] = q.bias
        out[f"blocks.{i}.norm"] = b.norm
    return out


_GGML_OF = {torch.float32: GGMLType.F32, torch.float16: GGMLType.F16}


def write_gguf(model: ToyModel, path) -> None:
    w = GGUFWriter(path, arch="toy")
    for name, t in sorted(tensors_of(model).items()):
        if isinstance(t, PackedTensor):
            w.add_tensor(name, t.shape, t.ggml_type, lambda t=t: t.data)
        else:
            w.add_tensor(name, t.shape, _GGML_OF[t.dtype], lambda t=t: t.contiguous().view(torch.uint8).reshape(-1))
    w.write()


def meta_copy(model: ToyModel) -> ToyModel:
    """The model with every block weight on the meta device (a loader that reads nothing)."""
    m = copy.deepcopy(model)
    for b in m.blocks:
        for mod in b.modules():
            for k, t in mod._buffers.items():
                if t is not None:
                    mod._buffers[k] = torch.empty_like(t, device="meta")
    return m


def make_plan(n: int, sizes, *, resident=(), slots=2, host=None, staging=0) -> Plan:
    streamed = [i for i in range(n) if i not in resident]
    host = host or tuple(DROPPED if i in resident else PINNED for i in range(n))
    dev = DeviceBudget(None, 0, 0, "test", 0, 0, 0, 0, 0, 0, 0)
    return Plan(
        n_blocks=n, resident=tuple(resident), ring_slots=min(slots, len(streamed)),
        slot_bytes=max((sizes[i] for i in streamed), default=0), host=tuple(host), staging_slots=staging,
        device=dev, ram=HostBudget(0, 0, 0, 0),
    )


@pytest.fixture
def toy():
    torch.manual_seed(0)
    model = ToyModel()
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


def test_layout_from_module_is_aligned_and_complete(toy):
    model, _, _ = toy
    layouts = build_layouts(model.blocks, "blocks", None)
    for layout, block in zip(layouts, model.blocks):
        names = {p.name for p in layout.places}
        assert names == {n for n in tensors_of(model) if n.startswith(f"blocks.{layout.index}.")}
        spans = sorted((p.offset, p.offset + p.nbytes) for p in layout.places)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no overlap
        assert all(p.offset % 256 == 0 for p in layout.places)
        assert layout.nbytes >= spans[-1][1] and layout.runs == []


def test_layout_from_gguf_is_the_file_layout(toy, tmp_path):
    model, _, _ = toy
    path = tmp_path / "toy.gguf"
    write_gguf(model, path)
    source = FileSource.from_gguf(path)
    layouts = build_layouts(meta_copy(model).blocks, "blocks", source)
    for layout in layouts:
        assert len(layout.runs) == 1  # a block's tensors are contiguous in the file: one read
        start = layout.runs[0][0]
        for p in layout.places:
            assert p.offset == p.file_offset - start
    # the planner's view of the file agrees with the engine's layout
    assert BlockWeights.from_gguf(path).block_bytes == tuple(l.nbytes for l in layouts)


def run_streamed(model, plan, x, source=None, calls=2):
    engine = attach(model, plan, source=source, device="cpu", progress=False)
    try:
        with torch.no_grad():
            outs = [model(x) for _ in range(calls)]
    finally:
        stats = engine.stats()
        engine.close()
    return outs, stats


@pytest.mark.parametrize(
    "resident,slots",
    [((), 2), ((), 3), ((0, 2, 4), 2), ((1,), 2), (tuple(range(N_BLOCKS)), 2), ((0, 1, 2, 3), 2)],
)
def test_streamed_forward_equals_plain_forward_from_memory(toy, resident, slots):
    model, x, ref = toy
    sizes = [l.nbytes for l in build_layouts(model.blocks, "blocks", None)]
    plan = make_plan(N_BLOCKS, sizes, resident=resident, slots=slots, host=[PINNED] * N_BLOCKS)
    outs, stats = run_streamed(model, plan, x)
    for out in outs:
        assert torch.equal(out, ref)
    n = N_BLOCKS - len(resident)
    # after the first block every streamed block was prefetched: one miss in all
    assert stats["misses"] == (1 if n else 0)
    # each streamed block once per forward, plus the next forward's first blocks
    # prefetched at the end; a single streamed block simply stays in its slot
    depth = min(plan.ring_slots - 1, n - 1) if n > 1 else 0
    assert stats["copies"] == (1 if n == 1 else 2 * n + depth)


@pytest.mark.parametrize("placement", ["pinned", "staged", "mixed"])
def test_streamed_forward_from_file_equals_plain_forward(toy, tmp_path, placement):
    model, x, ref = toy
    path = tmp_path / "toy.gguf"
    write_gguf(model, path)
    meta = meta_copy(model)
    source = FileSource.from_gguf(path)
    sizes = [l.nbytes for l in build_layouts(meta.blocks, "blocks", source)]
    resident = (2,)
    host = {
        "pinned": [PINNED] * N_BLOCKS,
        "staged": [STAGED] * N_BLOCKS,
        "mixed": [PINNED, STAGED, PINNED, STAGED, STAGED],
    }[placement]
    host[2] = DROPPED
    plan = make_plan(N_BLOCKS, sizes, resident=resident, host=host, staging=2 if placement != "pinned" else 0)
    outs, _ = run_streamed(meta, plan, x, source=source, calls=3)
    for out in outs:
        assert torch.equal(out, ref)
    # closing gives the weights back: every block tensor is on the meta device again
    assert all(t.is_meta for b in meta.blocks for t in b.buffers())


def test_repeated_and_out_of_order_calls_stay_exact(toy, tmp_path):
    """CFG passes run one at a time (each block called twice in a row), a forward cut
    short, and blocks called directly: the engine refetches, never uses a stale slot."""
    model, x, ref = toy
    path = tmp_path / "toy.gguf"
    write_gguf(model, path)
    meta = meta_copy(model)
    source = FileSource.from_gguf(path)
    sizes = [l.nbytes for l in build_layouts(meta.blocks, "blocks", source)]
    host = [PINNED, STAGED, STAGED, PINNED, STAGED]
    plan = make_plan(N_BLOCKS, sizes, slots=2, host=host, staging=2)
    engine = attach(meta, plan, source=source, device="cpu", progress=False)
    try:
        with torch.no_grad():
            # each block twice in a row (two CFG passes), same result as one pass twice
            h1 = h2 = meta.embed(x)
            r1 = model.embed(x)
            for i, b in enumerate(meta.blocks):
                h1, h2 = b(h1), b(h2)
                r1 = model.blocks[i](r1)
            assert torch.equal(h1, r1) and torch.equal(h2, r1)
            # a forward cut short after two blocks, then whole forwards
            h = meta.embed(x)
            for b in list(meta.blocks)[:2]:
                h = b(h)
            assert torch.equal(meta(x), ref)
            # blocks out of order
            for i in (3, 0, 4, 4, 1):
                assert torch.equal(meta.blocks[i](r1), model.blocks[i](r1))
            assert torch.equal(meta(x), ref)
    finally:
        engine.close()


def test_engine_refuses_a_plan_for_other_weights(toy):
    model, _, _ = toy
    sizes = [l.nbytes for l in build_layouts(model.blocks, "blocks", None)]
    plan = make_plan(N_BLOCKS, [s // 2 for s in sizes])
    with pytest.raises(ValueError, match="ring slots hold"):
        StreamEngine(model.blocks, plan, device="cpu", load=False)
    with pytest.raises(ValueError, match="plan is for"):
        StreamEngine(model.blocks[:3], plan, device="cpu", load=False)


def test_meta_weight_missing_from_file_is_refused(toy, tmp_path):
    model, _, _ = toy
    path = tmp_path / "toy.gguf"
    write_gguf(model, path)
    source = FileSource.from_gguf(path)
    del source.tensors["blocks.3.norm"]
    with pytest.raises(ValueError, match=r"blocks\.3\.norm .*not in the file"):
        build_layouts(meta_copy(model).blocks, "blocks", source)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_expert_swap_releases_host_memory(tmp_path, device):
    """Two experts, RAM for one: the swap gives the first one's host copies back before
    the second is read; each expert computes exactly as its plain model."""
    x = torch.randn(2, 5, 8)
    experts, refs = {}, {}
    for name, seed in (("high", 1), ("low", 2)):
        model = ToyModel(seed)
        with torch.no_grad():
            refs[name] = model(x)
        path = tmp_path / f"{name}.gguf"
        write_gguf(model, path)
        experts[name] = (meta_copy(model), FileSource.from_gguf(path))
    w = BlockWeights.of(experts["high"][0], experts["high"][1])
    one = sum(w.block_bytes)
    info = DeviceInfo("test", 1 << 40, 1 << 40, 0, 0, 0, "test")
    plan = plan_blocks(w, activation=lambda f, h: 0, vram=1024, ram=f"{one + 1}B", device=info, resident=0)
    assert plan.resident == () and all(h == PINNED for h in plan.host)
    es = ExpertSet(experts, plan, device=device, progress=False)
    assert not es.prefetch  # RAM holds one expert only
    pinned_before = pinned_bytes()
    # pinned_bytes() counts page-locked memory, which exists only with CUDA
    locked = one if device == "cuda" else 0
    xd = x.to(device)
    close = (lambda a, b: torch.equal(a.cpu(), b)) if device == "cpu" else (lambda a, b: torch.allclose(a.cpu(), b, atol=1e-3))
    try:
        model = es.activate("high")
        with torch.no_grad():
            assert close(model(xd), refs["high"])
        assert es.engines["high"].store.pinned_bytes == one
        assert pinned_bytes() - pinned_before == locked
        model = es.activate("low")
        assert es.engines["high"].store.pinned_bytes == 0  # released at the swap
        assert es.engines["low"].store.pinned_bytes == one
        assert pinned_bytes() - pinned_before == locked  # one expert's worth, never two
        with torch.no_grad():
            assert close(model(xd), refs["low"])
        # and back (a second video): reread from the file
        model = es.activate("high")
        with torch.no_grad():
            assert close(model(xd), refs["high"])
    finally:
        es.close()
    assert pinned_bytes() == pinned_before


def test_expert_prefetch_in_background(tmp_path):
    x = torch.randn(2, 5, 8)
    experts, refs = {}, {}
    for name, seed in (("high", 3), ("low", 4)):
        model = ToyModel(seed)
        with torch.no_grad():
            refs[name] = model(x)
        path = tmp_path / f"{name}.gguf"
        write_gguf(model, path)
        experts[name] = (meta_copy(model), FileSource.from_gguf(path))
    w = BlockWeights.of(experts["high"][0], experts["high"][1])
    info = DeviceInfo("test", 1 << 40, 1 << 40, 0, 0, 0, "test")
    plan = plan_blocks(w, activation=lambda f, h: 0, vram=1024, ram=f"{4 * sum(w.block_bytes)}B", device=info, resident=0)
    es = ExpertSet(experts, plan, device="cpu", progress=False)
    assert es.prefetch
    try:
        with torch.no_grad():
            assert torch.equal(es.activate("high")(x), refs["high"])
            assert es._loader is not None and es._loader[0] == "low"
            assert torch.equal(es.activate("low")(x), refs["low"])
    finally:
        es.close()


def t5_streamed(golden, device):
    """(plain output, streamed output) of the golden tiny umt5 GGUF, every block streamed
    through a 2-slot ring, the token table left in host memory."""
    from quant.t5_names import official_name
    from runtime.t5 import load_text_encoder
    from safetensors.torch import load_file

    folder = golden / "t5"
    path = next(folder.glob("*.gguf"))
    io = load_file(str(folder / "io.safetensors"))
    plain = load_text_encoder(path, folder / "tokenizer", device=device, dtype=torch.float32, cache=False)
    ref = plain.forward(io["ids"], io["mask"])
    enc = load_text_encoder(path, folder / "tokenizer", dtype=torch.float32, cache=False)
    source = FileSource.from_gguf(path, rename=official_name)
    layouts = build_layouts(enc.model.blocks, "blocks", source)
    assert all(layout.runs for layout in layouts)  # the packed linears come from the file
    sizes = [layout.nbytes for layout in layouts]
    plan = make_plan(len(sizes), sizes, host=[PINNED, STAGED] * (len(sizes) // 2) + [PINNED] * (len(sizes) % 2), staging=2)
    engine = attach(enc.model, plan, source=source, device=device, exclude=("token_embedding",), progress=False)
    enc.device = torch.device(device)
    try:
        outs = [enc.forward(io["ids"], io["mask"]) for _ in range(2)]
    finally:
        engine.close()
    return ref, outs


@pytest.mark.golden
def test_text_encoder_streams_exactly(golden):
    ref, outs = t5_streamed(golden, "cpu")
    for out in outs:
        assert torch.equal(out, ref)


# -- GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("placement", ["pinned", "staged"])
def test_gpu_streamed_forward_is_bit_identical(toy, tmp_path, placement):
    model, x, _ = toy
    path = tmp_path / "toy.gguf"
    write_gguf(model, path)
    resident_model = copy.deepcopy(model).cuda()
    xc = x.cuda()
    with torch.no_grad():
        ref = resident_model(xc)
    meta = meta_copy(model)
    source = FileSource.from_gguf(path)
    sizes = [l.nbytes for l in build_layouts(meta.blocks, "blocks", source)]
    host = [PINNED if placement == "pinned" else STAGED] * N_BLOCKS
    host[3] = DROPPED
    plan = make_plan(N_BLOCKS, sizes, resident=(3,), host=host, staging=2 if placement == "staged" else 0)
    engine = attach(meta, plan, source=source, device="cuda", progress=False)
    try:
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(meta(xc), ref)
        if placement == "pinned":
            assert pinned_bytes() >= sum(sizes[i] for i in plan.streamed)
    finally:
        engine.close()
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.golden
def test_gpu_text_encoder_streams_exactly(golden):
    ref, outs = t5_streamed(golden, "cuda")
    for out in outs:
        assert torch.equal(out, ref)


@pytest.mark.gpu
def test_gpu_too_small_a_budget_is_refused_before_any_work(toy):
    """A budget below one block plus the activations gives the planner's message, and no
    device memory is taken."""
    model, _, _ = toy
    weights = BlockWeights.of(model)
    before = torch.cuda.memory_allocated()
    info = DeviceInfo.probe("cuda")
    tiny = info.overhead + weights.largest  # room for less than the two ring slots
    with pytest.raises(PlanError, match=r"needs .* GiB of GPU memory; the budget is"):
        plan_blocks(weights, activation=lambda f, h: 64 * MiB, vram=f"{tiny}B", ram=1, device=info)
    assert torch.cuda.memory_allocated() == before

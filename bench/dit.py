"""Benchmark the Wan 2.2 DiT: one full-size A14B block, and the whole expert.

    python bench/dit.py [--out bench-dit.json]      # on the GPU: everything below
    python bench/dit.py --tiny                      # the same logic on tiny sizes (CPU is fine)

Part 1, one block of the 14B expert (dim 5120, 40 heads of 128, FFN 13824), random
weights made on the GPU directly in their stored form (bf16, or random valid q8_0 /
q4_0 blocks: no CPU quantization; a "q4_0" block stores ffn.2 as q4_1 as city96's files
do), at 832x480x81 (21x30x52 = 32,760 tokens) and 1280x720x81 (75,600 tokens), with the
CFG pair run as batch 1 and as batch 2. Reported: median time of the block forward
(CUDA events, after warm-up), TFLOP/s of its matmuls and attention, the ratio to bf16 in
the same run, the time to decode the block's weights alone (GB/s of stored bytes), peak
memory from the allocator (allocated and reserved) and from the driver
(torch.cuda.mem_get_info), the SDPA backend that ran and how far its output is from
flash attention's on the same random q/k/v (JSON only).

Part 2, the whole 40-block expert all-resident at 480p (q8_0, and bf16 for reference):
one forward against the official figure on the same GPU (3.88 s and 40.9 GiB peak with
bf16 weights and cuDNN SDPA). Targets: q8_0 block <= 1.05x bf16; the expert faster than
the official forward with at most half its memory.

Part 3 (--chunks), the block's token chunks: one q8_0 block at each resolution and CFG
batch under each (attention queries : FFN tokens) chunking, "-" for a whole sample (or
batch); the first chunking is the reference. Reported: median time and its ratio to
the reference, the activation peak beside the planner's estimate
(runtime.stream.activations), and whether the output equals the reference's bit for bit.

Part 4 (--memory), the planner's activation estimate against a forward: a full-size
expert cut to --memory-layers blocks (activations do not grow with depth) with q8_0
weights, at each resolution with CFG batch 1 and 2, the allocator's peak (allocated
and reserved) over what the weights and decode scratch hold, beside the estimate.

Every case first checks that its estimated memory fits what the device has free (with a
margin) and is skipped otherwise; an out-of-memory error skips that case too.
"""
from __future__ import annotations

import os

# As the CLI runs: expandable segments keep the allocator's reserve near its peak.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quant.ggml_types import GGMLType, traits  # noqa: E402
from quant.packed import PackedTensor  # noqa: E402
from runtime.attention import resolve_kernel, sdpa_backend_name  # noqa: E402
from runtime.dit import Block, BlockInputs, ComputeSettings, Segment, TimeEmbedding, WanDiT  # noqa: E402
from runtime.dit_config import DiTConfig  # noqa: E402
from runtime.qlinear import QLinear, ScratchPool, attach_scratch  # noqa: E402
from runtime.rope import RopeTable  # noqa: E402
from runtime.stream.activations import dit_activation_bytes, dit_activation_phases  # noqa: E402
from runtime.stream.plan import fused_kernels_ready  # noqa: E402

GIB = 1024**3
# The official WanModel forward on the lent H200 at 832x480x81 (32,760 tokens), bf16
# weights, cuDNN SDPA: the figure the whole-expert run is compared with.
OFFICIAL_480P = {"seconds": 3.88, "peak_gib": 40.9}


@dataclass(frozen=True)
class Size:
    name: str
    config: DiTConfig
    grids: dict  # resolution label -> latent grid in patches (F, H/2, W/2)
    text_tokens: int  # real context rows (padded to 512 by the model)


def a14b(layers: int = 40) -> DiTConfig:
    return DiTConfig(model_type="i2v", in_dim=36, out_dim=16, dim=5120, ffn_dim=13824, freq_dim=256, text_dim=4096,
                     num_heads=40, num_layers=layers, patch_size=(1, 2, 2), heads_source="argument")


def grid_for(width: int, height: int, frames: int) -> tuple[int, int, int]:
    """Wan 2.1 VAE (4x temporal, 8x spatial) then 1x2x2 patches."""
    return ((frames - 1) // 4 + 1, height // 16, width // 16)


FULL = Size("a14b", a14b(), {"480p": grid_for(832, 480, 81), "720p": grid_for(1280, 720, 81)}, 120)
TINY = Size(
    "tiny",
    DiTConfig(model_type="i2v", in_dim=36, out_dim=16, dim=128, ffn_dim=256, freq_dim=256, text_dim=64, num_heads=4,
              num_layers=2, patch_size=(1, 2, 2), heads_source="argument"),
    {"480p": (3, 4, 6), "720p": (3, 6, 8)},
    7,
)

# Weight kinds: what each block linear is stored as.
KINDS = {
    "bf16": lambda name: None,
    "q8_0": lambda name: GGMLType.Q8_0,
    "q4_0": lambda name: GGMLType.Q4_1 if name.endswith("ffn.2") else GGMLType.Q4_0,
}
# Standard deviation of the stored integers of each type (uniform random bytes).
_Q_STD = {GGMLType.Q8_0: 73.9, GGMLType.Q4_0: 4.61, GGMLType.Q4_1: 4.61}


# ---- random weights, made on the device ------------------------------------------------


def random_packed(ggml_type: GGMLType, rows: int, cols: int, device, gen) -> PackedTensor:
    """Valid blocks: uniform random quants, one fp16 scale per block giving weights of
    standard deviation about 1/sqrt(cols)."""
    t = traits(ggml_type)
    n = rows * cols // t.block_size
    data = torch.randint(0, 256, (n, t.type_size), dtype=torch.uint8, device=device, generator=gen)
    d = torch.full((n, 1), cols**-0.5 / _Q_STD[ggml_type], dtype=torch.float16, device=device)
    data[:, 0:2] = d.view(torch.uint8)
    if ggml_type == GGMLType.Q4_1:
        data[:, 2:4] = (-7.5 * d).view(torch.uint8)  # centre the 0..15 nibbles
    return PackedTensor(data.view(-1), ggml_type, (rows, cols))


def fill(module: torch.nn.Module, kind: str, device, gen) -> None:
    """Random weights for every buffer: block linears in `kind`, the other linears F16
    (as in city96's files; bf16 for the bf16 kind), biases/norms/modulation F16, the
    patch embedding F32. `module` is a Block or a whole WanDiT."""
    in_blocks = isinstance(module, Block)
    for name, m in module.named_modules():
        if isinstance(m, QLinear):
            qtype = KINDS[kind](name) if in_blocks or name.startswith("blocks.") else None
            if qtype is not None:
                m.set_weight(random_packed(qtype, m.out_features, m.in_features, device, gen))
            else:
                dtype = torch.bfloat16 if kind == "bf16" else torch.float16
                w = torch.randn(m.out_features, m.in_features, device=device, generator=gen, dtype=dtype)
                m.set_weight(w.mul_(m.in_features**-0.5))
            m.bias = torch.randn(m.out_features, device=device, generator=gen, dtype=torch.float16).mul_(0.02)
    for mod in module.modules():
        for bname, buf in list(mod._buffers.items()):
            if buf is None or buf.device.type != "meta":
                continue
            if bname == "modulation":
                v = torch.randn(buf.shape, device=device, generator=gen).div_(math.sqrt(buf.shape[-1]))
            elif bname == "weight" and buf.dim() == 1:
                v = 1 + 0.1 * torch.randn(buf.shape, device=device, generator=gen)
            elif buf.dim() == 5:  # patch embedding
                v = torch.randn(buf.shape, device=device, generator=gen).div_(math.sqrt(buf[0].numel()))
            else:
                v = 0.02 * torch.randn(buf.shape, device=device, generator=gen)
            setattr(mod, bname, v if buf.dim() == 5 else v.to(torch.float16))


def stored_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


# ---- timing and memory ------------------------------------------------------------------


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn, runs: int, warmup: int, before=None) -> list[float]:
        out = []
        for i in range(warmup + runs):
            if before is not None:
                before()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1000
            else:
                t0 = time.perf_counter()
                fn()
                seconds = time.perf_counter() - t0
            if i >= warmup:
                out.append(seconds)
        return out


def memory_snapshot(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "allocated_peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "reserved_peak_gib": torch.cuda.max_memory_reserved(device) / GIB,
        "driver_used_gib": (total - free) / GIB,
        "device_total_gib": total / GIB,
    }


def fits(device: torch.device, need_bytes: float, margin_gib: float = 4.0) -> tuple[bool, str]:
    if device.type != "cuda":
        return True, ""
    free, _ = torch.cuda.mem_get_info(device)
    ok = need_bytes + margin_gib * GIB <= free
    return ok, f"needs ~{need_bytes / GIB:.1f} GiB + {margin_gib:.0f} margin, {free / GIB:.1f} GiB free"


def activation_estimate(cfg: DiTConfig, tokens: int, batch: int) -> float:
    """Bytes a block forward holds at its peak (bf16 compute): residual stream and its
    saved copy (float32), q/k/v/attention/projection (bf16), FFN hidden (bf16), slack."""
    t = tokens * batch
    return t * (2 * 4 * cfg.dim + 6 * 2 * cfg.dim + 2 * cfg.ffn_dim) * 1.3 + 2 * cfg.dim * cfg.ffn_dim * 2


def block_flops(cfg: DiTConfig, tokens: int, batch: int, text_len: int = 512) -> float:
    d, f, L = cfg.dim, cfg.ffn_dim, tokens
    linear = 2 * L * d * d * 4 + 2 * L * d * d * 2 + 2 * text_len * d * d * 2 + 2 * L * d * f * 2
    attention = 4 * L * L * d + 4 * L * text_len * d
    return batch * (linear + attention)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def attention_agreement(tokens: int, head_dim: int, device, heads: int = 4) -> float | None:
    """rel_l2 of the attention the bench uses against flash attention (or the math kernel)
    on random bf16 q/k/v of this length: a wrong fast kernel would show here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from runtime.attention import sdpa

    if device.type != "cuda":
        return None
    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, generator=gen, dtype=torch.bfloat16) for _ in range(3))
    out = sdpa(q, k, v).float()
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
            break
        except RuntimeError:
            continue
    ref = ref.transpose(1, 2).float()
    return ((out - ref).norm() / ref.norm()).item()


# ---- part 1: one block -------------------------------------------------------------------


def make_block(size: Size, kind: str, res: str, batch: int, device, settings: ComputeSettings):
    """A block with random `kind` weights, its inputs (x0 [B, S, dim] float32, one
    timestep, random text context) and the BlockInputs for `settings`."""
    cfg = size.config
    grid = size.grids[res]
    tokens = math.prod(grid)
    gen = torch.Generator(device=device).manual_seed(0)
    block = Block(cfg, device="meta")
    fill(block, kind, device, gen)
    pool = ScratchPool(limit_bytes=max(cfg.dim * cfg.dim, cfg.dim * cfg.ffn_dim) * 2)
    attach_scratch(block, pool)
    d = cfg.dim
    x0 = torch.randn(batch, tokens, d, device=device, generator=gen)
    e0 = 0.1 * torch.randn(1, 6, d, device=device, generator=gen)
    time_emb = TimeEmbedding(torch.zeros(1, d, device=device), e0, [Segment(0, batch * tokens, 0)])
    context = torch.randn(batch, 512, d, device=device, generator=gen, dtype=torch.bfloat16)
    rope = [RopeTable(cfg.head_dim, device).for_grid(*grid)] * batch
    return block, x0, BlockInputs(time_emb, context, [tokens] * batch, rope, settings)


def block_estimate(cfg: DiTConfig, tokens: int, batch: int, settings: ComputeSettings, device) -> int:
    """The planner's bytes for one block call on top of x, the context and the rope: its
    largest phase."""
    phases = dit_activation_phases(
        dim=cfg.dim, ffn_dim=cfg.ffn_dim, heads=cfg.num_heads, tokens=tokens, text_len=cfg.text_len, batch=batch,
        dtype_bytes=2, attn_chunk=settings.attn_chunk_tokens, ffn_chunk=settings.ffn_chunk_tokens,
        head_chunk=settings.attn_heads_per_chunk, chunk_values=settings.chunk_values,
        fused=device.type == "cuda" and fused_kernels_ready(), head_out=cfg.patch_numel * cfg.out_dim,
    )
    return max(phases["self_attention"], phases["cross_attention"], phases["ffn"])


def bench_block(size: Size, kind: str, res: str, batch: int, device, runs: int, warmup: int, attention: str) -> dict:
    cfg = size.config
    tokens = math.prod(size.grids[res])
    row = {"part": "block", "kind": kind, "resolution": res, "tokens": tokens, "cfg_batch": batch}
    need = activation_estimate(cfg, tokens, batch) + 0.8 * GIB * (cfg.dim / 5120) ** 2
    ok, why = fits(device, need)
    if not ok:
        return {**row, "skipped": why}
    settings = ComputeSettings(dtype=torch.bfloat16, attention=attention)
    block, x0, ctx = make_block(size, kind, res, batch, device, settings)
    x = x0.clone()
    clock = Clock(device)
    try:
        block(x, ctx)  # allocates the decode scratch, which then counts as a weight, not an activation
        release()
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        times = clock.time(lambda: block(x, ctx), runs, warmup, before=lambda: x.copy_(x0))
        mem = memory_snapshot(device)
        linears = [m for m in block.modules() if isinstance(m, QLinear)]
        decode = None
        if any(m.needs_decode(torch.bfloat16) for m in linears):
            decode = statistics.median(clock.time(lambda: [m.dense_weight(torch.bfloat16) for m in linears], runs, 1))
    except torch.cuda.OutOfMemoryError as e:
        return {**row, "skipped": f"out of memory: {str(e).splitlines()[0]}"}
    finally:
        del x, x0, block
        release()
    seconds = statistics.median(times)
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    row.update(
        seconds=seconds,
        all_seconds=times,
        tflops=block_flops(cfg, tokens, batch) / seconds / 1e12,
        block_weight_bytes=weight_bytes,
        decode_seconds=decode,
        decode_gbps=None if decode is None else weight_bytes / decode / 1e9,
        attention=attention if attention != "sdpa" else sdpa_backend_name(device, torch.bfloat16, cfg.head_dim),
        attention_rel_l2_vs_flash=attention_agreement(tokens, cfg.head_dim, device) if batch == 1 else None,
        **mem,
    )
    if mem:
        row["activation_peak_gib"] = mem["allocated_peak_gib"] - base / GIB
        row["activation_estimate_gib"] = block_estimate(cfg, tokens, batch, settings, device) / GIB
    return row


# ---- part 3: token chunks ------------------------------------------------------------------


def parse_chunks(text: str) -> list[tuple[int | None, int | None]]:
    """"-:-,8192:16384,..." -> [(None, None), (8192, 16384), ...] (attention : FFN)."""
    out = []
    for item in text.split(","):
        a, f = item.split(":")
        out.append(tuple(None if v.strip() == "-" else int(v) for v in (a, f)))
    return out


# Whole samples first (the reference), the defaults, then each chunk alone around them.
SWEEP = "-:-,8192:16384,16384:16384,4096:16384,2048:16384,8192:32768,8192:8192,8192:4096,8192:-"


def bench_chunks(size: Size, kind: str, res: str, batch: int, device, runs: int, warmup: int, attention: str,
                 chunkings: list) -> list[dict]:
    cfg = size.config
    tokens = math.prod(size.grids[res])
    base_row = {"part": "chunks", "kind": kind, "resolution": res, "tokens": tokens, "cfg_batch": batch}
    need = activation_estimate(cfg, tokens, batch) + 0.8 * GIB * (cfg.dim / 5120) ** 2
    ok, why = fits(device, need)
    if not ok:
        return [{**base_row, "skipped": why}]
    settings = ComputeSettings(dtype=torch.bfloat16, attention=attention)
    block, x0, ctx = make_block(size, kind, res, batch, device, settings)
    x = x0.clone()
    clock = Clock(device)
    rows, reference, ref_seconds = [], None, None
    try:
        for attn, ffn in chunkings:
            settings.attn_chunk_tokens, settings.ffn_chunk_tokens = attn, ffn
            row = {**base_row, "attn_chunk": attn, "ffn_chunk": ffn}
            try:
                x.copy_(x0)
                block(x, ctx)  # warm-up; decode scratch allocated
                release()
                base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                times = clock.time(lambda: block(x, ctx), runs, warmup, before=lambda: x.copy_(x0))
                mem = memory_snapshot(device)
                x.copy_(x0)
                out = block(x, ctx)
            except torch.cuda.OutOfMemoryError as e:
                rows.append({**row, "skipped": f"out of memory: {str(e).splitlines()[0]}"})
                release()
                continue
            seconds = statistics.median(times)
            if reference is None:
                reference, ref_seconds = out.clone(), seconds
            row.update(
                seconds=seconds, all_seconds=times, vs_reference=seconds / ref_seconds,
                tflops=block_flops(cfg, tokens, batch) / seconds / 1e12,
                equal_to_reference=bool(torch.equal(out, reference)),
                max_abs_to_reference=float((out - reference).abs().max()),
                activation_estimate_gib=block_estimate(cfg, tokens, batch, settings, device) / GIB,
            )
            if mem:
                row["activation_peak_gib"] = mem["allocated_peak_gib"] - base / GIB
                row["reserved_peak_gib"] = mem["reserved_peak_gib"]
            rows.append(row)
            print(f"chunks {res} cfg {batch} {attn}:{ffn}: {seconds * 1e3:.1f} ms ({row['vs_reference']:.3f}), "
                  f"equal {row['equal_to_reference']}", file=sys.stderr, flush=True)
    finally:
        del x, x0, block, reference
        release()
    return rows


# ---- part 4: the activation estimate against a forward ------------------------------------


def bench_memory(size: Size, res: str, batch: int, layers: int, device, attention: str, attn_chunk: int | None) -> dict:
    from dataclasses import replace

    cfg = replace(size.config, num_layers=layers)
    f, h, w = size.grids[res]
    tokens = f * h * w
    row = {"part": "memory", "kind": "q8_0", "resolution": res, "tokens": tokens, "cfg_batch": batch, "blocks": layers,
           "attn_chunk": attn_chunk}
    settings = ComputeSettings(dtype=torch.bfloat16, attention=attention, attn_chunk_tokens=attn_chunk)
    estimate = dit_activation_bytes(
        dim=cfg.dim, ffn_dim=cfg.ffn_dim, heads=cfg.num_heads, tokens=tokens, text_len=cfg.text_len, batch=batch,
        dtype_bytes=2, attn_chunk=settings.attn_chunk_tokens, ffn_chunk=settings.ffn_chunk_tokens,
        fused=device.type == "cuda" and fused_kernels_ready(), head_out=cfg.patch_numel * cfg.out_dim,
    )
    ok, why = fits(device, estimate + 3 * GIB * (cfg.dim / 5120) ** 2)
    if not ok:
        return {**row, "skipped": why}
    gen = torch.Generator(device=device).manual_seed(0)
    model = WanDiT(cfg, settings, device="meta")
    fill(model, "q8_0", device, gen)
    in_ch = cfg.in_dim - cfg.out_dim
    x = [torch.randn(cfg.out_dim, f, 2 * h, 2 * w, device=device, generator=gen) for _ in range(batch)]
    y = [torch.randn(in_ch, f, 2 * h, 2 * w, device=device, generator=gen) for _ in range(batch)]
    context = [torch.randn(n, cfg.text_dim, device=device, generator=gen, dtype=torch.bfloat16)
               for n in (size.text_tokens, size.text_tokens // 3 + 1)[:batch]]
    t = torch.full((batch,), 900.0, device=device)
    try:
        with torch.no_grad():
            small = [u[:, :1, :2, :2] for u in x], t, context, 1
            model(*small, y=[u[:, :1, :2, :2] for u in y])  # the decode scratch and kernels, once
            release()
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            base_reserved = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
            model(x, t, context, tokens, y=y)
            mem = memory_snapshot(device)
    except torch.cuda.OutOfMemoryError as e:
        return {**row, "skipped": f"out of memory: {str(e).splitlines()[0]}"}
    finally:
        del model
        release()
    row.update(activation_estimate_gib=estimate / GIB)
    if mem:
        row["activation_peak_gib"] = mem["allocated_peak_gib"] - base / GIB
        row["reserved_growth_gib"] = mem["reserved_peak_gib"] - base_reserved / GIB
    return row


# ---- part 2: the whole expert ------------------------------------------------------------


def bench_expert(size: Size, kind: str, device, runs: int, warmup: int, attention: str) -> dict:
    cfg = size.config
    grid = size.grids["480p"]
    tokens = math.prod(grid)
    row = {"part": "expert", "kind": kind, "resolution": "480p", "tokens": tokens, "cfg_batch": 1, "blocks": cfg.num_layers}
    per_block = {"bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}[kind] * 4 * (2 * cfg.dim**2 + cfg.dim * cfg.ffn_dim)
    need = per_block * cfg.num_layers + 0.6 * GIB * (cfg.dim / 5120) ** 2 + activation_estimate(cfg, tokens, 1)
    ok, why = fits(device, need)
    if not ok:
        return {**row, "skipped": why}
    gen = torch.Generator(device=device).manual_seed(0)
    model = WanDiT(cfg, ComputeSettings(dtype=torch.bfloat16, attention=attention), device="meta")
    fill(model, kind, device, gen)
    f, h, w = grid
    x = [torch.randn(16, f, 2 * h, 2 * w, device=device, generator=gen)]
    y = [torch.randn(20, f, 2 * h, 2 * w, device=device, generator=gen)]
    context = [torch.randn(size.text_tokens, cfg.text_dim, device=device, generator=gen, dtype=torch.bfloat16)]
    t = torch.tensor([999], device=device)
    clock = Clock(device)
    try:
        release()
        weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else stored_bytes(model)
        times = clock.time(lambda: model(x, t, context, tokens, y=y), runs, warmup)
        mem = memory_snapshot(device)
    except torch.cuda.OutOfMemoryError as e:
        return {**row, "skipped": f"out of memory: {str(e).splitlines()[0]}"}
    finally:
        del model
        release()
    seconds = statistics.median(times)
    row.update(seconds=seconds, all_seconds=times, weights_gib=weights / GIB,
               tflops=cfg.num_layers * block_flops(cfg, tokens, 1) / seconds / 1e12, **mem)
    if mem and size is FULL:
        row["vs_official_time"] = seconds / OFFICIAL_480P["seconds"]
        row["vs_official_peak"] = mem["allocated_peak_gib"] / OFFICIAL_480P["peak_gib"]
    return row


# ---- report --------------------------------------------------------------------------------


def ratios_to_bf16(rows: list[dict]) -> None:
    base = {(r["part"], r["resolution"], r["cfg_batch"]): r["seconds"] for r in rows if r["kind"] == "bf16" and "seconds" in r}
    for r in rows:
        b = base.get((r["part"], r["resolution"], r["cfg_batch"]))
        if b and "seconds" in r:
            r["vs_bf16"] = r["seconds"] / b


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = (f"{'part':<7}{'kind':<6}{'res':<6}{'tokens':>8}{'cfg':>4}{'seconds':>10}{'TFLOP/s':>9}{'vs bf16':>9}"
            f"{'decode GB/s':>12}{'alloc GiB':>10}{'act GiB':>9}{'resv GiB':>9}{'driver GiB':>11}  attention")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["part"] in ("chunks", "memory"):
            continue
        if "skipped" in r:
            lines.append(f"{r['part']:<7}{r['kind']:<6}{r['resolution']:<6}{r['tokens']:>8}{r['cfg_batch']:>4}  skipped: {r['skipped']}")
            continue
        lines.append(
            f"{r['part']:<7}{r['kind']:<6}{r['resolution']:<6}{r['tokens']:>8}{r['cfg_batch']:>4}"
            f"{r['seconds']:>10.4f}{fmt(r.get('tflops'), '.0f'):>9}{fmt(r.get('vs_bf16'), '.3f'):>9}"
            f"{fmt(r.get('decode_gbps'), '.0f'):>12}{fmt(r.get('allocated_peak_gib'), '.2f'):>10}"
            f"{fmt(r.get('activation_peak_gib'), '.2f'):>9}{fmt(r.get('reserved_peak_gib'), '.2f'):>9}"
            f"{fmt(r.get('driver_used_gib'), '.2f'):>11}  {r.get('attention', '')}"
        )
    for r in rows:
        if r["part"] == "expert" and "vs_official_time" in r:
            lines.append(
                f"expert {r['kind']} 480p: {r['seconds']:.2f} s = {r['vs_official_time']:.2f}x the official "
                f"{OFFICIAL_480P['seconds']} s; peak {r['allocated_peak_gib']:.1f} GiB = {r['vs_official_peak']:.2f}x the "
                f"official {OFFICIAL_480P['peak_gib']} GiB (targets: < 1x and <= 0.5x)"
            )
    q8 = [r for r in rows if r["part"] == "block" and r["kind"] == "q8_0" and "vs_bf16" in r]
    if q8:
        worst = max(r["vs_bf16"] for r in q8)
        lines.append(f"q8_0 block vs bf16: worst {worst:.3f}x (target <= 1.05x)")
    blocks = [r for r in rows if r["part"] == "block" and "activation_estimate_gib" in r]
    for r in blocks:
        lines.append(f"block {r['kind']} {r['resolution']} cfg {r['cfg_batch']}: activations measured "
                     f"{r['activation_peak_gib']:.2f} GiB, estimated {r['activation_estimate_gib']:.2f} GiB")
    return "\n".join(lines)


def chunk_table(rows: list[dict]) -> str:
    head = (f"{'kind':<6}{'res':<6}{'cfg':>4}{'attn':>7}{'ffn':>7}{'ms':>9}{'vs whole':>9}{'TFLOP/s':>9}"
            f"{'act GiB':>9}{'est GiB':>9}{'resv GiB':>9}  output")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['kind']:<6}{r['resolution']:<6}{r['cfg_batch']:>4}  skipped: {r['skipped']}")
            continue
        same = "= whole" if r["equal_to_reference"] else f"max |diff| {r['max_abs_to_reference']:.2e}"
        lines.append(
            f"{r['kind']:<6}{r['resolution']:<6}{r['cfg_batch']:>4}{fmt(r['attn_chunk'], 'd'):>7}"
            f"{fmt(r['ffn_chunk'], 'd'):>7}{r['seconds'] * 1e3:>9.1f}{r['vs_reference']:>9.3f}{r['tflops']:>9.0f}"
            f"{fmt(r.get('activation_peak_gib'), '.2f'):>9}{r['activation_estimate_gib']:>9.2f}"
            f"{fmt(r.get('reserved_peak_gib'), '.2f'):>9}  {same}"
        )
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    head = f"{'res':<6}{'tokens':>8}{'cfg':>4}{'attn':>7}{'measured GiB':>14}{'reserved +GiB':>15}{'estimate GiB':>14}{'meas/est':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['resolution']:<6}{r['tokens']:>8}{r['cfg_batch']:>4}  skipped: {r['skipped']}")
            continue
        meas = r.get("activation_peak_gib")
        lines.append(
            f"{r['resolution']:<6}{r['tokens']:>8}{r['cfg_batch']:>4}{fmt(r['attn_chunk'], 'd'):>7}{fmt(meas, '.2f'):>14}"
            f"{fmt(r.get('reserved_growth_gib'), '.2f'):>15}{r['activation_estimate_gib']:>14.2f}"
            f"{fmt(None if meas is None else meas / r['activation_estimate_gib'], '.3f'):>10}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks the bench logic on any device")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--kinds", default="bf16,q8_0,q4_0")
    p.add_argument("--resolutions", default="480p,720p")
    p.add_argument("--cfg", default="1,2", help="CFG batch sizes for the block part")
    p.add_argument("--expert-kinds", default="q8_0,bf16", help="'' skips the whole-expert part")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attention", default=None, help="sdpa (default) or sage")
    p.add_argument("--chunks", default="", help=f"part 3: 'sweep' ({SWEEP}) or such a list; '' skips it")
    p.add_argument("--chunk-kinds", default="q8_0", help="weight kinds of part 3")
    p.add_argument("--memory", action="store_true", help="part 4: the activation estimate against forwards")
    p.add_argument("--memory-layers", type=int, default=2, help="blocks of the expert in part 4")
    p.add_argument("--out", default="bench-dit.json")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = TINY if args.tiny else FULL
    attention = resolve_kernel(args.attention)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None, "size": size.name,
            "official_480p": OFFICIAL_480P}
    rows = []
    kinds = [k for k in args.kinds.split(",") if k]
    for res in [r for r in args.resolutions.split(",") if r]:
        for batch in [int(b) for b in args.cfg.split(",") if b]:
            for kind in kinds:
                r = bench_block(size, kind, res, batch, device, args.runs, args.warmup, attention)
                print(f"block {kind} {res} cfg {batch}: {r.get('seconds', r.get('skipped'))}", file=sys.stderr, flush=True)
                rows.append(r)
    for kind in [k for k in args.expert_kinds.split(",") if k]:
        r = bench_expert(size, kind, device, max(1, args.runs // 2), 1, attention)
        print(f"expert {kind}: {r.get('seconds', r.get('skipped'))}", file=sys.stderr, flush=True)
        rows.append(r)
    resolutions = [r for r in args.resolutions.split(",") if r]
    if args.chunks:
        chunkings = parse_chunks(SWEEP if args.chunks == "sweep" else args.chunks)
        for res in resolutions:
            for batch in [int(b) for b in args.cfg.split(",") if b]:
                for kind in [k for k in args.chunk_kinds.split(",") if k]:
                    rows += bench_chunks(size, kind, res, batch, device, args.runs, args.warmup, attention, chunkings)
    if args.memory:
        for res in resolutions:
            for batch in (1, 2):
                for attn_chunk in (None, 8192 if size is FULL else 16):  # whole samples, query chunks
                    r = bench_memory(size, res, batch, args.memory_layers, device, attention, attn_chunk)
                    print(f"memory {res} cfg {batch} attention chunk {attn_chunk}: "
                          f"{r.get('activation_peak_gib', r.get('skipped'))}", file=sys.stderr, flush=True)
                    rows.append(r)
    ratios_to_bf16(rows)
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(f"{info['device']}, torch {info['torch']}, {size.name} sizes; JSON: {args.out}")
    print(table(rows))
    if any(r["part"] == "chunks" for r in rows):
        print(chunk_table([r for r in rows if r["part"] == "chunks"]))
    if any(r["part"] == "memory" for r in rows):
        print(memory_table([r for r in rows if r["part"] == "memory"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

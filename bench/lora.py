"""Benchmark LoRA on quantized weights: per-forward cost of a rank-64 LoRA on every linear
of one full-size Wan 2.2 A14B block, side path vs merge.

    python bench/lora.py [--out bench-lora.json]     # on the GPU
    python bench/lora.py --tiny                      # the same logic on tiny sizes (CPU is fine)

One block of the 14B expert (dim 5120, 40 heads, FFN 13824) with random valid q8_0
weights made on the GPU (bench/dit.py's `fill`), at 832x480x81 (32,760 tokens), the CFG
pair as batch 1 and batch 2, bf16 compute. A rank-64 LoRA (bf16 factors, as the LightX2V
files store them) on all ten linears: self-attention q/k/v/o, cross-attention q/k/v/o
(k/v run on the 512 context rows), FFN up and down. Each LoRA mode is timed in the same
run as the block without LoRA:

  side   y = x·Wᵀ + b + ((x·downᵀ)·scale)·upᵀ        cost grows with tokens
  merge  W_scratch += up·diag(scale)·down (float32 product) right after the decode
  auto   per linear and call, whichever does fewer multiply-adds (the default)

Reported: median block time (CUDA events, after warm-up), overhead over the plain block
(target <= 5%), the LoRA's own multiply-adds (TFLOP/s over the extra time), the merged
weight's distance from round(W + delta formed in float32) (units in the last place of the
weight; up to 1 is the double rounding of a weight decoded to bf16 first), the time to
decode the block's weights alone and with the merge ("decode s" of the none and merge
rows), and how far each mode's block output is from the merge's, relative to the LoRA's
effect on it ("vs merge", rel. L2).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from dit import FULL, TINY, Clock, activation_estimate, fill, fits, fmt, memory_snapshot, release  # noqa: E402

from runtime.dit import Block, BlockInputs, ComputeSettings, Segment, TimeEmbedding  # noqa: E402
from runtime.qlinear import QLinear, ScratchPool, attach_scratch  # noqa: E402
from runtime.rope import RopeTable  # noqa: E402
from runtime.attention import resolve_kernel  # noqa: E402

MODES = ("side", "merge", "auto")
TARGET_OVERHEAD = 0.05
TEXT_ROWS = 512


def add_lora(block: Block, rank: int, device, gen, dtype=torch.bfloat16) -> None:
    for m in block.modules():
        if isinstance(m, QLinear):
            down = (torch.randn(rank, m.in_features, device=device, generator=gen) / m.in_features**0.5).to(dtype)
            up = (0.02 * torch.randn(m.out_features, rank, device=device, generator=gen)).to(dtype)
            m.set_lora(down, up, torch.full((rank,), 0.5, device=device))


def merge_precision(block: Block, dtype: torch.dtype) -> dict:
    """The merged FFN-down weight against W + delta formed in float64 (W decoded in
    float32, exact for the packed types), in units in the last place of `dtype` at the
    size of the terms: the larger of |W| and the sum of |up·scale·down| products (where
    the rank-R sum cancels to nearly nothing, the result's own ulp says nothing about
    how it was computed). Up to 1 is the double rounding of a weight decoded to `dtype`
    before the add; more is an error, e.g. products or their sum rounded to 16 bits."""
    lin = block.ffn[2]
    up, down = lin.lora_up.double() * lin.lora_scale.double(), lin.lora_down.double()
    merged = lin.dense_weight(dtype).double()
    base = lin.decoded(torch.float32).double()
    exact = base + up @ down
    size = torch.maximum(base.abs(), up.abs() @ down.abs())
    _, exponent = torch.frexp(torch.maximum(size, exact.abs()))
    mantissa_bits = round(-math.log2(torch.finfo(dtype).eps))  # bf16 7, float32 23
    spacing = torch.ldexp(torch.ones_like(exact), exponent - mantissa_bits - 1)
    return {"merge_max_ulps": ((merged - exact).abs() / spacing).max().item()}


def lora_flops(block: Block, tokens: int, batch: int, mode: str) -> float:
    """Multiply-adds x 2 that the LoRA adds to one block forward in `mode`."""
    total = 0.0
    for name, m in block.named_modules():
        if not isinstance(m, QLinear) or m.lora_down is None:
            continue
        rows = batch * (TEXT_ROWS if name in ("cross_attn.k", "cross_attn.v") else tokens)
        merge = mode == "merge" or (mode == "auto" and m.lora_merges(rows))
        r = m.lora_rank
        total += 2 * m.out_features * m.in_features * r if merge else 2 * rows * r * (m.in_features + m.out_features)
    return total


def bench(size, batch: int, rank: int, device, runs: int, warmup: int, attention: str) -> list[dict]:
    cfg = size.config
    grid = size.grids["480p"]
    tokens = math.prod(grid)
    rows_out = []
    head = {"resolution": "480p", "tokens": tokens, "cfg_batch": batch, "rank": rank, "weights": "q8_0"}
    ok, why = fits(device, activation_estimate(cfg, tokens, batch) + 0.8 * 2**30 * (cfg.dim / 5120) ** 2)
    if not ok:
        return [{**head, "mode": m, "skipped": why} for m in ("none", *MODES)]
    gen = torch.Generator(device=device).manual_seed(0)
    block = Block(cfg, device="meta")
    fill(block, "q8_0", device, gen)
    attach_scratch(block, ScratchPool(limit_bytes=max(cfg.dim * cfg.dim, cfg.dim * cfg.ffn_dim) * 2))
    d = cfg.dim
    settings = ComputeSettings(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, attention=attention)
    x0 = torch.randn(batch, tokens, d, device=device, generator=gen)
    e0 = 0.1 * torch.randn(1, 6, d, device=device, generator=gen)
    time_emb = TimeEmbedding(torch.zeros(1, d, device=device), e0, [Segment(0, batch * tokens, 0)])
    context = torch.randn(batch, TEXT_ROWS, d, device=device, generator=gen, dtype=settings.dtype)
    rope = [RopeTable(cfg.head_dim, device).for_grid(*grid)] * batch
    ctx = BlockInputs(time_emb, context, [tokens] * batch, rope, settings)
    linears = [m for m in block.modules() if isinstance(m, QLinear)]
    clock = Clock(device)
    x = x0.clone()
    outputs = {}

    def run(mode: str) -> dict:
        for m in linears:
            m.lora_mode = mode if mode != "none" else "auto"
        times = clock.time(lambda: block(x, ctx), runs, warmup, before=lambda: x.copy_(x0))
        x.copy_(x0)
        outputs[mode] = block(x, ctx).float().clone()
        decode = None
        if mode in ("none", "merge"):  # the weights alone: decode, and decode + merge
            decode = statistics.median(clock.time(lambda: [m.dense_weight(settings.dtype) for m in linears], runs, 1))
        return {"seconds": statistics.median(times), "all_seconds": times, "decode_seconds": decode}

    try:
        release()
        block(x, ctx)  # scratch allocated before the measurements
        results = {"none": run("none")}
        add_lora(block, rank, device, gen, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        for mode in MODES:
            results[mode] = run(mode)
        mem = memory_snapshot(device)
        precision = merge_precision(block, settings.dtype)
    except torch.cuda.OutOfMemoryError as e:
        return [{**head, "mode": m, "skipped": f"out of memory: {str(e).splitlines()[0]}"} for m in ("none", *MODES)]
    base = results["none"]["seconds"]
    ref = outputs["merge"]
    for mode, r in results.items():
        row = {**head, "mode": mode, **r, **mem, **(precision if mode == "merge" else {})}
        if mode != "none":
            extra = r["seconds"] - base
            flops = lora_flops(block, tokens, batch, mode)
            row.update(overhead=extra / base, lora_flops=flops,
                       lora_tflops=flops / extra / 1e12 if extra > 0 else None,
                       # the side path's deviation from the merge, relative to the LoRA's effect on the output
                       rel_l2_vs_merge=((outputs[mode] - ref).norm() / (ref - outputs["none"]).norm()).item())
            if r["decode_seconds"] is not None:
                row["merge_seconds"] = r["decode_seconds"] - results["none"]["decode_seconds"]
        rows_out.append(row)
    del block, x, x0
    release()
    return rows_out


def table(rows: list[dict]) -> str:
    head = (f"{'mode':<7}{'tokens':>8}{'cfg':>4}{'rank':>5}{'seconds':>10}{'overhead':>10}{'LoRA TFLOP/s':>13}"
            f"{'decode s':>10}{'alloc GiB':>10}{'vs merge':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['mode']:<7}{r['tokens']:>8}{r['cfg_batch']:>4}{r['rank']:>5}  skipped: {r['skipped']}")
            continue
        over = r.get("overhead")
        lines.append(
            f"{r['mode']:<7}{r['tokens']:>8}{r['cfg_batch']:>4}{r['rank']:>5}{r['seconds']:>10.4f}"
            f"{fmt(None if over is None else 100 * over, '+.2f') + ('%' if over is not None else ''):>10}"
            f"{fmt(r.get('lora_tflops'), '.1f'):>13}{fmt(r['decode_seconds'], '.4f'):>10}"
            f"{fmt(r.get('allocated_peak_gib'), '.2f'):>10}{fmt(r.get('rel_l2_vs_merge'), '.1e'):>10}")
    for r in rows:
        if "merge_max_ulps" in r:
            lines.append(f"merged weight (cfg {r['cfg_batch']}): max {r['merge_max_ulps']:.2f} ulp from "
                         "W + delta in float64 at the size of its terms (expected <= 1 for 16-bit weights)")
    measured = [r for r in rows if r.get("overhead") is not None]
    for mode in MODES:
        worst = [r["overhead"] for r in measured if r["mode"] == mode]
        if worst:
            lines.append(f"{mode}: worst overhead {100 * max(worst):+.2f}% (target <= {100 * TARGET_OVERHEAD:.0f}%)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks the bench logic on any device")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--cfg", default="1,2", help="CFG batch sizes")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attention", default=None, help="sdpa (default) or sage")
    p.add_argument("--out", default="bench-lora.json")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = TINY if args.tiny else FULL
    attention = resolve_kernel(args.attention)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "size": size.name,
            "dim": size.config.dim, "ffn_dim": size.config.ffn_dim, "heads": size.config.num_heads}
    rows = []
    for batch in [int(b) for b in args.cfg.split(",") if b]:
        got = bench(size, batch, args.rank, device, args.runs, args.warmup, attention)
        for r in got:
            print(f"cfg {batch} {r['mode']}: {r.get('seconds', r.get('skipped'))}", file=sys.stderr, flush=True)
        rows += got
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(f"{info['device']}, torch {info['torch']}, {size.name} sizes; JSON: {args.out}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

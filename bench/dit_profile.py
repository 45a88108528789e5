"""Where the time of one DiT block goes, with the fused elementwise kernels and without.

    python bench/dit_profile.py [--kinds bf16,q8_0] [--cfg 1,2] [--out bench-dit-profile.json]
    python bench/dit_profile.py --tiny          # the same logic on tiny sizes (CPU is fine)

One full-size A14B block (dim 5120, 40 heads, FFN 13824; random weights made on the
device as bench/dit.py makes them) at 832x480x81 (32,760 tokens), run twice over: on
the torch twins (runtime.fused disabled: the op-by-op float32/float64 code) and on the
fused kernels. For each:
  * the whole block forward, median of CUDA-event times;
  * the same forward cut into stages (Block.forward's calls, in order, with an event
    after each), median per stage, with the fewest bytes each elementwise stage must
    move and the GB/s that makes;
  * one forward under torch.profiler, device time summed by kernel kind (matmul,
    attention, wanrt kernels, torch norms, elementwise, copies) and the top kernels.
Then, at full size on fresh random data, how closely each kernel agrees with its twin
(share of identical values, largest difference in bf16/float32 steps, rel_l2), and the
device's two ceilings measured in the same run: a device-to-device copy (GB/s, bytes
read + written) and a bf16 matmul of the block's q shape (TFLOP/s).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime import fused  # noqa: E402
from runtime.attention import attention  # noqa: E402
from runtime.dit import Block, BlockInputs, ComputeSettings, Segment, TimeEmbedding, gated_add_, modulated_norm  # noqa: E402
from runtime.qlinear import ScratchPool, attach_scratch  # noqa: E402
from runtime.rope import RopeTable  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_dit", Path(__file__).with_name("dit.py"))
bench_dit = sys.modules["bench_dit"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_dit)

MODES = ("twins", "kernels")


# ---- timing --------------------------------------------------------------------------------


class Marks:
    """Timestamps after each stage: CUDA events on a GPU, the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.names: list[str | None] = []
        self.stamps = []

    def __call__(self, name: str | None) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
        else:
            e = time.perf_counter()
        self.names.append(name)
        self.stamps.append(e)

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            self.stamps[-1].synchronize()
        out = {}
        for i in range(1, len(self.stamps)):
            a, b = self.stamps[i - 1], self.stamps[i]
            dt = a.elapsed_time(b) / 1000 if self.cuda else b - a
            out[self.names[i]] = out.get(self.names[i], 0.0) + dt
        return out


def staged_forward(block: Block, x: torch.Tensor, ctx: BlockInputs, mark) -> torch.Tensor:
    """Block.forward's calls in its order, `mark(stage)` after each stage."""
    B, S, D = x.shape
    st = ctx.settings
    chunk, segs = st.chunk_tokens(D), ctx.time.segments
    mod = block.modulation.float().view(6, D) + ctx.time.e0
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod.unbind(1)
    sa, ca, n = block.self_attn, block.cross_attn, block.self_attn.num_heads
    heads = dict(kernel=st.attention, heads_per_chunk=st.attn_heads_per_chunk)
    mark(None)
    h = modulated_norm(x.view(-1, D), shift_sa, scale_sa, segs, st.dtype, block.eps, chunk).view(B, S, D)
    mark("LN1 + modulation")
    q = sa.q(h)
    mark("q linear")
    sa.norm_q.normalize_(q, chunk, ctx.rope)
    mark("q RMSNorm + rope")
    k = sa.k(h)
    mark("k linear")
    sa.norm_k.normalize_(k, chunk, ctx.rope)
    mark("k RMSNorm + rope")
    v = sa.v(h)
    mark("v linear")
    del h
    a = attention(q.view(B, S, n, -1), k.view(B, S, n, -1), v.view(B, S, n, -1), ctx.seq_lens, **heads)
    mark("self-attention")
    del q, k, v
    y = sa.o(a.reshape(B, S, D))
    mark("o linear")
    del a
    if x.dtype != torch.float32:
        x = x.float()
    xf = x.view(-1, D)
    gated_add_(xf, y.view(-1, D), gate_sa, segs, chunk)
    mark("x += y*gate (self)")
    del y
    h = block.norm3(xf, st.dtype, chunk).view(B, S, D)
    mark("LN3 (affine)")
    q = ca.q(h)
    mark("cross q linear")
    del h
    ca.norm_q.normalize_(q, chunk)
    mark("cross q RMSNorm")
    kc = ca.norm_k.normalize_(ca.k(ctx.context), chunk)
    vc = ca.v(ctx.context)
    mark("cross k, v (context)")
    a = attention(q.view(B, S, n, -1), kc.view(B, -1, n, D // n), vc.view(B, -1, n, D // n), **heads)
    mark("cross-attention")
    del q, kc, vc
    y = ca.o(a.reshape(B, S, D))
    mark("cross o linear")
    del a
    fused.gated_add_(xf, y.view(-1, D))
    mark("x += y (cross)")
    del y
    up, down = block.ffn[0], block.ffn[2]
    w_up, w_down = up.dense_weight(st.dtype, slot=0), down.dense_weight(st.dtype, slot=1)
    b_up, b_down = up.bias.to(st.dtype), down.bias.to(st.dtype)
    mark("FFN weights decode")
    h = modulated_norm(xf, shift_ff, scale_ff, segs, st.dtype, block.eps, chunk)
    mark("LN2 + modulation")
    a = F.linear(h, w_up, b_up)
    mark("FFN up linear")
    del h
    a = torch.ops.aten.gelu_(a, approximate="tanh")
    mark("GELU (tanh)")
    out = F.linear(a, w_down, b_down)
    mark("FFN down linear")
    del a
    gated_add_(xf, out, gate_ff, segs, chunk)
    mark("x += y*gate (FFN)")
    return x


def stage_bytes(stage: str, tokens: int, dim: int, ffn: int) -> int | None:
    """The fewest bytes an elementwise stage must move (bf16 activations, float32 residual)."""
    td = tokens * dim
    return {
        "LN1 + modulation": 6 * td,  # float32 in, bf16 out
        "q RMSNorm + rope": 4 * td,  # bf16 in place
        "k RMSNorm + rope": 4 * td,
        "x += y*gate (self)": 10 * td,  # float32 read + write, bf16 read
        "LN3 (affine)": 6 * td,
        "cross q RMSNorm": 4 * td,
        "x += y (cross)": 10 * td,
        "LN2 + modulation": 6 * td,
        "GELU (tanh)": 4 * tokens * ffn,
        "x += y*gate (FFN)": 10 * td,
    }.get(stage)


# ---- profiler --------------------------------------------------------------------------------

CATEGORIES = (
    ("attention", ("sdpa", "fmha", "flash", "attention", "cudnn")),
    ("wanrt kernels", ("layer_norm_mul_add_kernel", "rms_norm_rope_kernel", "gated_add_kernel", "dequantize_kernel")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "sm90_")),
    ("torch layer norm", ("layer_norm",)),
    ("reductions", ("reduce",)),
    ("copies/casts", ("copy", "memcpy", "cast")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_once(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = []
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if us > 0:
            kernels.append({"name": evt.key, "count": evt.count, "ms": us / 1000})
    kernels.sort(key=lambda k: -k["ms"])
    cats: dict[str, float] = {}
    for k in kernels:
        cats[category(k["name"])] = cats.get(category(k["name"]), 0.0) + k["ms"]
    return {"categories": cats, "kernels": kernels[:25]}


# ---- one block, both modes ---------------------------------------------------------------------


def bench_block(size, kind: str, batch: int, device, runs: int, warmup: int, profile: bool) -> dict:
    cfg = size.config
    grid = size.grids["480p"]
    tokens = math.prod(grid)
    gen = torch.Generator(device=device).manual_seed(0)
    block = Block(cfg, device="meta")
    bench_dit.fill(block, kind, device, gen)
    attach_scratch(block, ScratchPool(limit_bytes=max(cfg.dim * cfg.dim, cfg.dim * cfg.ffn_dim) * 2))
    d = cfg.dim
    x0 = torch.randn(batch, tokens, d, device=device, generator=gen)
    e0 = 0.1 * torch.randn(1, 6, d, device=device, generator=gen)
    time_emb = TimeEmbedding(torch.zeros(1, d, device=device), e0, [Segment(0, batch * tokens, 0)])
    context = torch.randn(batch, 512, d, device=device, generator=gen, dtype=torch.bfloat16)
    rope = [RopeTable(cfg.head_dim, device).for_grid(*grid)] * batch
    ctx = BlockInputs(time_emb, context, [tokens] * batch, rope, ComputeSettings(dtype=torch.bfloat16))
    x = x0.clone()
    clock = bench_dit.Clock(device)
    row = {"kind": kind, "cfg_batch": batch, "tokens": tokens, "modes": {}}
    saved = fused.enabled()
    # The modes take turns run by run, so that both meet the same clocks and temperature.
    block_times: dict[str, list[float]] = {mode: [] for mode in MODES}
    stages: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES}
    try:
        for i in range(warmup + runs):
            for mode in MODES:
                fused.set_enabled(mode == "kernels")
                block_times[mode] += clock.time(lambda: block(x, ctx), 1, 0, before=lambda: x.copy_(x0))
                x.copy_(x0)
                marks = Marks(device)
                staged_forward(block, x, ctx, marks)
                for name, s in marks.seconds().items():
                    stages[mode].setdefault(name, []).append(s)
        for mode in MODES:
            fused.set_enabled(mode == "kernels")
            m = {
                "block_seconds": statistics.median(block_times[mode][warmup:]),
                "block_all_seconds": block_times[mode][warmup:],
                "stages": {name: statistics.median(v[warmup:]) for name, v in stages[mode].items()},
            }
            m["staged_total_seconds"] = sum(m["stages"].values())
            m["tflops"] = bench_dit.block_flops(cfg, tokens, batch) / m["block_seconds"] / 1e12
            # The staged run must compute what the block does (else it times something else).
            x.copy_(x0)
            staged = staged_forward(block, x, ctx, lambda name: None).clone()
            x.copy_(x0)
            m["staged_vs_block_max_abs"] = (staged - block(x, ctx)).abs().max().item()
            del staged
            if profile and device.type == "cuda":
                x.copy_(x0)
                m["profile"] = profile_once(lambda: block(x, ctx))
            row["modes"][mode] = m
    finally:
        fused.set_enabled(saved)
        del block, x, x0
        bench_dit.release()
    for name in row["modes"]["kernels"]["stages"]:
        nbytes = stage_bytes(name, batch * tokens, cfg.dim, cfg.ffn_dim)
        if nbytes:
            row.setdefault("stage_bytes", {})[name] = nbytes
    return row


# ---- agreement at full size ---------------------------------------------------------------------


def steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values apart a and b are (same float dtype)."""
    bits, mask = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float32: (torch.int32, 0x7FFFFFFF)}[a.dtype]

    def ordered(t):
        i = t.contiguous().view(bits).long()
        m = i & mask
        return torch.where(i < 0, -m, m)

    return (ordered(a) - ordered(b)).abs()


def agree(name: str, native: torch.Tensor, twin: torch.Tensor) -> dict:
    """Share of identical values; the largest difference in steps of the dtype among values
    not lost to cancellation (|twin| >= 1/256 of the largest), and relative to the largest."""
    s = steps(native, twin)
    diff = (native.double() - twin.double()).abs()
    top = twin.double().abs().max()
    big = twin.double().abs() >= top / 256
    return {
        "stage": name,
        "dtype": str(native.dtype).removeprefix("torch."),
        "identical": (s == 0).double().mean().item(),
        "max_steps": int(s[big].max().item()),
        "max_abs_over_max_value": (diff.max() / top).item(),
        "rel_l2": ((native.double() - twin.double()).norm() / twin.double().norm()).item(),
    }


def agreement(size, device) -> list[dict]:
    """Each kernel against its twin at full size, fresh random data."""
    cfg = size.config
    grid = size.grids["480p"]
    T, D = math.prod(grid), cfg.dim
    gen = torch.Generator(device=device).manual_seed(7)
    rope = RopeTable(cfg.head_dim, device).for_grid(*grid)
    rows = []

    def both(fn):
        saved = fused.set_enabled(True)
        try:
            native = fn()
            fused.set_enabled(False)
            twin = fn()
        finally:
            fused.set_enabled(saved)
        return native, twin

    w = 1 + 0.1 * torch.randn(D, device=device, generator=gen)
    q = (4 * torch.randn(T, D, device=device, generator=gen)).to(torch.bfloat16)
    rows.append(agree("q/k RMSNorm + rope (bf16)", *both(lambda: fused.rms_norm_rope_(q.clone(), w, cfg.eps, rope))))
    rows.append(agree("cross q RMSNorm (bf16)", *both(lambda: fused.rms_norm_rope_(q.clone(), w, cfg.eps))))
    del q
    x = 3 * torch.randn(T, D, device=device, generator=gen) + 0.5
    scale1p = 1 + 0.2 * torch.randn(D, device=device, generator=gen)
    shift = 0.5 * torch.randn(D, device=device, generator=gen)
    out = torch.empty(T, D, dtype=torch.bfloat16, device=device)
    rows.append(agree("LN + modulation (f32 -> bf16)",
                      *both(lambda: fused.modulated_layer_norm(x, scale1p, shift, cfg.eps, out).clone())))
    xb = x.to(torch.bfloat16)
    rows.append(agree("LN + modulation (bf16 -> bf16, block 0)",
                      *both(lambda: fused.modulated_layer_norm(xb, scale1p, shift, cfg.eps, out).clone())))
    del xb
    rows.append(agree("LN3 affine (f32 -> bf16)",
                      *both(lambda: fused.affine_layer_norm(x, scale1p, shift, cfg.eps, out).clone())))
    head = torch.empty(T, D, device=device)
    rows.append(agree("LN + modulation (f32 -> f32, head)",
                      *both(lambda: fused.modulated_layer_norm(x, scale1p, shift, cfg.eps, head).clone())))
    del head
    y = torch.randn(T, D, device=device, generator=gen).to(torch.bfloat16)
    gate = torch.randn(D, device=device, generator=gen)
    rows.append(agree("x += y*gate (f32)", *both(lambda: fused.gated_add_(x.clone(), y, gate))))
    return rows


def ceilings(device) -> dict:
    """A device-to-device copy (bytes read + written) and a bf16 matmul of the q shape."""
    clock = bench_dit.Clock(device)
    n = 1 << 29  # 2 GiB of float32
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    copy = statistics.median(clock.time(lambda: b.copy_(a), 10, 3))
    del a, b
    x = torch.randn(32760, 5120, device=device, dtype=torch.bfloat16)
    w = torch.randn(5120, 5120, device=device, dtype=torch.bfloat16)
    mm = statistics.median(clock.time(lambda: x @ w.t(), 10, 3))
    return {"copy_gbps": 2 * n * 4 / copy / 1e9, "matmul_tflops": 2 * 32760 * 5120 * 5120 / mm / 1e12}


# ---- report ----------------------------------------------------------------------------------------


def tables(rows: list[dict], agreement_rows: list[dict], ceil: dict | None) -> str:
    lines = []
    for r in rows:
        tw, kn = r["modes"]["twins"], r["modes"]["kernels"]
        lines.append(f"\n{r['kind']} block, 480p, CFG batch {r['cfg_batch']} ({r['tokens']} tokens per sample)")
        head = f"{'stage':<26}{'twins ms':>10}{'kernels ms':>12}{'saved ms':>10}{'min GB':>8}{'kernel GB/s':>13}"
        lines += [head, "-" * len(head)]
        for name, t in tw["stages"].items():
            k = kn["stages"].get(name)
            nbytes = r.get("stage_bytes", {}).get(name)
            gbps = f"{nbytes / k / 1e9:.0f}" if nbytes and k else ""
            lines.append(
                f"{name:<26}{t * 1e3:>10.2f}{k * 1e3:>12.2f}{(t - k) * 1e3:>10.2f}"
                f"{'' if not nbytes else f'{nbytes / 1e9:.2f}':>8}{gbps:>13}"
            )
        lines.append(f"{'sum of stages':<26}{tw['staged_total_seconds'] * 1e3:>10.2f}{kn['staged_total_seconds'] * 1e3:>12.2f}"
                     f"{(tw['staged_total_seconds'] - kn['staged_total_seconds']) * 1e3:>10.2f}")
        lines.append(f"{'block forward':<26}{tw['block_seconds'] * 1e3:>10.2f}{kn['block_seconds'] * 1e3:>12.2f}"
                     f"{(tw['block_seconds'] - kn['block_seconds']) * 1e3:>10.2f}   "
                     f"{tw['tflops']:.0f} -> {kn['tflops']:.0f} TFLOP/s, x{tw['block_seconds'] / kn['block_seconds']:.3f}")
        lines.append(f"  staged run vs block output, max abs: twins {tw['staged_vs_block_max_abs']:.1e}, "
                     f"kernels {kn['staged_vs_block_max_abs']:.1e}")
        if "profile" in tw:
            cats = sorted(set(tw["profile"]["categories"]) | set(kn["profile"]["categories"]),
                          key=lambda c: -tw["profile"]["categories"].get(c, 0))
            lines.append("  profiler, device ms by kind:  " + ", ".join(
                f"{c} {tw['profile']['categories'].get(c, 0):.1f} -> {kn['profile']['categories'].get(c, 0):.1f}"
                for c in cats))
    if agreement_rows:
        lines.append("\nkernels vs twins, full size, fresh random data")
        head = f"{'stage':<42}{'dtype':>9}{'identical':>12}{'max steps':>11}{'max/top':>10}{'rel_l2':>10}"
        lines += [head, "-" * len(head)]
        for a in agreement_rows:
            lines.append(f"{a['stage']:<42}{a['dtype']:>9}{a['identical'] * 100:>11.4f}%{a['max_steps']:>11}"
                         f"{a['max_abs_over_max_value']:>10.1e}{a['rel_l2']:>10.1e}")
    if ceil:
        lines.append(f"\nceilings: copy {ceil['copy_gbps']:.0f} GB/s (read + write); "
                     f"bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks the logic on any device")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--kinds", default="bf16")
    p.add_argument("--cfg", default="1", help="CFG batch sizes")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=12, help="top kernels printed per profiled mode")
    p.add_argument("--out", default="bench-dit-profile.json")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = bench_dit.TINY if args.tiny else bench_dit.FULL
    cuda = device.type == "cuda"
    rows = []
    for kind in [k for k in args.kinds.split(",") if k]:
        for i, batch in enumerate(int(b) for b in args.cfg.split(",") if b):
            r = bench_block(size, kind, batch, device, args.runs, args.warmup, profile=cuda and i == 0)
            print(f"{kind} cfg {batch}: " + ", ".join(f"{m} {v['block_seconds'] * 1e3:.2f} ms" for m, v in r["modes"].items()),
                  file=sys.stderr, flush=True)
            rows.append(r)
    agreement_rows = agreement(size, device) if cuda else []
    ceil = None if not cuda or args.tiny else ceilings(device)
    info = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "size": size.name, "kernels_available": fused.takes(torch.empty(1, device=device))}
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows, "agreement": agreement_rows, "ceilings": ceil},
                                         indent=1))
    for r in rows:
        for mode in MODES:
            prof = r["modes"][mode].get("profile")
            if prof:
                print(f"\ntop kernels, {r['kind']} CFG {r['cfg_batch']}, {mode} (device ms, count):")
                for k in prof["kernels"][: args.top]:
                    print(f"  {k['ms']:8.2f} {k['count']:5}  {k['name'][:110]}")
    print(f"\n{info['device']}, torch {info['torch']}, {size.name} sizes, kernels available: "
          f"{info['kernels_available']}; JSON: {args.out}")
    print(tables(rows, agreement_rows, ceil))
    return 0


if __name__ == "__main__":
    sys.exit(main())

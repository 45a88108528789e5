"""Benchmark the block codecs: native C vs the numpy twin vs gguf-py, in one run.

Quantizes one Wan-FFN-shaped bf16 tensor (4096 x 13824 by default) to each type with
the native library (all CPUs, all CPUs into a reused output buffer, one thread), the numpy twin, and gguf-py
(`gguf.quants.quantize` on the float32 widening, as a converter built on gguf-py must
do), then dequantizes it natively to bf16. Rates are bf16 source bytes per second;
ratios are against gguf-py measured here. Other processes share the CPU: the load
average is recorded.

    python bench/codecs.py [--rows 4096] [--cols 13824] [--types q8_0,q4_0] [--repeat 3] [--out codecs.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant import _native, codecs  # noqa: E402


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=13824)
    p.add_argument("--types", default="q8_0,q4_0")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import gguf.quants
    from gguf import GGMLQuantizationType

    x = (torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    src_bytes = x.numel() * x.element_size()
    native = _native.available()
    results = {
        "shape": [args.rows, args.cols],
        "source_bytes": src_bytes,
        "cpus": os.cpu_count(),
        "native_build": _native.build_info() if native else _native.load_error(),
        "load_before": os.getloadavg()[0],
        "types": {},
    }
    for name in args.types.split(","):
        r = {}
        if native:
            r["native_s"] = best_time(lambda: codecs.quantize(x, name, backend="native"), args.repeat)
            r["native_1thread_s"] = best_time(lambda: codecs.quantize(x, name, threads=1, backend="native"), args.repeat)
            packed = codecs.quantize(x, name, backend="native")
            # a converter that reuses its output buffer skips faulting in fresh pages
            r["native_reuse_out_s"] = best_time(lambda: codecs.quantize(x, name, backend="native", out=packed), args.repeat)
            r["native_dequant_bf16_s"] = best_time(
                lambda: codecs.dequantize(packed, name, x.shape, dtype=torch.bfloat16, backend="native"), args.repeat
            )
        r["twin_s"] = best_time(lambda: codecs.quantize(x, name, backend="reference"), 1)
        qtype = GGMLQuantizationType[name.upper()]
        r["gguf_py_s"] = best_time(lambda: gguf.quants.quantize(x.float().numpy(), qtype), 1)
        for key in [k for k in r if k.endswith("_s")]:
            r[key.removesuffix("_s") + "_GBps"] = src_bytes / r[key] / 1e9
        r["native_vs_gguf_py"] = r["gguf_py_s"] / r["native_s"] if native else None
        r["reused_out_vs_gguf_py"] = r["gguf_py_s"] / r["native_reuse_out_s"] if native else None
        r["twin_vs_gguf_py"] = r["gguf_py_s"] / r["twin_s"]
        results["types"][name] = r
    results["load_after"] = os.getloadavg()[0]

    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(f"{args.rows}x{args.cols} bf16 ({src_bytes / 1e6:.0f} MB), load {results['load_before']:.1f}"
          f"->{results['load_after']:.1f} on {results['cpus']} CPUs; rates in GB/s of bf16 source")
    print(f"{'type':6} {'native':>14} {'reused out':>14} {'native 1 thr':>14} {'twin':>14} {'gguf-py':>14} "
          f"{'x gguf-py':>10} {'reused x':>9} {'deq->bf16':>14}")
    for name, r in results["types"].items():
        def cell(key):
            return f"{r[key + '_s']:6.3f}s {r[key + '_GBps']:5.2f}" if key + "_s" in r else f"{'-':>14}"
        ratio = f"{r['native_vs_gguf_py']:9.1f}x" if native else f"{'-':>10}"
        reused = f"{r['reused_out_vs_gguf_py']:8.1f}x" if native else f"{'-':>9}"
        print(f"{name:6} {cell('native'):>14} {cell('native_reuse_out'):>14} {cell('native_1thread'):>14} "
              f"{cell('twin'):>14} {cell('gguf_py'):>14} {ratio} {reused} {cell('native_dequant_bf16'):>14}")


if __name__ == "__main__":
    main()

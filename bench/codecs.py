"""Benchmark the block codecs: native C (SIMD and portable loops) vs the numpy twin vs gguf-py, in one run.

Quantizes one Wan-FFN-shaped bf16 tensor (4096 x 13824 by default) to each type with
the native library: on every CPU into a fresh output (what a caller without a buffer
pays: the page faults of a new tensor), on every CPU into a reused output, on one
thread into a reused output (the quantizer alone, per core), and the portable C loops
on one thread (`WANRT_NO_AVX2=1`, what a CPU without AVX2 runs); then the numpy twin,
gguf-py (`gguf.quants.quantize` on the float32 widening, as a converter built on
gguf-py must do), and a native dequantization to bf16. Rates are GB/s of bf16 source;
"CPU s/GB" is the process CPU time (user + system, every thread) per GB of source,
nearly independent of how busy the machine is; ratios are against gguf-py measured
here. Other processes share the CPU: the load average is recorded. Each native figure
is the best of --repeat runs.

    python bench/codecs.py [--rows 4096] [--cols 13824] [--types q8_0,q4_0] [--repeat 5] [--out codecs.json]
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

PORTABLE_ENV = "WANRT_NO_AVX2"  # read by the C library on every call


def best_time(fn, repeat: int) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that run) over `repeat` runs."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        c, t = time.process_time(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if wall < best:
            best, best_cpu = wall, cpu
    return best, best_cpu


def portable(fn):
    def run():
        os.environ[PORTABLE_ENV] = "1"
        try:
            fn()
        finally:
            del os.environ[PORTABLE_ENV]

    return run


def measure(x: torch.Tensor, name: str, repeat: int, *, with_gguf_py: bool) -> dict:
    """Every run of one type: wall seconds, GB/s and CPU s/GB each, and the ratios to gguf-py."""
    gb = x.numel() * x.element_size() / 1e9
    runs = {}
    if _native.available():
        packed = codecs.quantize(x, name, backend="native")
        runs["native_fresh_out"] = lambda: codecs.quantize(x, name, backend="native")
        runs["native"] = lambda: codecs.quantize(x, name, backend="native", out=packed)
        runs["native_1thread"] = lambda: codecs.quantize(x, name, threads=1, backend="native", out=packed)
        runs["portable_1thread"] = portable(runs["native_1thread"])
        runs["native_dequant_bf16"] = lambda: codecs.dequantize(
            packed, name, x.shape, dtype=torch.bfloat16, backend="native"
        )
    if with_gguf_py:
        import gguf.quants
        from gguf import GGMLQuantizationType

        qtype = GGMLQuantizationType[name.upper()]
        runs["twin"] = lambda: codecs.quantize(x, name, backend="reference")
        runs["gguf_py"] = lambda: gguf.quants.quantize(x.float().numpy(), qtype)
    r = {}
    for key, fn in runs.items():
        wall, cpu = best_time(fn, repeat if key.startswith(("native", "portable")) else 1)
        r[key + "_s"], r[key + "_GBps"], r[key + "_cpu_s_per_GB"] = wall, gb / wall, cpu / gb
    if "native_s" in r and "gguf_py_s" in r:
        r["native_vs_gguf_py"] = r["gguf_py_s"] / r["native_s"]
        r["fresh_out_vs_gguf_py"] = r["gguf_py_s"] / r["native_fresh_out_s"]
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=13824)
    p.add_argument("--types", default="q8_0,q4_0")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-gguf-py", action="store_true", help="skip the (slow) numpy twin and gguf-py runs")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if PORTABLE_ENV in os.environ:
        p.error(f"unset {PORTABLE_ENV}: this benchmark runs both the SIMD and the portable loops itself")

    x = (torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    gb = x.numel() * x.element_size() / 1e9
    native = _native.available()
    results = {
        "shape": [args.rows, args.cols],
        "source_bytes": x.numel() * x.element_size(),
        "cpus": os.cpu_count(),
        "native_build": _native.build_info() if native else _native.load_error(),
        "load_before": os.getloadavg()[0],
        "types": {},
    }
    for name in args.types.split(","):
        results["types"][name] = measure(x, name, args.repeat, with_gguf_py=not args.no_gguf_py)
    results["load_after"] = os.getloadavg()[0]

    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(f"{args.rows}x{args.cols} bf16 ({gb * 1e3:.0f} MB), load {results['load_before']:.1f}"
          f"->{results['load_after']:.1f} on {results['cpus']} CPUs; GB/s of bf16 source, CPU s per GB")
    columns = [
        ("native", "all CPUs"),
        ("native_fresh_out", "fresh out"),
        ("native_1thread", "1 thread"),
        ("portable_1thread", "portable 1 thr"),
        ("twin", "twin"),
        ("gguf_py", "gguf-py"),
        ("native_dequant_bf16", "deq->bf16"),
    ]
    columns = [(k, title) for k, title in columns if any(k + "_s" in r for r in results["types"].values())]
    print(f"{'type':6} " + " ".join(f"{title:>19}" for _, title in columns) + f" {'x gguf-py':>10}")
    for name, r in results["types"].items():
        cells = [
            f"{r[k + '_GBps']:6.2f} GB/s {r[k + '_cpu_s_per_GB']:5.3f}" if k + "_s" in r else f"{'-':>19}"
            for k, _ in columns
        ]
        ratio = f"{r['native_vs_gguf_py']:9.1f}x" if "native_vs_gguf_py" in r else f"{'-':>10}"
        print(f"{name:6} " + " ".join(f"{c:>19}" for c in cells) + f" {ratio}")


if __name__ == "__main__":
    main()

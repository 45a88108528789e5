"""Benchmark python -m quant.convert on a synthetic bf16 Wan expert of a few GB.

Makes a bf16 safetensors file with Wan A14B-shaped tensors (5120-wide blocks: q/k/v/o
5120x5120, ffn 13824x5120 and 5120x13824, biases, norms, modulation, plus the
embeddings and head), converts it with our converter in a subprocess per type (so peak
RSS is that run's own), and runs gguf-py's quantizer on one block's tensors in the same
run for the speed ratio.

    python bench/convert.py [--blocks 6] [--types q8_0,q4_0] [--out bench-convert.json]

Reported per type: seconds inside the converter, source GB/s (bf16 bytes read per
second), peak RSS and peak RSS minus the largest source tensor, and the ratio of our
converter's rate to gguf-py's rate (read + widen to float32 + gguf.quants.quantize, no
file writing) on the same tensors. To show where the time goes, each stage is also
timed alone: reading every tensor, our codec on one block, and writing as many bytes
as the output into the same folder. Other processes share the CPU: the load average
before and after each run is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quant.safetensors_io import SafetensorsFile, TensorToWrite, write_safetensors  # noqa: E402

DIM, FFN, TEXT_DIM, FREQ_DIM, IN_DIM, OUT_DIM = 5120, 13824, 4096, 256, 36, 16

# The child measures its own peak RSS (ru_maxrss is per process) and time inside convert().
_CHILD = r"""
import json, resource, sys
from quant.convert import ConvertOptions, convert
from quant.ggml_types import parse_type

def status(key):  # VmHWM is this process's own peak; ru_maxrss would include the parent's at fork
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime, u.ru_stime

src, out, type_name, report = sys.argv[1:5]
rss0 = status("VmRSS")
user0, sys0 = cpu()
r = convert(src, out, ConvertOptions(type=parse_type(type_name), force=True, progress=False))
user1, sys1 = cpu()
json.dump({"seconds": r.seconds, "source_bytes": r.source_bytes, "output_bytes": r.output_bytes,
           "user_seconds": user1 - user0, "system_seconds": sys1 - sys0,
           "rss_before_bytes": rss0, "peak_rss_bytes": status("VmHWM")}, open(report, "w"))
"""


def wan_shapes(n_blocks: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        "patch_embedding.weight": (DIM, IN_DIM, 1, 2, 2),
        "patch_embedding.bias": (DIM,),
        "text_embedding.0.weight": (DIM, TEXT_DIM),
        "text_embedding.0.bias": (DIM,),
        "text_embedding.2.weight": (DIM, DIM),
        "text_embedding.2.bias": (DIM,),
        "time_embedding.0.weight": (DIM, FREQ_DIM),
        "time_embedding.0.bias": (DIM,),
        "time_embedding.2.weight": (DIM, DIM),
        "time_embedding.2.bias": (DIM,),
        "time_projection.1.weight": (6 * DIM, DIM),
        "time_projection.1.bias": (6 * DIM,),
        "head.head.weight": (4 * OUT_DIM, DIM),
        "head.head.bias": (4 * OUT_DIM,),
        "head.modulation": (1, 2, DIM),
    }
    for i in range(n_blocks):
        b = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                shapes[f"{b}{attn}.{p}.weight"] = (DIM, DIM)
                shapes[f"{b}{attn}.{p}.bias"] = (DIM,)
            shapes[f"{b}{attn}.norm_q.weight"] = (DIM,)
            shapes[f"{b}{attn}.norm_k.weight"] = (DIM,)
        shapes[f"{b}norm3.weight"] = (DIM,)
        shapes[f"{b}norm3.bias"] = (DIM,)
        shapes[f"{b}ffn.0.weight"] = (FFN, DIM)
        shapes[f"{b}ffn.0.bias"] = (FFN,)
        shapes[f"{b}ffn.2.weight"] = (DIM, FFN)
        shapes[f"{b}ffn.2.bias"] = (DIM,)
        shapes[f"{b}modulation"] = (1, 6, DIM)
    return dict(sorted(shapes.items()))


def make_checkpoint(path: Path, n_blocks: int) -> dict[str, tuple[int, ...]]:
    shapes = wan_shapes(n_blocks)
    gen = torch.Generator().manual_seed(0)

    def produce(shape):
        def f():
            fan_in = shape[-1] if len(shape) > 1 else 1
            return (torch.randn(shape, generator=gen) / fan_in**0.5).to(torch.bfloat16)
        return f

    write_safetensors(path, [TensorToWrite(n, torch.bfloat16, s, produce(s)) for n, s in shapes.items()])
    return shapes


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 26):
            pass


def run_ours(src: Path, out: Path, type_name: str) -> dict:
    report = out.with_suffix(".json")
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), type_name, str(report)], check=True, cwd=REPO)
    wall = time.perf_counter() - t0
    r = json.loads(report.read_text())
    r.update(wall_seconds=wall, load_before=load_before, load_after=os.getloadavg()[0])
    out.unlink()
    report.unlink()
    return r


def run_gguf_py(src: Path, names: list[str], type_name: str) -> dict:
    """gguf-py's path on the given tensors: read, widen bf16 to float32, quantize."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name.upper()]
    nbytes, t0 = 0, time.perf_counter()
    with SafetensorsFile(src) as f:
        for n in names:
            x = f.read(n)
            nbytes += x.numel() * x.element_size()
            gguf.quants.quantize(x.to(torch.float32).numpy(), qtype)
    return {"seconds": time.perf_counter() - t0, "source_bytes": nbytes}


def run_codec(src: Path, names: list[str], type_name: str) -> dict:
    """Our codec alone on the same tensors (read excluded), for where the time goes."""
    from quant import codecs
    from quant.ggml_types import parse_type

    t = parse_type(type_name)
    tensors = []
    with SafetensorsFile(src) as f:
        tensors = [f.read(n) for n in names]
    t0 = time.perf_counter()
    for x in tensors:
        codecs.quantize(x, t)
    return {"seconds": time.perf_counter() - t0, "source_bytes": sum(x.numel() * 2 for x in tensors)}


def run_read(src: Path) -> dict:
    """Reading alone: every tensor into one reused buffer (as the converter reads)."""
    nbytes, t0 = 0, time.perf_counter()
    with SafetensorsFile(src) as f:
        buf = torch.empty(max(e.nbytes for e in f.entries.values()), dtype=torch.uint8)
        for n, e in f.entries.items():
            f.read(n, buf)
            nbytes += e.nbytes
    return {"seconds": time.perf_counter() - t0, "bytes": nbytes}


def run_write(folder: Path, nbytes: int) -> dict:
    """Writing alone: `nbytes` from a reused buffer into a new file, synced (as the
    writer does), in the folder the converter writes to."""
    chunk = torch.ones(64 << 20, dtype=torch.uint8).numpy()
    path = folder / "write-test.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(memoryview(chunk)[: min(left, len(chunk))])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return {"seconds": seconds, "bytes": nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=6, help="5120-wide blocks (703 MB each in bf16; 6 -> 4.7 GB)")
    ap.add_argument("--types", default="q8_0,q4_0")
    ap.add_argument("--dir", default=None, help="folder for the temporary files (default: system temp)")
    ap.add_argument("--out", default="bench-convert.json")
    args = ap.parse_args()

    results = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "blocks": args.blocks, "runs": []}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="wanrt-bench-") as tmp:
        src = Path(tmp) / "wan_bf16.safetensors"
        t0 = time.perf_counter()
        shapes = make_checkpoint(src, args.blocks)
        results["make_seconds"] = time.perf_counter() - t0
        results["source_bytes"] = src.stat().st_size
        largest = max(shapes, key=lambda n: torch.Size(shapes[n]).numel())
        results["largest_tensor"] = largest
        results["largest_tensor_bytes"] = torch.Size(shapes[largest]).numel() * 2
        block0 = [n for n in shapes if n.startswith("blocks.0.")]
        warm_page_cache(src)
        read = run_read(src)
        results["read_only"] = read
        results["read_gb_per_s"] = read["bytes"] / read["seconds"] / 1e9

        for type_name in args.types.split(","):
            ours = run_ours(src, Path(tmp) / f"out-{type_name}.gguf", type_name)
            ref = run_gguf_py(src, block0, type_name)
            codec = run_codec(src, block0, type_name)
            write = run_write(Path(tmp), ours["output_bytes"])
            ours_rate = ours["source_bytes"] / ours["seconds"]
            ref_rate = ref["source_bytes"] / ref["seconds"]
            results["runs"].append({
                "type": type_name,
                "ours": ours,
                "ours_gb_per_s": ours_rate / 1e9,
                "peak_rss_above_largest_gb": (ours["peak_rss_bytes"] - results["largest_tensor_bytes"]) / 1e9,
                "gguf_py": ref,
                "gguf_py_gb_per_s": ref_rate / 1e9,
                "codec_only_gb_per_s": codec["source_bytes"] / codec["seconds"] / 1e9,
                "write_only": write,
                "write_gb_per_s": write["bytes"] / write["seconds"] / 1e9,
                # the write stage in source bytes per second (how fast the source could go if writing were all)
                "write_bound_source_gb_per_s": ours["source_bytes"] / write["seconds"] / 1e9,
                "ratio_vs_gguf_py": ours_rate / ref_rate,
                "codec_ratio_vs_gguf_py": codec["source_bytes"] / codec["seconds"] / ref_rate,
            })

    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nsource: {results['source_bytes'] / 1e9:.2f} GB bf16, {args.blocks} blocks of width {DIM}; "
          f"largest tensor {results['largest_tensor']} {results['largest_tensor_bytes'] / 1e9:.3f} GB; "
          f"{results['cpu_count']} CPUs; reading alone {results['read_gb_per_s']:.2f} GB/s")
    print("GB/s are source (bf16) bytes per second unless marked out; x = ratio to gguf-py's quantizer")
    print(f"{'type':<5} {'seconds':>7} {'GB/s':>5} {'CPU s/GB':>8} {'peak RSS GB':>11} {'-largest':>8} {'codec':>6} "
          f"{'write out':>9} {'write-bound':>11} {'gguf-py':>7} {'x ours':>6} {'x codec':>7} {'load':>9}")
    for r in results["runs"]:
        o = r["ours"]
        cpu_per_gb = (o["user_seconds"] + o["system_seconds"]) / (o["source_bytes"] / 1e9)
        print(f"{r['type']:<5} {o['seconds']:7.2f} {r['ours_gb_per_s']:5.2f} {cpu_per_gb:8.2f} "
              f"{o['peak_rss_bytes'] / 1e9:11.2f} "
              f"{r['peak_rss_above_largest_gb']:8.2f} {r['codec_only_gb_per_s']:6.2f} {r['write_gb_per_s']:9.2f} "
              f"{r['write_bound_source_gb_per_s']:11.2f} {r['gguf_py_gb_per_s']:7.3f} {r['ratio_vs_gguf_py']:6.1f} "
              f"{r['codec_ratio_vs_gguf_py']:7.1f} {o['load_before']:4.1f}/{o['load_after']:<4.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

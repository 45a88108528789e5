"""Benchmark python -m quant.convert on a synthetic bf16 Wan expert of a few GB.

Makes a bf16 safetensors file with Wan A14B-shaped tensors (5120-wide blocks: q/k/v/o
5120x5120, ffn 13824x5120 and 5120x13824, biases, norms, modulation, plus the
embeddings and head), reads it once so it sits in the page cache (as a checkpoint does
right after a download or a first run), then, per type, runs three conversions of the
same tensors to the same types, each in its own process (so CPU time and peak RSS are
that run's own):

* ours: `quant.convert.convert()` as the CLI runs it (read, quantize and write overlap);
* ours, one stage at a time: the same reader, `tensor_bytes` and `GGUFWriter`, called
  one after the other with a timer around each stage (read / quantize / write);
* gguf-py: a converter built on gguf-py: `safetensors.safe_open` (memory map), torch
  widening to float32, `gguf.quants.quantize`, `gguf.GGUFWriter` streaming tensor by
  tensor, then fsync (ours syncs too), with a timer around each stage.

All three files must be byte-identical (checked). Reported: CPU seconds per GB of
source per stage (user + system, every thread: nearly independent of how busy the
machine is), wall GB/s of source with the load average and the cores other processes
kept busy during the run, peak RSS above the largest tensor, and ratios to gguf-py
measured in this run: "quantizer only" (bf16 tensor in memory -> blocks in memory:
ours `tensor_bytes` on every core, theirs float32 widening + `gguf.quants.quantize`,
which numpy runs on one) and "end to end" (source file in the page cache -> synced GGUF
file). Before each run the source is read once more (its CPU cost is recorded): on a
virtual machine, memory untouched for a while can cost ~1 CPU-s/GB to touch again,
which would otherwise land on whichever run comes first. Our converter runs
`--repeat` times; the median run is shown.

    python bench/convert.py [--blocks 6] [--types q8_0,q4_0] [--dir DIR] [--out bench-convert.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quant.safetensors_io import TensorToWrite, write_safetensors  # noqa: E402

DIM, FFN, TEXT_DIM, FREQ_DIM, IN_DIM, OUT_DIM = 5120, 13824, 4096, 256, 36, 16
STAGES = ("read", "quantize", "write")


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


def make_checkpoint(path: Path, n_blocks: int) -> None:
    gen = torch.Generator().manual_seed(0)

    def produce(shape):
        def f():
            fan_in = shape[-1] if len(shape) > 1 else 1
            return (torch.randn(shape, generator=gen) / fan_in**0.5).to(torch.bfloat16)
        return f

    write_safetensors(path, [TensorToWrite(n, torch.bfloat16, s, produce(s)) for n, s in wan_shapes(n_blocks).items()])


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from quant.safetensors_io import SafetensorsFile

    with SafetensorsFile(path) as f:
        return {n: e.shape for n, e in f.entries.items()}


def warm_page_cache(path: Path) -> float:
    """Read the file once (into the page cache); CPU seconds per GB it took. On a
    virtual machine, memory the guest has not touched for a while can cost ~1 CPU-s/GB
    to touch again (the host faults it back in): this pass takes that cost, so it does
    not land on whichever run comes first."""
    t = Clock.now()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 << 20)
        while f.readinto(buf):
            pass
    return (Clock.now()[1] - t[1]) / (path.stat().st_size / 1e9)


def same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            x, y = fa.read(32 << 20), fb.read(32 << 20)
            if x != y:
                return False
            if not x:
                return True


# ---- children: each conversion in its own process ------------------------------------

class Clock:
    """Wall and CPU seconds (user + system, all threads of this process) per stage."""

    def __init__(self):
        self.wall = {s: 0.0 for s in STAGES}
        self.cpu = {s: 0.0 for s in STAGES}

    @staticmethod
    def now() -> tuple[float, float]:
        u = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), u.ru_utime + u.ru_stime

    def add(self, stage: str, since: tuple[float, float]) -> tuple[float, float]:
        now = self.now()
        self.wall[stage] += now[0] - since[0]
        self.cpu[stage] += now[1] - since[1]
        return now


def _peak_rss() -> int:
    # VmHWM is this process's own peak; ru_maxrss would include the parent's at fork
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _file_layout(path: Path):
    """Metadata (key, value, type, item type) and tensors (name, torch shape, type) of a GGUF file."""
    from quant.gguf_reader import GGUFFile

    with GGUFFile(path) as f:
        meta = [(k, v, *f.metadata_types[k]) for k, v in f.metadata.items() if k != "general.architecture"]
        tensors = [(n, t.shape, t.ggml_type) for n, t in f.tensors.items()]
        return f.architecture, meta, tensors


def child_ours(src: str, out: str, type_name: str) -> dict:
    from quant.convert import ConvertOptions, convert
    from quant.ggml_types import parse_type

    t = Clock.now()
    r = convert(src, out, ConvertOptions(type=parse_type(type_name), force=True, progress=False))
    t1 = Clock.now()
    return {"seconds": t1[0] - t[0], "cpu_seconds": t1[1] - t[1], "source_bytes": r.source_bytes,
            "output_bytes": r.output_bytes}


def child_serial(src: str, out: str, layout_of: str) -> dict:
    """Our pieces one stage at a time, in one thread: read a piece of rows, quantize
    it, write it, next (the same piece size, reader, encoder and writer as convert)."""
    from quant.atomic_file import ALIGN, in_place_skip
    from quant.checkpoint import open_checkpoint
    from quant.convert import tensor_bytes
    from quant.convert_pipeline import PIECE_ELEMENTS
    from quant.ggml_types import row_nbytes
    from quant.gguf_writer import GGUFWriter
    from quant.type_policy import TensorPlan

    arch, meta, tensors = _file_layout(Path(layout_of))
    clock = Clock()
    with open_checkpoint(src) as ckpt:
        rbuf = torch.empty(PIECE_ELEMENTS * 2, dtype=torch.uint8)
        obuf = torch.empty(PIECE_ELEMENTS * 4 + ALIGN, dtype=torch.uint8)
        w = GGUFWriter(out, arch=arch, overwrite=True)
        for key, value, vtype, itype in meta:
            w.add_metadata(key, value, vtype, item_type=itype)

        def produce(name, shape, ggml_type):
            plan = TensorPlan(name, shape, ggml_type, None, "")
            read = ckpt.byte_reader(name)
            dtype = ckpt.info(name).dtype
            n = shape[-1]
            rows = torch.Size(shape).numel() // n
            step = max(1, PIECE_ELEMENTS // n)

            def pieces():
                for r in range(0, rows, step):
                    k = min(step, rows - r)
                    t = Clock.now()
                    x = read(r * n * dtype.itemsize, rbuf[: k * n * dtype.itemsize], threads=1).view(dtype).view(k, n)
                    t = clock.add("read", t)
                    at = offsets[name] + r * row_nbytes(ggml_type, n)  # placed to be written without a copy
                    skip = in_place_skip(obuf.data_ptr(), at)
                    out = obuf[skip : skip + k * row_nbytes(ggml_type, n)]
                    y = tensor_bytes(plan, x, out=out)
                    if y.data_ptr() == x.data_ptr():  # kept as read: copied out, as the pipeline does
                        y = out.copy_(y.reshape(-1).view(torch.uint8))
                    clock.add("quantize", t)
                    yield y
            return pieces

        for name, shape, ggml_type in tensors:
            w.add_tensor(name, shape, ggml_type, produce(name, shape, ggml_type))
        offsets = w.tensor_offsets()
        t0 = Clock.now()
        w.write()
        t1 = Clock.now()
    clock.wall["write"] = t1[0] - t0[0] - clock.wall["read"] - clock.wall["quantize"]
    clock.cpu["write"] = t1[1] - t0[1] - clock.cpu["read"] - clock.cpu["quantize"]
    return {"seconds": t1[0] - t0[0], "cpu_seconds": t1[1] - t0[1], "stage_seconds": clock.wall,
            "stage_cpu_seconds": clock.cpu}


def child_gguf_py(src: str, out: str, layout_of: str) -> dict:
    """A converter built on gguf-py, writing the same tensors and metadata."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    from quant.ggml_types import tensor_nbytes

    arch, meta, tensors = _file_layout(Path(layout_of))
    clock = Clock()
    t0 = Clock.now()
    w = gguf.GGUFWriter(out, arch=arch)
    for key, value, vtype, itype in meta:
        w.add_key_value(key, value, gguf.GGUFValueType(int(vtype)), None if itype is None else gguf.GGUFValueType(int(itype)))
    for name, shape, ggml_type in tensors:
        w.add_tensor_info(name, shape, np.dtype(np.float32), tensor_nbytes(ggml_type, shape),
                          raw_dtype=gguf.GGMLQuantizationType(int(ggml_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t = clock.add("write", t0)
    with safe_open(src, framework="pt") as f:
        for name, shape, ggml_type in tensors:
            x = f.get_tensor(name).to(torch.float32).numpy()
            t = clock.add("read", t)  # read includes the float32 widening gguf-py needs
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType(int(ggml_type)))
            t = clock.add("quantize", t)
            w.write_tensor_data(q)
            t = clock.add("write", t)
    for fout in w.fout:
        fout.flush()
        os.fsync(fout.fileno())
    w.close()
    t1 = clock.add("write", t)
    return {"seconds": t1[0] - t0[0], "cpu_seconds": t1[1] - t0[1], "stage_seconds": clock.wall,
            "stage_cpu_seconds": clock.cpu}


CHILDREN = {"ours": child_ours, "serial": child_serial, "gguf-py": child_gguf_py}


def _busy_cpu_seconds() -> float:
    """CPU seconds every process of the machine has used so far (from /proc/stat)."""
    fields = open("/proc/stat").readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run_child(role: str, src: Path, *args: str) -> dict:
    warm = warm_page_cache(src)
    args = (str(src), *args)
    report = Path(args[1] + ".json")
    load_before = os.getloadavg()[0]
    busy0, kids0, t0 = _busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", role, *args, str(report)], check=True, cwd=REPO)
    busy1, kids1, wall = _busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    r = json.loads(report.read_text())
    report.unlink()
    child_cpu = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
    # cores the rest of the machine kept busy meanwhile (other people's work)
    r.update(load_before=load_before, load_after=os.getloadavg()[0], warm_up_cpu_s_per_gb=warm,
             others_cores=max(0.0, (busy1 - busy0 - child_cpu) / wall))
    return r


def child_main(role: str, args: list[str]) -> None:
    *rest, report = args
    rss0 = int([ln for ln in open("/proc/self/status") if ln.startswith("VmRSS:")][0].split()[1]) * 1024
    r = CHILDREN[role](*rest)
    r.update(rss_before_bytes=rss0, peak_rss_bytes=_peak_rss())
    Path(report).write_text(json.dumps(r))


# ---- driver ----------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child_main(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=6, help="5120-wide blocks (703 MB each in bf16; 6 -> 4.7 GB)")
    ap.add_argument("--types", default="q8_0,q4_0")
    ap.add_argument("--dir", default=None, help="folder for the files (default: system temp); its file system matters")
    ap.add_argument("--source", type=Path, default=None,
                    help="keep the synthetic checkpoint at this path and reuse it when it is there")
    ap.add_argument("--repeat", type=int, default=3, help="runs of our converter per type (the median is shown)")
    ap.add_argument("--no-gguf-py", action="store_true", help="skip the gguf-py conversion (faster)")
    ap.add_argument("--out", default="bench-convert.json")
    args = ap.parse_args()

    shapes = wan_shapes(args.blocks)
    largest = max(shapes, key=lambda n: torch.Size(shapes[n]).numel())
    results = {"cpu_count": os.cpu_count(), "blocks": args.blocks, "largest_tensor": largest,
               "largest_tensor_bytes": torch.Size(shapes[largest]).numel() * 2, "runs": []}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="wanrt-bench-") as tmp:
        src = args.source or Path(tmp) / "wan_bf16.safetensors"
        if not src.exists():
            make_checkpoint(src, args.blocks)
        elif _tensor_shapes(src) != shapes:
            sys.exit(f"{src} is not the synthetic checkpoint of {args.blocks} blocks; remove it or pass --blocks")
        results["source_bytes"] = src.stat().st_size
        for type_name in args.types.split(","):
            run = {"type": type_name}
            ours = Path(tmp) / f"ours-{type_name}.gguf"
            tries = [run_child("ours", src, str(ours), type_name) for _ in range(args.repeat)]
            run["ours"] = sorted(tries, key=lambda r: r["seconds"])[len(tries) // 2]  # the median run
            run["ours"]["all_seconds"] = [r["seconds"] for r in tries]
            run["ours"]["all_cpu_seconds"] = [r["cpu_seconds"] for r in tries]
            other = Path(tmp) / f"other-{type_name}.gguf"
            roles = ["serial"] + ([] if args.no_gguf_py else ["gguf-py"])
            for role in roles:
                run[role] = run_child(role, src, str(other), str(ours))
                run[role]["identical_to_ours"] = same_bytes(ours, other)
                other.unlink()
            ours.unlink()
            results["runs"].append(run)
    for run in results["runs"]:
        summarize(run, results)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_tables(results)
    print(f"wrote {args.out}")


def summarize(run: dict, results: dict) -> None:
    gb = run["ours"]["source_bytes"] / 1e9
    for role in ("ours", "serial", "gguf-py"):
        r = run.get(role)
        if r is None:
            continue
        r["gb_per_s"] = gb / r["seconds"]
        r["cpu_s_per_gb"] = r["cpu_seconds"] / gb
        r["peak_rss_above_largest_gb"] = (r["peak_rss_bytes"] - results["largest_tensor_bytes"]) / 1e9
        if "stage_cpu_seconds" in r:
            r["stage_cpu_s_per_gb"] = {s: v / gb for s, v in r["stage_cpu_seconds"].items()}
            r["stage_gb_per_s"] = {s: gb / v if v > 0 else None for s, v in r["stage_seconds"].items()}
    ref = run.get("gguf-py")
    if ref is not None:
        q_ours, q_ref = run["serial"], ref
        run["x_quantizer_wall"] = q_ref["stage_seconds"]["quantize"] / q_ours["stage_seconds"]["quantize"]
        run["x_quantizer_cpu"] = q_ref["stage_cpu_seconds"]["quantize"] / q_ours["stage_cpu_seconds"]["quantize"]
        run["x_end_to_end_wall"] = ref["seconds"] / run["ours"]["seconds"]
        run["x_end_to_end_cpu"] = ref["cpu_seconds"] / run["ours"]["cpu_seconds"]


def print_tables(results: dict) -> None:
    print(f"\nsource: {results['source_bytes'] / 1e9:.2f} GB bf16 in the page cache, {results['blocks']} blocks of "
          f"width {DIM}; largest tensor {results['largest_tensor']} {results['largest_tensor_bytes'] / 1e9:.3f} GB; "
          f"{results['cpu_count']} CPUs")
    print("CPU s/GB: user+system seconds of all threads per GB of bf16 source (nearly load-independent); "
          "GB/s: source GB per wall second; load: 1-min load average before/after; others: cores other "
          "processes kept busy during the run; same: output byte-identical to ours")
    print(f"{'type':<5} {'run':<8} {'read':>6} {'quant':>6} {'write':>6} {'total':>6} {'wall s':>7} {'GB/s':>5} "
          f"{'RSS-largest':>11} {'load':>9} {'others':>6} {'same':>4}")
    for run in results["runs"]:
        for role in ("ours", "serial", "gguf-py"):
            r = run.get(role)
            if r is None:
                continue
            st = r.get("stage_cpu_s_per_gb", {})
            cells = " ".join(f"{st[s]:6.2f}" if s in st else f"{'-':>6}" for s in STAGES)
            same = "" if role == "ours" else ("yes" if r["identical_to_ours"] else "NO")
            print(f"{run['type']:<5} {role:<8} {cells} {r['cpu_s_per_gb']:6.2f} {r['seconds']:7.2f} {r['gb_per_s']:5.2f} "
                  f"{r['peak_rss_above_largest_gb']:8.2f} GB {r['load_before']:4.1f}/{r['load_after']:<4.1f} "
                  f"{r['others_cores']:6.2f} {same:>4}")
    if any("x_quantizer_wall" in run for run in results["runs"]):
        print("ours vs gguf-py, same tensors, same run (x = how many times faster; in wall seconds, and in CPU "
              "seconds, which do not depend on the cores free)")
        print("  quantizer only: bf16 tensor in memory -> blocks in memory (ours: tensor_bytes, every core; theirs: "
              "float32 widening + gguf.quants.quantize, one core)")
        print("  end to end: safetensors in the page cache -> synced GGUF (ours: convert(), pipelined; theirs: "
              "safe_open + widening + quantize + gguf.GGUFWriter + fsync)")
        print(f"{'type':<5} {'quantizer wall':>14} {'quantizer CPU':>13} {'e2e wall':>9} {'e2e CPU':>8}")
        for run in results["runs"]:
            if "x_quantizer_wall" in run:
                print(f"{run['type']:<5} {run['x_quantizer_wall']:13.1f}x {run['x_quantizer_cpu']:12.1f}x "
                      f"{run['x_end_to_end_wall']:8.1f}x {run['x_end_to_end_cpu']:7.1f}x")


if __name__ == "__main__":
    main()

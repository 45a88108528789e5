"""Benchmark the streaming engine: one full forward of a 14B expert under any VRAM budget.

    python bench/stream.py --out bench-stream.json [--dir /tmp/wanrt-stream-bench] [--only 480p,disk]
    python bench/stream.py --tiny                 # the same runs on a tiny model (CPU is fine)

Builds what it needs: a full-size synthetic Wan 2.2 I2V-A14B expert (dim 5120, 40 heads,
FFN 13824, 40 blocks, text_dim 4096, in_dim 36) with random valid weights, written as GGUF
q8_0 (15.4 GB) and q4_0 (8.6 GB, FFN down projection in q4_1 as in city96's files) with
the real files' layout (small tensors F16, the 5-D patch embedding F32); the random
blocks are cut from a pool, so writing is disk-bound. Files are reused when present.

Each run is one expert forward with both CFG samples as a batch of 2, at 832×480×81
(32,760 tokens) or 1280×720×81 (75,600): uncapped with every block resident, then with
VRAM capped by torch.cuda.set_per_process_memory_fraction at 12, 8 and 6 GiB (the plan
is made for the same budget), then with --ram below the expert (blocks staged from the
file, page cache dropped before each timed forward), then the two-expert swap (q8_0
then q4_0, RAM for one). Reported per run: time (best of --repeat, after a tiny warm-up
forward), overlap efficiency = resident time / this time, TFLOP/s, H2D GB/s, peak VRAM
from the allocator (allocated, reserved) and from the driver (mem_get_info sampled after
each forward, and context + peak reserved), the plan's prediction beside each, measured /
predicted activation peak, peak host RSS and pinned bytes, and whether the output equals
the resident run's bit for bit (same weights, same inputs). A request the planner refuses
is reported with its message (that is the promised behaviour, not a failure).

Runs print as they finish; the table comes last; --out writes JSON. Runs are ordered
large first; --only takes comma-separated substrings of run names.
"""
from __future__ import annotations

import os

# Fragmentation is part of what the planner promises; expandable segments keep it small.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quant.ggml_types import GGMLType, traits  # noqa: E402
from quant.gguf_writer import GGUFWriter  # noqa: E402
from quant.type_policy import plan_tensor  # noqa: E402
from runtime.dit_config import DiTConfig, expected_shapes  # noqa: E402
from runtime.dit_loading import load_dit  # noqa: E402
from runtime.stream import BlockWeights, ExpertSet, FileSource, PlanError, Request, attach, plan_dit  # noqa: E402
from runtime.stream.budget import (  # noqa: E402
    GiB,
    MiB,
    DeviceInfo,
    peak_rss_bytes,
    pinned_bytes,
    reset_peak_rss,
    rss_bytes,
)
from runtime.stream.engine import move_outside_blocks  # noqa: E402
from runtime.stream.host import PINNED, HostStore, build_layouts  # noqa: E402
from runtime.stream.activations import dit_flops_per_block  # noqa: E402

A14B = DiTConfig("i2v", 36, 16, 5120, 13824, 256, 4096, 40, 40, (1, 2, 2), "argument")
TINY = DiTConfig("i2v", 36, 16, 256, 688, 256, 64, 2, 6, (1, 2, 2), "argument")
SIZES = {"480p": (832, 480, 81), "720p": (1280, 720, 81)}
TINY_SIZES = {"480p": (96, 64, 9), "720p": (128, 80, 9)}
CAPS_GIB = (12, 8, 6)
TINY_CAPS = (0.9, 0.75, 0.6)  # share of the block bytes the budget leaves room for
QUANTS = ("q8_0", "q4_0")


# -- synthetic expert files ---------------------------------------------------------------


def _block_pool(ggml_type: GGMLType, nbytes: int, gen: torch.Generator) -> torch.Tensor:
    """Random valid blocks: small fp16 scales (and mins), random quants."""
    t = traits(ggml_type)
    n = -(-nbytes // t.type_size)
    blocks = torch.randint(0, 256, (n, t.type_size), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n, generator=gen) * 2e-4 + 5e-5).half()
    blocks[:, 0:2] = d.view(torch.uint8).view(n, 2)
    if ggml_type in (GGMLType.Q4_1, GGMLType.Q5_1):
        blocks[:, 2:4] = (-8 * d.float()).half().view(torch.uint8).view(n, 2)
    return blocks.reshape(-1)


def write_expert(path: Path, cfg: DiTConfig, quant: str, seed: int = 0) -> Path:
    """A GGUF expert with random valid weights, reused if a complete one is there."""
    target = GGMLType[quant.upper()]
    shapes = expected_shapes(cfg)
    plans = {n: plan_tensor(n, shapes[n], torch.float16, target=target, base=GGMLType.F16) for n in sorted(shapes)}
    gen = torch.Generator().manual_seed(seed)
    largest = max(traits(p.ggml_type).type_size * (int(torch.tensor(p.shape).prod()) // traits(p.ggml_type).block_size)
                  for p in plans.values())
    pools = {t: _block_pool(t, largest + (1 << 20), gen) for t in {p.ggml_type for p in plans.values()} if traits(t).block_size > 1}
    w = GGUFWriter(path, arch="wan", overwrite=True)
    w.add_quantization_info(target)

    def produce(p):
        n = int(torch.tensor(p.shape).prod()) if p.shape else 1
        if p.ggml_type in pools:
            t = traits(p.ggml_type)
            nbytes = n // t.block_size * t.type_size
            pool = pools[p.ggml_type]
            start = (hash(p.name) % max(1, (pool.numel() - nbytes) // t.type_size)) * t.type_size
            return pool[start : start + nbytes]
        dtype = torch.float32 if p.ggml_type == GGMLType.F32 else torch.float16
        scale = 0.02
        values = torch.randn(n, generator=gen) * scale
        if "norm" in p.name:
            values += 1.0
        return values.to(dtype).view(torch.uint8)

    for name, p in plans.items():
        w.add_tensor(name, p.shape, p.ggml_type, lambda p=p: produce(p))
    if path.exists() and path.stat().st_size == w.total_bytes:
        return path
    t0 = time.perf_counter()
    w.write()
    print(f"wrote {path} ({path.stat().st_size / GiB:.2f} GiB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages, so the next reads hit the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- measuring --------------------------------------------------------------------------


class RssSampler:
    """Peak resident set while running: the kernel's high-water mark when it can be reset,
    and a sampling thread otherwise."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None
        self.hwm_reset = False

    def __enter__(self):
        self.hwm_reset = reset_peak_rss()
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(), peak_rss_bytes() if self.hwm_reset else 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def driver_used(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def h2d_bandwidth(device: torch.device) -> float | None:
    """Pinned host-to-device GB/s (256 MiB, best of 3)."""
    if device.type != "cuda":
        return None
    from runtime.stream.host import PinnedBuffer

    buf = PinnedBuffer(256 * MiB)
    dst = torch.empty(256 * MiB, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(buf.tensor, non_blocking=True)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    buf.close()
    return 256 * MiB / best / 1e9


def inputs(cfg: DiTConfig, size: tuple[int, int, int], device, batch: int = 2):
    """Latents x [16, F, H, W], conditions y [20, F, H, W], two text contexts, t, seq_len."""
    w, h, f = size
    lat = ((f - 1) // 4 + 1, h // 8, w // 8)
    gen = torch.Generator().manual_seed(1)
    x = [torch.randn(cfg.out_dim, *lat, generator=gen).to(device)] * batch
    y = [torch.randn(cfg.in_dim - cfg.out_dim, *lat, generator=gen).to(device)] * batch
    context = [torch.randn(n, cfg.text_dim, generator=gen).to(device, torch.bfloat16) for n in (120, 40)[:batch]]
    t = torch.full((batch,), 900.0)
    seq_len = lat[0] * (lat[1] // 2) * (lat[2] // 2)
    return x, t, context, seq_len, y


# -- one run ----------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    size: str
    quant: str
    cap: float | None  # GiB (with --tiny: the share of the blocks the budget has room for); None: uncapped
    disk: bool = False
    experts: bool = False
    result: dict = field(default_factory=dict)


class Bench:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.cfg = TINY if self.tiny else A14B
        self.sizes = TINY_SIZES if self.tiny else SIZES
        cuda = torch.cuda.is_available() and not args.cpu
        # an explicit index: some torch calls (set_per_process_memory_fraction) require one
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.dir = Path(args.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, Path] = {}
        self.models: dict[str, torch.nn.Module] = {}
        self.sources: dict[str, FileSource] = {}
        self.stores: dict[str, HostStore] = {}
        self.resident_time: dict[tuple[str, str], float] = {}
        self.resident_out: dict[tuple[str, str], list[torch.Tensor]] = {}

    # files, models and shared host copies, made on first use
    def file(self, quant: str) -> Path:
        if quant not in self.files:
            tag = "tiny" if self.tiny else "a14b"
            self.files[quant] = write_expert(self.dir / f"{tag}-synthetic-{quant.upper()}.gguf", self.cfg, quant)
        return self.files[quant]

    def model(self, quant: str):
        if quant not in self.models:
            path = self.file(quant)
            self.models[quant] = load_dit(path, dtype=torch.bfloat16, load_blocks=False)
            self.sources[quant] = FileSource.from_gguf(path)
        return self.models[quant], self.sources[quant]

    def store(self, quant: str) -> HostStore:
        """All blocks pinned once, shared by the runs that have RAM for them."""
        if quant not in self.stores:
            model, source = self.model(quant)
            layouts = build_layouts(model.blocks, "blocks", source)
            store = HostStore(layouts, [PINNED] * len(layouts), source, pin=self.cuda)
            t0 = time.perf_counter()
            store.load()
            print(f"pinned {quant} blocks: {store.pinned_bytes / GiB:.2f} GiB in {time.perf_counter() - t0:.1f} s", flush=True)
            self.stores[quant] = store
        return self.stores[quant]

    def release_stores(self) -> None:
        for store in self.stores.values():
            store.close()
        self.stores.clear()
        gc.collect()

    def reset_device(self, model=None) -> None:
        if model is not None:
            move_outside_blocks(model, "cpu")
            model.scratch.clear()
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def device_info(self, cap_bytes: int | None) -> DeviceInfo:
        if self.cuda:
            if cap_bytes is not None:
                total = torch.cuda.get_device_properties(self.device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), self.device)
            return DeviceInfo.probe(self.device)
        return DeviceInfo("cpu (as a device)", 1 << 50, 1 << 50, 0, 0, 0, "none")

    def budget(self, run: Run, weights: BlockWeights, request: Request) -> int | None:
        if run.cap is None:
            return None
        if not self.tiny:
            return int(run.cap * GiB)
        full = plan_dit(self.cfg, request, weights=weights, vram=f"{1 << 40}B", ram=f"{1 << 40}B",
                        device=DeviceInfo("sizing", 1 << 41, 1 << 41, 0, 0, 0, "none"))
        return int(full.device.driver_peak - (1 - run.cap) * sum(weights.block_bytes))

    def forward(self, model, args) -> tuple[float, int, list[torch.Tensor]]:
        """(seconds, driver bytes in use after it, outputs) of one forward."""
        sync(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(*args[:4], y=args[4])
        sync(self.device)
        seconds = time.perf_counter() - t0
        return seconds, driver_used(self.device), out

    def run_forward(self, run: Run) -> dict:
        cfg = self.cfg
        w, h, f = self.sizes[run.size]
        request = Request(w, h, f)
        model, source = self.model(run.quant)
        self.reset_device(model)
        weights = BlockWeights.of(model, source)
        cap = self.budget(run, weights, request)
        info = self.device_info(cap)
        # RAM for every block (the shared pinned copies), or half the expert: staged from disk
        expert = sum(weights.block_bytes)
        ram = f"{expert // 2 if run.disk else 2 * expert}B"
        vram = "auto" if cap is None else f"{cap}B"
        res = {"request": request.describe(), "quant": run.quant, "cap_bytes": cap, "ram": ram,
               "overhead_bytes": info.overhead, "overhead_source": info.overhead_source}
        try:
            plan = plan_dit(cfg, request, weights=weights, vram=vram, ram=ram, device=info)
        except PlanError as e:
            res["refused"] = str(e)
            return res
        print(plan.describe(), flush=True)
        host = None if run.disk else self.store(run.quant)
        engine = None
        with RssSampler() as rss:
            try:
                engine = attach(model, plan, source=source, device=self.device, host=host, progress=False)
                warm = inputs(cfg, (16, 16, 1), self.device)
                self.forward(model, warm)
                args = inputs(cfg, (w, h, f), self.device)
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device) if self.cuda else 0
                times, driver = [], 0
                for _ in range(self.args.repeat):
                    if run.disk:
                        drop_page_cache(self.files[run.quant])
                    s, d, out = self.forward(model, args)
                    times.append(s)
                    driver = max(driver, d)
                    out = [o.cpu() for o in out]
                stats = engine.stats()
            except torch.OutOfMemoryError as e:
                res["oom"] = str(e).splitlines()[0]
                return res
            finally:
                if engine is not None:
                    engine.close()
        best = min(times)
        n_fwd = len(times)
        flops = dit_flops_per_block(dim=cfg.dim, ffn_dim=cfg.ffn_dim, tokens=request.tokens(cfg.patch_size),
                                    text_len=cfg.text_len, batch=2) * cfg.num_layers
        res.update(
            plan={
                "resident": len(plan.resident), "streamed": len(plan.streamed), "ring_slots": plan.ring_slots,
                "slot_bytes": plan.slot_bytes, "pinned_blocks": sum(1 for i in plan.streamed if plan.host[i] == "pinned"),
                "staged_blocks": sum(1 for i in plan.streamed if plan.host[i] == "staged"),
                "attn_chunk": plan.attn_chunk, "ffn_chunk": plan.ffn_chunk, "head_chunk": plan.head_chunk,
            },
            predicted={"driver_peak": plan.device.driver_peak, "allocator_peak": plan.device.allocator_peak,
                       "activations": plan.device.activations},
            seconds=times, best_seconds=best, tflops=flops / best / 1e12,
            h2d_gbps=stats["bytes_copied"] / max(1, n_fwd + 1) / best / 1e9,
            engine=stats, host_rss_peak=rss.peak, pinned_bytes=pinned_bytes(),
        )
        if self.cuda:
            peak_alloc = torch.cuda.max_memory_allocated(self.device)
            peak_reserved = torch.cuda.max_memory_reserved(self.device)
            outside = driver_used(self.device) - torch.cuda.memory_reserved(self.device)
            res.update(
                alloc_peak=peak_alloc, reserved_peak=peak_reserved, driver_sampled_peak=driver,
                driver_peak=max(driver, outside + peak_reserved), activations_measured=peak_alloc - base,
            )
        key = (run.size, run.quant)
        if cap is None:
            self.resident_time[key] = best
            self.resident_out[key] = out
        if key in self.resident_time:
            res["efficiency"] = self.resident_time[key] / best
        if key in self.resident_out and cap is not None:
            ref = self.resident_out[key]
            res["equal_to_resident"] = all(torch.equal(a, b) for a, b in zip(out, ref))
            res["max_abs_diff_to_resident"] = max(float((a - b).abs().max()) for a, b in zip(out, ref))
        return res

    def run_experts(self, run: Run) -> dict:
        """High-noise expert q8_0, then low-noise q4_0, RAM for one: forward, swap, forward."""
        cfg = self.cfg
        w, h, f = self.sizes[run.size]
        request = Request(w, h, f)
        self.release_stores()
        experts, plans = {}, {}
        for name, quant in (("high", "q8_0"), ("low", "q4_0")):
            model, source = self.model(quant)
            self.reset_device(model)
            experts[name] = (model, source)
        one = max(sum(BlockWeights.of(m, s).block_bytes) for m, s in experts.values())
        ram = f"{one + GiB}B"
        weights = {n: BlockWeights.of(m, s) for n, (m, s) in experts.items()}
        cap = self.budget(run, weights["high"], request)
        info = self.device_info(cap)
        vram = "auto" if cap is None else f"{cap}B"
        res = {"request": request.describe(), "cap_bytes": cap, "ram_budget": one + GiB, "expert_bytes": one}
        try:
            for n in experts:
                plans[n] = plan_dit(cfg, request, weights=weights[n], vram=vram, ram=ram, device=info)
        except PlanError as e:
            res["refused"] = str(e)
            return res
        args = inputs(cfg, (w, h, f), self.device)
        timeline = []
        with RssSampler() as rss:
            es = ExpertSet(experts, plans, device=self.device, progress=False)
            try:
                for name in ("high", "low"):
                    t0 = time.perf_counter()
                    model = es.activate(name)
                    sync(self.device)
                    t_switch = time.perf_counter() - t0
                    s, _, _ = self.forward(model, args)
                    timeline.append({"expert": name, "activate_seconds": t_switch, "forward_seconds": s,
                                     "rss": rss_bytes(), "pinned": pinned_bytes()})
                    print(f"  {name}: activate {t_switch:.1f} s, forward {s:.2f} s, RSS {rss_bytes() / GiB:.1f} GiB",
                          flush=True)
                res["prefetch"] = es.prefetch
            finally:
                es.close()
        res.update(timeline=timeline, host_rss_peak=rss.peak, target_rss=one + 3 * GiB)
        return res

    def execute(self, run: Run) -> None:
        t0 = time.perf_counter()
        try:
            run.result = self.run_experts(run) if run.experts else self.run_forward(run)
        except Exception as e:  # one broken run must not lose the others
            run.result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        run.result["wall_seconds"] = time.perf_counter() - t0
        print(f"[{run.name}] {line(run)}", flush=True)


def runs(tiny: bool) -> list[Run]:
    caps = TINY_CAPS if tiny else CAPS_GIB
    unit = "x" if tiny else "GiB"
    out = []
    for size in ("720p", "480p"):
        quants = ("q8_0",) if size == "720p" else QUANTS
        for quant in quants:
            out.append(Run(f"{size}-{quant}-resident", size, quant, None))
            for cap in caps:
                if quant == "q4_0" and cap != caps[-1]:
                    continue
                if size == "720p" and cap == caps[-1]:
                    continue
                out.append(Run(f"{size}-{quant}-{cap}{unit}", size, quant, cap))
    out.append(Run(f"480p-q8_0-{caps[1]}{unit}-disk", "480p", "q8_0", caps[1], disk=True))
    out.append(Run(f"experts-480p-{caps[1]}{unit}", "480p", "q8_0", caps[1], experts=True))
    return out


# -- report -------------------------------------------------------------------------------------


def g(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def line(run: Run) -> str:
    r = run.result
    if "refused" in r:
        return f"refused: {r['refused']}"
    if "oom" in r:
        return f"OUT OF MEMORY: {r['oom']}"
    if "error" in r:
        return f"ERROR: {r['error']}"
    if run.experts:
        return f"host RSS peak {g(r['host_rss_peak'])} GiB (target <= {g(r['target_rss'])}), prefetch {r.get('prefetch')}"
    eff = f"{r['efficiency']:.3f}" if "efficiency" in r else "-"
    act = r.get("activations_measured")
    act_ratio = f"{act / r['predicted']['activations']:.2f}" if act else "-"
    same = {True: ", output == resident", False: f", OUTPUT DIFFERS by {r.get('max_abs_diff_to_resident')}"}
    return (
        f"{r['best_seconds']:.2f} s, eff {eff}{same.get(r.get('equal_to_resident'), '')}, "
        f"{r['tflops']:.0f} TFLOP/s, H2D {r['h2d_gbps']:.1f} GB/s, "
        f"driver {g(r.get('driver_peak'))} (pred {g(r['predicted']['driver_peak'])}) GiB, "
        f"reserved {g(r.get('reserved_peak'))}, act meas/pred {act_ratio}, RSS {g(r['host_rss_peak'])} GiB"
    )


def table(all_runs: list[Run]) -> str:
    head = ("run", "plan res/str/slots", "chunks", "time s", "eff", "TFLOP/s", "H2D GB/s", "alloc", "reserved",
            "driver", "pred", "act m/p", "RSS", "pinned")
    rows = [head]
    for run in all_runs:
        r = run.result
        if not r:
            continue
        if run.experts:
            tl = r.get("timeline", [])
            rows.append((run.name, "swap high->low", "-", "/".join(f"{t['forward_seconds']:.2f}" for t in tl) or "-",
                         "-", "-", "-", "-", "-", "-", "-", "-", g(r.get("host_rss_peak")), "-"))
            continue
        if "best_seconds" not in r:
            what = "refused" if "refused" in r else "OOM" if "oom" in r else "error"
            rows.append((run.name, what) + ("",) * (len(head) - 2))
            continue
        p = r["plan"]
        act = r.get("activations_measured")
        chunks = "/".join("-" if v is None else str(v) for v in (p.get("attn_chunk"), p["ffn_chunk"]))
        rows.append((
            run.name, f"{p['resident']}/{p['streamed']}/{p['ring_slots']}" + (f" {p['staged_blocks']} staged" if p["staged_blocks"] else ""),
            chunks, f"{r['best_seconds']:.2f}", f"{r['efficiency']:.3f}" if "efficiency" in r else "-", f"{r['tflops']:.0f}",
            f"{r['h2d_gbps']:.1f}", g(r.get("alloc_peak")), g(r.get("reserved_peak")), g(r.get("driver_peak")),
            g(r["predicted"]["driver_peak"]), f"{act / r['predicted']['activations']:.2f}" if act else "-",
            g(r["host_rss_peak"]), g(r["pinned_bytes"]),
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "wanrt-stream-bench"),
                    help="folder for the synthetic GGUF experts (about 24 GB; reused when present)")
    ap.add_argument("--only", help="comma-separated substrings of run names (e.g. 480p,disk)")
    ap.add_argument("--repeat", type=int, default=2, help="timed forwards per run (the best counts)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and sizes: checks the whole bench in seconds")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is there (with --tiny)")
    args = ap.parse_args(argv)
    bench = Bench(args)
    todo = runs(args.tiny)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        todo = [r for r in todo if any(k in r.name for k in keys)]
    info = {
        "device": torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu",
        "torch": torch.__version__, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "h2d_pinned_gbps": h2d_bandwidth(bench.device), "model": "tiny" if args.tiny else "A14B expert",
    }
    print(f"device {info['device']}, torch {info['torch']}, pinned H2D {info['h2d_pinned_gbps'] or 0:.1f} GB/s", flush=True)
    for quant in QUANTS:
        if any(r.quant == quant or r.experts for r in todo):
            bench.file(quant)
    def save() -> None:  # after every run: a cut-short session keeps what it measured
        if args.out:
            done = [{"name": r.name, **r.result} for r in todo if r.result]
            Path(args.out).write_text(json.dumps({"info": info, "runs": done}, indent=1, default=str))

    for run in todo:
        if run.disk or run.experts:
            bench.release_stores()
        bench.execute(run)
        save()
    bench.release_stores()
    print()
    print(table(todo))
    return 0 if all("error" not in r.result for r in todo) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the Wan VAE's memory targets: decode of 81 frames and encode of the 81-frame
I2V conditioning video at 832x480 and 1280x720, float32 and bfloat16, untiled and with
the tiles the VAE chooses itself for a VRAM budget.

    python bench/vae.py [--out bench-vae.json]     # on the GPU: the full-size Wan 2.1 VAE (~2 min)
    python bench/vae.py --all                       # also NCDHW and device-resident-video rows
    python bench/vae.py --vae 2.2                   # the Wan 2.2 VAE instead
    python bench/vae.py --tiny                      # the same logic on tiny sizes (CPU is fine)

Targets: 480p encode and decode under 4 GiB, 720p under 6 GiB, tiled time <= 1.3x the
untiled, tiled result within the tests' bound of the untiled one (3% relative L2). For
scale, the official VAE in float32 on the H200 peaks at 7.3 GiB encode / 8.7 GiB decode
at 832x480x81 (2.2 s / 2.8 s) and 16.1 / 19.4 GiB at 1280x720x81 (4.1 s / 6.6 s).

Per size, dtype and direction two rows, with the video where the pipeline keeps it (the
decoded video goes to host memory chunk by chunk, the encoder reads its video from host
memory frame by frame):
- "untiled": the whole frame, no cap; the time and result the tiled row is held against;
- "auto": the VAE is given the target as its VRAM budget and picks its tiles (or none)
  from its memory estimate, and torch's allocator is capped at the target
  (set_per_process_memory_fraction), so a wrong estimate shows as a MISS, not as a
  number.
Columns: layout and TFLOP/s (conv and attention FLOPs counted on the meta device for the
same plan), the work tiles recompute (overlaps) as a fraction of the untiled FLOPs,
predicted peak (the estimate), measured peaks of the VAE alone: allocator (max allocated
during the call + weights), reserved (max reserved, what the cap limits) and driver
(device memory in use at the peak, sampled, less what was in use before the call, +
weights; lazily loaded kernels included, the CUDA context not), relative L2 to the
untiled result and to the float32 untiled result. PASS on an auto row: it ran under the
cap, allocator and reserved peaks within the target, the estimate not below the
allocator peak, time <= 1.3x untiled, error within the bound.

The full-size VAE has random weights made on the GPU (initialised like the golden sets:
conv weights N(0, gain^2/fan_in), norms 1 + N(0, 0.2^2)). The allocator uses expandable
segments, as the CLI sets it. Rows stop being started after --max-seconds.
"""
from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI does

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.vae import WanVAE, build_model, load_vae  # noqa: E402
from runtime.vae21 import WAN21_FULL  # noqa: E402
from runtime.vae22 import WAN22_FULL  # noqa: E402
from runtime.vae_blocks import VAEConfig  # noqa: E402
from runtime.vae_tiling import memory_estimate  # noqa: E402

GIB = 1024**3
OFFICIAL_FP32 = {  # seconds and peak GiB of the official VAE on the H200 (Wan 2.1, 81 frames)
    ("encode", "480p"): (2.2, 7.3), ("decode", "480p"): (2.8, 8.7),
    ("encode", "720p"): (4.1, 16.1), ("decode", "720p"): (6.6, 19.4),
}
TIME_TARGET = 1.3  # tiled time / untiled time
TILED_REL_L2 = 0.03  # tests/test_vae_tiling.py


@dataclass(frozen=True)
class Size:
    label: str
    frames: int
    height: int
    width: int
    budget: int | None  # bytes for the auto rows; None: 60% of the untiled cache and activations


FULL_SIZES = (Size("480p", 81, 480, 832, 4 * GIB), Size("720p", 81, 720, 1280, 6 * GIB))
TINY_SIZES = (Size("tiny-a", 9, 64, 128, None), Size("tiny-b", 9, 64, 192, None))


def tiny_config(version: str) -> VAEConfig:
    return VAEConfig(version=version, dim=8, z_dim=16 if version == "2.1" else 48,
                     dec_dim=8 if version == "2.1" else 12)


def random_state_dict(config: VAEConfig, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = build_model(config).state_dict()
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for k, p in shapes.items():
        x = torch.randn(p.shape, generator=g, device=device)
        if k.endswith("gamma"):
            sd[k] = 1 + 0.2 * x
        elif k.endswith("bias"):
            sd[k] = 0.05 * x
        else:
            gain = 0.5 if ("residual.6" in k or ".proj." in k) else 1.0
            sd[k] = x * (gain / p[0].numel() ** 0.5)
    return sd


def make_input(op: str, config: VAEConfig, size: Size, device, frames: int | None = None) -> torch.Tensor:
    """decode: a normal latent on the device (where the denoiser leaves it); encode: the
    I2V conditioning video in host memory (a smooth image as frame 0, zeros after it)."""
    st, sh, sw = config.stride
    frames = size.frames if frames is None else frames
    g = torch.Generator(device=device).manual_seed(1)
    if op == "decode":
        return torch.randn(config.z_dim, 1 + (frames - 1) // st, size.height // sh, size.width // sw,
                           generator=g, device=device)
    coarse = torch.rand(1, 3, 6, 10, generator=g, device=device) * 2 - 1
    image = torch.nn.functional.interpolate(coarse, size=(size.height, size.width), mode="bicubic")[0]
    video = torch.zeros(3, frames, size.height, size.width)
    video[:, 0] = image.clamp(-1, 1).cpu()
    return video


_FLOPS: dict = {}


def count_flops(vae: WanVAE, op: str, x: torch.Tensor, tile) -> float:
    """Conv and attention FLOPs of one call with this plan, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    key = (vae.config, op, tuple(x.shape), tuple(tile) if tile else None)
    if key not in _FLOPS:
        with torch.device("meta"):
            model = build_model(vae.config).to(vae.dtype).requires_grad_(False)
        shadow = WanVAE(model.eval(), device=torch.device("meta"), dtype=vae.dtype, channels_last=False,
                        overlap=vae.overlap)
        with FlopCounterMode(display=False) as counter:
            if op == "decode":
                shadow.decode_unclamped(x.to("meta"), tile=tile or False)
            else:
                shadow.encode([x.to("meta")], tile=tile or False)
        _FLOPS[key] = float(counter.get_total_flops())
    return _FLOPS[key]


class DriverPeak:
    """Device memory in use (total - free), sampled on a thread while active."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()

    def sample(self) -> None:
        free, total = torch.cuda.mem_get_info(self.device)
        self.peak = max(self.peak, total - free)

    def _run(self) -> None:
        torch.cuda.set_device(self.device)
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "DriverPeak":
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def call(vae: WanVAE, op: str, x: torch.Tensor, tile, output_device):
    if op == "decode":
        return vae.decode_unclamped(x, tile=tile, output_device=output_device)
    return vae.encode([x], tile=tile)[0].cpu()


def run_case(vae: WanVAE, op: str, size: Size, device, warm_frames: int, *, budget: int | None,
             output_device) -> tuple[dict, torch.Tensor]:
    """Warm up on a few frames with the same plan, then one full call: untiled when
    `budget` is None, else the VAE's own choice for that VRAM budget (bytes, weights
    included) under an allocator capped at it."""
    vae.vram_budget = budget
    tile = False if budget is None else None  # None: the VAE chooses
    try:
        return _run_case(vae, op, size, tile, device, warm_frames, budget, output_device)
    finally:
        vae.vram_budget = None


def _run_case(vae: WanVAE, op: str, size: Size, tile, device, warm_frames: int, cap: int | None,
              output_device) -> tuple[dict, torch.Tensor]:
    config = vae.config
    x = make_input(op, config, size, device)
    io = ({"output_on_device": output_device is None or torch.device(output_device) == vae.device} if op == "decode"
          else {"input_on_device": x.device == vae.device})  # as the call itself will plan
    plan = vae.plan(op, size.frames, size.height, size.width, tile=tile, **io)
    fixed = plan.tile if plan.tiled else False
    call(vae, op, make_input(op, config, size, device, frames=warm_frames), fixed, output_device)
    cuda = device.type == "cuda"
    weights = sum(p.numel() * p.element_size() for p in vae.model.parameters())
    stats = {}
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        allocated0, reserved0 = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        free0, total = torch.cuda.mem_get_info(device)
        others = allocated0 - weights  # what the bench holds besides the VAE (the input latent)
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, (cap + others) / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with DriverPeak(device) if cuda else _Nothing() as driver:
            t0 = time.perf_counter()
            out = call(vae, op, x, tile, output_device)
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
    finally:
        if cuda and cap is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    if cuda:
        stats = dict(alloc_gib=(torch.cuda.max_memory_allocated(device) - allocated0 + weights) / GIB,
                     reserved_gib=(torch.cuda.max_memory_reserved(device) - reserved0 + weights) / GIB,
                     driver_gib=(driver.peak - (total - free0) + weights) / GIB)
    flops = count_flops(vae, op, x, fixed)
    estimate = memory_estimate(config, op, size.frames, size.height, size.width, tile=fixed or None,
                               dtype=vae.dtype, overlap=vae.overlap, channels_last=vae.channels_last, **io)
    row = dict(op=op, size=size.label, seconds=seconds, flops=flops, tflops=flops / seconds / 1e12,
               tiles=f"{len(plan.spans_y)}x{len(plan.spans_x)}", tile=list(plan.tile) if plan.tiled else None,
               **stats, estimate_gib=estimate.total / GIB, estimate=estimate.__dict__)
    return row, out.float().cpu()


class _Nothing:
    peak = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    d = out - ref
    return {"rel_l2": (d.norm() / ref.norm()).item(), "max_abs": d.abs().max().item()}


def verdict(row: dict, budget: int) -> str:
    """PASS, or MISS with the targets missed, for an auto row."""
    if "alloc_gib" not in row:
        return "-"
    missed = []
    if row["alloc_gib"] > budget / GIB or row["reserved_gib"] > budget / GIB:
        missed.append("memory")
    if row["estimate_gib"] < row["alloc_gib"]:
        missed.append("estimate low")
    if row.get("time_vs_untiled") and row["time_vs_untiled"] > TIME_TARGET:
        missed.append("time")
    if row.get("vs_untiled", {}).get("rel_l2", 0) > TILED_REL_L2:
        missed.append("error")
    return "PASS" if not missed else "MISS: " + ", ".join(missed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-vae.json")
    p.add_argument("--vae", choices=("2.1", "2.2"), default="2.1")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes: checks the logic anywhere")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--all", action="store_true",
                   help="also untiled rows of the first size with NCDHW activations and with the video on the device")
    p.add_argument("--max-seconds", type=float, default=240.0, help="start no row after this many seconds")
    args = p.parse_args()

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda" and not args.tiny:
        sys.exit("bench/vae.py: the full-size benchmark needs a CUDA device; use --tiny to check the logic on CPU")
    started = time.perf_counter()
    config = tiny_config(args.vae) if args.tiny else (WAN21_FULL if args.vae == "2.1" else WAN22_FULL)
    sizes = TINY_SIZES if args.tiny else FULL_SIZES
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    warm_frames = 1 + config.stride[0]  # two latent frames: chunk 0 and a steady-state chunk
    sd = {k: v.cpu() for k, v in random_state_dict(config, device).items()}  # nothing left on the device
    host = "cpu" if device.type == "cuda" else None  # where the pipeline puts the decoded video

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "vae": config.__dict__,
            "official_fp32_h200": {f"{k[0]} {k[1]}": v for k, v in OFFICIAL_FP32.items()}}
    rows: list[dict] = []
    skipped: list[str] = []
    references: dict = {}  # float32 untiled outputs (host memory), per (size, op)

    def add(row: dict, out: torch.Tensor, untiled: torch.Tensor | None, key) -> None:
        if untiled is not None:
            row["vs_untiled"] = compare(out, untiled)
        if key in references and row["dtype"] != "float32":
            row["vs_fp32_untiled"] = compare(out, references[key])
        rows.append(row)
        print(_line(row), flush=True)

    for dtype in dtypes:
        vae = load_vae(sd, device=device, dtype=dtype)
        label = str(dtype).replace("torch.", "")
        for size in sizes:
            budget = size.budget or _tiny_budget(vae, size)
            for op in ("decode", "encode"):
                key = (size.label, op)
                if time.perf_counter() - started > args.max_seconds:
                    skipped.append(f"{op} {size.label} {label}")
                    continue
                untiled = None
                for mode in ("untiled", "auto"):
                    meta = dict(dtype=label, layout="channels_last" if vae.channels_last else "ncdhw",
                                video="host" if host else "device", mode=mode, budget_gib=budget / GIB)
                    try:
                        row, out = run_case(vae, op, size, device, warm_frames,
                                            budget=budget if mode == "auto" else None, output_device=host)
                    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
                        rows.append(dict(op=op, size=size.label, **meta, error=str(e).splitlines()[0]))
                        print(f"{op} {size.label} {label} {mode}: out of memory ({str(e).splitlines()[0]})", flush=True)
                        gc.collect()
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    row.update(meta)
                    add(row, out, untiled, key)
                    if mode == "untiled":
                        untiled = out
                        if dtype == torch.float32:
                            references[key] = out
                    del out
                del untiled
        if args.all:
            _extra_rows(args, started, sd, sizes[0], dtype, device, warm_frames, add, host)
        del vae
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for r in rows:  # ratios and verdicts measured in this run
        same = ("op", "size", "dtype") if r.get("extra") else ("op", "size", "dtype", "layout", "video")
        base = next((b for b in rows if b.get("mode") == "untiled" and "seconds" in b
                     and all(b.get(k) == r.get(k) for k in same)), None)
        if "seconds" in r and base is not None:
            r["time_vs_untiled"] = r["seconds"] / base["seconds"]
            r["recompute"] = r["flops"] / base["flops"] - 1
        if r.get("mode") == "auto":
            r["verdict"] = verdict(r, int(r["budget_gib"] * GIB)) if "seconds" in r else "MISS: out of memory"
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows, "skipped": skipped,
                                          "seconds": time.perf_counter() - started}, indent=1))
    if skipped:
        print(f"not run (past --max-seconds {args.max_seconds:.0f}): {', '.join(skipped)}")
    print(table(rows, device))
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")


def _extra_rows(args, started, sd, size, dtype, device, warm_frames, add, host) -> None:
    """--all: untiled rows of the first size with NCDHW activations (channels-last is the
    default on CUDA) and with the decoded video kept on the device."""
    label = str(dtype).replace("torch.", "")
    for channels_last, video in ((False, host), (True, None)):
        if host is None and video is None and channels_last:
            continue  # on the CPU the video is on the device already
        vae = load_vae(sd, device=device, dtype=dtype, channels_last=channels_last)
        for op in ("decode", "encode") if video is host else ("decode",):
            if time.perf_counter() - started > args.max_seconds:
                return
            row, out = run_case(vae, op, size, device, warm_frames, budget=None, output_device=video)
            row.update(dtype=label, layout="channels_last" if channels_last else "ncdhw",
                       video="host" if video else "device", mode="variant", budget_gib=None, extra=True)
            add(row, out, None, (size.label, op))
        del vae


def _tiny_budget(vae: WanVAE, size: Size) -> int:
    """Room for 60% of the untiled cache and activations (decode: the larger of the two)."""
    full = memory_estimate(vae.config, "decode", size.frames, size.height, size.width, dtype=vae.dtype,
                           overlap=vae.overlap, channels_last=vae.channels_last)
    return int(full.total - 0.4 * (full.cache + full.activations))


def _line(r: dict) -> str:
    mem = " ".join(f"{k[:-4]} {r[k]:.2f}" for k in ("alloc_gib", "reserved_gib", "driver_gib") if k in r)
    return (f"{r['op']} {r['size']} {r['dtype']} {r['layout']} video on {r['video']} {r['mode']} {r['tiles']}: "
            f"{r['seconds']:.3f} s, {r['tflops']:.1f} TFLOP/s, predicted {r['estimate_gib']:.2f} GiB"
            + (f", measured {mem} GiB" if mem else ""))


def table(rows: list[dict], device) -> str:
    cols = ["op", "size", "dtype", "layout", "video", "mode", "budget", "tiles", "seconds", "x untiled", "TFLOP/s",
            "recompute", "pred GiB", "alloc GiB", "reserved GiB", "driver GiB", "vs untiled", "vs fp32", "verdict"]
    lines = [cols]
    for r in rows:
        def num(key, fmt="{:.2f}"):
            return fmt.format(r[key]) if r.get(key) is not None else "-"

        rel = r.get("vs_untiled", {}).get("rel_l2")
        rel32 = r.get("vs_fp32_untiled", {}).get("rel_l2")
        lines.append([r["op"], r["size"], r["dtype"], "cl" if r["layout"] == "channels_last" else "ncdhw", r["video"],
                      r["mode"], num("budget_gib", "{:.1f}") if r["mode"] == "auto" else "-", r.get("tiles", "-"),
                      num("seconds", "{:.3f}"), num("time_vs_untiled"), num("tflops", "{:.1f}"),
                      num("recompute", "{:+.1%}") if r["mode"] == "auto" else "-", num("estimate_gib"),
                      num("alloc_gib"), num("reserved_gib"), num("driver_gib"),
                      f"{rel:.4f}" if rel is not None else "-", f"{rel32:.4f}" if rel32 is not None else "-",
                      r.get("verdict", r.get("error", "-"))])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(cols))]
    out = ["  ".join(str(v).rjust(w) for v, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    if device.type == "cuda":
        out.append("official fp32 (H200): " + ", ".join(f"{k[0]} {k[1]} {v[0]} s / {v[1]} GiB"
                                                        for k, v in OFFICIAL_FP32.items()))
    return "\n".join(out)


if __name__ == "__main__":
    main()

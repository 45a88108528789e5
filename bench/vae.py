"""Benchmark the Wan VAE: decode of 81 frames and encode of the 81-frame I2V conditioning
video, at 832x480 and 1280x720, untiled and tiled, float32 and bfloat16.

    python bench/vae.py [--out bench-vae.json]     # on the GPU: the full-size Wan 2.1 VAE
    python bench/vae.py --vae 2.2                   # the Wan 2.2 VAE instead
    python bench/vae.py --tiny                      # the same logic on tiny sizes (CPU is fine)

The full-size VAE is built with random weights made on the GPU (initialised like the
golden sets: conv weights N(0, gain^2/fan_in), norms 1 + N(0, 0.2^2)). Per case: time of
one call after a short warm-up of the same shapes (CUDA events), TFLOP/s of the work (conv
and attention FLOPs counted on the meta device for the same plan), peak memory from the
allocator (max allocated, max reserved) and from the driver (total - free after the call,
before the cache is emptied), the estimate `runtime.vae` plans tiles with, and for tiled
and bf16 cases the distance to the float32 untiled result of the same input.

Settings: channels-last activations and cuDNN autotuning (torch.backends.cudnn.benchmark)
on; for the first size the untiled cases are repeated with the NCDHW layout and without
autotuning (`--no-compare` skips them). TF32 convolutions are PyTorch's default (the
official code runs the same way).

Tiled cases use the tiles `load_vae` picks from a VRAM budget (4 GiB at 480p, 6 GiB at
720p, the targets); when the whole frame already fits the budget, the float32 choice is
forced so that tiling is still measured. Targets: 480p encode and decode under 4 GiB peak,
720p under 6 GiB; tiled time <= 1.3x untiled. For scale, the official VAE in float32 on
the H200 peaks at 7.3 GiB encode / 8.7 GiB decode at 832x480x81 (2.2 s / 2.8 s) and
16.1 / 19.4 GiB at 1280x720x81 (4.1 s / 6.6 s).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.vae import WanVAE, build_model, load_vae  # noqa: E402
from runtime.vae21 import WAN21_FULL  # noqa: E402
from runtime.vae22 import WAN22_FULL  # noqa: E402
from runtime.vae_blocks import VAEConfig  # noqa: E402
from runtime.vae_tiling import choose_tile, memory_estimate  # noqa: E402

GIB = 1024**3
OFFICIAL_FP32 = {  # seconds and peak GiB of the official VAE on the H200 (Wan 2.1, 81 frames)
    ("encode", "480p"): (2.2, 7.3), ("decode", "480p"): (2.8, 8.7),
    ("encode", "720p"): (4.1, 16.1), ("decode", "720p"): (6.6, 19.4),
}


@dataclass(frozen=True)
class Size:
    label: str
    frames: int
    height: int
    width: int
    budget: int | None  # bytes for the tiled case; None: 60% of the untiled cache and activations


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
    """decode: a normal latent; encode: the I2V conditioning video (a smooth image as frame
    0, zeros after it)."""
    st, sh, sw = config.stride
    frames = size.frames if frames is None else frames
    g = torch.Generator(device=device).manual_seed(1)
    if op == "decode":
        return torch.randn(config.z_dim, 1 + (frames - 1) // st, size.height // sh, size.width // sw,
                           generator=g, device=device)
    coarse = torch.rand(1, 3, 6, 10, generator=g, device=device) * 2 - 1
    image = torch.nn.functional.interpolate(coarse, size=(size.height, size.width), mode="bicubic")[0]
    video = torch.zeros(3, frames, size.height, size.width, device=device)
    video[:, 0] = image.clamp(-1, 1)
    return video


_FLOPS: dict = {}


def count_flops(vae: WanVAE, op: str, x: torch.Tensor, tile) -> float:
    """Conv and attention FLOPs of one call with this plan, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    key = (op, tuple(x.shape), tuple(tile) if tile else tile)
    if key in _FLOPS:
        return _FLOPS[key]
    with torch.device("meta"):
        model = build_model(vae.config).to(vae.dtype)
    shadow = WanVAE(model.eval(), device=torch.device("meta"), dtype=vae.dtype, channels_last=False,
                    overlap=vae.overlap)
    with FlopCounterMode(display=False) as counter:
        if op == "decode":
            shadow.decode_unclamped(x.to("meta"), tile=tile)
        else:
            shadow.encode([x.to("meta")], tile=tile)
    _FLOPS[key] = float(counter.get_total_flops())
    return _FLOPS[key]


def timed(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000, out
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run_case(vae: WanVAE, op: str, size: Size, tile, device, warm_frames: int) -> tuple[dict, torch.Tensor]:
    """Warm up on a few frames of the same shapes, then time one full call."""
    config = vae.config

    def call(x):
        return vae.decode_unclamped(x, tile=tile) if op == "decode" else vae.encode([x], tile=tile)[0]

    call(make_input(op, config, size, device, frames=warm_frames))
    x = make_input(op, config, size, device)
    gc.collect()
    stats = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        free0, total = torch.cuda.mem_get_info(device)
        stats["driver_before_gib"] = (total - free0) / GIB
    seconds, out = timed(lambda: call(x), device)
    if device.type == "cuda":
        free1, total = torch.cuda.mem_get_info(device)
        stats.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / GIB,
                     peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB,
                     driver_after_gib=(total - free1) / GIB)
    flops = count_flops(vae, op, x, tile)
    estimate = memory_estimate(config, op, size.frames, size.height, size.width, tile=tile if tile else None,
                               dtype=vae.dtype, overlap=vae.overlap, input_on_device=op == "encode")
    del x
    row = dict(op=op, size=size.label, seconds=seconds, tflops=flops / seconds / 1e12, **stats,
               estimate_gib=estimate.total / GIB, estimate=estimate.__dict__)
    return row, out


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (out - ref).float()
    return {"rel_l2": (d.norm() / ref.float().norm()).item(), "max_abs": d.abs().max().item()}


@dataclass(frozen=True)
class Variant:
    """How the VAE runs: compute dtype, activation layout, cuDNN autotuning."""

    dtype: torch.dtype
    channels_last: bool = True
    cudnn_benchmark: bool = True

    @property
    def main(self) -> bool:  # the default settings: every size, untiled and tiled
        return self.channels_last and self.cudnn_benchmark

    def labels(self) -> dict:
        return {"dtype": str(self.dtype).replace("torch.", ""),
                "layout": "channels_last" if self.channels_last else "ncdhw",
                "cudnn_benchmark": self.cudnn_benchmark}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-vae.json")
    p.add_argument("--vae", choices=("2.1", "2.2"), default="2.1")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes: checks the logic anywhere")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no-compare", action="store_true",
                   help="skip the untiled rows of the first size with an NCDHW layout and without cuDNN autotuning")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        sys.exit("bench/vae.py: the full-size benchmark needs a CUDA device; use --tiny to check the logic on CPU")
    config = tiny_config(args.vae) if args.tiny else (WAN21_FULL if args.vae == "2.1" else WAN22_FULL)
    sizes = TINY_SIZES if args.tiny else FULL_SIZES
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    variants = [Variant(d) for d in dtypes]
    if not args.no_compare:
        variants += [Variant(d, channels_last=False) for d in dtypes]
        variants += [Variant(d, cudnn_benchmark=False) for d in dtypes]
    warm_frames = 1 + config.stride[0]  # two latent frames: chunk 0 and a steady-state chunk
    sd = random_state_dict(config, device)

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "vae": config.__dict__,
            "official_fp32_h200": {f"{k[0]} {k[1]}": v for k, v in OFFICIAL_FP32.items()}}
    rows = []
    references = {}  # float32 untiled outputs of the main variant, per (size, op)
    for variant in variants:
        torch.backends.cudnn.benchmark = variant.cudnn_benchmark
        vae = load_vae(sd, device=device, dtype=variant.dtype, channels_last=variant.channels_last)
        for size in sizes if variant.main else sizes[:1]:
            for op in ("decode", "encode"):
                reference = references.get((size.label, op))
                tile, forced = _tile_for(config, op, size, variant.dtype, vae.overlap)
                untiled = None
                for tiled in (False, True) if variant.main else (False,):
                    try:
                        row, out = run_case(vae, op, size, tile if tiled else False, device, warm_frames)
                    except torch.cuda.OutOfMemoryError as e:
                        print(f"{op} {size.label} {variant.labels()}: out of memory ({e})", flush=True)
                        continue
                    row.update(variant.labels(), tiles="1", tile=None)
                    if tiled:
                        plan = vae.plan(op, size.frames, size.height, size.width, tile=tile)
                        budget = size.budget or _tiny_budget(config, op, size, variant.dtype, vae.overlap)
                        row.update(tile=list(plan.tile), budget_gib=budget / GIB,
                                   tiles=f"{len(plan.spans_y)}x{len(plan.spans_x)}" + (" forced" if forced else ""))
                        if untiled is not None:
                            row["vs_untiled"] = compare(out, untiled)
                    if reference is not None:
                        row["vs_fp32_untiled"] = compare(out, reference)
                    elif not tiled and variant.main and variant.dtype == torch.float32:
                        references[(size.label, op)] = reference = out
                    rows.append(row)
                    print(_line(row), flush=True)
                    if not tiled:
                        untiled = out
                    del out
                del untiled
        del vae
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:  # ratios measured in this run
        base = next((b for b in rows if (b["op"], b["size"], b["dtype"], b["tiles"]) == (r["op"], r["size"], r["dtype"], "1")
                     and b["layout"] == "channels_last" and b["cudnn_benchmark"]), None)
        r["time_vs_untiled"] = r["seconds"] / base["seconds"] if base else None
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(table(rows, device))
    print(f"wrote {args.out}")


def _tiny_budget(config, op, size, dtype, overlap) -> int:
    """Room for 60% of the untiled cache and activations."""
    full = memory_estimate(config, op, size.frames, size.height, size.width, dtype=dtype, overlap=overlap,
                           input_on_device=op == "encode")
    return int(full.total - 0.4 * (full.cache + full.activations))


def _tile_for(config: VAEConfig, op: str, size: Size, dtype, overlap: int):
    """The tiles the budget picks; the float32 choice when the whole frame fits."""
    budget = size.budget or _tiny_budget(config, op, size, dtype, overlap)
    tile = choose_tile(config, op, size.frames, size.height, size.width, budget=budget, dtype=dtype,
                       overlap=overlap, input_on_device=op == "encode")
    if tile is not None:
        return tile, False
    budget32 = size.budget or _tiny_budget(config, op, size, torch.float32, overlap)
    tile = choose_tile(config, op, size.frames, size.height, size.width, budget=budget32, overlap=overlap,
                       input_on_device=op == "encode")
    if tile is None:  # fits even in float32: two tiles across the width
        _, sh, sw = config.stride
        tile = (size.height // sh, (size.width // sw + overlap) // 2 + 1)
    return tile, True


def _line(r: dict) -> str:
    mem = f"{r['peak_allocated_gib']:.2f}" if "peak_allocated_gib" in r else "-"
    return (f"{r['op']} {r['size']} {r['dtype']} {r['layout']} autotune {r['cudnn_benchmark']} tiles {r['tiles']}: "
            f"{r['seconds']:.3f} s, "
            f"{r['tflops']:.1f} TFLOP/s, peak {mem} GiB (estimate {r['estimate_gib']:.2f})")


def table(rows: list[dict], device) -> str:
    cols = ["op", "size", "dtype", "layout", "autotune", "tiles", "seconds", "x untiled", "TFLOP/s", "alloc GiB", "reserved GiB",
            "driver GiB", "estimate GiB", "vs untiled", "vs fp32"]
    lines = [cols]
    for r in rows:
        def gib(key):
            return f"{r[key]:.2f}" if key in r else "-"
        rel = r.get("vs_untiled", {}).get("rel_l2")
        rel32 = r.get("vs_fp32_untiled", {}).get("rel_l2")
        lines.append([r["op"], r["size"], r["dtype"], "cl" if r["layout"] == "channels_last" else "ncdhw",
                      "on" if r["cudnn_benchmark"] else "off", r["tiles"],
                      f"{r['seconds']:.3f}", f"{r['time_vs_untiled']:.2f}" if r["time_vs_untiled"] else "-",
                      f"{r['tflops']:.1f}", gib("peak_allocated_gib"), gib("peak_reserved_gib"),
                      gib("driver_after_gib"), f"{r['estimate_gib']:.2f}",
                      f"{rel:.4f}" if rel is not None else "-", f"{rel32:.4f}" if rel32 is not None else "-"])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(cols))]
    out = ["  ".join(str(v).rjust(w) for v, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    if device.type == "cuda":
        out.append("official fp32 (H200): " + ", ".join(f"{k[0]} {k[1]} {v[0]} s / {v[1]} GiB"
                                                        for k, v in OFFICIAL_FP32.items()))
    return "\n".join(out)


if __name__ == "__main__":
    main()

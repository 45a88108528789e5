"""Benchmark a whole generation the way `python -m runtime.generate` runs it, on a
full-size synthetic Wan 2.2 I2V-A14B under a VRAM budget (default 8 GiB).

    python bench/e2e.py --out bench-e2e.json [--dir /tmp/wanrt-e2e] [--vram 8] [--frames 17] [--steps 4]
    python bench/e2e.py --tiny                 # the same runs on a tiny model (CPU is fine)

Builds what it needs, reused when present: two q8_0 GGUF experts with random valid
weights (bench/stream.py's writer: dim 5120, 40 blocks, 15.4 GB each), a full-size Wan 2.1
VAE with random weights (bench/vae.py's initialisation), and random text contexts in
place of the umt5 encoder (11 GB that would only turn a prompt into numbers: with random
weights the video is noise anyway, so the text stage is skipped and says so).

Each run is `load_pipeline(..., vram=, ram=)` + `generate(...)` + saving the video as
.webp (no ffmpeg binary needed), through the same calls as the CLI, at 832x480, with the
LightX2V 4-step schedule (Euler, shift 5, two steps per expert): with CFG (guide 3.5,
batch 2), the same again with the experts still attached, and without CFG. On CUDA the
allocator is capped at the budget (torch.cuda.set_per_process_memory_fraction) so that a
plan that is wrong fails instead of borrowing the H200's memory.

Reported per run: wall time per step, the phases (plan, text, VAE encode, expert load,
denoise per expert, expert swap, VAE decode, save), peak VRAM from the allocator
(allocated, reserved) and the driver (sampled), the plan's predicted peak, peak host RSS
and page-locked bytes. Lines print as runs finish; the table comes last; --out writes JSON.
"""
from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI does

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runtime.generate import summary_lines  # noqa: E402
from runtime.pipeline import load_pipeline  # noqa: E402
from runtime.stream import BlockWeights, DeviceInfo, Request, plan_dit  # noqa: E402
from runtime.stream.budget import DEFAULT_DEVICE_OVERHEAD, GiB  # noqa: E402
from runtime.vae21 import WAN21_FULL  # noqa: E402


def _bench_module(name: str):
    """Another bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


stream_bench = _bench_module("stream")  # write_expert, A14B, TINY
vae_bench = _bench_module("vae")  # random_state_dict, tiny_config

SIZE = (832, 480)
TINY_SIZE = (96, 64)
TINY_FRAMES = 9
CONTEXT_TOKENS = (120, 40)  # positive, negative: typical umt5 prompt lengths
NOTE = ("random weights; random text contexts stand in for the umt5 encoder (the video is noise either way), "
        "so the text stage is not run")


# -- inputs -------------------------------------------------------------------------------


def write_vae(path: Path, tiny: bool) -> Path:
    """A Wan 2.1 VAE with random weights (full size: 127 M parameters, float32), reused if present."""
    if path.exists():
        return path
    from safetensors.torch import save_file

    config = vae_bench.tiny_config("2.1") if tiny else WAN21_FULL
    sd = {k: v.contiguous() for k, v in vae_bench.random_state_dict(config, torch.device("cpu")).items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)
    return path


def contexts(text_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    pos, neg = (0.1 * torch.randn(n, text_dim, generator=g) for n in CONTEXT_TOKENS)
    return pos.to(torch.bfloat16), neg.to(torch.bfloat16)


def input_image(width: int, height: int) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 17 + yy / 23)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def tiny_vram(cfg, high: Path, frames: int, device: torch.device) -> int:
    """A budget that leaves room for half the tiny expert's blocks (so that the rest streams)."""
    weights = BlockWeights.from_gguf(high)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the pipeline's default
    request = Request(*TINY_SIZE, frames, batch=2, dtype=dtype)  # with CFG: the larger plan
    full = plan_dit(cfg, request, weights=weights, vram=f"{1 << 40}B", ram=f"{1 << 40}B",
                    device=DeviceInfo("sizing", 1 << 41, 1 << 41, 0, 0, 0, "none"))
    overhead = DeviceInfo.probe().overhead if device.type == "cuda" else DEFAULT_DEVICE_OVERHEAD
    return full.device.allocator_peak + overhead - sum(weights.block_bytes) // 2


# -- one run ---------------------------------------------------------------------------------


def run_one(name: str, pipe, image, args, pos, neg, width: int, height: int, guide: float) -> dict:
    out = Path(args.dir) / f"e2e-{name}.webp"
    t0 = time.perf_counter()
    result = pipe.generate(image, context=pos, negative_context=neg, width=width, height=height,
                           frames=args.frames, steps=args.steps, preset="lightx2v-4step", guide_scale=guide, seed=1,
                           progress=not args.quiet)
    t_save = time.perf_counter()
    saved = result.save(out, overwrite=True)
    save_seconds = time.perf_counter() - t_save
    wall = time.perf_counter() - t0
    for line in summary_lines(result, saved):
        print(f"  {line}", flush=True)
    t = dict(result.timings, save=save_seconds)
    plans = getattr(pipe.experts, "plans", {}) or {}
    return {
        "guide_scale": guide, "cfg": guide != 1.0, "steps": len(result.step_times), "frames": args.frames,
        "size": f"{width}x{height}", "seconds_per_step": result.step_times, "timings": t, "wall_seconds": wall,
        "mean_step_seconds": sum(result.step_times) / len(result.step_times),
        "memory": result.memory, "video": str(out), "experts_per_step": result.settings["experts_per_step"],
        "plans": {n: {"resident": len(p.resident), "streamed": len(p.streamed), "ring_slots": p.ring_slots,
                      "slot_bytes": p.slot_bytes, "ffn_chunk": p.ffn_chunk, "head_chunk": p.head_chunk,
                      "staged": sum(1 for i in p.streamed if p.host[i] == "staged"),
                      "predicted_driver_peak": p.device.driver_peak,
                      "predicted_allocator_peak": p.device.allocator_peak} for n, p in plans.items()},
    }


# -- report ------------------------------------------------------------------------------------


def g(n) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def table(runs: list[dict]) -> str:
    head = ("run", "s/step", "plan", "load", "encode", "high", "low", "swap", "decode", "save", "total",
            "alloc", "reserved", "driver", "pred", "RSS", "pinned", "res/str")
    rows = [head]
    for r in runs:
        if "error" in r or "refused" in r:
            rows.append((r["name"], "refused" if "refused" in r else "error") + ("",) * (len(head) - 2))
            continue
        t, m = r["timings"], r["memory"]
        s = lambda k: f"{t[k]:.1f}" if k in t else "-"  # noqa: E731
        p = r["plans"].get("high") or next(iter(r["plans"].values()), None)
        rows.append((
            r["name"], f"{r['mean_step_seconds']:.2f}", s("plan"), s("load_experts"), s("vae_encode"),
            s("denoise_high"), s("denoise_low"), s("swap"), s("vae_decode"), s("save"), f"{t['total'] + t['save']:.1f}",
            g(m.get("cuda_peak_allocated")), g(m.get("cuda_peak_reserved")), g(m.get("cuda_peak_driver")),
            g(p and p["predicted_driver_peak"]), g(m["host_peak_rss"]), g(m["host_pinned_peak"]),
            f"{p['resident']}/{p['streamed']}" if p else "-",
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "wanrt-e2e"),
                    help="folder for the synthetic experts and VAE (about 31 GB; reused) and the videos")
    ap.add_argument("--vram", default="8", help="VRAM budget, GiB or 'auto' (default 8)")
    ap.add_argument("--ram", default="auto", help="RAM budget (default auto)")
    ap.add_argument("--frames", type=int, default=17, help="frames, 4n+1 (default 17)")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps (default 4: two per expert)")
    ap.add_argument("--no-cap", action="store_true", help="do not cap the CUDA allocator at the budget")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and size: checks the whole bench in seconds")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is there (with --tiny)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.tiny and args.frames == 17:
        args.frames = TINY_FRAMES
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda and not args.tiny:
        ap.error("the full-size bench needs a CUDA device; use --tiny to check it on the CPU")

    cfg = stream_bench.TINY if args.tiny else stream_bench.A14B
    tag = "tiny" if args.tiny else "a14b"
    experts = {}
    for seed, role in enumerate(("high", "low")):
        experts[role] = stream_bench.write_expert(folder / f"e2e-{tag}-{role}-noise-Q8_0.gguf", cfg, "q8_0", seed=seed)
    vae = write_vae(folder / f"e2e-{tag}-wan21-vae-random.safetensors", args.tiny)
    width, height = TINY_SIZE if args.tiny else SIZE
    vram = args.vram
    if args.tiny and vram == "8":
        vram = f"{tiny_vram(cfg, experts['high'], args.frames, device)}B"
    if cuda and not args.no_cap and vram != "auto":
        from runtime.stream import parse_memory

        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, parse_memory(vram) / total), device)
    info = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
        "vram": vram, "ram": args.ram, "allocator_capped": cuda and not args.no_cap and vram != "auto",
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "model": "tiny" if args.tiny else "I2V-A14B",
        "experts": {k: str(v) for k, v in experts.items()}, "vae": str(vae), "note": NOTE,
    }
    print(f"device {info['device']}, torch {info['torch']}, --vram {vram}, --ram {args.ram}; {NOTE}", flush=True)

    pos, neg = contexts(cfg.text_dim)
    image = input_image(width, height)
    say = lambda message: print(f"  {message}", file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    pipe = load_pipeline(high_noise=experts["high"], low_noise=experts["low"], vae=vae, device=device,
                         vram=vram, ram=args.ram, prompt_cache=False, log=say)
    pipe.streaming = True  # on the CPU too (--tiny): the engine runs with synchronous copies
    info["load_pipeline_seconds"] = time.perf_counter() - t0
    runs = []
    for name, guide in (("cfg", 3.5), ("cfg-attached", 3.5), ("no-cfg", 1.0)):
        print(f"[{name}] guide scale {guide:g}, {width}x{height}x{args.frames}, {args.steps} steps", flush=True)
        try:
            r = run_one(name, pipe, image, args, pos, neg, width, height, guide)
        except ValueError as e:  # a request the planner refuses is reported, not a crash
            r = {"refused": str(e)}
        except Exception as e:  # noqa: BLE001 - one broken run must not lose the others
            r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        r["name"] = name
        runs.append(r)
        if "mean_step_seconds" in r:
            print(f"[{name}] {r['mean_step_seconds']:.2f} s/step, total {r['wall_seconds']:.1f} s", flush=True)
        else:
            print(f"[{name}] {r.get('refused') or r.get('error')}", flush=True)
    pipe.close()
    print()
    print(f"times in s, memory in GiB; {NOTE}")
    print(table(runs))
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, "runs": runs}, indent=1, default=str))
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

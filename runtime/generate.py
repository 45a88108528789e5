"""`python -m runtime.generate`: make a video from an image and a prompt with Wan 2.2 I2V-A14B.

    python -m runtime.generate --demo -o demo.mp4          # tiny random model, seconds on a CPU
    python -m runtime.generate --model Wan2.2-I2V-A14B -i cat.png -p "a cat turns its head" -o cat.mp4
    python -m runtime.generate --high-noise high.gguf --low-noise low.gguf --text-encoder umt5.gguf \\
        --vae wan_2.1_vae.safetensors -i cat.png -p "..." --preset lightx2v-4step --vram 8

Environment variables that Wan I2V scripts commonly read give defaults for flags not on
the command line: INPUT_IMAGE, POSITIVE_PROMPT, NEGATIVE_PROMPT, WIDTH, HEIGHT, LENGTH, SEED.

On a GPU the experts and the text encoder stream through the engine to fit --vram and
--ram; the plan is printed before the work starts.

Everything that can be refused (arguments, the image, the size, the output path, missing
or mismatched model files, a video that cannot fit the budgets) is refused before any
model is loaded. A run that fails or is interrupted leaves nothing under the output name.
Errors are one line and exit code 2; --debug shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import tempfile
import time
import warnings

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130

ENV_DEFAULTS = {  # environment variable -> argument it gives a default for
    "INPUT_IMAGE": "image",
    "POSITIVE_PROMPT": "prompt",
    "NEGATIVE_PROMPT": "negative_prompt",
    "WIDTH": "width",
    "HEIGHT": "height",
    "LENGTH": "frames",
    "SEED": "seed",
}
INT_ARGS = ("width", "height", "frames", "seed")
DEFAULT_FRAMES = 81


class UsageError(ValueError):
    """A command-line mistake."""


def build_parser() -> argparse.ArgumentParser:
    from .samplers import PRESETS, SAMPLERS

    p = argparse.ArgumentParser(
        prog="python -m runtime.generate",
        description="Image-to-video with Wan 2.2 I2V-A14B (quantized experts, low VRAM).",
        epilog="Environment defaults: " + ", ".join(f"{k} (--{v.replace('_', '-')})" for k, v in ENV_DEFAULTS.items())
        + ". Example: python -m runtime.generate --demo -o demo.mp4",
    )
    io = p.add_argument_group("input and output")
    io.add_argument("-i", "--image", help="input image (first frame)")
    io.add_argument("-p", "--prompt", help="what should happen in the video")
    io.add_argument("-n", "--negative-prompt", help="what to avoid (default: the official Wan negative prompt)")
    io.add_argument("--last-image", help="last frame too (first-last-frame to video)")
    io.add_argument("-o", "--output", help="output file: .mp4, .webp, .gif, or a folder/ for PNG frames "
                                           "(default: wan_<date>-<time>.mp4); settings go to <name>.json")
    io.add_argument("--overwrite", action="store_true", help="replace an existing output")
    io.add_argument("--fps", type=float, default=None, help="frames per second of the file (default 16)")

    size = p.add_argument_group("size")
    size.add_argument("-W", "--width", type=int, help="video width (rounded to a multiple of 16)")
    size.add_argument("-H", "--height", type=int, help="video height (rounded to a multiple of 16)")
    size.add_argument("--max-area", help="pixel budget for the official size rule, e.g. 1280*720 (default) or "
                                         "832*480; the aspect ratio follows the image")
    size.add_argument("--crop", action="store_true", help="crop the image to the video's aspect instead of stretching")
    size.add_argument("-l", "--frames", type=int, help=f"number of frames, 4n+1 (default {DEFAULT_FRAMES})")

    s = p.add_argument_group("sampling")
    s.add_argument("--preset", choices=sorted(PRESETS), help="sampling recipe (default: 'default', the official "
                   "40-step one); flags given explicitly override its values")
    s.add_argument("--steps", type=int, help="denoising steps (default 40)")
    s.add_argument("--cfg", type=float, nargs="+", metavar="G",
                   help="guide scale: one value for both experts, or two: LOW HIGH (low-noise expert first, "
                        "the official order); 1 turns guidance off (default 3.5 3.5)")
    s.add_argument("--shift", type=float, help="flow shift (default 5.0)")
    s.add_argument("--sampler", choices=sorted(SAMPLERS), help="solver (default unipc)")
    s.add_argument("--boundary", type=float, help="switch to the low-noise expert below t = boundary*1000 "
                                                  "(default 0.9)")
    s.add_argument("--seed", type=int, help="random seed (default: random, -1 too); the same seed gives the same "
                                            "video on any device")

    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="DIR", help="model folder: official Wan2.2-I2V-A14B, ComfyUI models/, "
                                                 "or a folder with a pair of GGUF experts")
    m.add_argument("--high-noise", metavar="PATH", help="high-noise expert (file or folder)")
    m.add_argument("--low-noise", metavar="PATH", help="low-noise expert (file or folder)")
    m.add_argument("--text-encoder", metavar="PATH", help="umt5-xxl encoder (.pth, .safetensors or .gguf)")
    m.add_argument("--tokenizer", metavar="PATH", help="google/umt5-xxl tokenizer folder")
    m.add_argument("--vae", metavar="PATH", help="Wan 2.1 VAE (.pth or .safetensors)")
    m.add_argument("--demo", action="store_true", help="use a tiny random model and a built-in image (no download)")
    m.add_argument("--lora", action="append", metavar="[EXPERT=]PATH[:STRENGTH]",
                   help="apply a LoRA: high=PATH:1.0 or low=PATH:1.0 for one expert, both=PATH or PATH:STRENGTH "
                        "for both (strength default 1); several allowed, e.g. the lightx2v 4-step pair with "
                        "--preset lightx2v-4step")

    r = p.add_argument_group("runtime")
    r.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    r.add_argument("--dtype", choices=("bf16", "fp32"), help="compute dtype (default: bf16 on cuda, fp32 on cpu)")
    r.add_argument("--text-device", help="where the text encoder runs (default: the device when it fits, else cpu)")
    r.add_argument("--vram", default="auto",
                   help="GPU memory budget as the driver counts it (nvidia-smi), CUDA context included: 'auto' "
                        "(what is free) or GiB (8, 7.5, 6144MiB); the experts and the text encoder stream to fit "
                        "it, and a video that cannot fit is refused before anything loads (default auto)")
    r.add_argument("--ram", default="auto",
                   help="host memory budget: 'auto' (what is available, less 3 GiB) or GiB; blocks that do not "
                        "fit are read from the file as they are needed (default auto)")
    r.add_argument("--lora-mode", choices=("auto", "merge", "side"), default="auto",
                   help="how LoRAs run: merged into each decoded weight, beside the matmul, or per layer "
                        "whichever is cheaper (default auto)")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


# ---- arguments ---------------------------------------------------------------------


def apply_environment(args: argparse.Namespace, environ=os.environ) -> list[str]:
    """Fill arguments not given on the command line from the environment; empty variables
    count as unset. Returns notes on what was taken."""
    notes = []
    for var, dest in ENV_DEFAULTS.items():
        raw = environ.get(var)
        if raw is None or raw.strip() == "" or getattr(args, dest) is not None:
            continue
        value = raw
        if dest in INT_ARGS:
            try:
                value = int(raw.strip())
            except ValueError:
                raise UsageError(f"{var}={raw!r} (environment): expected a whole number for --{dest}") from None
        setattr(args, dest, value)
        notes.append(f"--{dest.replace('_', '-')} from {var}")
    return notes


def parse_max_area(text: str | None) -> int | None:
    """'1280*720', '1280x720' or '921600' -> pixels."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[*xX]\s*(\d+))?\s*", text)
    if not m:
        raise UsageError(f"--max-area {text!r}: expected W*H like 1280*720, or a number of pixels")
    area = int(m.group(1)) * (int(m.group(2)) if m.group(2) else 1)
    if area <= 0:
        raise UsageError(f"--max-area {text!r} must be positive")
    return area


def check_arguments(args: argparse.Namespace) -> None:
    from .stream.budget import parse_memory

    if args.cfg is not None and len(args.cfg) > 2:
        raise UsageError(f"--cfg takes one value or two (LOW HIGH), got {len(args.cfg)}")
    if args.fps is not None and not (math.isfinite(args.fps) and 0 < args.fps <= 1000):
        raise UsageError(f"--fps must be in (0, 1000], got {args.fps:g}")
    if (args.width is not None or args.height is not None) and args.max_area is not None:
        raise UsageError("give either --max-area or --width/--height, not both")
    for flag in ("vram", "ram"):
        parse_memory(getattr(args, flag), f"--{flag}")
    model_flags = [f for f in ("high_noise", "low_noise", "text_encoder", "tokenizer", "vae") if getattr(args, f)]
    if args.demo and (args.model or model_flags):
        raise UsageError("--demo brings its own tiny model; drop --model and the model file flags")
    if not args.demo and not (args.model or model_flags):
        raise UsageError("no model given: pass --model DIR (or --high-noise/--low-noise/--text-encoder/--vae), "
                         "or try --demo")
    if not args.demo:
        if args.image is None:
            raise UsageError("no input image: pass -i/--image PATH (or set INPUT_IMAGE)")
        if args.prompt is None:
            raise UsageError("no prompt: pass -p/--prompt TEXT (or set POSITIVE_PROMPT)")


def default_output(now: float | None = None) -> str:
    return time.strftime("wan_%Y%m%d-%H%M%S.mp4", time.localtime(now))


def _guide_scale(cfg: list[float] | None):
    if cfg is None:
        return None
    return cfg[0] if len(cfg) == 1 else (cfg[0], cfg[1])


# ---- reporting ---------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def summary_lines(result, saved) -> list[str]:
    t = result.timings
    phases = [("prepare", "prepare"), ("plan", "plan"), ("text", "text"), ("vae_encode", "VAE encode"),
              ("load_experts", "load experts"), ("denoise", "denoise"), ("swap", "expert swap"),
              ("vae_decode", "VAE decode")]
    parts = []
    for key, label in phases:
        if key not in t:
            continue
        part = f"{label} {t[key]:.1f} s"
        if key == "denoise" and result.step_times:
            per = [f"{sum(result.step_times) / len(result.step_times):.2f} s/step"]
            per += [f"{e} {t[f'denoise_{e}']:.1f} s" for e in ("high", "low") if f"denoise_{e}" in t]
            part += f" ({', '.join(per)})"
        parts.append(part)
    mem = result.memory
    memory = [f"host peak RSS {_gib(mem['host_peak_rss'])}"] if mem.get("host_peak_rss") else []
    if mem.get("host_pinned_peak"):
        memory.append(f"pinned {_gib(mem['host_pinned_peak'])}")
    if "cuda_peak_allocated" in mem:
        memory.append(f"GPU peak {_gib(mem['cuda_peak_allocated'])} allocated, "
                      f"{_gib(mem['cuda_peak_reserved'])} reserved, {_gib(mem['cuda_peak_driver'])} in the driver "
                      "(sampled)")
    lines = [f"wrote {saved.path} ({saved.frames} frames, {saved.width}x{saved.height}, {saved.fps:g} fps)"
             + (f" and {saved.sidecar}" if saved.sidecar else ""),
             f"seed {result.seed}",
             "time: " + " | ".join(parts) + f" | total {t['total']:.1f} s"]
    if memory:
        lines.append("memory: " + " | ".join(memory))
    return lines + list(saved.notes)


# ---- running -----------------------------------------------------------------------


def _say(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _say(f"warning: {message}")


def run(args: argparse.Namespace) -> int:
    from .pipeline import load_pipeline, use_expandable_segments
    from .video_io import DEFAULT_FPS, check_output_path

    use_expandable_segments()  # before anything touches CUDA: fragmentation against the planner's margin

    env_notes = [] if args.demo else apply_environment(args)
    check_arguments(args)
    output = args.output or default_output()
    check_output_path(output, overwrite=args.overwrite)
    for note in env_notes:
        _say(note)

    with contextlib.ExitStack() as stack:
        options = dict(image=args.image, prompt=args.prompt, negative_prompt=args.negative_prompt)
        model = args.model
        if args.demo:
            from . import demo

            model = demo.write_demo_model(stack.enter_context(tempfile.TemporaryDirectory(prefix="wanrt-demo-")))
            _say("demo: a tiny model with random weights (the video shows noise, not the picture): "
                 "it checks that everything works together")
            if args.image is None:
                options["image"] = demo.demo_image()
            if args.prompt is None:
                options["prompt"] = demo.DEMO_PROMPT
            if args.frames is None:
                args.frames = demo.DEMO_FRAMES
            if args.steps is None and args.preset is None:
                args.steps = demo.DEMO_STEPS
            if args.width is None and args.height is None and args.max_area is None:
                args.width, args.height = demo.DEMO_SIZE
        pipe = load_pipeline(model, high_noise=args.high_noise, low_noise=args.low_noise,
                             text_encoder=args.text_encoder, tokenizer=args.tokenizer, vae=args.vae,
                             device=args.device, dtype=args.dtype, vram=args.vram, ram=args.ram,
                             prompt_cache=not args.demo, text_device=args.text_device, log=_say,
                             loras=args.lora, lora_mode=args.lora_mode)
        stack.callback(pipe.close)
        result = pipe.generate(
            options["image"], options["prompt"], options["negative_prompt"],
            width=args.width, height=args.height, max_area=parse_max_area(args.max_area),
            frames=DEFAULT_FRAMES if args.frames is None else args.frames,
            steps=args.steps, guide_scale=_guide_scale(args.cfg), shift=args.shift, sampler=args.sampler,
            seed=args.seed, boundary=args.boundary, last_image=args.last_image, preset=args.preset,
            crop=args.crop, progress=True)
        saved = result.save(output, args.fps or DEFAULT_FPS, overwrite=args.overwrite)
    for line in summary_lines(result, saved):
        print(line)
    return 0


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the input was wrong (a message, not a traceback)."""
    import torch

    return (ValueError, OSError, ImportError, MemoryError, torch.OutOfMemoryError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.debug:
        return run(args)
    shown, warnings.showwarning = warnings.showwarning, _one_line_warning
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; no video was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the CLI's edge: one line instead of a traceback
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            print(f"error: out of GPU memory ({str(e).splitlines()[0]}); lower the size or --frames, "
                  "or give a smaller --vram budget", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, user_error_types()):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"error: unexpected {type(e).__name__}: {e} (run again with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())

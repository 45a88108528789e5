"""Image-to-video with Wan 2.2 I2V-A14B: `load_pipeline(...)` then `pipe.generate(...)`.

One generation, as the official `WanI2V.generate` (wan/image2video.py) does it:

    1. image ─prepare─► [3, h, w] in [-1, 1]             (size rule, bicubic, no clamp)
    2. prompt, negative ─umt5─► contexts                  (cached; encoder freed after)
    3. [image, 0, ..., 0] ─VAE encode─► y = mask ⊕ latent  [20, F_lat, lat_h, lat_w]
    4. noise = randn(16, F_lat, lat_h, lat_w) from a CPU generator seeded with `seed`
    5. for each step t: expert = high-noise if t >= boundary·1000 else low-noise
          v = uncond + g·(cond − uncond)   (one batch-2 forward; one forward when g = 1)
          x = sampler.step(v, k, x)
    6. x ─VAE decode─► video [3, F, h, w] in [-1, 1]

Where wanrt departs from the official code, on purpose: the noise comes from a CPU
generator on every device (the official draws it on the GPU, so its videos depend on
the device); both CFG passes run as one batch of two (a streamed block is fetched once
per step, not twice); CFG is skipped when the guide scale is 1; FLF2V (a last frame) is
supported as Wan 2.1 does it.

Components load lazily and only when needed: no text encoder when contexts are given or
cached, the VAE for encoding and again for decoding, the experts on the first generation.
The experts sit behind one seam, `pipe.experts`: an object whose `activate("high" |
"low")` returns the model for the current step.

On CUDA every large module goes through the streaming engine (runtime/stream), planned
to the `vram` / `ram` budgets for the request: the experts' plans are made from their
files' headers as soon as the size and frame count are known, so a request that cannot
fit is refused with the planner's message before the text encoder, the VAE or an expert
loads; the umt5 encoder streams when it does not fit and is closed before the experts
come; the VAE tiles to the same budget; the experts (`StreamedExperts`) stream, switch
once at the boundary, give the device back for the VAE decode, and stay attached for the
next video of the same shape. On the CPU nothing streams: `open_experts` loads both
experts (`ResidentExperts`) and the budgets are not used.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .conditioning import image_condition, latent_frames
from .image_prep import (PreparedImage, SizeError, VideoSize, center_crop_to_aspect, load_image, prepare_image,
                         resize_bicubic, round_frames, to_model_range)
from .lora import apply_loras, check_loras, lora_state
from .qlinear import LORA_MODES
from .model_folder import HIGH, LOW, ModelFiles, resolve_model_files
from .prompts import DEFAULT_NEGATIVE_PROMPT
from .samplers import HIGH_NOISE, LOW_NOISE, expert_for_timestep, get_preset, guide_scale_for, make_sampler
from .samplers.presets import SamplingPreset
from .stream.budget import AUTO, parse_memory, peak_rss_bytes, pinned_bytes, reset_peak_rss, rss_bytes
from .video_io import DEFAULT_FPS, SavedVideo, save_video, to_uint8_frames

TEXT_DTYPE = torch.bfloat16  # the official t5_dtype
VAE_DTYPE = torch.float32  # the official VAE runs in float32
LATENT_CHANNELS = 16  # Wan 2.1 VAE
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes any 64-bit value
EXPERT_NAMES = {HIGH_NOISE: "high", LOW_NOISE: "low"}  # sampler's expert -> experts.activate name


class GenerationError(RuntimeError):
    """The run itself went wrong (e.g. the latent stopped being finite)."""


# ---- settings ----------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingSettings:
    sampler: str
    steps: int
    shift: float
    guide_scale: tuple[float, float]  # (low-noise expert, high-noise expert), official order
    boundary: float
    preset: str

    @property
    def uses_cfg(self) -> bool:
        return any(g != 1.0 for g in self.guide_scale)


def _guide_pair(value) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        pair = (float(value), float(value))
    else:
        try:
            pair = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            pair = ()
        if len(pair) != 2:
            raise ValueError(f"guide_scale must be a number or a pair (low-noise, high-noise), got {value!r}")
    if not all(math.isfinite(g) and g >= 0 for g in pair):
        raise ValueError(f"guide scales must be finite and >= 0, got {value!r} (1 turns guidance off)")
    return pair


def resolve_sampling(preset: str | None = None, *, steps=None, shift=None, sampler=None, guide_scale=None,
                     boundary=None) -> tuple[SamplingSettings, list[str]]:
    """The preset's values (default: the official 40-step UniPC recipe) with every value
    the caller gave taking precedence; notes say which preset values were overridden."""
    base: SamplingPreset = get_preset(preset or "default")
    given = {"steps": steps, "shift": shift, "sampler": sampler, "guide_scale": guide_scale, "boundary": boundary}
    notes = []
    values = {}
    for key, value in given.items():
        preset_value = getattr(base, key)
        if value is None:
            values[key] = preset_value
            continue
        values[key] = value
        shown = _guide_pair(value) if key == "guide_scale" else value
        if preset is not None and shown != preset_value:
            notes.append(f"{key} {_fmt(shown)} overrides the {base.name} preset's {_fmt(preset_value)}")
    steps = values["steps"]
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive whole number, got {steps!r}")
    shift = float(values["shift"])
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a positive number, got {values['shift']!r} (Wan 2.2 I2V uses 5.0)")
    boundary = float(values["boundary"])
    if not 0 <= boundary <= 1:
        raise ValueError(f"boundary must lie in [0, 1], got {values['boundary']!r} (Wan 2.2 I2V uses 0.9)")
    make_sampler(values["sampler"], 1, shift)  # refuses unknown names with the list of known ones
    return SamplingSettings(str(values["sampler"]).lower(), int(steps), shift, _guide_pair(values["guide_scale"]),
                            boundary, base.name), notes


def _fmt(value) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


def resolve_device(device=None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use cuda, cuda:1 or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available here (no GPU, or a torch build without CUDA); "
                             "use device cpu, or install the CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device type {device.type!r} is not supported; use cuda or cpu")
    return device


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The experts' compute dtype: bfloat16 (the official GPU numerics) on CUDA, float32 on CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use bf16 or fp32")
        return DTYPES[dtype.lower()]
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {dtype} is not supported; use torch.bfloat16 or torch.float32")
    return dtype


def resolve_seed(seed) -> tuple[int, bool]:
    """(seed, drawn): None or -1 draw a random seed, as the official code does for -1."""
    if seed is None or (isinstance(seed, (int, np.integer)) and seed == -1):
        return random.SystemRandom().randrange(2**32), True
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be a whole number in [0, 2**64), or None / -1 for a random one; got {seed!r}")
    return int(seed), False


def initial_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The starting latent: float32 normal noise from a CPU generator (the same on every device)."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float32, generator=g)


def prepare_last_image(source, size: VideoSize) -> tuple[torch.Tensor, list[str]]:
    """The last frame of FLF2V at the video size: centre-cropped to the video's aspect when
    it differs (the official Wan 2.1 code means to do this, but its crop uses the size
    before resizing), then resized like the first frame."""
    unit, notes = load_image(source)
    notes = [f"last image: {n}" for n in notes]
    pixels = to_model_range(unit)
    _, src_h, src_w = pixels.shape
    if abs((src_w / src_h) / (size.width / size.height) - 1) > 0.01:
        pixels = center_crop_to_aspect(pixels, size)
        notes.append(f"last image: cropped the {src_w}x{src_h} image to its centre "
                     f"{pixels.shape[2]}x{pixels.shape[1]} to match {size.width}x{size.height}")
    return resize_bicubic(pixels, size), notes


def _context(value, what: str) -> torch.Tensor:
    """A precomputed text embedding: [L, dim] (or [1, L, dim], or a one-element list)."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a tensor [L, dim] (the text encoder's output), got {type(value).__name__}")
    if value.dim() == 3 and value.shape[0] == 1:
        value = value[0]
    if value.dim() != 2 or value.shape[0] < 1 or not value.is_floating_point():
        raise ValueError(f"{what} must be a float tensor [L, dim] with L >= 1, got {value.dtype} {list(value.shape)}")
    return value


# ---- the experts seam --------------------------------------------------------------


class ResidentExperts:
    """Both experts loaded on the device (the CPU path: nothing streams there).
    `activate(name)` returns the model of that expert ("high" or "low"). The VRAM/RAM
    budgets are kept for the record: planning to a budget is `StreamedExperts`' work."""

    names = ("high", "low")

    def __init__(self, high, low, *, device: torch.device, dtype: torch.dtype, vram=None, ram=None):
        from .dit_loading import check_expert_pair, load_dit

        self.device, self.dtype, self.vram, self.ram = device, dtype, vram, ram
        self.models = {"high": load_dit(high, device=device, dtype=dtype, expect="i2v")}
        self.models["low"] = load_dit(low, device=device, dtype=dtype, expect="i2v")
        check_expert_pair(self.models["high"], self.models["low"])
        self.active: str | None = None

    @property
    def config(self):
        return self.models["high"].config

    def activate(self, name: str):
        if name not in self.models:
            raise KeyError(f"no expert named {name!r}; the experts are {', '.join(self.names)}")
        self.active = name
        return self.models[name]

    def close(self) -> None:
        self.models.clear()
        self.active = None


def open_experts(high, low, *, device: torch.device, dtype: torch.dtype, vram=None, ram=None) -> ResidentExperts:
    """The experts object a pipeline runs with where nothing streams (the CPU)."""
    return ResidentExperts(high, low, device=device, dtype=dtype, vram=vram, ram=ram)


def check_expert_files(high, low, dtype: torch.dtype = torch.float32):
    """Read only the headers of both expert checkpoints and refuse, before anything is
    loaded, T2V/TI2V experts, experts of two different models, or experts given in each
    other's place. Returns the DiT config and the bytes both experts take once loaded
    for compute in `dtype` (float32 linear weights are narrowed for bf16 compute)."""
    from quant.checkpoint import open_checkpoint

    from .dit_loading import DiTLoadError, check_expected, check_expert_pair, inspect_checkpoint

    configs, roles, nbytes = {}, {}, 0
    for role, source in ((HIGH, high), (LOW, low)):
        with open_checkpoint(source) as ckpt:
            configs[role] = inspect_checkpoint(ckpt).config
            check_expected(configs[role], "i2v", ckpt.path)
            roles[role] = ckpt.expert
            for name in ckpt.names():
                info = ckpt.info(name)
                narrowed = dtype != torch.float32 and info.dtype == torch.float32 and len(info.shape) == 2
                nbytes += info.nbytes // 2 if narrowed else info.nbytes
    for role, other in ((HIGH, LOW), (LOW, HIGH)):
        if roles[role] == other:
            src = high if role == HIGH else low
            raise DiTLoadError(
                f"{src}: given as the {role.replace('_', '-')} expert but it is marked {other!r} (by its "
                "metadata or name); swap the high-noise and low-noise experts")
    check_expert_pair(configs[HIGH], configs[LOW])
    return configs[HIGH], nbytes


def uses_streaming(device: torch.device) -> bool:
    """Whether large modules run through the streaming engine on `device`: on CUDA; the
    CPU holds the models whole (host memory is what the engine would stream from)."""
    return device.type == "cuda"


ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def use_expandable_segments() -> None:
    """Ask torch's CUDA allocator for expandable segments, unless the user configured
    the allocator or CUDA is already initialised (then it is too late). Why: a streamed
    DiT step allocates and frees activations of many sizes; with fixed segments the cache
    fragments by more than the planner's margin (8% of the activation peak + 256 MiB)
    and a plan that fits on paper runs out of memory; expandable segments keep it small."""
    if any(v in os.environ for v in ALLOC_CONF_VARS) or torch.cuda.is_initialized():
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


# ---- measuring ---------------------------------------------------------------------


class MemoryMeter:
    """Peak memory of one generation: torch's allocator (exact), the driver (sampled by a
    thread every `interval` seconds and after every step and phase), the host's resident
    set (the kernel's high-water mark when it can be reset, else sampled) and the host
    memory the streaming engine page-locked (sampled). Use as a context manager."""

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device = device
        self.cuda = device.type == "cuda"
        self.interval = interval
        self.driver_peak = 0
        self.rss_peak = 0
        self.pinned_peak = 0
        self.rss_reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "MemoryMeter":
        self.rss_reset = reset_peak_rss()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sample()
        self._thread = threading.Thread(target=self._run, name="wanrt-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        self.rss_peak = max(self.rss_peak, rss_bytes())
        self.pinned_peak = max(self.pinned_peak, pinned_bytes())
        if self.cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            self.driver_peak = max(self.driver_peak, total - free)

    def report(self) -> dict[str, int]:
        """Peak bytes: host_peak_rss, host_pinned_peak and, on CUDA, cuda_peak_allocated /
        cuda_peak_reserved (the allocator) and cuda_peak_driver (all of the GPU's memory
        in use, this process's context included, as nvidia-smi shows it)."""
        self.sample()
        out = {"host_peak_rss": max(self.rss_peak, peak_rss_bytes() if self.rss_reset else 0),
               "host_pinned_peak": self.pinned_peak}
        if self.cuda:
            out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_peak_reserved"] = torch.cuda.max_memory_reserved(self.device)
            out["cuda_peak_driver"] = self.driver_peak
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the result --------------------------------------------------------------------


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    video: torch.Tensor  # float32 [3, F, H, W] in [-1, 1] (CPU)
    latent: torch.Tensor  # float32 [16, F_lat, lat_h, lat_w], the denoised latent (CPU)
    seed: int
    settings: dict[str, Any]  # everything needed to make this video again (JSON-able)
    timings: dict[str, float]  # seconds per phase
    step_times: list[float]  # seconds per denoising step
    memory: dict[str, int]  # peak bytes: host_peak_rss, host_pinned_peak, cuda_peak_allocated/_reserved/_driver
    notes: list[str] = field(default_factory=list)  # what was adjusted, for the user

    def save(self, path, fps: float = DEFAULT_FPS, *, overwrite: bool = False, **kwargs) -> SavedVideo:
        """Write the video (format from the extension) with a JSON sidecar of the settings."""
        return save_video(self.frames, path, fps, settings=self.settings, overwrite=overwrite, **kwargs)


# ---- the pipeline ------------------------------------------------------------------


class Pipeline:
    """Wan 2.2 I2V-A14B. Build it with `load_pipeline`; nothing is loaded until needed.

    `streaming` (True on CUDA) runs the experts and the text encoder through the
    streaming engine; `resident_blocks` ("auto", "max" or a number) is how many expert
    blocks the plans may keep on the GPU ("auto": as many as needed to hide the copies,
    all when they fit)."""

    def __init__(self, files: ModelFiles, *, device: torch.device, dtype: torch.dtype, vram=None, ram=None,
                 prompt_cache=True, text_device: torch.device | None = None,
                 log: Callable[[str], None] | None = None, loras=None, lora_mode: str = "auto"):
        if lora_mode not in LORA_MODES:
            raise ValueError(f"lora_mode {lora_mode!r}: expected one of {', '.join(LORA_MODES)}")
        self.loras = check_loras(loras)  # LoraSpecs, files checked now (headers only)
        self.lora_mode = lora_mode
        self.files = files
        self.device = device
        self.dtype = dtype
        self.vram = AUTO if vram is None else vram
        self.ram = AUTO if ram is None else ram
        self.prompt_cache = prompt_cache
        self.log = log or (lambda message: None)
        self.streaming = uses_streaming(device)
        self.resident_blocks: str | int = "auto"
        self.experts = None  # the seam: any object with activate(name) -> model and close()
        self._experts_key = None  # what the experts this pipeline made are for (None: given from outside)
        self._pending = None  # plans made for the next experts to build
        self._dit_config = None
        self.text_device = text_device

    def __repr__(self) -> str:
        return f"Pipeline({self.files.layout}: {self.files.folder or 'explicit files'}, {self.device}, {self.dtype})"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the experts (the only component kept between generations)."""
        self._close_experts()
        _free(self.device)

    def _close_experts(self) -> None:
        if self.experts is not None:
            close = getattr(self.experts, "close", None)
            if close is not None:
                close()
            self.experts = None
        self._experts_key = None

    def device_info(self):
        """The device as the streaming planner sees it now (measured on CUDA)."""
        from .streamed_experts import device_info

        return device_info(self.device, self.vram)

    # -- 2. text ----------------------------------------------------------------------

    def _tokenizer(self):
        from .tokenizer import load_gguf_tokenizer, load_tokenizer

        path = self.files.tokenizer
        if path.is_file() and path.suffix.lower() == ".gguf":
            return load_gguf_tokenizer(path)
        return load_tokenizer(path)

    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Text embeddings [L, dim] of `prompts`: from the prompt cache when all are there,
        else from the text encoder, loaded for this and freed after (streamed to the GPU
        per its plan when the pipeline streams)."""
        from .t5 import cached_embeddings, load_text_encoder

        self.files.require("text_encoder", "tokenizer")
        tokenizer = self._tokenizer()
        cached = cached_embeddings(self.files.text_encoder, tokenizer, prompts, dtype=TEXT_DTYPE,
                                   cache=self.prompt_cache)
        if cached is not None:
            self.log("text: prompt embeddings from the cache (text encoder not loaded)")
            return [c.to(self.device) for c in cached]
        if self.streaming and self._text_device() == self.device:
            return self._encode_streamed(prompts, tokenizer)

        device = self._text_device()
        self.log(f"text: loading {self.files.text_encoder} on {device}")
        encoder = load_text_encoder(self.files.text_encoder, tokenizer, device=device, dtype=TEXT_DTYPE,
                                    cache=self.prompt_cache)
        try:
            return [c.to(self.device) for c in encoder.encode(prompts)]
        finally:
            del encoder
            _free(self.device)

    def _text_device(self) -> torch.device:
        """Where the text encoder runs: `text_device` if given, else the pipeline's device
        (streamed there when it does not fit, on the CPU when even that cannot be)."""
        return self.device if self.text_device is None else self.text_device

    def _encode_streamed(self, prompts: list[str], tokenizer) -> list[torch.Tensor]:
        """The umt5 encoder loaded on the CPU (a GGUF stays memory-mapped), planned for
        these prompts and streamed to the device; on the CPU when the plan refuses (unless
        the device was asked for explicitly). Closed, device memory given back, on return."""
        from quant.t5_names import official_name

        from .stream import BlockWeights, FileSource, PlanError, attach, plan_t5
        from .streamed_experts import budget_arg, is_gguf
        from .t5 import load_text_encoder

        path = self.files.text_encoder
        self.log(f"text: loading {path}")
        encoder = load_text_encoder(path, tokenizer, device="cpu", dtype=TEXT_DTYPE, cache=self.prompt_cache)
        engine = None
        try:
            source = FileSource.from_gguf(path, rename=official_name) if is_gguf(path) else None
            weights = BlockWeights.of(encoder.model, source, exclude=("token_embedding",))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the encoder warns about long prompts itself
                tokens = max(len(row) for row in tokenizer.ids(prompts))
            try:
                plan = plan_t5(encoder.config, weights=weights, tokens=tokens,
                               batch=min(len(prompts), encoder.max_batch), dtype=TEXT_DTYPE,
                               vram=budget_arg(self.vram), ram=budget_arg(self.ram), device=self.device_info())
            except PlanError as err:
                if self.text_device is not None:
                    raise
                self.log(f"text: {err}; it runs on the CPU instead")
                return [c.to(self.device) for c in encoder.encode(prompts)]
            for line in plan.describe().splitlines():
                self.log(line)
            engine = attach(encoder.model, plan, source=source, device=self.device, exclude=("token_embedding",),
                            progress=False)
            encoder.device = self.device
            return [c.to(self.device) for c in encoder.encode(prompts)]
        finally:
            if engine is not None:
                engine.close()
            del encoder
            _free(self.device)

    # -- 3./6. VAE -----------------------------------------------------------------------

    def _vae(self):
        """The VAE on the device; when the pipeline streams, its automatic tiling plans to
        the room the VRAM budget leaves now (the planner's view: driver memory, CUDA
        context and tensors already allocated included)."""
        from .vae import load_vae

        self.files.require("vae")
        budget = None
        if self.streaming and self.device.type == "cuda":
            budget = max(0, self.device_info().room(self.vram))
        vae = load_vae(self.files.vae, device=self.device, dtype=VAE_DTYPE, vram_budget=budget)
        if vae.config.z_dim != LATENT_CHANNELS:
            raise ValueError(f"{self.files.vae}: a Wan {vae.config.version} VAE with {vae.config.z_dim} latent "
                             "channels; I2V-A14B uses the Wan 2.1 VAE (16 channels, Wan2.1_VAE.pth)")
        return vae

    # -- 5. experts ----------------------------------------------------------------------

    def _check_experts(self):
        """The DiT config, checked from the experts' headers before any loading."""
        if getattr(self.experts, "config", None) is not None:
            return self.experts.config
        if self._dit_config is None:
            self.files.require("high_noise", "low_noise")
            self._dit_config, _ = check_expert_files(self.files.high_noise, self.files.low_noise, self.dtype)
        return self._dit_config

    def _expert_sources(self) -> dict[str, Any]:
        return {"high": self.files.high_noise, "low": self.files.low_noise}

    def plan_experts(self, config, requests: dict, loras=None) -> dict | None:
        """Plans for the experts in `requests` (name -> stream.Request) from their headers,
        logged; raises PlanError (nothing loaded) when the request cannot fit. None when
        nothing streams, or when the attached experts already serve these requests (and
        `loras`, the LoraSpecs they carry; default: the pipeline's)."""
        if not self.streaming or (self.experts is not None and self._experts_key is None):
            return None
        from .streamed_experts import header_weights, plan_experts

        loras = tuple(self.loras if loras is None else loras)
        key = ("streamed", tuple(sorted(requests.items())), self.vram, self.ram, self.resident_blocks, self.dtype,
               loras, self.lora_mode)
        if key == self._experts_key:
            self.log("experts: already attached for this size and frame count")
            return None
        self._close_experts()  # their host memory is not the new plan's to count
        sources = self._expert_sources()
        weights = {n: header_weights(sources[n], self.dtype) for n in requests}
        info = self.device_info()
        plans = plan_experts(config, sources, requests, vram=self.vram, ram=self.ram, info=info, dtype=self.dtype,
                             resident=self.resident_blocks, weights=weights)
        self._pending = dict(key=key, config=config, plans=plans, weights=weights, requests=requests, info=info,
                             loras=loras)
        shown = None
        for name, plan in plans.items():
            text = plan.describe()
            if text == shown:
                self.log(f"{name}-noise expert: the same plan")
                continue
            where = "streamed from" if weights[name].reloadable else "held in host memory, from"
            self.log(f"{name}-noise expert, {where} {sources[name]}")
            for line in text.splitlines():
                self.log(line)
            shown = text
        return plans

    def _experts(self, progress: bool = False):
        """The experts seam: given from outside, attached per the pending plans, or both
        experts loaded whole (where nothing streams)."""
        if self.experts is not None and (self._experts_key is None or self._pending is None):
            return self.experts
        if self._pending is not None:
            from .streamed_experts import StreamedExperts

            p, self._pending = self._pending, None
            self._close_experts()
            self.log(f"experts: loading {', '.join(str(self._expert_sources()[n]) for n in p['plans'])}")
            self.experts = StreamedExperts(
                self._expert_sources(), p["plans"], p["weights"], config=p["config"], requests=p["requests"],
                device=self.device, dtype=self.dtype, vram=self.vram, ram=self.ram, info=p["info"],
                resident=self.resident_blocks, loras=p["loras"], lora_mode=self.lora_mode, log=self.log,
                progress=progress)
            self._experts_key = p["key"]
            return self.experts
        self.log(f"experts: loading {self.files.high_noise} and {self.files.low_noise}")
        self.experts = open_experts(self.files.high_noise, self.files.low_noise, device=self.device,
                                    dtype=self.dtype, vram=self.vram, ram=self.ram)
        self._experts_key = ("resident",)
        return self.experts

    # -- everything ----------------------------------------------------------------------

    def generate(
        self,
        image,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        *,
        width: int | None = None,
        height: int | None = None,
        max_area: int | None = None,
        frames: int = 81,
        steps: int | None = None,
        guide_scale: float | tuple[float, float] | None = None,
        shift: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        boundary: float | None = None,
        last_image=None,
        context: torch.Tensor | None = None,
        negative_context: torch.Tensor | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        preset: str | None = None,
        crop: bool = False,
        progress: bool = False,
        loras=None,
    ) -> GenerationResult:
        """Make a video that starts from `image` (a path, PIL image, array or tensor).

        Size: `width`/`height` (multiples of 16; one of them keeps the image's aspect), or
        the official rule for the pixel budget `max_area` (default 1280*720); `crop` crops
        the image to the video's aspect instead of stretching it. `frames` is rounded to
        4n + 1 (default 81, 5 s at 16 fps).
        Sampling: `preset` ("default": 40 UniPC steps, shift 5, guide (3.5, 3.5), boundary
        0.9; "lightx2v-4step": 4 Euler steps, shift 5, no CFG) gives every value the call
        leaves at None. `guide_scale` is one number or the official pair (low-noise expert,
        high-noise expert); 1 skips the negative pass. `sampler`: unipc, dpm++ or euler.
        `seed` None (or -1) draws one; it is in the result.
        Text: `negative_prompt` None or "" means the official default; `context` /
        `negative_context` are precomputed embeddings [L, 4096] (then no text encoder).
        `last_image`: the last frame too (first-last-frame to video).
        `callback(step, total, latent)` runs after each step (step counts from 1).
        LoRAs: `loras` (LoraSpecs, 'high=PATH:1.0' strings, paths) replaces the pipeline's
        own for this video ([] for none); each expert gets the LoRAs meant for it when it
        first runs, and the base weights are restored exactly when they change.
        """
        with MemoryMeter(self.device) as meter:
            return self._generate(meter, image, prompt, negative_prompt, width=width, height=height,
                                  max_area=max_area, frames=frames, steps=steps, guide_scale=guide_scale, shift=shift,
                                  sampler=sampler, seed=seed, boundary=boundary, last_image=last_image, context=context,
                                  negative_context=negative_context, callback=callback, preset=preset, crop=crop,
                                  progress=progress, loras=loras)

    def _generate(self, meter: MemoryMeter, image, prompt, negative_prompt, *, width, height, max_area, frames, steps,
                  guide_scale, shift, sampler, seed, boundary, last_image, context, negative_context, callback, preset,
                  crop, progress, loras) -> GenerationResult:
        timings: dict[str, float] = {}
        start = time.perf_counter()

        @contextlib.contextmanager
        def phase(name: str):
            t0 = time.perf_counter()
            yield
            _sync(self.device)
            meter.sample()
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0

        # 1. Everything that can be refused is checked before any model is loaded, the
        #    streaming plans of the experts included.
        with phase("prepare"):
            sampling, notes = resolve_sampling(preset, steps=steps, shift=shift, sampler=sampler,
                                               guide_scale=guide_scale, boundary=boundary)
            frames, frame_notes = round_frames(frames)
            notes += frame_notes
            prepared: PreparedImage = prepare_image(image, max_area=max_area, width=width, height=height, crop=crop)
            notes += prepared.notes
            last = None
            if last_image is not None:
                if frames < 5:
                    raise SizeError(f"a last image needs a video of at least 5 frames, got {frames}")
                last, last_notes = prepare_last_image(last_image, prepared.size)
                notes += last_notes
            lora_specs = self.loras if loras is None else check_loras(loras)
            seed, drawn = resolve_seed(seed)
            if drawn:
                notes.append(f"seed {seed} (random)")
            if negative_prompt is None or negative_prompt == "":
                negative_prompt = DEFAULT_NEGATIVE_PROMPT
            if context is None and not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
            pos = None if context is None else _context(context, "context")
            neg = None
            if sampling.uses_cfg and negative_context is not None:
                neg = _context(negative_context, "negative_context")
            to_encode = [prompt] if pos is None else []
            if sampling.uses_cfg and neg is None:
                to_encode.append(negative_prompt)
            needed = ["vae"] + (["text_encoder", "tokenizer"] if to_encode else [])
            if getattr(self.experts, "config", None) is None:
                needed = ["high_noise", "low_noise"] + needed
            self.files.require(*needed)  # every missing file named at once
            config = self._check_experts()
            for c, what in ((pos, "context"), (neg, "negative_context")):
                if c is not None and c.shape[1] != config.text_dim:
                    raise ValueError(f"{what} has width {c.shape[1]}; these experts take text embeddings of "
                                     f"width {config.text_dim}")
            size = prepared.size
            sampler_ = make_sampler(sampling.sampler, sampling.steps, sampling.shift)
            schedule = [expert_for_timestep(t, sampling.boundary) for t in sampler_.timesteps]
            requests = expert_requests(schedule, sampling.guide_scale, size, frames, self.dtype)
        for n in notes:
            self.log(n)
        low_g, high_g = sampling.guide_scale
        self.log(f"video {size.width}x{size.height}, {frames} frames; {sampling.steps} {sampling.sampler} steps, "
                 f"shift {sampling.shift:g}, guide scale {high_g:g} (high noise) / {low_g:g} (low noise)"
                 f"{'' if sampling.uses_cfg else ', no CFG'}; seed {seed}")
        if self.streaming:
            with phase("plan"):
                self.plan_experts(config, requests, lora_specs)
        f_lat = latent_frames(frames)
        pt, ph, pw = config.patch_size
        seq_len = f_lat * size.lat_h * size.lat_w // (pt * ph * pw)

        # 2. Text.
        if to_encode:
            with phase("text"):
                encoded = self.encode_prompts(to_encode)
                if pos is None:
                    pos = encoded.pop(0)
                if sampling.uses_cfg and neg is None:
                    neg = encoded.pop(0)
        pos = pos.to(self.device)
        neg = None if neg is None else neg.to(self.device)

        # 3. The image condition.
        with phase("vae_encode"):
            self.log(f"VAE: encoding the condition video ({frames} frames, {size.width}x{size.height})")
            vae = self._vae()
            y = image_condition(vae, prepared.pixels, frames, last, device=self.device)
            del vae
            _free(self.device)

        # 4. Noise.
        x = initial_noise(seed, (LATENT_CHANNELS, f_lat, size.lat_h, size.lat_w)).to(self.device)

        # 5. Denoising: the first expert is made ready while loading, the switch is timed
        #    on its own ("swap"), each expert's steps too ("denoise_high", "denoise_low").
        with phase("load_experts"):
            experts = self._experts(progress)
            streamed = self._experts_key is not None and self._experts_key[0] == "streamed"
            experts.activate(EXPERT_NAMES[schedule[0]])
        step_times: list[float] = []
        bar = _progress_bar(progress, sampling.steps)
        with phase("denoise"):
            try:
                for k, t in enumerate(sampler_.timesteps):
                    t0 = time.perf_counter()
                    name = EXPERT_NAMES[schedule[k]]
                    if k > 0 and schedule[k] != schedule[k - 1]:
                        self.log(f"step {k + 1}: switching to the {name}-noise expert")
                        with phase("swap"):
                            experts.activate(name)
                        t0 = time.perf_counter()
                    model = experts.activate(name)
                    if not streamed and (lora_specs or lora_state(model) is not None):  # no work when already on
                        apply_loras(model, lora_specs, expert=name, mode=self.lora_mode, log=self.log)
                    g = guide_scale_for(schedule[k], sampling.guide_scale)
                    v = _velocity(model, x, t, y, pos, neg if g != 1.0 else None, g, seq_len)
                    x = sampler_.step(v, k, x)
                    del v
                    _sync(self.device)
                    if not bool(torch.isfinite(x).all()):
                        raise GenerationError(
                            f"the latent is no longer finite after step {k + 1} ({name}-noise expert); "
                            "try --dtype fp32, or check that the expert files are intact")
                    step_times.append(time.perf_counter() - t0)
                    timings[f"denoise_{name}"] = timings.get(f"denoise_{name}", 0.0) + step_times[-1]
                    meter.sample()
                    if bar is not None:
                        bar.set_postfix_str(f"{name} noise", refresh=False)
                        bar.update()
                    if callback is not None:
                        callback(k + 1, sampling.steps, x)
            finally:
                if bar is not None:
                    bar.close()
                release = getattr(experts, "release_device", None)
                if release is not None:
                    release()  # the decode gets the device; the experts stay attached for the next video
        if "swap" in timings:
            timings["denoise"] -= timings["swap"]

        # 6. Decode.
        with phase("vae_decode"):
            self.log("VAE: decoding")
            vae = self._vae()
            video = vae.decode([x], output_device="cpu")[0]  # frames leave the device chunk by chunk
            del vae
            _free(self.device)

        timings["total"] = time.perf_counter() - start
        settings = {
            "task": "i2v-A14B",
            "prompt": prompt if context is None else "(precomputed context)",
            "negative_prompt": ("(not used: guide scale 1)" if not sampling.uses_cfg else
                                negative_prompt if negative_context is None else "(precomputed context)"),
            "image": _describe_source(image),
            "last_image": None if last_image is None else _describe_source(last_image),
            "width": size.width, "height": size.height, "frames": frames, "crop": crop,
            "preset": sampling.preset, "sampler": sampling.sampler, "steps": sampling.steps,
            "shift": sampling.shift, "guide_scale": list(sampling.guide_scale),
            "boundary": sampling.boundary, "seed": seed,
            "experts_per_step": [EXPERT_NAMES[e] for e in schedule],
            "loras": [{"path": str(s.path), "strength": s.strength, "expert": s.expert} for s in lora_specs],
            "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
            "model": {c: str(getattr(self.files, c)) if getattr(self.files, c) else None
                      for c in ("high_noise", "low_noise", "text_encoder", "vae")},
        }
        if streamed:
            settings["vram"] = self.vram if self.vram == AUTO else f"{self.vram / 2**30:g}GiB"
            settings["ram"] = self.ram if self.ram == AUTO else f"{self.ram / 2**30:g}GiB"
        return GenerationResult(
            frames=to_uint8_frames(video), video=video, latent=x.cpu(), seed=seed, settings=settings,
            timings=timings, step_times=step_times, memory=meter.report(), notes=notes)


def expert_requests(schedule, guide_scale, size: VideoSize, frames: int, dtype: torch.dtype) -> dict:
    """What each expert that runs computes: a stream.Request of the video's size, batch 2
    where its guide scale asks for CFG (both passes share a forward), else 1."""
    from .stream import Request

    out = {}
    for expert in dict.fromkeys(schedule):
        batch = 2 if guide_scale_for(expert, guide_scale) != 1.0 else 1
        out[EXPERT_NAMES[expert]] = Request(size.width, size.height, frames, batch=batch, dtype=dtype)
    return out


def _velocity(model, x, t, y, pos, neg, g: float, seq_len: int) -> torch.Tensor:
    """The guided flow prediction. With a negative context both passes are one batch of
    two (same x, y, t; the contexts differ), then v = uncond + g·(cond − uncond); without
    one (guide scale 1) a single pass."""
    t = torch.as_tensor(t).reshape(1)  # int64 for UniPC / DPM++, float32 for Euler
    if neg is None:
        return model([x], t, [pos], seq_len, y=[y])[0]
    cond, uncond = model([x, x], t.repeat(2), [pos, neg], seq_len, y=[y, y])
    return uncond + g * (cond - uncond)


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="denoising", unit="step", dynamic_ncols=True)


def _describe_source(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    shape = getattr(source, "shape", None) or getattr(source, "size", None)
    return f"{type(source).__name__} {tuple(shape) if shape is not None else ''}".strip()


def load_pipeline(
    model: str | os.PathLike | None = None,
    *,
    high_noise=None,
    low_noise=None,
    text_encoder=None,
    tokenizer=None,
    vae=None,
    device=None,
    dtype=None,
    vram=None,
    ram=None,
    prompt_cache=True,
    text_device=None,
    log: Callable[[str], None] | None = None,
    loras=None,
    lora_mode: str = "auto",
) -> Pipeline:
    """A Wan 2.2 I2V-A14B pipeline from a model folder (official, ComfyUI or flat layout)
    and/or explicit files; explicit files win. Nothing is loaded here: missing files are
    reported by `generate` before it loads anything, naming what it expected where.

    device: "cuda", "cuda:N" or "cpu" (default: cuda when available). dtype: the experts'
    compute dtype, bf16 (default on CUDA; the official numerics) or fp32 (default on CPU).
    vram / ram: "auto" (the default) or GiB (a number, or "7.5GiB", "6144MiB"): the budgets
    the streaming engine plans every large module to on CUDA (VRAM as the driver counts it,
    the CUDA context included); a request that cannot fit is refused by `generate` before
    anything loads. Unused on the CPU. prompt_cache: True (the default cache folder), False, a
    folder or a PromptCache. text_device: where the umt5 encoder runs (default: the device
    when it fits there, else the CPU). log: called with one line per event (loading, notes).
    loras: LoRAs for every generation (runtime.lora.LoraSpec(path, strength, expert), or
    'high=PATH:1.0' / 'low=PATH' / 'PATH:0.6' strings); lora_mode: how a linear applies
    them, "auto" (default), "merge" (into the decoded weight) or "side" (beside the matmul)."""
    files = resolve_model_files(model, high_noise=high_noise, low_noise=low_noise, text_encoder=text_encoder,
                                tokenizer=tokenizer, vae=vae)
    use_expandable_segments()  # before CUDA initialises, or it is too late
    device = resolve_device(device)
    pipe = Pipeline(files, device=device, dtype=resolve_dtype(dtype, device), vram=parse_memory(vram, "vram"),
                    ram=parse_memory(ram, "ram"), prompt_cache=prompt_cache,
                    text_device=None if text_device is None else resolve_device(text_device), log=log,
                    loras=loras, lora_mode=lora_mode)
    for note in files.notes:
        pipe.log(note)
    if not pipe.streaming and (pipe.vram != AUTO or pipe.ram != AUTO):
        pipe.log(f"--vram/--ram are not used on {device}: nothing streams there")
    return pipe


__all__ = ["load_pipeline", "Pipeline", "GenerationResult", "GenerationError", "SamplingSettings",
           "resolve_sampling", "initial_noise", "open_experts", "ResidentExperts", "check_expert_files",
           "expert_requests", "uses_streaming", "use_expandable_segments", "MemoryMeter"]

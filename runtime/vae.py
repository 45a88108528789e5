"""The Wan VAEs as the pipelines use them: `load_vae` and the `WanVAE` wrapper.

The wrapper does what the official `Wan2_1_VAE` / `Wan2_2_VAE` do around the model:
latents are normalised with per-channel constants held as float32 `mean` and
`inv_std = 1 / std` (encode: `(mu - mean) * inv_std`, only the mean `mu`, no sampling;
decode starts from `z / inv_std + mean`), decoded videos are clamped to [-1, 1], and both
take and return lists of [C, F, H, W] tensors. On top of that it writes each time chunk
straight into a preallocated output, optionally runs in bf16, and tiles space when the
VRAM budget asks for it (`vae_tiling`).

Which VAE a file holds is read from its weights: the encoder's first conv takes 3
channels in Wan 2.1 and 12 (2x2 patchified) in Wan 2.2; widths, depth and temporal
downsampling come from tensor shapes and names.
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from . import vae_diffusers
from .vae21 import WanVAE21
from .vae22 import WanVAE22
from .vae_blocks import (CausalVAE, FeatureCache, VAEConfig, activation_format, conv_weight_format,
                         new_activation)
from .vae_frames import VideoOutput, blend
from .vae_tiling import DEFAULT_OVERLAP, choose_tile, memory_bytes, plan_tiles, ramp_weights

# The official wrapper's literals (wan/modules/vae2_1.py `Wan2_1_VAE`, vae2_2.py `Wan2_2_VAE`).
LATENT_MEAN_21 = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENT_STD_21 = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
LATENT_MEAN_22 = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENT_STD_22 = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
LATENT_CONSTANTS = {"2.1": (LATENT_MEAN_21, LATENT_STD_21), "2.2": (LATENT_MEAN_22, LATENT_STD_22)}

# Names every Wan VAE state dict has (ComfyUI detects a Wan VAE by the first one).
MARKERS = ("decoder.middle.0.residual.0.gamma", "encoder.conv1.weight", "conv2.weight")
# Prefixes under which single-file checkpoints bundle a VAE.
PREFIXES = ("vae.", "first_stage_model.", "model.")

_AUTO = object()


def build_model(config: VAEConfig) -> CausalVAE:
    return WanVAE21(config) if config.version == "2.1" else WanVAE22(config)


# ----------------------------------------------------------------------------- reading


def read_state_dict(source) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict and a name for messages, from a path (.safetensors, or a .pth/.pt/.ckpt
    read with torch.load(weights_only=True): pickles are never executed) or a mapping."""
    if isinstance(source, Mapping):
        return dict(source), "state dict"
    path = Path(os.fspath(source))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected a Wan VAE checkpoint "
                                f"(Wan2.1_VAE.pth, Wan2.2_VAE.pth or a .safetensors file)")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, str(path)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        return _torch_load(path), str(path)
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected .safetensors or .pth")


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it asks for {found.group(1)}, which" if found else "its pickle holds something that"
        raise ValueError(
            f"{path}: refused: {what} a weights-only load does not allow (a pickle like that can "
            f"run code). Only plain state dicts of tensors are read; use the official file or a "
            f".safetensors copy made with a tool you trust") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors (as the official "
                         f"Wan2.1_VAE.pth is), got {type(sd).__name__}")
    return dict(sd)


def official_names(sd: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Check that `sd` is a Wan VAE in the official (= ComfyUI) naming, stripping a bundle
    prefix, or translate diffusers' AutoencoderKLWan names (Wan 2.1 VAE); refuse anything
    else by what it looks like."""
    for prefix in ("", *PREFIXES):
        if all(prefix + m in sd for m in MARKERS):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if vae_diffusers.is_diffusers_vae(sd):
        return vae_diffusers.official_names(sd, name)
    for prefix in ("", *PREFIXES):
        missing = [m for m in MARKERS if prefix + m not in sd]
        if len(missing) < len(MARKERS):
            raise ValueError(f"{name}: an incomplete Wan VAE: {', '.join(missing)} missing (the official "
                             f"files hold encoder and decoder; re-download or re-export the whole state dict)")
    if "decoder.conv_in.weight" in sd or "post_quant_conv.weight" in sd:
        looks = "a diffusers AutoencoderKL of an image model"
    elif any(k.endswith("self_attn.q.weight") or k.endswith("patch_embedding.weight") for k in sd):
        looks = "a Wan DiT (diffusion model)"
    elif any("token_embedding" in k or "shared.weight" in k for k in sd):
        looks = "a text encoder"
    else:
        some = ", ".join(sorted(sd)[:3]) or "no tensors"
        looks = f"something else (names like {some})"
    raise ValueError(f"{name}: not a Wan VAE checkpoint: it has no {MARKERS[0]!r}; it looks like {looks}. "
                     f"Pass Wan2.1_VAE.pth / Wan2.2_VAE.pth or ComfyUI's wan_2.1_vae / wan2.2_vae .safetensors")


def config_from_weights(sd: Mapping[str, torch.Tensor], name: str = "state dict") -> VAEConfig:
    """VAEConfig from tensor shapes and names (never from file names)."""
    conv_in = sd["encoder.conv1.weight"]  # [dim, 3 or 12, 3, 3, 3]
    version = {3: "2.1", 12: "2.2"}.get(conv_in.shape[1])
    if version is None:
        raise ValueError(f"{name}: encoder.conv1 takes {conv_in.shape[1]} channels; a Wan 2.1 VAE takes 3, "
                         f"a Wan 2.2 VAE 12 (2x2 patchified RGB)")
    dim = conv_in.shape[0]
    z_dim = sd["conv2.weight"].shape[0]
    dec_dim = sd["decoder.head.0.gamma"].shape[0]
    if any(".to_qkv." in k for k in sd if k.startswith(("encoder.downsamples", "decoder.upsamples"))):
        raise ValueError(f"{name}: attention inside the down/upsampling stages (attn_scales) is not "
                         f"used by any Wan VAE and is not supported")
    widths, blocks, temporal = _stages(sd, version)
    if len(set(blocks)) != 1 or any(w % dim for w in widths):
        raise ValueError(f"{name}: unexpected encoder stages (widths {widths}, residual blocks {blocks})")
    if version == "2.1" and dec_dim != dim:
        raise ValueError(f"{name}: decoder width {dec_dim} differs from encoder width {dim}")
    config = VAEConfig(version=version, dim=dim, z_dim=z_dim, dec_dim=dec_dim,
                       dim_mult=tuple(w // dim for w in widths), num_res_blocks=blocks[0],
                       temporal_downsample=tuple(temporal))
    if config.stride[0] != 4:
        raise ValueError(f"{name}: its encoder compresses time {config.stride[0]}x (temporal downsampling "
                         f"{list(config.temporal_downsample)}); Wan VAEs compress it 4x, which the causal "
                         f"4-frame chunks rely on")
    if z_dim != len(LATENT_CONSTANTS[version][0]):
        raise ValueError(f"{name}: a Wan {version} VAE has {len(LATENT_CONSTANTS[version][0])} latent "
                         f"channels, this one {z_dim}")
    return config


def _stages(sd, version: str) -> tuple[list[int], list[int], list[bool]]:
    """Per encoder stage: output width, residual blocks, temporal downsampling."""
    def index_set(prefix: str) -> list[int]:
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})

    widths, blocks, temporal = [], [], []
    if version == "2.1":  # one flat list: residual blocks, then a resample closing each stage
        n = 0
        for i in index_set("encoder.downsamples."):
            p = f"encoder.downsamples.{i}."
            if p + "residual.2.weight" in sd:
                n += 1
                width = sd[p + "residual.2.weight"].shape[0]
            elif p + "resample.1.weight" in sd:
                widths.append(width)
                blocks.append(n)
                temporal.append(p + "time_conv.weight" in sd)
                n = 0
        widths.append(width)
        blocks.append(n)
    else:  # one Down_ResidualBlock per stage
        for i in index_set("encoder.downsamples."):
            p = f"encoder.downsamples.{i}.downsamples."
            res = [j for j in index_set(p) if f"{p}{j}.residual.2.weight" in sd]
            widths.append(sd[f"{p}{res[-1]}.residual.2.weight"].shape[0])
            blocks.append(len(res))
            if any(f"{p}{j}.resample.1.weight" in sd for j in index_set(p)):
                temporal.append(any(f"{p}{j}.time_conv.weight" in sd for j in index_set(p)))
    return widths, blocks, temporal


# ----------------------------------------------------------------------------- the wrapper


class WanVAE:
    """A loaded Wan VAE. `encode(videos)` / `decode(latents)` take and return lists of
    [C, F, H, W] tensors like the official wrappers; outputs are float32 on `device`."""

    def __init__(self, model: CausalVAE, *, device: torch.device, dtype: torch.dtype, channels_last: bool,
                 tile=None, overlap: int = DEFAULT_OVERLAP, vram_budget: int | None = None):
        self.model = model
        self.config: VAEConfig = model.config
        self.device = _device(device)
        self.dtype = dtype
        self.channels_last = channels_last
        self.memory_format = activation_format(channels_last)
        self.tile = tile
        self.overlap = overlap
        self.vram_budget = vram_budget
        mean, std = LATENT_CONSTANTS[self.config.version]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=self.device)

    def __repr__(self) -> str:
        c = self.config
        return (f"WanVAE(version={c.version}, z_dim={c.z_dim}, stride={c.stride}, dim={c.dim}, "
                f"dec_dim={c.dec_dim}, device={self.device}, dtype={self.dtype})")

    # --- memory and tiles

    def memory_bytes(self, op: str, frames: int, height: int, width: int, *, tile=None, **io) -> int:
        """Estimated peak device bytes of encoding/decoding a [3, frames, height, width] video
        (`io`: input_on_device, output_on_device, see `vae_tiling.memory_estimate`)."""
        return memory_bytes(self.config, op, frames, height, width, tile=tile, dtype=self.dtype,
                            overlap=self.overlap, channels_last=self.channels_last, **io)

    def _budget(self) -> int | None:
        if self.vram_budget is not None:
            return int(self.vram_budget)
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return int(0.9 * (free + cached)) + weights  # the estimate counts the weights in

    def plan(self, op: str, frames: int, height: int, width: int, tile=_AUTO, **io):
        """The TilePlan an encode/decode of a [3, frames, height, width] video uses (`io`:
        input_on_device, output_on_device)."""
        tile = self.tile if tile is _AUTO else tile
        _, sh, sw = self.config.stride
        if tile is None:
            budget = self._budget()
            tile = None if budget is None else choose_tile(
                self.config, op, frames, height, width, budget=budget, dtype=self.dtype, overlap=self.overlap,
                channels_last=self.channels_last, **io)
        elif tile is False:
            tile = None
        return plan_tiles(height // sh, width // sw, tile, self.overlap)

    # --- encode

    @torch.inference_mode()
    def encode(self, videos, *, tile=_AUTO, progress: bool = False) -> list[torch.Tensor]:
        """videos: list of [3, F, H, W] in [-1, 1], F = 1 + 4k, H and W multiples of the
        spatial stride -> list of normalised latents [z, 1 + k, H/s, W/s] (float32)."""
        return [self._encode_one(v, tile, progress) for v in _as_list(videos, "videos")]

    def _encode_one(self, video: torch.Tensor, tile, progress: bool) -> torch.Tensor:
        st, sh, sw = self.config.stride
        _check_video(video, self.config)
        _, frames, height, width = video.shape
        plan = self.plan("encode", frames, height, width, tile, input_on_device=video.device == self.device)
        lat_f, lat_h, lat_w = 1 + (frames - 1) // st, height // sh, width // sw
        out = torch.empty((self.config.z_dim, lat_f, lat_h, lat_w), dtype=torch.float32, device=self.device)
        mean, inv_std = self.mean.view(-1, 1, 1), self.inv_std.view(-1, 1, 1)
        bar = _progress(progress, (len(plan) + plan.tiled) * lat_f, "VAE encode")
        if not plan.tiled:
            for i, mu in self.model.encode_chunks(video, FeatureCache(self.memory_format)):
                out[:, i] = (mu.float() - mean) * inv_std
                bar.update()
            bar.close()
            return out
        # Tiles run the local stages (all chunks each, own cache) into one blended feature
        # map (the blend weights add up to one); the middle, whose attention sees the
        # whole frame, then runs untiled.
        features = None
        for iy, (y0, y1), ix, (x0, x1) in plan.tiles():
            pixels = video[:, :, y0 * sh : y1 * sh, x0 * sw : x1 * sw]
            w = ramp_weights(plan.spans_y, iy, 1, self.device)[:, None] * ramp_weights(plan.spans_x, ix, 1, self.device)
            rows_done = plan.spans_y[iy - 1][1] - y0 if iy else 0
            cols_done = plan.spans_x[ix - 1][1] - x0 if ix else 0
            for i, f in self.model.encode_chunks(pixels, FeatureCache(self.memory_format), local_only=True):
                if features is None:
                    features = torch.empty((f.shape[0], lat_f, lat_h, lat_w), dtype=torch.float32, device=self.device)
                blend(features[:, i, y0:y1, x0:x1], f * w, rows_done, cols_done)
                bar.update()
        cache = FeatureCache(self.memory_format)
        for i in range(lat_f):
            mu = self.model.encode_global(features[:, i].to(self.dtype), cache)
            out[:, i] = (mu.float() - mean) * inv_std
            cache.first_chunk = False
            bar.update()
        bar.close()
        return out

    # --- decode

    @torch.inference_mode()
    def decode(self, latents, *, tile=_AUTO, output_device=None, progress: bool = False) -> list[torch.Tensor]:
        """latents: list of normalised [z, T, h, w] -> list of videos [3, 1 + 4(T-1), h*s, w*s]
        clamped to [-1, 1] (float32), on `output_device` (default: the VAE's device; "cpu"
        keeps the video out of device memory: frames leave the device a time chunk at a time)."""
        return [self._decode_one(z, tile, output_device, progress, clamp=True) for z in _as_list(latents, "latents")]

    def decode_unclamped(self, latent: torch.Tensor, *, tile=_AUTO, output_device=None,
                         progress: bool = False) -> torch.Tensor:
        """The decoder output of one latent before the wrapper's clamp."""
        with torch.inference_mode():
            return self._decode_one(latent, tile, output_device, progress, clamp=False)

    def _decode_one(self, latent: torch.Tensor, tile, output_device, progress: bool, clamp: bool) -> torch.Tensor:
        st, sh, sw = self.config.stride
        _check_latent(latent, self.config)
        _, lat_f, lat_h, lat_w = latent.shape
        frames, height, width = 1 + st * (lat_f - 1), lat_h * sh, lat_w * sw
        out_dev = self.device if output_device is None else _device(output_device)
        plan = self.plan("decode", frames, height, width, tile, output_on_device=out_dev == self.device)
        out = VideoOutput((3, frames, height, width), out_dev, self.device, st, clamp)
        z = latent.to(device=self.device, dtype=torch.float32)
        z = (z / self.inv_std.view(-1, 1, 1, 1) + self.mean.view(-1, 1, 1, 1)).to(self.dtype)
        bar = _progress(progress, len(plan) * frames + plan.tiled * lat_f, "VAE decode")
        if not plan.tiled:
            out.begin_tile(slice(0, height), slice(0, width), None)
            for f, pixels in self.model.decode_frames(z, FeatureCache(self.memory_format)):
                out.put(f, pixels)
                bar.update()
            bar.close()
            return out.result()
        # The middle, whose attention sees the whole frame, runs once over all latent
        # frames; each tile then runs the local upsampling stages (all chunks, own cache)
        # on its window of the middle's output.
        cache = FeatureCache(self.memory_format)
        features = None
        for i, f in self.model.decode_middle(z, cache):
            if features is None:
                features = new_activation(f, f.shape[1], lat_f, lat_h, lat_w, self.memory_format)
            features[:, :, i : i + 1] = f
            del f
            bar.update()
        del cache, z
        for iy, (y0, y1), ix, (x0, x1) in plan.tiles():
            wy, wx = ramp_weights(plan.spans_y, iy, sh, self.device), ramp_weights(plan.spans_x, ix, sw, self.device)
            w = wy[:, None] * wx
            rows_done = (plan.spans_y[iy - 1][1] - y0) * sh if iy else 0
            cols_done = (plan.spans_x[ix - 1][1] - x0) * sw if ix else 0
            out.begin_tile(slice(y0 * sh, y1 * sh), slice(x0 * sw, x1 * sw), w, rows_done, cols_done)
            window = features[:, :, :, y0:y1, x0:x1]
            for f, pixels in self.model.decode_window(window, FeatureCache(self.memory_format)):
                out.put(f, pixels)
                bar.update()
        bar.close()
        return out.result()


def _device(device) -> torch.device:
    """A torch.device with its index, so that equal devices compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _as_list(items, what: str) -> list[torch.Tensor]:
    if isinstance(items, torch.Tensor) or not isinstance(items, (list, tuple)):
        raise TypeError(f"{what} must be a list of tensors (one per video), got {type(items).__name__}; "
                        f"wrap a single one: [{what[:-1]}]")
    return list(items)


def _check_video(video: torch.Tensor, config: VAEConfig) -> None:
    st, sh, sw = config.stride
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"a video must be [3, F, H, W], got {list(video.shape)}")
    _, f, h, w = video.shape
    if (f - 1) % st:
        raise ValueError(f"a video for the VAE needs 1 + {st}k frames, got {f}; trim or pad it "
                         f"to {1 + st * ((f - 1) // st)} or {1 + st * -(-(f - 1) // st)}")
    if h % sh or w % sw:
        raise ValueError(f"video height and width must be multiples of {sh} for the Wan {config.version} VAE, "
                         f"got {h}x{w}")


def _check_latent(latent: torch.Tensor, config: VAEConfig) -> None:
    if latent.dim() != 4 or latent.shape[0] != config.z_dim:
        raise ValueError(f"a latent for the Wan {config.version} VAE must be [{config.z_dim}, T, h, w], "
                         f"got {list(latent.shape)}")


def _progress(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled, leave=False)


# ----------------------------------------------------------------------------- loading


def load_vae(source, *, device="cpu", dtype: torch.dtype = torch.float32, tile=None,
             overlap: int = DEFAULT_OVERLAP, vram_budget: int | None = None,
             channels_last: bool | None = None) -> WanVAE:
    """Load a Wan 2.1 or 2.2 VAE.

    source: Wan2.1_VAE.pth / Wan2.2_VAE.pth (read with torch.load(weights_only=True), never
      unpickled otherwise), a .safetensors file in the official / ComfyUI naming or (Wan 2.1
      VAE only) diffusers' AutoencoderKLWan naming (vae/diffusion_pytorch_model.safetensors),
      or a state dict.
    dtype: compute dtype of weights, activations and cache (the official runs float32;
      bfloat16 halves the memory at about 2% relative error).
    tile: None chooses spatial tiles from `vram_budget` (bytes; on CUDA default ~90% of the
      free memory, on CPU untiled), False never tiles, an int or (h, w) fixes the tile
      size in latent pixels; `overlap` latent pixels between tiles.
    channels_last: activation layout (default: channels-last on CUDA).
    """
    device = _device(device)
    sd, name = read_state_dict(source)
    sd = official_names(sd, name)
    config = config_from_weights(sd, name)
    if channels_last is None:
        channels_last = device.type == "cuda"
    with torch.device("meta"):
        model = build_model(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{name}: does not match a Wan {config.version} VAE of dim {config.dim}: "
                         f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for k, t in expected.items():
        if sd[k].shape != t.shape:
            raise ValueError(f"{name}: {k} has shape {list(sd[k].shape)}, expected {list(t.shape)}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    del sd
    model.eval().requires_grad_(False)
    conv_weight_format(model, activation_format(channels_last))
    return WanVAE(model, device=device, dtype=dtype, channels_last=channels_last, tile=tile,
                  overlap=overlap, vram_budget=vram_budget)


def vae_memory_bytes(config: VAEConfig, op: str, frames: int, height: int, width: int, *,
                     tile=None, dtype: torch.dtype = torch.float32, overlap: int = DEFAULT_OVERLAP, **io) -> int:
    """Estimated peak device bytes (torch's allocator, weights of the whole VAE included) of
    a VAE encode/decode of a [3, frames, height, width] video with `tile` (None: untiled);
    `io`: input_on_device, output_on_device (the pipeline decodes to host memory: False),
    channels_last (default True, as on CUDA). See `vae_tiling.memory_estimate`."""
    return memory_bytes(config, op, frames, height, width, tile=tile, dtype=dtype, overlap=overlap, **io)

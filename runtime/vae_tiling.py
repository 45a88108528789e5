"""Spatial tiling for the VAEs, and the memory estimate that chooses it.

Time chunking is exact (the feature cache carries the causal context), so only space is
tiled: overlapping latent tiles, each run through all time chunks with its own cache, are
blended with linear ramps across their overlaps into one preallocated output. Tiling is
not exact (the middle attention sees the whole frame and the stacked 3x3 convs see far),
so overlaps are generous (default 8 latent pixels) and the result is compared with the
untiled one in the tests.

The estimate (what the automatic choice and the planners trust): the peak of torch's
allocator during one encode or decode = weights of the whole VAE + input/output buffers +
feature caches + activations. Caches and the largest activation are read off the
model's widths and levels per latent pixel (`vae_blocks.working_set_per_latent_px`) and
scale with the area each part runs on: the tile for the local stages, the whole frame
for the middle (a tiled call runs the middle once, apart from the tiles). The live
activations at the peak are a measured multiple of the largest one (ACTIVATION_FACTOR).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .vae_blocks import CausalVAE, VAEConfig, working_set_per_latent_px

DEFAULT_OVERLAP = 8  # latent pixels
# Live activations at the peak in units of the largest single activation of a chunk (a
# block's input, its conv buffer and output, the stage input a per-frame loop keeps),
# by activation layout (channels_last -> factor). Measured with the full-size Wan 2.1
# VAE on an H200 (832x480 and 1280x720, 81 frames, float32 and bfloat16, untiled and
# tiled; allocator peak minus what was allocated before the call, less io and cache):
# 2.4-2.6 channels-last, 3.7-3.8 NCDHW (cuDNN converts the layout on the side); the
# live-tensor count on the CPU gives 2.35 (no workspaces), see tests/test_vae_tiling.py.
ACTIVATION_FACTOR = {True: 2.75, False: 3.9}
# Allocator rounding (2 MiB pages, about a hundred live blocks) and workspace variation.
MARGIN_FRACTION = 0.02
MARGIN_BYTES = 64 << 20


@dataclass(frozen=True)
class TilePlan:
    """Latent spans along height and width; one tile per (y span, x span)."""

    spans_y: tuple[tuple[int, int], ...]
    spans_x: tuple[tuple[int, int], ...]

    @property
    def tiled(self) -> bool:
        return len(self.spans_y) * len(self.spans_x) > 1

    @property
    def tile(self) -> tuple[int, int]:
        return (max(b - a for a, b in self.spans_y), max(b - a for a, b in self.spans_x))

    def __len__(self) -> int:
        return len(self.spans_y) * len(self.spans_x)

    def tiles(self):
        """(index y, span y, index x, span x) for every tile."""
        for iy, sy in enumerate(self.spans_y):
            for ix, sx in enumerate(self.spans_x):
                yield iy, sy, ix, sx


def spans(size: int, tile: int, overlap: int) -> tuple[tuple[int, int], ...]:
    """Cover [0, size) with the fewest tiles of at most `tile` that overlap by at least
    `overlap`; tiles are shrunk to the smallest equal size that does it and spread evenly."""
    if tile >= size:
        return ((0, size),)
    if tile <= overlap:
        raise ValueError(f"tile {tile} must be larger than the overlap {overlap} (latent pixels)")
    n = -(-(size - overlap) // (tile - overlap))
    tile = -(-(size + (n - 1) * overlap) // n)
    starts = [round(i * (size - tile) / (n - 1)) for i in range(n)]
    return tuple((s, s + tile) for s in starts)


def plan_tiles(height: int, width: int, tile: int | tuple[int, int] | None, overlap: int) -> TilePlan:
    """Latent height/width and a tile size (None: one tile) -> TilePlan."""
    if tile is None:
        return TilePlan(((0, height),), ((0, width),))
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    return TilePlan(spans(height, th, overlap), spans(width, tw, overlap))


def ramp_weights(all_spans, index: int, scale: int, device=None) -> torch.Tensor:
    """Blend weight along one axis for tile `index`, at `scale` output pixels per latent
    pixel; the weights of all tiles add up to 1 at every pixel (so the 2-D products do
    too, and blending needs no weight sum). Across an overlap of L pixels with a
    neighbour the weight is 0 on the quarter nearest this tile's edge (where the zero
    padding of its convs is felt most), rises linearly over the middle half and is 1 on
    the far quarter; the neighbour's weight is the mirror image. Where tiles are so
    small that a pixel lies in more than two, the ramps are normalised by their sum."""
    size = all_spans[-1][1] * scale
    total = torch.zeros(size, dtype=torch.float32, device=device)
    for i, (a, b) in enumerate(all_spans):
        total[a * scale : b * scale] += _tile_ramp(all_spans, i, scale, device)
    a, b = all_spans[index]
    return _tile_ramp(all_spans, index, scale, device) / total[a * scale : b * scale]


def _tile_ramp(all_spans, index: int, scale: int, device) -> torch.Tensor:
    a, b = all_spans[index]
    n = (b - a) * scale
    pos = torch.arange(n, dtype=torch.float32, device=device) + 0.5
    w = torch.ones(n, dtype=torch.float32, device=device)
    if index > 0:  # overlap with the previous tile at the start
        w = torch.minimum(w, _ramp(pos, (all_spans[index - 1][1] - a) * scale))
    if index + 1 < len(all_spans):  # and with the next one at the end
        w = torch.minimum(w, _ramp(n - pos, (b - all_spans[index + 1][0]) * scale))
    return w


def _ramp(dist: torch.Tensor, overlap: int) -> torch.Tensor:
    """0 .. 1 as `dist` (from the tile edge) crosses the middle half of the overlap."""
    margin = overlap // 4
    width = max(overlap - 2 * margin, 1)
    return ((dist - margin) / width).clamp_(0, 1)


@functools.lru_cache(maxsize=8)
def _shape_model(config: VAEConfig) -> CausalVAE:
    from .vae import build_model  # the model classes live there; building on meta is free

    with torch.device("meta"):
        return build_model(config)


@dataclass(frozen=True)
class WorkingSet:
    """Elements per latent pixel of one encode/decode: the tiled (local) stages' cache and
    largest activation, the same for the untiled (global) ones; the weights of the whole
    VAE (`load_vae` puts encoder and decoder on the device); the channels of the feature
    map between the two parts (a tiled encode blends it in float32, a tiled decode keeps
    the middle's output in the compute dtype)."""

    local_cache: float
    local_largest: float
    local_kept: float  # the largest stage input held for a shortcut (Wan 2.2)
    global_cache: float
    global_largest: float
    weights: int
    feature_channels: int


@functools.lru_cache(maxsize=32)
def working_set(config: VAEConfig, op: str) -> WorkingSet:
    model = _shape_model(config)
    if op == "encode":
        enc = model.encoder
        local, glob = (enc.conv1, enc.downsamples), (enc.middle, enc.head)
    else:
        dec = model.decoder
        local, glob = (dec.upsamples, dec.head), (dec.conv1, dec.middle)
    channels = (model.encoder if op == "encode" else model.decoder).middle[0].residual["2"].in_channels
    lc, ll, lk = working_set_per_latent_px(local)
    gc, gl, _ = working_set_per_latent_px(glob)
    weights = sum(p.numel() for p in model.parameters())
    return WorkingSet(lc, ll, lk, gc, gl, weights, channels)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak device bytes of one encode/decode, by part (cache and activations of the
    phase that peaks: a tiled call runs its tiles and its whole-frame middle apart)."""

    weights: int
    io: int  # input/output, latents, the feature map between tiles and middle, staging
    cache: int  # feature caches
    activations: int
    margin: int  # allocator rounding, workspace variation

    @property
    def total(self) -> int:
        return self.weights + self.io + self.cache + self.activations + self.margin


def memory_estimate(config: VAEConfig, op: str, frames: int, height: int, width: int, *,
                    tile: int | tuple[int, int] | None = None, dtype: torch.dtype = torch.float32,
                    overlap: int = DEFAULT_OVERLAP, input_on_device: bool = False,
                    output_on_device: bool = True, channels_last: bool = True) -> MemoryEstimate:
    """Estimated peak device memory (torch's allocator) of encoding a [3, frames, height,
    width] video or decoding the latent of one, with spatial tiles of `tile` latent pixels
    (None: untiled), weights/activations/cache in `dtype`, the activation layout of
    `channels_last`. The decoded video (float32) is counted when `output_on_device`
    (otherwise one time chunk of one tile is); the encoder's input video only when
    `input_on_device` (otherwise it moves to the device one frame at a time).

    Model: whole-VAE weights + io + cache + ACTIVATION_FACTOR x the largest activation
    (+ the largest stage input held for a shortcut) + MARGIN; cache, largest activation
    and held input per latent pixel come from the blocks' widths
    and levels (`working_set`) times the area they run on: the tile for the local stages,
    the whole frame for the middle."""
    if op not in ("encode", "decode"):
        raise ValueError(f"op must be 'encode' or 'decode', not {op!r}")
    st, sh, sw = config.stride
    lat_f, lat_h, lat_w = 1 + (frames - 1) // st, height // sh, width // sw
    plan = plan_tiles(lat_h, lat_w, tile, overlap)
    th, tw = plan.tile
    item = torch.empty((), dtype=dtype).element_size()
    ws = working_set(config, op)
    factor = ACTIVATION_FACTOR[bool(channels_last)]
    full, part = lat_h * lat_w, th * tw
    latent = config.z_dim * lat_f * full
    if op == "encode":
        io = latent * 4 if output_on_device else 0
        io += 3 * frames * height * width * 4 if input_on_device else 0
    else:
        io = latent * (4 + 2 * item)  # float32 copy, compute-dtype copy, conv2 output
        tile_px = th * sh * tw * sw
        if output_on_device:
            io += 3 * frames * height * width * 4 + (tile_px * 4 * 4 if plan.tiled else 0)  # + weighted frame
        else:
            io += 3 * st * tile_px * 4  # one chunk on its way to the host
    local = (ws.local_cache, factor * ws.local_largest + ws.local_kept)  # (cache, activations) per px
    if plan.tiled:
        io += ws.feature_channels * lat_f * full * (4 if op == "encode" else item)
        phases = [(local[0] * part, local[1] * part), (ws.global_cache * full, factor * ws.global_largest * full)]
        cache, activations = max(phases, key=sum)
    else:
        cache = (ws.local_cache + ws.global_cache) * full
        activations = max(local[1], factor * ws.global_largest) * full
    cache, activations = cache * item, activations * item
    weights = ws.weights * item
    margin = MARGIN_FRACTION * (weights + io + cache + activations) + MARGIN_BYTES
    return MemoryEstimate(int(weights), int(io), int(cache), int(activations), int(margin))


def memory_bytes(config: VAEConfig, op: str, frames: int, height: int, width: int, **kwargs) -> int:
    """`memory_estimate(...).total`: estimated peak device bytes of a VAE encode/decode."""
    return memory_estimate(config, op, frames, height, width, **kwargs).total


def layouts(size: int, overlap: int):
    """(tile count, tile size) for each distinct way of covering `size` latent pixels with
    equal tiles overlapping by `overlap` (tiles larger than the overlap), fewest first."""
    seen = set()
    for n in range(1, size + 1):
        tile = -(-(size + (n - 1) * overlap) // n)
        if n > 1 and tile <= overlap:
            break
        s = spans(size, tile, overlap)
        if len(s) == n and n not in seen:
            seen.add(n)
            yield n, s[0][1] - s[0][0]


def choose_tile(config: VAEConfig, op: str, frames: int, height: int, width: int, *,
                budget: int, dtype: torch.dtype = torch.float32, overlap: int = DEFAULT_OVERLAP,
                input_on_device: bool = False, output_on_device: bool = True,
                channels_last: bool = True) -> tuple[int, int] | None:
    """The tile layout whose estimate fits `budget` bytes with the fewest tiles (each tile
    recomputes its overlaps, and smaller tiles run less efficiently), then the least
    computed area: None when the whole frame fits. Raises MemoryError when no layout does."""
    _, sh, sw = config.stride
    lat_h, lat_w = height // sh, width // sw
    kw = dict(dtype=dtype, overlap=overlap, input_on_device=input_on_device, output_on_device=output_on_device,
              channels_last=channels_last)

    def fits(tile) -> bool:
        return memory_bytes(config, op, frames, height, width, tile=tile, **kw) <= budget

    if fits(None):
        return None
    rows, cols = list(layouts(lat_h, overlap)), list(layouts(lat_w, overlap))
    candidates = sorted((ny * nx, ny * th * nx * tw, (th, tw)) for ny, th in rows for nx, tw in cols if ny * nx > 1)
    for _, _, tile in candidates:
        if fits(tile):
            return tile
    smallest = (rows[-1][1], cols[-1][1])
    need = memory_bytes(config, op, frames, height, width, tile=smallest, **kw)
    raise MemoryError(
        f"VAE {op} of {frames}x{height}x{width} does not fit a budget of {budget / 2**30:.2f} GiB "
        f"even with {smallest[0]}x{smallest[1]} latent tiles (about {need / 2**30:.2f} GiB); "
        f"use dtype=torch.bfloat16, a smaller overlap, or a larger budget")

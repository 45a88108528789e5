"""Spatial tiling for the VAEs, and the memory estimate that chooses it.

Time chunking is exact (the feature cache carries the causal context), so only space is
tiled: overlapping latent tiles, each run through all time chunks with its own cache, are
blended with linear ramps across their overlaps into one preallocated output. Tiling is
not exact (the middle attention sees the whole frame and the stacked 3x3 convs see far),
so overlaps are generous (default 8 latent pixels) and the result is compared with the
untiled one in the tests.

The estimate: device memory of one encode or decode is weights + input/output buffers +
per tile (feature cache + activations). Cache and activations scale with the tile area;
per latent pixel they are read off the model's widths and levels
(`vae_blocks.working_set_per_latent_px`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .vae_blocks import CausalVAE, VAEConfig, working_set_per_latent_px

DEFAULT_OVERLAP = 8  # latent pixels
# Live activations at the peak, in units of the largest single activation of a chunk
# (a block's input, its shortcut, its conv buffer and output, plus the stage input the
# per-frame loop keeps); checked against a live-tensor count in tests/test_vae_tiling.py.
ACTIVATION_FACTOR = 3.5
# cuDNN workspaces and allocator rounding.
MARGIN_FRACTION = 0.08
MARGIN_BYTES = 128 << 20


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
    pixel. Across an overlap of L pixels with a neighbour the weight is 0 on the quarter
    nearest this tile's edge (where the zero padding of its convs is felt most), rises
    linearly over the middle half and is 1 on the far quarter; the neighbour's weight is
    the mirror image, so the two add up to 1."""
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
    largest activation, the same for the untiled (global) ones, the weights, and the
    channels of the feature map a tiled encode blends."""

    local_cache: float
    local_largest: float
    global_cache: float
    global_largest: float
    weights: int
    feature_channels: int


@functools.lru_cache(maxsize=32)
def working_set(config: VAEConfig, op: str) -> WorkingSet:
    model = _shape_model(config)
    if op == "encode":
        enc = model.encoder
        local, glob, latent_conv = (enc.conv1, enc.downsamples), (enc.middle, enc.head), model.conv1
        part, channels = enc, enc.middle[0].residual["2"].in_channels
    else:
        dec = model.decoder
        local, glob, latent_conv = (dec.upsamples, dec.head), (dec.conv1, dec.middle), model.conv2
        part, channels = dec, 0
    lc, ll = working_set_per_latent_px(local)
    gc, gl = working_set_per_latent_px(glob)
    weights = sum(p.numel() for m in (part, latent_conv) for p in m.parameters())
    return WorkingSet(lc, ll, gc, gl, weights, channels)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak device bytes of one encode/decode, by part."""

    weights: int
    io: int  # output (float32), latent, blend buffers; the input video only if on the device
    cache: int  # feature cache of a tile (the untiled middle's over the whole frame)
    activations: int
    margin: int  # cuDNN workspaces, allocator rounding

    @property
    def total(self) -> int:
        return self.weights + self.io + self.cache + self.activations + self.margin


def memory_estimate(config: VAEConfig, op: str, frames: int, height: int, width: int, *,
                    tile: int | tuple[int, int] | None = None, dtype: torch.dtype = torch.float32,
                    overlap: int = DEFAULT_OVERLAP, input_on_device: bool = False,
                    output_on_device: bool = True) -> MemoryEstimate:
    """Estimated peak device memory of encoding a [3, frames, height, width] video or
    decoding the latent of one, with spatial tiles of `tile` latent pixels (None: untiled)
    and weights/activations in `dtype`. Outputs are float32, counted when
    `output_on_device`; the encoder's input video is counted only when `input_on_device`
    (otherwise it moves to the device one frame at a time)."""
    if op not in ("encode", "decode"):
        raise ValueError(f"op must be 'encode' or 'decode', not {op!r}")
    st, sh, sw = config.stride
    lat_f, lat_h, lat_w = 1 + (frames - 1) // st, height // sh, width // sw
    plan = plan_tiles(lat_h, lat_w, tile, overlap)
    th, tw = plan.tile
    item = torch.empty((), dtype=dtype).element_size()
    ws = working_set(config, op)
    full, part = lat_h * lat_w, th * tw
    cache = (ws.local_cache * part + ws.global_cache * full) * item
    largest = max(ws.local_largest * part, ws.global_largest * full) * item
    pixels = 3 * frames * height * width
    latent = config.z_dim * lat_f * full
    if op == "encode":
        io = (latent * 4 if output_on_device else 0) + (pixels * 4 if input_on_device else 0)
        if plan.tiled:  # the blended feature map of all chunks, and the weight sum
            io += ws.feature_channels * lat_f * full * 4 + full * 4
    else:
        io = latent * (4 + item)
        if output_on_device:
            io += pixels * 4 + (height * width * 4 if plan.tiled else 0)
    weights = ws.weights * item
    activations = ACTIVATION_FACTOR * largest
    margin = MARGIN_FRACTION * (weights + io + cache + activations) + MARGIN_BYTES
    return MemoryEstimate(int(weights), int(io), int(cache), int(activations), int(margin))


def memory_bytes(config: VAEConfig, op: str, frames: int, height: int, width: int, **kwargs) -> int:
    """`memory_estimate(...).total`: estimated peak device bytes of a VAE encode/decode."""
    return memory_estimate(config, op, frames, height, width, **kwargs).total


def choose_tile(config: VAEConfig, op: str, frames: int, height: int, width: int, *,
                budget: int, dtype: torch.dtype = torch.float32, overlap: int = DEFAULT_OVERLAP,
                input_on_device: bool = False, output_on_device: bool = True) -> tuple[int, int] | None:
    """The tiling that fits `budget` bytes with the least computed area (then the fewest
    tiles): None when the whole frame fits. Raises MemoryError when even small tiles do not."""
    _, sh, sw = config.stride
    lat_h, lat_w = height // sh, width // sw

    def fits(tile) -> bool:
        return memory_bytes(config, op, frames, height, width, tile=tile, dtype=dtype, overlap=overlap,
                            input_on_device=input_on_device, output_on_device=output_on_device) <= budget

    if fits(None):
        return None
    smallest = overlap + 1
    best = None
    for ny in range(1, lat_h + 1):
        th = spans(lat_h, -(-(lat_h + (ny - 1) * overlap) // ny), overlap)
        if len(th) != ny or (ny > 1 and th[0][1] - th[0][0] < smallest):
            continue
        for nx in range(1, lat_w + 1):
            tw = spans(lat_w, -(-(lat_w + (nx - 1) * overlap) // nx), overlap)
            if len(tw) != nx or (nx > 1 and tw[0][1] - tw[0][0] < smallest):
                continue
            tile = (th[0][1] - th[0][0], tw[0][1] - tw[0][0])
            if not fits(tile):
                continue
            cost = (ny * tile[0] * nx * tile[1], ny * nx)
            if best is None or cost < best[0]:
                best = (cost, tile)
            break  # more columns only cost more area
    if best is None:
        need = memory_bytes(config, op, frames, height, width, tile=(smallest, smallest), dtype=dtype,
                            overlap=overlap, input_on_device=input_on_device, output_on_device=output_on_device)
        raise MemoryError(
            f"VAE {op} of {frames}x{height}x{width} does not fit a budget of {budget / 2**30:.2f} GiB "
            f"even with {smallest}x{smallest} latent tiles (about {need / 2**30:.2f} GiB); "
            f"use dtype=torch.bfloat16, a smaller overlap, or a larger budget")
    return best[1]

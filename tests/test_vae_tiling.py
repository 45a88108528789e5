"""Spatial tiling of the VAEs: tile layout, blend weights, tiled vs untiled results, and
the memory estimate that picks tiles (checked against a count of live tensors)."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import runtime
from runtime.vae import build_model
from runtime.vae21 import WAN21_FULL
from runtime.vae22 import WAN22_FULL
from runtime.vae_blocks import VAEConfig
from runtime.vae_frames import VideoOutput
from runtime.vae_tiling import (DEFAULT_OVERLAP, choose_tile, layouts, memory_estimate, plan_tiles, ramp_weights,
                                spans)

# Tiles see zero padding at their borders (the middle attention runs untiled), so tiled
# results differ from untiled ones near seams. Measured on these tiny random models with
# the default overlap over 5 seeds: 0.1% to 1% relative L2 (a misplaced tile or a wrong
# blend weight gives tens of %); the bound leaves room for other seeds.
TILED_REL_L2 = 0.03


def tiny_state_dict(version: str, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """A tiny Wan VAE with random weights initialised like the golden sets (conv weights
    N(0, gain^2/fan_in), gain 0.5 for residual.6 and attention proj; biases N(0, 0.05^2);
    gammas 1 + N(0, 0.2^2))."""
    z = 16 if version == "2.1" else 48
    cfg = VAEConfig(version=version, dim=dim, z_dim=z, dec_dim=dim if version == "2.1" else dim + dim // 2)
    with torch.device("meta"):
        shapes = build_model(cfg).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, p in shapes.items():
        if k.endswith("gamma"):
            sd[k] = 1 + 0.2 * torch.randn(p.shape, generator=g)
        elif k.endswith("bias"):
            sd[k] = 0.05 * torch.randn(p.shape, generator=g)
        else:
            gain = 0.5 if ("residual.6" in k or ".proj." in k) else 1.0
            sd[k] = torch.randn(p.shape, generator=g) * gain / p[0].numel() ** 0.5
    return sd


def smooth(shape, seed: int, noise: float) -> torch.Tensor:
    """A smooth random field plus a little noise, [C, T, H, W]."""
    g = torch.Generator().manual_seed(seed)
    c, t, h, w = shape
    coarse = torch.randn(c, t, 3, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear") + noise * torch.randn(shape, generator=g)


def rel_l2(a, ref) -> float:
    return ((a - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def vae(request):
    return runtime.load_vae(tiny_state_dict(request.param, 4, seed=7))


# --- layout and weights


@pytest.mark.parametrize("size,tile,overlap", [(60, 56, 8), (104, 56, 8), (90, 49, 8), (17, 9, 4), (33, 20, 8)])
def test_spans_cover_with_the_requested_overlap(size, tile, overlap):
    s = spans(size, tile, overlap)
    assert s[0][0] == 0 and s[-1][1] == size
    assert all(b - a <= tile for a, b in s)
    assert all(s[i][1] - s[i + 1][0] >= overlap for i in range(len(s) - 1))
    assert len(s) == max(1, -(-(size - overlap) // (tile - overlap)))


def test_tile_not_larger_than_overlap_is_refused():
    with pytest.raises(ValueError, match="larger than the overlap"):
        spans(40, 8, 8)


@pytest.mark.parametrize("tile,overlap", [((17, 24), 8), ((9, 12), 8)])  # the second: pixels in many tiles
def test_blend_weights_add_up_to_one(tile, overlap):
    plan = plan_tiles(40, 70, tile, overlap)
    assert plan.tiled and len(plan) > 4
    for all_spans, size in ((plan.spans_y, 40), (plan.spans_x, 70)):
        for scale in (1, 8):
            total = torch.zeros(size * scale)
            for i, (a, b) in enumerate(all_spans):
                total[a * scale : b * scale] += ramp_weights(all_spans, i, scale)
            assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_whole_frame_tile_is_untiled():
    assert not plan_tiles(30, 52, None, 8).tiled
    assert not plan_tiles(30, 52, (30, 60), 8).tiled


# --- tiled vs untiled


def test_tiled_decode_close_to_untiled(vae):
    """Two tiles along the width, two latent frames (so each tile's cache carries over)."""
    z = vae.config.z_dim
    latent = smooth((z, 2, 8, 16), seed=1, noise=0.3)
    whole = vae.decode_unclamped(latent, tile=False)
    tiled = vae.decode_unclamped(latent, tile=(8, 12))
    assert vae.plan("decode", *whole.shape[1:], tile=(8, 12)).tiled
    err = rel_l2(tiled, whole)
    print(f"tiled vs untiled decode, Wan {vae.config.version}: rel L2 {err:.4f}, "
          f"max abs {(tiled - whole).abs().max().item():.4f}")
    assert err < TILED_REL_L2


def test_tiled_encode_close_to_untiled(vae):
    s = vae.config.stride[1]
    video = smooth((3, 5, 8 * s, 16 * s), seed=2, noise=0.1).clamp(-1, 1)
    (whole,) = vae.encode([video], tile=False)
    (tiled,) = vae.encode([video], tile=(8, 12))
    err = rel_l2(tiled, whole)
    print(f"tiled vs untiled encode, Wan {vae.config.version}: rel L2 {err:.4f}")
    assert err < TILED_REL_L2


def test_tiles_in_both_directions():
    vae = runtime.load_vae(tiny_state_dict("2.1", 4, seed=3))
    latent = smooth((16, 2, 16, 16), seed=4, noise=0.3)
    whole = vae.decode_unclamped(latent, tile=False)
    plan = vae.plan("decode", *whole.shape[1:], tile=12)
    assert len(plan.spans_y) == len(plan.spans_x) == 2
    assert rel_l2(vae.decode_unclamped(latent, tile=12), whole) < TILED_REL_L2


def test_budget_chooses_the_tiles(vae):
    """tile=None follows vram_budget: a generous budget runs untiled (identical result),
    a tight one tiles within the budget estimate."""
    z, s = vae.config.z_dim, vae.config.stride[1]
    latent = smooth((z, 2, 8, 16), seed=5, noise=0.3)
    frames, h, w = 5, 8 * s, 16 * s
    untiled = vae.memory_bytes("decode", frames, h, w)
    vae.vram_budget = untiled
    assert not vae.plan("decode", frames, h, w).tiled
    assert torch.equal(vae.decode_unclamped(latent), vae.decode_unclamped(latent, tile=False))
    tile = (8, 12)
    vae.vram_budget = vae.memory_bytes("decode", frames, h, w, tile=tile)
    vae.overlap = DEFAULT_OVERLAP
    try:
        plan = vae.plan("decode", frames, h, w)
        assert plan.tiled and vae.memory_bytes("decode", frames, h, w, tile=plan.tile) <= vae.vram_budget
    finally:
        vae.vram_budget = None


# --- the memory estimate


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages ops create while active (views of inputs are not new), and
    the peak of their live total."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.total = self.peak = 0

    def _free(self, key: int) -> None:
        self.total -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in seen:
                    self.live[key] = storage.nbytes()
                    self.total += storage.nbytes()
                    self.peak = max(self.peak, self.total)
                    weakref.finalize(storage, self._free, key)
        return out


def live_peak(vae, op: str, x: torch.Tensor, tile) -> int:
    with torch.inference_mode(), LiveBytes() as live:
        getattr(vae, op)([x], tile=tile if tile else False)
    return live.peak


def call_size(cfg, op: str, lat: tuple[int, int, int]):
    """(frames, height, width) of a call with latent frames/height/width `lat`, and its input."""
    st, s = cfg.stride[0], cfg.stride[1]
    frames, h, w = 1 + st * (lat[0] - 1), lat[1] * s, lat[2] * s
    shape = (3, frames, h, w) if op == "encode" else (cfg.z_dim, *lat)
    return (frames, h, w), smooth(shape, seed=6, noise=0.2)


def device_part(est) -> int:
    """What a call allocates (the live-tensor count sees neither weights nor margin)."""
    return est.io + est.cache + est.activations


# The live-tensor count on the CPU has no cuDNN workspaces, which the channels-last factor
# includes (measured on an H200), so it lands a little under the estimate: at full widths
# 0.90-0.97 of it in both dtypes; tiny models, whose latent-width tensors weigh more, 0.75-0.99.
FULL_WIDTH_BOUND = (0.88, 1.0)
TINY_BOUND = (0.7, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["encode", "decode"])
@pytest.mark.parametrize("tile", [None, (8, 12)])
def test_estimate_matches_the_live_tensors(vae, op, tile, dtype):
    """Everything a call allocates (cache, activations, outputs) stays under the estimate
    without weights and margin, and not far under it, in both dtypes."""
    vae = runtime.load_vae(tiny_state_dict(vae.config.version, 4, seed=7), dtype=dtype)
    cfg = vae.config
    (frames, h, w), x = call_size(cfg, op, (3, 8, 16))
    peak = live_peak(vae, op, x, tile)
    est = memory_estimate(cfg, op, frames, h, w, tile=tile, dtype=dtype, overlap=vae.overlap, channels_last=True)
    ratio = peak / device_part(est)
    print(f"Wan {cfg.version} {op} {dtype} tile={tile}: live peak {peak} B = {ratio:.3f} of the estimate")
    assert TINY_BOUND[0] <= ratio <= TINY_BOUND[1]


@pytest.fixture(scope="module")
def full_width_21():
    """The Wan 2.1 VAE at full width (random weights); run at a small size, its memory
    per pixel is that of 832x480 (cache and activations scale with the area)."""
    return tiny_state_dict("2.1", WAN21_FULL.dim, seed=11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_estimate_matches_the_live_tensors_at_full_width(full_width_21, op, dtype):
    vae = runtime.load_vae(full_width_21, dtype=dtype)
    assert vae.config == WAN21_FULL
    (frames, h, w), x = call_size(vae.config, op, (2, 4, 8))
    peak = live_peak(vae, op, x, None)
    est = memory_estimate(vae.config, op, frames, h, w, dtype=dtype, channels_last=True)
    ratio = peak / device_part(est)
    print(f"full-width Wan 2.1 {op} {dtype}: live peak {peak / 2**20:.2f} MiB = {ratio:.3f} of the estimate")
    assert FULL_WIDTH_BOUND[0] <= ratio <= FULL_WIDTH_BOUND[1]


def test_estimate_scales_with_tile_area_and_dtype():
    kw = dict(frames=81, height=480, width=832)
    full = memory_estimate(WAN21_FULL, "decode", **kw)
    half = memory_estimate(WAN21_FULL, "decode", tile=(60, 56), **kw)
    bf16 = memory_estimate(WAN21_FULL, "decode", dtype=torch.bfloat16, **kw)
    assert half.cache < 0.6 * full.cache and half.activations < 0.6 * full.activations
    assert bf16.cache * 2 == pytest.approx(full.cache, rel=1e-6) and bf16.weights * 2 == full.weights
    assert full.weights == 4 * sum(p.numel() for p in build_model(WAN21_FULL).parameters())  # the whole VAE
    # the float32 output dominates io and does not shrink with tiles
    assert full.io >= 3 * 81 * 480 * 832 * 4 and half.io >= full.io
    ncdhw = memory_estimate(WAN21_FULL, "decode", channels_last=False, **kw)
    assert ncdhw.activations > full.activations and ncdhw.cache == full.cache


FULL = {"2.1": WAN21_FULL, "2.2": WAN22_FULL}


@pytest.mark.parametrize("version", ["2.1", "2.2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op,io", [("decode", {"output_on_device": False}), ("decode", {}),
                                   ("encode", {}), ("encode", {"input_on_device": True})])
@pytest.mark.parametrize("size,budget_gib", [((480, 832), 4), ((720, 1280), 6), ((720, 1280), 3)])
def test_auto_tiles_fit_the_budget_with_the_fewest_tiles(version, dtype, op, io, size, budget_gib):
    """The automatic choice fits the budget by the estimate; no layout with fewer tiles
    does, nor one of as many tiles with less area; untiled when the whole frame fits."""
    cfg, (h, w), budget = FULL[version], size, budget_gib << 30
    kw = dict(dtype=dtype, overlap=DEFAULT_OVERLAP, **io)

    def estimate(tile):
        return memory_estimate(cfg, op, 81, h, w, tile=tile, **kw).total

    try:
        tile = choose_tile(cfg, op, 81, h, w, budget=budget, **kw)
    except MemoryError:
        tile = "none fits"
    candidates = [(ny * nx, ny * th * nx * tw, (th, tw))
                  for ny, th in layouts(h // cfg.stride[1], DEFAULT_OVERLAP)
                  for nx, tw in layouts(w // cfg.stride[2], DEFAULT_OVERLAP)]
    fitting = sorted(c for c in candidates if estimate(None if c[0] == 1 else c[2]) <= budget)
    if not fitting:
        assert tile == "none fits"
    elif fitting[0][0] == 1:
        assert tile is None
    else:
        assert tile == fitting[0][2] and estimate(tile) <= budget


def test_choose_tile_fits_the_budget_or_says_why():
    kw = dict(frames=81, height=720, width=1280)
    budget = 6 << 30
    tile = choose_tile(WAN21_FULL, "decode", budget=budget, **kw)
    assert tile is not None
    assert memory_estimate(WAN21_FULL, "decode", tile=tile, **kw).total <= budget
    assert choose_tile(WAN21_FULL, "decode", budget=1 << 40, **kw) is None
    with pytest.raises(MemoryError, match="bfloat16"):
        choose_tile(WAN22_FULL, "decode", budget=1 << 30, **kw)


# --- where decoded frames go


def test_decode_to_host_memory_matches(vae):
    """output_device="cpu" gives the same video; the estimate then counts one time chunk
    of output instead of the video."""
    z, (st, s, _) = vae.config.z_dim, vae.config.stride
    latent = smooth((z, 2, 8, 16), seed=8, noise=0.3)
    for tile in (False, (8, 12)):
        ref = vae.decode([latent], tile=tile)[0]
        assert torch.equal(vae.decode([latent], tile=tile, output_device="cpu")[0], ref)
    frames, h, w = 1 + 2 * st, 8 * s, 16 * s
    on, off = (memory_estimate(vae.config, "decode", frames, h, w, output_on_device=o, channels_last=vae.channels_last)
               for o in (True, False))
    assert on.io - off.io == 3 * (frames - st) * h * w * 4
    assert vae.memory_bytes("decode", frames, h, w, output_on_device=False) == off.total


@pytest.mark.parametrize("tiles,overlap", [((2, 3), 8), ((3, 3), 6)])
def test_video_output_blends_tiles_into_the_whole(tiles, overlap):
    """Tile windows of a known video, weighted and written tile by tile (first touch
    copies, later tiles add), give back the video, for layouts where a tile also overlaps
    the one two places before it."""
    g = torch.Generator().manual_seed(3)
    lat_h, lat_w, scale, frames = 3 * overlap, 4 * overlap, 2, 5
    plan = plan_tiles(lat_h, lat_w, (-(-(lat_h + (tiles[0] - 1) * overlap) // tiles[0]),
                                     -(-(lat_w + (tiles[1] - 1) * overlap) // tiles[1])), overlap)
    assert (len(plan.spans_y), len(plan.spans_x)) == tiles
    video = torch.randn(3, frames, lat_h * scale, lat_w * scale, generator=g)
    out = VideoOutput(tuple(video.shape), torch.device("cpu"), torch.device("cpu"), 4, clamp=False)
    for iy, (y0, y1), ix, (x0, x1) in plan.tiles():
        w = ramp_weights(plan.spans_y, iy, scale)[:, None] * ramp_weights(plan.spans_x, ix, scale)
        rows_done = (plan.spans_y[iy - 1][1] - y0) * scale if iy else 0
        cols_done = (plan.spans_x[ix - 1][1] - x0) * scale if ix else 0
        rows, cols = slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale)
        out.begin_tile(rows, cols, w, rows_done, cols_done)
        for f in range(frames):
            out.put(f, video[:, f, rows, cols])
    assert torch.allclose(out.result(), video, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["2.1", "2.2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_estimate_bounds_the_cuda_allocator_peak(version, dtype, op):
    """What the CUDA caching allocator hands out during a call (cuDNN workspaces included)
    stays under the estimate, untiled and tiled, with the video in host memory (as the
    pipeline runs it) and on the device."""
    vae = runtime.load_vae(tiny_state_dict(version, 16, seed=9), device="cuda", dtype=dtype)
    cfg = vae.config
    st, s = cfg.stride[0], cfg.stride[1]
    frames, h, w = 1 + 4 * st, 40 * s, 64 * s
    shape = (3, frames, h, w) if op == "encode" else (cfg.z_dim, 5, 40, 64)
    x = smooth(shape, seed=10, noise=0.2)
    for on_device in (False, True):
        xs = x.cuda() if on_device else x
        kw = {} if op == "encode" else {"output_device": "cuda" if on_device else "cpu"}
        io = {"input_on_device": on_device} if op == "encode" else {"output_on_device": on_device}
        for tile in (None, (32, 32)):
            getattr(vae, op)([xs], tile=tile or False, **kw)  # warm-up: cuDNN picks its algorithms
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() - (xs.numel() * 4 if on_device else 0)
            getattr(vae, op)([xs], tile=tile or False, **kw)
            peak = torch.cuda.max_memory_allocated() - base
            est = memory_estimate(cfg, op, frames, h, w, tile=tile, dtype=dtype, overlap=vae.overlap, **io)
            print(f"Wan {version} {op} {dtype} tile={tile} on device {on_device}: CUDA peak {peak / 2**20:.1f} MiB, "
                  f"estimate {(est.total - est.weights) / 2**20:.1f} MiB")
            assert peak <= est.total - est.weights


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_video_through_pinned_buffers_is_exact(dtype):
    """Decoding into host memory (chunks staged through page-locked buffers) gives the
    device result bit for bit, untiled and tiled; encoding a host video (frames fed the
    same way) gives the result of encoding it from device memory."""
    vae = runtime.load_vae(tiny_state_dict("2.1", 8, seed=12), device="cuda", dtype=dtype)
    latent = smooth((16, 4, 24, 40), seed=13, noise=0.3).cuda()
    for tile in (False, (16, 24)):
        ref = vae.decode([latent], tile=tile)[0]
        host = vae.decode([latent], tile=tile, output_device="cpu")[0]
        assert host.device.type == "cpu" and torch.equal(host, ref.cpu())
    video = smooth((3, 13, 24 * 8, 40 * 8), seed=14, noise=0.1).clamp(-1, 1)
    for tile in (False, (16, 24)):
        assert torch.equal(vae.encode([video], tile=tile)[0], vae.encode([video.cuda()], tile=tile)[0])

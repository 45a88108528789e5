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
from runtime.vae_tiling import (DEFAULT_OVERLAP, choose_tile, memory_estimate, plan_tiles, ramp_weights,
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


def test_blend_weights_add_up_to_one():
    plan = plan_tiles(40, 70, (17, 24), 8)
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


@pytest.mark.parametrize("op", ["encode", "decode"])
@pytest.mark.parametrize("tile", [None, (8, 12)])
def test_estimate_bounds_the_live_tensors(vae, op, tile):
    """Everything a call allocates (cache, activations, outputs) stays under the estimate
    without its weights and margin, and the estimate is not wildly pessimistic."""
    cfg = vae.config
    st, s = cfg.stride[0], cfg.stride[1]
    frames, h, w = 1 + 2 * st, 8 * s, 16 * s
    shape = (3, frames, h, w) if op == "encode" else (cfg.z_dim, 3, 8, 16)
    x = smooth(shape, seed=6, noise=0.2)
    with torch.inference_mode(), LiveBytes() as live:
        getattr(vae, op)([x], tile=tile if tile else False)
    est = memory_estimate(cfg, op, frames, h, w, tile=tile, overlap=vae.overlap)
    bound = est.io + est.cache + est.activations
    print(f"Wan {cfg.version} {op} tile={tile}: live peak {live.peak} B, estimate {bound} B")
    assert live.peak <= bound
    assert live.peak >= 0.35 * bound


def test_estimate_scales_with_tile_area_and_dtype():
    kw = dict(frames=81, height=480, width=832)
    full = memory_estimate(WAN21_FULL, "decode", **kw)
    half = memory_estimate(WAN21_FULL, "decode", tile=(60, 56), **kw)
    bf16 = memory_estimate(WAN21_FULL, "decode", dtype=torch.bfloat16, **kw)
    assert half.cache < 0.6 * full.cache and half.activations < 0.6 * full.activations
    assert bf16.cache * 2 == pytest.approx(full.cache, rel=1e-6) and bf16.weights * 2 == full.weights
    # the float32 output dominates io and does not shrink with tiles
    assert full.io >= 3 * 81 * 480 * 832 * 4 and half.io >= full.io


def test_choose_tile_fits_the_budget_or_says_why():
    kw = dict(frames=81, height=720, width=1280)
    budget = 6 << 30
    tile = choose_tile(WAN21_FULL, "decode", budget=budget, **kw)
    assert tile is not None
    assert memory_estimate(WAN21_FULL, "decode", tile=tile, **kw).total <= budget
    assert choose_tile(WAN21_FULL, "decode", budget=1 << 40, **kw) is None
    with pytest.raises(MemoryError, match="bfloat16"):
        choose_tile(WAN22_FULL, "decode", budget=1 << 30, **kw)


def test_decode_to_host_memory_matches(vae):
    """output_device="cpu" (frames leave the device one by one) gives the same video, and
    the estimate then leaves the output out."""
    z, s = vae.config.z_dim, vae.config.stride[1]
    latent = smooth((z, 2, 8, 16), seed=8, noise=0.3)
    for tile in (False, (8, 12)):
        ref = vae.decode([latent], tile=tile)[0]
        assert torch.equal(vae.decode([latent], tile=tile, output_device="cpu")[0], ref)
    on = vae.memory_bytes("decode", 5, 8 * s, 16 * s)
    off = vae.memory_bytes("decode", 5, 8 * s, 16 * s, output_on_device=False)
    assert on - off >= 3 * 5 * 8 * s * 16 * s * 4


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["2.1", "2.2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_estimate_bounds_the_cuda_allocator_peak(version, dtype, op):
    """What the CUDA caching allocator hands out during a call (cuDNN workspaces included)
    stays under the estimate, untiled and tiled."""
    vae = runtime.load_vae(tiny_state_dict(version, 16, seed=9), device="cuda", dtype=dtype)
    cfg = vae.config
    st, s = cfg.stride[0], cfg.stride[1]
    frames, h, w = 1 + 4 * st, 40 * s, 64 * s
    shape = (3, frames, h, w) if op == "encode" else (cfg.z_dim, 5, 40, 64)
    x = smooth(shape, seed=10, noise=0.2).cuda()
    for tile in (None, (32, 32)):
        getattr(vae, op)([x], tile=tile or False)  # warm-up: cuDNN picks its algorithms
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        getattr(vae, op)([x], tile=tile or False)
        peak = torch.cuda.max_memory_allocated() - base
        est = memory_estimate(cfg, op, frames, h, w, tile=tile, dtype=dtype, overlap=vae.overlap)
        print(f"Wan {version} {op} {dtype} tile={tile}: CUDA peak {peak / 2**20:.1f} MiB, "
              f"estimate {(est.total - est.weights) / 2**20:.1f} MiB")
        assert peak <= est.total - est.weights

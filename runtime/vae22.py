"""Wan 2.2 VAE (`WanVAE_` of the official `wan/modules/vae2_2.py`): z 48, stride 4x16x16.

Differences from Wan 2.1 (`vae21`):
- pixels are patchified 2x2 before the encoder (3 -> 12 channels, channel 4c + 2r + q
  for pixel (2h + q, 2w + r)) and unpatchified after the decoder;
- every encoder stage is residual around its downsampling: main path (residual blocks,
  resample) plus `AvgDown3D` of the stage input (zero frame in front to an even count,
  then channel groups x 2 frames x 2 x 2 pixels averaged); the last stage adds its input;
- every decoder stage but the last is residual around its upsampling: main path plus
  `DupUp3D` of the stage input (channels repeated into 2 frames x 2 x 2 pixels; the
  first chunk drops its first frame); upsample convs keep the channel count;
- decoder widths come from `dec_dim`: 4 dec_dim at the bottom down to dec_dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vae_blocks import (CausalConv3d, CausalVAE, Decoder, Encoder, FeatureCache, Resample, ResidualBlock, VAEConfig,
                         head, middle, run_blocks, set_level)

WAN22_FULL = VAEConfig(version="2.2", dim=160, z_dim=48, dec_dim=256)
PATCH = 2


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] -> [B, 12, T, H/2, W/2]; channel 4c + 2r + q holds pixel (2h+q, 2w+r)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH)  # b c t h q w r
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, t, h // PATCH, w // PATCH)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // (PATCH * PATCH), PATCH, PATCH, t, h, w)  # b c r q t h w
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c // (PATCH * PATCH), t, h * PATCH, w * PATCH)


def avg_down(x: torch.Tensor, out_channels: int, ft: int, fs: int) -> torch.Tensor:
    """AvgDown3D: [B, C, T, H, W] -> [B, out, ceil(T/ft), H/fs, W/fs]. Channel c, offsets
    (a, p, q) become expanded channel c*ft*fs*fs + (a*fs + p)*fs + q; consecutive groups
    of C*ft*fs*fs/out expanded channels are averaged."""
    pad = (ft - x.shape[2] % ft) % ft
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    group = c * ft * fs * fs // out_channels
    return x.reshape(b, out_channels, group, t // ft, h // fs, w // fs).mean(dim=2)


def dup_up(x: torch.Tensor, out_channels: int, ft: int, fs: int, first_chunk: bool) -> torch.Tensor:
    """DupUp3D: each input channel repeated, then expanded channel o*ft*fs*fs + (a*fs + p)*fs + q
    becomes output channel o at frame offset a and pixel offset (p, q); the first chunk
    drops its first ft - 1 frames."""
    b, c, t, h, w = x.shape
    repeats = out_channels * ft * fs * fs // c
    x = x.repeat_interleave(repeats, dim=1).reshape(b, out_channels, ft, fs, fs, t, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, out_channels, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1 :] if first_chunk else x


def keep_stage_inputs(stages) -> None:
    """Each stage holds its input until its shortcut is added at the end; record the
    input's elements per latent pixel for the memory estimate."""
    for stage in stages:
        stage.kept_input = stage.d_in * stage.level_frames * stage.level_px


class DownStage(nn.Module):
    """`Down_ResidualBlock`: residual blocks + resample, plus the AvgDown3D shortcut."""

    def __init__(self, d_in: int, d_out: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.d_in, self.d_out, self.ft, self.fs = d_in, d_out, 2 if temporal else 1, 2 if down else 1
        blocks: list[nn.Module] = []
        for _ in range(num_res_blocks):
            blocks.append(ResidualBlock(d_in, d_out))
            d_in = d_out
        if down:
            blocks.append(Resample(d_out, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        shortcut = avg_down(x, self.d_out, self.ft, self.fs)
        return run_blocks(self.downsamples, x, cache).add_(shortcut)


class UpStage(nn.Module):
    """`Up_ResidualBlock`: residual blocks + resample, plus the DupUp3D shortcut when the
    stage upsamples."""

    def __init__(self, d_in: int, d_out: int, num_res_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.d_in, self.d_out, self.ft, self.up = d_in, d_out, 2 if temporal else 1, up
        blocks: list[nn.Module] = []
        for _ in range(num_res_blocks):
            blocks.append(ResidualBlock(d_in, d_out))
            d_in = d_out
        if up:
            blocks.append(Resample(d_out, "upsample3d" if temporal else "upsample2d", out_dim=d_out))
        self.upsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        main = run_blocks(self.upsamples, x, cache)
        if not self.up:
            return main
        return main.add_(dup_up(x, self.d_out, self.ft, 2, cache.first_chunk))


class Encoder22(Encoder):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        side = 2**last
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, dims[0], 3, padding=1)
        set_level(self.conv1, side * side, 1)
        stages: list[nn.Module] = []
        self.frame_stages = None
        frames = 1
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = cfg.temporal_downsample[i] if i < len(cfg.temporal_downsample) else False
            down = i != last
            if temporal and down and self.frame_stages is None:
                self.frame_stages, frames = len(stages), 4
            stages.append(DownStage(d_in, d_out, cfg.num_res_blocks, temporal and down, down))
            set_level(stages[-1], side * side, frames)
            if down:
                side //= 2
                frames = max(frames // 2, 1) if temporal else frames
        if self.frame_stages is None:
            self.frame_stages = len(stages)
        self.downsamples = nn.ModuleList(stages)
        keep_stage_inputs(stages)
        self.middle = middle(dims[-1])
        self.head = head(dims[-1], 2 * cfg.z_dim)
        set_level(self.middle, 1, frames)
        set_level(self.head, 1, frames)


class Decoder22(Decoder):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dec_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = middle(dims[0])
        set_level(self.conv1, 1, 1)
        set_level(self.middle, 1, 1)
        stages: list[nn.Module] = []
        self.frame_stages = 0
        px, frames = 1, 1
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = cfg.temporal_upsample[i] if i < len(cfg.temporal_upsample) else False
            up = i != last
            stages.append(UpStage(d_in, d_out, cfg.num_res_blocks + 1, temporal and up, up))
            set_level(stages[-1], px, frames)
            if up:
                px *= 4
                if temporal:
                    frames *= 2
                    self.frame_stages = len(stages)
        self.upsamples = nn.ModuleList(stages)
        self.head = head(dims[-1], 3 * PATCH * PATCH)
        self.set_frame_levels(px)
        keep_stage_inputs(stages)


class WanVAE22(CausalVAE):
    def __init__(self, cfg: VAEConfig):
        assert cfg.version == "2.2"
        super().__init__(cfg, Encoder22, Decoder22)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x)

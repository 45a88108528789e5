"""Wan 2.1 VAE (`WanVAE_` of the official `wan/modules/vae2_1.py`): z 16, stride 4x8x8.

Encoder: conv1 3 -> dim; stages of residual blocks at widths dim x [1, 2, 4, 4], each but
the last ending in a 2x spatial downsample (with a 2x temporal one where
`temporal_downsample` says so); middle (residual, attention, residual); head (norm, SiLU,
conv -> 2z). Decoder: conv1 z -> 4 dim; middle; stages at widths dim x [4, 4, 2, 1] of
num_res_blocks + 1 residual blocks, each but the last ending in a 2x upsample whose conv
halves the channels; head -> 3.

Time: see `vae_blocks`. Memory: the stages that run at the full frame rate (the encoder
before its first temporal downsample, the decoder after its last temporal upsample) take
one frame at a time; the cache makes that exact, and it cuts their activations 4x.
"""
from __future__ import annotations

from torch import nn

from .vae_blocks import (CausalConv3d, CausalVAE, Decoder, Encoder, Resample, ResidualBlock, VAEConfig, head, middle,
                         set_level)

WAN21_FULL = VAEConfig(version="2.1", dim=96, z_dim=16, dec_dim=96)


class Encoder21(Encoder):
    def __init__(self, cfg: VAEConfig, in_channels: int = 3):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        side = 2**last  # pixels per latent pixel along one side, at the stage input
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1)
        set_level(self.conv1, side * side, 1)
        blocks: list[nn.Module] = []
        self.frame_stages = None  # blocks[:frame_stages] run one frame at a time
        frames = 1
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(d_in, d_out))
                set_level(blocks[-1], side * side, frames)
                d_in = d_out
            if i != last:
                temporal = cfg.temporal_downsample[i]
                if temporal and self.frame_stages is None:
                    self.frame_stages, frames = len(blocks), 4
                blocks.append(Resample(d_out, "downsample3d" if temporal else "downsample2d"))
                set_level(blocks[-1], side * side, frames)
                side //= 2
                frames = max(frames // 2, 1) if temporal else frames
        if self.frame_stages is None:
            self.frame_stages = len(blocks)
        self.downsamples = nn.ModuleList(blocks)
        self.middle = middle(dims[-1])
        self.head = head(dims[-1], 2 * cfg.z_dim)
        set_level(self.middle, 1, frames)
        set_level(self.head, 1, frames)


class Decoder21(Decoder):
    def __init__(self, cfg: VAEConfig, out_channels: int = 3):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = middle(dims[0])
        set_level(self.conv1, 1, 1)
        set_level(self.middle, 1, 1)
        blocks: list[nn.Module] = []
        self.frame_stages = 0  # blocks[frame_stages:] and the head run one frame at a time
        px, frames = 1, 1
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                d_in //= 2  # the previous upsample conv halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(d_in, d_out))
                set_level(blocks[-1], px, frames)
                d_in = d_out
            if i != last:
                temporal = cfg.temporal_upsample[i]
                blocks.append(Resample(d_out, "upsample3d" if temporal else "upsample2d", out_dim=d_out // 2))
                set_level(blocks[-1], px, frames)
                px *= 4
                if temporal:
                    frames *= 2
                    self.frame_stages = len(blocks)
        self.upsamples = nn.ModuleList(blocks)
        self.head = head(dims[-1], out_channels)
        self.set_frame_levels(px)


class WanVAE21(CausalVAE):
    def __init__(self, cfg: VAEConfig):
        assert cfg.version == "2.1"
        super().__init__(cfg, Encoder21, Decoder21)

"""Building blocks shared by the Wan 2.1 and Wan 2.2 VAEs.

Time is processed causally in chunks (the official walk: encoder chunks of frames [0],
[1..4], [5..8], ...; the decoder one latent frame at a time). Every causal conv with a
temporal kernel of 3 sees, in front of its chunk, the last 2 input frames of the previous
chunk (zeros before the first), kept in a `FeatureCache`. This makes chunking exact: the
result equals causal convs over the whole sequence. Two rules break that symmetry on
purpose and are copied from the official code: the first chunk skips the temporal conv of
a temporal downsample (its frame is passed through) and of a temporal upsample (frame 0
is not doubled, and later frames see zeros instead of it).

The module and parameter names are the official ones, so an official state dict loads
with `load_state_dict(strict=True)`.

Memory: conv inputs are built once, in one buffer holding [history, chunk] along time;
producers (norm + SiLU) write straight into it, so there is no separate concat or pad copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .vae_frames import FrameFeeder


@dataclass(frozen=True)
class VAEConfig:
    """Hyperparameters of a Wan VAE (`WanVAE_` in the official code).

    version "2.1": z 16, dim 96, decoder width = dim, upsample convs halve channels.
    version "2.2": z 48, dim 160, dec_dim 256, 2x2 patchify, residual shortcuts around
    every down/upsampling stage, upsample convs keep channels.
    """

    version: str
    dim: int
    z_dim: int
    dec_dim: int
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def patch_size(self) -> int:
        return 2 if self.version == "2.2" else 1

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return tuple(reversed(self.temporal_downsample))

    @property
    def stride(self) -> tuple[int, int, int]:
        """(time, height, width) pixels per latent pixel."""
        t = 2 ** sum(self.temporal_downsample)
        s = 2 ** (len(self.dim_mult) - 1) * self.patch_size
        return (t, s, s)


class FeatureCache:
    """Per-module history carried from one time chunk to the next (one per encode or
    decode call, and one per spatial tile). `first_chunk` is True until the driver has
    finished the first chunk."""

    def __init__(self, memory_format: torch.memory_format = torch.contiguous_format):
        self.memory_format = memory_format
        self.first_chunk = True
        self._frames: dict[nn.Module, torch.Tensor] = {}

    def get(self, module: nn.Module) -> torch.Tensor | None:
        return self._frames.get(module)

    def put(self, module: nn.Module, frames: torch.Tensor) -> None:
        """Keep a copy of `frames` (usually a view into a transient buffer)."""
        old = self._frames.get(module)
        if old is not None and old.shape == frames.shape:
            old.copy_(frames)  # reuse the slot: no allocation churn between chunks
        else:
            self._frames[module] = frames.clone(memory_format=self.memory_format)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._frames.values())


def new_activation(ref: torch.Tensor, channels: int, frames: int, height: int, width: int,
                   memory_format: torch.memory_format) -> torch.Tensor:
    return torch.empty((ref.shape[0], channels, frames, height, width), dtype=ref.dtype,
                       device=ref.device, memory_format=memory_format)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded on the left in time only (2*p_t frames of history or zeros) and
    symmetrically in space. `kernel 1` convs (shortcuts, the latent 1x1x1 convs) need no
    history."""

    def __init__(self, in_dim: int, out_dim: int, kernel, stride=1, padding=0):
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=padding)
        self.history = 2 * self.padding[0]
        self.padding = (0, self.padding[1], self.padding[2])

    def input_buffer(self, x_like: torch.Tensor, frames: int, cache: FeatureCache):
        """A buffer [B, C_in, history + frames, H, W] whose first frames hold the cached
        history (zeros in the first chunk), and the view where the chunk goes."""
        h, w = x_like.shape[3], x_like.shape[4]
        buf = new_activation(x_like, self.in_channels, self.history + frames, h, w, cache.memory_format)
        prev = cache.get(self)
        if prev is None:
            buf[:, :, : self.history].zero_()
        else:
            buf[:, :, : self.history].copy_(prev)
        return buf, buf[:, :, self.history :]

    def run(self, buf: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """Convolve a filled `input_buffer` and keep its last frames as the next history."""
        cache.put(self, buf[:, :, -self.history :])
        return self._conv_forward(buf, self.weight, self.bias)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        if self.history == 0:
            return self._conv_forward(x, self.weight, self.bias)
        buf, body = self.input_buffer(x, x.shape[2], cache)
        body.copy_(x)
        return self.run(buf, cache)


class RMSNorm(nn.Module):
    """`F.normalize(x, dim=channels) * sqrt(C) * gamma`: L2 over channels (eps 1e-12 on
    the norm), not mean-centred, no bias. `images` gives gamma the official [C, 1, 1]
    shape (attention blocks) instead of [C, 1, 1, 1]."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)  # [B, 1, ...]
        out = torch.div(x, norm, out=out) if out is not None else x / norm
        gamma = self.gamma.view(-1, *([1] * (x.dim() - 2)))
        out.mul_(gamma * self.scale)
        if silu:
            F.silu(out, inplace=True)
        return out


class ResidualBlock(nn.Module):
    """x + (norm, SiLU, conv3, norm, SiLU, conv3)(x); a 1x1x1 conv shortcut when the width
    changes. Official names: residual.{0,2,3,6}, shortcut."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.ModuleDict({
            "0": RMSNorm(in_dim),
            "2": CausalConv3d(in_dim, out_dim, 3, padding=1),
            "3": RMSNorm(out_dim),
            "6": CausalConv3d(out_dim, out_dim, 3, padding=1),
        })
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        r = self.residual
        h = self.shortcut(x) if self.shortcut is not None else x
        buf, body = r["2"].input_buffer(x, x.shape[2], cache)
        r["0"](x, out=body, silu=True)
        y = r["2"].run(buf, cache)
        del buf, body
        buf, body = r["6"].input_buffer(y, y.shape[2], cache)
        r["3"](y, out=body, silu=True)
        del y
        return r["6"].run(buf, cache).add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately (no
    attention across frames), after an RMS norm; scale 1/sqrt(C); residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        out = torch.empty_like(x)
        for i in range(t):
            frame = x[:, :, i]  # [B, C, H, W]
            qkv = self.to_qkv(self.norm(frame))  # [B, 3C, H, W]
            qkv = qkv.flatten(2).transpose(1, 2).contiguous()  # [B, HW, 3C]
            q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # [B, 1, HW, C] each
            a = F.scaled_dot_product_attention(q, k, v)
            del qkv, q, k, v
            a = a.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
            out[:, :, i] = self.proj(a).add_(frame)
        return out


class Resample(nn.Module):
    """Spatial 2x down/upsampling per frame, with an optional temporal 2x step.

    downsample: zero-pad right/bottom by 1, 3x3 conv stride 2 (`resample.1`); 3-D adds
      `time_conv` (kernel 3, stride 2, no padding) over [last frame of the previous
      chunk, chunk]; the first chunk is passed through.
    upsample: nearest-exact 2x then 3x3 conv (`resample.1`, C -> out_dim); 3-D first runs
      `time_conv` (causal, C -> 2C) whose two halves become two frames; the first chunk
      skips it and leaves zeros as the history of the next chunk.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        assert mode in ("upsample2d", "upsample3d", "downsample2d", "downsample3d")
        self.mode = mode
        self.dim = dim
        if mode.startswith("up"):
            self.out_dim = dim if out_dim is None else out_dim
            self.resample = nn.ModuleDict({"1": nn.Conv2d(dim, self.out_dim, 3, padding=1)})
        else:
            self.out_dim = dim
            self.resample = nn.ModuleDict({"1": nn.Conv2d(dim, dim, 3, stride=2)})
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            self.time_conv = None

    def _spatial(self, frames: list[torch.Tensor], like: torch.Tensor, fmt) -> torch.Tensor:
        """Apply the per-frame spatial step to each [B, C, H, W] frame; one output tensor."""
        conv = self.resample["1"]
        b, _, h, w = frames[0].shape
        up = self.mode.startswith("up")
        oh, ow = (2 * h, 2 * w) if up else ((h - 2) // 2 + 1, (w - 2) // 2 + 1)
        out = new_activation(like, self.out_dim, len(frames), oh, ow, fmt)
        for i, f in enumerate(frames):
            if up:
                f = F.interpolate(f, scale_factor=2.0, mode="nearest-exact")
            else:
                f = F.pad(f, (0, 1, 0, 1))
            out[:, :, i] = conv(f)
        return out

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        fmt = cache.memory_format
        t = x.shape[2]
        if self.mode == "upsample3d" and not cache.first_chunk:
            y = self.time_conv(x, cache)  # [B, 2C, T, H, W]; frame 2i from [0, C), 2i+1 from [C, 2C)
            c = self.dim
            frames = [y[:, s * c : (s + 1) * c, i] for i in range(t) for s in (0, 1)]
            out = self._spatial(frames, x, fmt)
            del y, frames
            return out
        out = self._spatial([x[:, :, i] for i in range(t)], x, fmt)
        if self.mode == "downsample3d":
            last = out[:, :, -1:]
            if not cache.first_chunk:
                tc = self.time_conv
                buf = new_activation(out, out.shape[1], t + 1, out.shape[3], out.shape[4], fmt)
                buf[:, :, :1].copy_(cache.get(tc))
                buf[:, :, 1:].copy_(out)
                cache.put(tc, last)
                return tc(buf)  # windows (0,1,2), (2,3,4), ... of the whole sequence
            cache.put(self.time_conv, last)
        return out


def head(in_dim: int, out_dim: int) -> nn.ModuleDict:
    """The output head: official nn.Sequential(RMS_norm, SiLU, CausalConv3d), parameters at
    indices 0 and 2."""
    return nn.ModuleDict({"0": RMSNorm(in_dim), "2": CausalConv3d(in_dim, out_dim, 3, padding=1)})


def middle(dim: int) -> nn.ModuleList:
    """The middle of encoder and decoder: residual, attention, residual."""
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def run_head(head: nn.ModuleDict, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    buf, body = head["2"].input_buffer(x, x.shape[2], cache)
    head["0"](x, out=body, silu=True)
    return head["2"].run(buf, cache)


def run_blocks(blocks, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    for block in blocks:
        x = block(x, cache)
    return x


def encoder_local(enc: nn.Module, frame, frames: int, cache: FeatureCache) -> torch.Tensor:
    """The spatially local part of one encoder chunk of `frames` frames, `frame(t)` giving
    frame t as [1, C, 1, H, W] on the device -> features [1, C', 1, h, w] at the latent
    resolution. `conv1` and the stages before the first temporal downsample
    (`downsamples[:frame_stages]`) take one frame at a time into a buffer; the rest takes
    the whole chunk."""
    per_frame = enc.downsamples[: enc.frame_stages]
    buf = None
    for t in range(frames):
        y = run_blocks(per_frame, enc.conv1(frame(t), cache), cache)
        if buf is None:
            buf = new_activation(y, y.shape[1], frames, y.shape[3], y.shape[4], cache.memory_format)
        buf[:, :, t : t + 1] = y
        del y
    return run_blocks(enc.downsamples[enc.frame_stages :], buf, cache)


def encoder_global(enc: nn.Module, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    """The rest of the chunk, which sees the whole frame (the middle attention): features
    -> [1, 2z, 1, h, w]."""
    return run_head(enc.head, run_blocks(enc.middle, x, cache), cache)


def decoder_middle(dec: nn.Module, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    """`conv1` and the middle (whose attention sees the whole frame) of one latent frame
    [1, z, 1, h, w] -> features [1, C, 1, h, w]."""
    return run_blocks(dec.middle, dec.conv1(x, cache), cache)


def decoder_upsample(dec: nn.Module, x: torch.Tensor, cache: FeatureCache) -> Iterator[torch.Tensor]:
    """Middle features of one latent frame [1, C, 1, h, w] (the whole frame or a window of
    it: these stages are local) -> its output frames [1, C', 1, H, W], one at a time. The
    stages after the last temporal upsample (`upsamples[frame_stages:]`) and the head take
    one frame at a time."""
    x = run_blocks(dec.upsamples[: dec.frame_stages], x, cache)
    tail = dec.upsamples[dec.frame_stages :]
    for t in range(x.shape[2]):
        yield run_head(dec.head, run_blocks(tail, x[:, :, t : t + 1], cache), cache)


def decoder_frames(dec: nn.Module, x: torch.Tensor, cache: FeatureCache) -> Iterator[torch.Tensor]:
    """One latent frame [1, z, 1, h, w] -> its output frames [1, C, 1, H, W], one at a time."""
    return decoder_upsample(dec, decoder_middle(dec, x, cache), cache)


class Encoder(nn.Module):
    """What both versions' encoders are: `conv1`, `downsamples` (the first `frame_stages`
    of them take one frame at a time), `middle` and `head`."""

    frame_stages: int

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """One chunk [1, C, T, H, W] on the device -> [1, 2z, 1, h, w]."""
        local = encoder_local(self, lambda t: x[:, :, t : t + 1], x.shape[2], cache)
        return encoder_global(self, local, cache)


class Decoder(nn.Module):
    """What both versions' decoders are: `conv1`, `middle`, `upsamples` (those from
    `frame_stages` on take one frame at a time) and `head`."""

    frame_stages: int

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> Iterator[torch.Tensor]:
        return decoder_frames(self, x, cache)

    def set_frame_levels(self, px: float) -> None:
        """Record that the stages after the last temporal upsample, and the head (at `px`
        pixels per latent pixel), take one frame at a time."""
        for stage in self.upsamples[self.frame_stages :]:
            for m in stage.modules():
                m.level_frames = 1
        set_level(self.head, px, 1)


def conv_weight_format(model: nn.Module, memory_format: torch.memory_format) -> None:
    """Lay conv weights out in the activations' memory format (cuDNN picks kernels by it)."""
    if memory_format == torch.contiguous_format:
        return
    for p in model.parameters():
        if p.dim() == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
        elif p.dim() == 4 and p.shape[1] > 1:
            p.data = p.data.contiguous(memory_format=torch.channels_last)


def activation_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def set_level(module: nn.Module, px: float, frames: int) -> None:
    """Record where a block runs: `px` pixels per latent pixel at its input and `frames`
    per step. Only the memory estimate reads these."""
    for m in module.modules():
        m.level_px, m.level_frames = px, frames


def working_set_per_latent_px(parts) -> tuple[float, float, float]:
    """(cache elements, largest activation elements, largest input a stage keeps alive)
    per latent pixel for a steady-state chunk of the modules `parts`, from the widths and
    levels of their blocks (a stage that adds a shortcut of its input at its end sets
    `kept_input`, elements per latent pixel)."""
    cache = 0.0
    largest = 0.0
    kept = 0.0
    for m in (m for part in parts for m in part.modules()):
        kept = max(kept, getattr(m, "kept_input", 0.0))
        px, t = getattr(m, "level_px", None), getattr(m, "level_frames", None)
        if px is None:
            continue
        if isinstance(m, CausalConv3d):
            cache += m.history * m.in_channels * px
            largest = max(largest, (t + m.history) * m.in_channels * px, t * m.out_channels * px)
        elif isinstance(m, Resample):
            up = m.mode.startswith("up")
            px_out = px * 4 if up else px / 4
            t_out = {"upsample3d": 2 * t, "downsample3d": max(t // 2, 1)}.get(m.mode, t)
            if m.mode == "downsample3d":
                cache += m.dim * px_out  # one frame of history
            largest = max(largest, t_out * m.out_dim * px_out, m.dim * px_out)
    return cache, largest, kept


class CausalVAE(nn.Module):
    """The causal chunk walk through time, shared by both versions: `encoder`, `conv1`
    (1x1x1, 2z -> 2z), `conv2` (1x1x1, z -> z) and `decoder`. Subclasses give the
    encoder and decoder of their version and may patchify the pixels."""

    def __init__(self, cfg: VAEConfig, encoder: Callable[[VAEConfig], Encoder],
                 decoder: Callable[[VAEConfig], Decoder]):
        super().__init__()
        self.config = cfg
        self.encoder = encoder(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = decoder(cfg)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode_chunks(self, video: torch.Tensor, cache: FeatureCache, local_only: bool = False
                      ) -> Iterator[tuple[int, torch.Tensor]]:
        """video [3, F, H, W] (any device, F = 1 + 4k) -> (latent frame i, mu [z, h, w]).
        Chunks of frames [0], [1..4], [5..8], ... give one latent frame each. With
        `local_only`, yields the features before the middle instead (see `encode_global`)."""
        w = self.conv1.weight
        feed = FrameFeeder(video, w.device, w.dtype)  # one frame moves to the device at a time

        def frame(t: int) -> torch.Tensor:
            return self.patchify(feed(t)).contiguous(memory_format=cache.memory_format)

        n_latent = 1 + (video.shape[1] - 1) // 4
        for i in range(n_latent):
            first = 0 if i == 0 else 1 + 4 * (i - 1)
            x = encoder_local(self.encoder, lambda t: frame(first + t), 1 if i == 0 else 4, cache)
            x = x[0, :, 0]
            if not local_only:
                x = self.encode_global(x, cache)
            cache.first_chunk = False
            yield i, x

    def encode_global(self, features: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """Features [C, h, w] of one chunk (from `encode_chunks(local_only=True)`) -> mu
        [z, h, w]. conv1 is 1x1x1, so it runs per chunk; only the mu half is used."""
        x = features[None, :, None].contiguous(memory_format=cache.memory_format)
        out = encoder_global(self.encoder, x, cache)
        z = self.config.z_dim
        return F.conv3d(out, self.conv1.weight[:z], self.conv1.bias[:z])[0, :, 0]

    def decoder_input(self, latent: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """De-normalised latent [z, T, h, w] in the compute dtype on the device -> conv2 of
        it, [1, z, T, h, w] (1x1x1: all frames at once)."""
        return self.conv2(latent.unsqueeze(0).contiguous(memory_format=cache.memory_format))

    def decode_frames(self, latent: torch.Tensor, cache: FeatureCache) -> Iterator[tuple[int, torch.Tensor]]:
        """latent [z, T, h, w] (see `decoder_input`) -> (frame index, pixels [3, H, W]);
        latent frame 0 gives 1 frame, each later one 4."""
        x = self.decoder_input(latent, cache)
        index = 0
        for i in range(x.shape[2]):
            for frame in self.decoder(x[:, :, i : i + 1], cache):
                yield index, self.unpatchify(frame)[0, :, 0]
                index += 1
            cache.first_chunk = False

    def decode_middle(self, latent: torch.Tensor, cache: FeatureCache) -> Iterator[tuple[int, torch.Tensor]]:
        """The part of `decode_frames` that sees the whole frame: latent [z, T, h, w] ->
        (latent frame i, middle features [1, C, 1, h, w]), for `decode_window`."""
        x = self.decoder_input(latent, cache)
        for i in range(x.shape[2]):
            yield i, decoder_middle(self.decoder, x[:, :, i : i + 1], cache)

    def decode_window(self, features: torch.Tensor, cache: FeatureCache) -> Iterator[tuple[int, torch.Tensor]]:
        """The rest of `decode_frames`, spatially local: middle features [1, C, T, h, w] of
        all latent frames (a window of them for a tile) -> (frame index, pixels [3, H, W])."""
        index = 0
        for i in range(features.shape[2]):
            for frame in decoder_upsample(self.decoder, features[:, :, i : i + 1], cache):
                yield index, self.unpatchify(frame)[0, :, 0]
                index += 1
            cache.first_chunk = False

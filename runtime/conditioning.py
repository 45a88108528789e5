"""The image condition `y` of the I2V experts: a frame mask and the VAE latent of the
conditioning video, y = cat([mask (4), latent (16)]) = [20, F_lat, lat_h, lat_w].

Image-to-video (official wan/image2video.py, `WanI2V.generate`):
    video = [image, 0, 0, ..., 0]                  [3, F, h, w], F = 4n + 1
    mask  = 1 on pixel frame 0, 0 on the others, with frame 0 repeated 4 times in front
            (F + 3 frames), viewed [F_lat, 4, lat_h, lat_w] and transposed: channel k of
            latent frame j stands for pixel frame 4j + k - 3.

First and last frame (FLF2V; not in the Wan 2.2 code, which has no FLF2V path; as Wan 2.1
does it in wan/first_last_frame2video.py of github.com/Wan-Video/Wan2.1 @ c8a66f3, and
diffusers' WanImageToVideoPipeline.prepare_latents with `last_image`):
    video = [first, 0, ..., 0, last]
    mask  = 1 on pixel frames 0 and F - 1: latent frame 0 all ones, and in the last latent
            frame only channel 3 (pixel frame F - 1) is one.
The Wan 2.1 code sizes its mask for 81 frames whatever F is; here it follows F.

The whole conditioning video goes through the VAE in one call, as the official code does:
the causal encoder sees the zero frames, so encoding the image alone would give a
different latent frame 0.
"""
from __future__ import annotations

import torch

TIME_STRIDE = 4  # pixel frames per latent frame after the first (Wan 2.1 VAE)


def latent_frames(frames: int) -> int:
    """F_lat = (F - 1) / 4 + 1 for a frame count F = 4n + 1."""
    if frames < 1 or (frames - 1) % TIME_STRIDE:
        raise ValueError(f"frames must be 4n + 1, got {frames}")
    return (frames - 1) // TIME_STRIDE + 1


def frame_mask(frames: int, lat_h: int, lat_w: int, *, last_frame: bool = False,
               device=None) -> torch.Tensor:
    """[4, F_lat, lat_h, lat_w] float32: which pixel frames the condition fixes."""
    f_lat = latent_frames(frames)
    known = torch.zeros(frames, dtype=torch.float32)
    known[0] = 1
    if last_frame:
        known[-1] = 1
    # Frame 0 repeated 4 times in front: pixel frames grouped 4 per latent frame.
    padded = torch.cat([known[:1].expand(TIME_STRIDE - 1), known])  # [F + 3]
    per_latent = padded.view(f_lat, TIME_STRIDE).t()  # [4, F_lat]
    return per_latent[:, :, None, None].expand(-1, -1, lat_h, lat_w).to(device).contiguous()


def condition_video(first: torch.Tensor, frames: int, last: torch.Tensor | None = None) -> torch.Tensor:
    """[3, F, h, w]: `first` ([3, h, w], resized, in [-1, 1]) as frame 0, `last` (same size)
    as frame F - 1 when given, zeros elsewhere."""
    if first.dim() != 3 or first.shape[0] != 3:
        raise ValueError(f"the first frame must be [3, h, w], got {list(first.shape)}")
    if last is not None and last.shape != first.shape:
        raise ValueError(f"the last frame has shape {list(last.shape)}, the first {list(first.shape)}; "
                         "both must be resized to the video size")
    if last is not None and frames < 1 + TIME_STRIDE:
        raise ValueError(f"a last frame needs a video of at least {1 + TIME_STRIDE} frames, got {frames}")
    video = first.new_zeros((3, frames, *first.shape[1:]), dtype=torch.float32)
    video[:, 0] = first
    if last is not None:
        video[:, -1] = last
    return video


def image_condition(vae, first: torch.Tensor, frames: int, last: torch.Tensor | None = None,
                    *, device=None) -> torch.Tensor:
    """y = cat([mask, vae.encode([video])[0]]): [20, F_lat, lat_h, lat_w] float32 on `device`
    (the VAE's device when None)."""
    video = condition_video(first, frames, last)
    latent = vae.encode([video])[0]  # [16, F_lat, lat_h, lat_w]
    device = latent.device if device is None else device
    _, _, lat_h, lat_w = latent.shape
    mask = frame_mask(frames, lat_h, lat_w, last_frame=last is not None, device=device)
    return torch.cat([mask, latent.to(device=device, dtype=torch.float32)])

"""Video frames on their way between host memory and the device.

Input (encode): a video in host memory moves to the device one frame at a time through
two page-locked buffers (`FrameFeeder`), so each copy runs without stalling the GPU.

Output (decode): the video is float32 [3, F, H, W] on the device or in host memory
(`VideoOutput`). On its way to host memory a time chunk (the frames of one latent frame)
is gathered on the device, copied into one of two page-locked buffers without waiting,
and moved into the video once the next chunk has been queued, so the GPU keeps working
while the host copies; the device holds one chunk of one tile, never the video.

Tiles are blended with weights that add up to one across overlaps (`vae_tiling.
ramp_weights`), so no weight sum is kept: each pixel's first tile copies its weighted
value and later tiles add theirs. Tiles come in row-major order, so the pixels of a tile
that earlier tiles touched are the rows the previous tile row reached and, below them, the
columns the previous tile of this row reached.
"""
from __future__ import annotations

from collections import deque

import torch


class FrameFeeder:
    """`feeder(t)`: frame t of a video [C, F, H, W] as [1, C, 1, H, W] on `device` in
    `dtype`. From host memory to a GPU the frame is first copied into one of two
    page-locked buffers (waiting only for that buffer's previous transfer), then sent
    without blocking."""

    def __init__(self, video: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.video, self.device, self.dtype = video, device, dtype
        self.staged = video.device.type == "cpu" and device.type == "cuda"
        self._pinned: list[torch.Tensor] = []
        self._sent: list[torch.cuda.Event | None] = [None, None]

    def __call__(self, t: int) -> torch.Tensor:
        frame = self.video[None, :, t : t + 1]
        if not self.staged:
            return frame.to(device=self.device, dtype=self.dtype)
        if not self._pinned:
            self._pinned = [torch.empty(frame.shape, dtype=frame.dtype, pin_memory=True) for _ in range(2)]
        slot = t % 2
        if self._sent[slot] is not None:
            self._sent[slot].synchronize()
        self._pinned[slot].copy_(frame)
        x = self._pinned[slot].to(self.device, non_blocking=True)
        self._sent[slot] = torch.cuda.Event()
        self._sent[slot].record()
        return x.to(self.dtype)


def blend(dst: torch.Tensor, src: torch.Tensor, rows_done: int, cols_done: int) -> None:
    """Blend a tile's weighted values `src` into `dst` (same shape, [..., h, w]): the first
    `rows_done` rows, and the first `cols_done` columns of the rows below them, were
    written by earlier tiles (add); the rest is new (copy)."""
    dst[..., rows_done:, cols_done:].copy_(src[..., rows_done:, cols_done:])
    if rows_done:
        dst[..., :rows_done, :].add_(src[..., :rows_done, :])
    if cols_done:
        dst[..., rows_done:, :cols_done].add_(src[..., rows_done:, :cols_done])


class VideoOutput:
    """The decoded video, written frame by frame, tile by tile.

    `frames_per_chunk`: output frames of each latent frame after the first (which gives
    one). `clamp`: clamp to [-1, 1] like the official wrapper (per frame when untiled,
    after blending when tiled)."""

    def __init__(self, shape: tuple[int, int, int, int], device: torch.device, compute_device: torch.device,
                 frames_per_chunk: int, clamp: bool):
        self.device = device
        self.compute_device = compute_device
        self.frames_per_chunk = frames_per_chunk
        self.clamp = clamp
        self.staged = device.type == "cpu" and compute_device.type == "cuda"
        # Every pixel is written before it is read (copied by its first tile), so no zeros;
        # host memory for the staged path comes from pinned buffers, not from the device.
        self.video = torch.empty(shape, dtype=torch.float32, device=device)
        self.tiled = False
        self._region = None
        self._chunk: torch.Tensor | None = None  # device-side frames of the current chunk
        self._pinned: list[torch.Tensor] = []
        self._pending: deque = deque()

    def begin_tile(self, rows: slice, cols: slice, weight: torch.Tensor | None, rows_done: int = 0,
                   cols_done: int = 0) -> None:
        """The next tile covers output pixels [rows, cols]; `weight` [h, w] (float32, on the
        compute device) or None when the tile is the whole frame."""
        self.tiled = self.tiled or weight is not None
        self._region = (rows, cols, weight, rows_done, cols_done)
        if self.staged:
            h, w = rows.stop - rows.start, cols.stop - cols.start
            shape = (3, self.frames_per_chunk, h, w)
            if self._chunk is None or self._chunk.shape != shape:
                self.drain()
                self._chunk = torch.empty(shape, dtype=torch.float32, device=self.compute_device)
                self._pinned = [torch.empty(shape, dtype=torch.float32, pin_memory=True) for _ in range(2)]

    def put(self, index: int, pixels: torch.Tensor) -> None:
        """Frame `index` of the current tile, pixels [3, h, w] on the compute device."""
        rows, cols, weight, rows_done, cols_done = self._region
        if not self.staged:
            dst = self.video[:, index, rows, cols]
            if weight is None:
                dst.copy_(pixels)
                if self.clamp:
                    dst.clamp_(-1, 1)
            else:
                blend(dst, (pixels * weight).to(self.device), rows_done, cols_done)
            return
        first = 0 if index == 0 else index - (index - 1) % self.frames_per_chunk  # chunk's first frame
        slot = self._chunk[:, index - first]
        if weight is None:
            slot.copy_(pixels)
            if self.clamp:
                slot.clamp_(-1, 1)
        else:
            torch.mul(pixels, weight, out=slot)
        if index == 0 or (index - first) == self.frames_per_chunk - 1:  # the chunk is complete
            self._send(first, index + 1 - first)

    def _send(self, first: int, n: int) -> None:
        busy = {id(p[1]) for p in self._pending}
        pinned = next(p for p in self._pinned if id(p) not in busy)
        pinned[:, :n].copy_(self._chunk[:, :n], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._pending.append((done, pinned, first, n, self._region))
        while len(self._pending) > 1:  # the previous chunk: copied while this one computes
            self._receive()

    def _receive(self) -> None:
        done, pinned, first, n, (rows, cols, _, rows_done, cols_done) = self._pending.popleft()
        done.synchronize()
        blend(self.video[:, first : first + n, rows, cols], pinned[:, :n], rows_done, cols_done)

    def drain(self) -> None:
        while self._pending:
            self._receive()

    def result(self) -> torch.Tensor:
        self.drain()
        if self.clamp and self.tiled:
            self.video.clamp_(-1, 1)
        return self.video

"""Wan's 3-axis rotary position embedding, in float64 as the official code computes it.

A head of size d holds c = d/2 complex pairs, adjacent channels (2i, 2i+1) read as
(real, imag). The pairs are split [c - 2(c//3), c//3, c//3] between the frame, height
and width axes (22/21/21 for d = 128); each axis has its own table of angles
p / 10000^(2j/n) (n = 2 x its pair count, p = 0..1023), and a token at grid position
(f, h, w) is rotated by [frame row f | height row h | width row w].
"""
from __future__ import annotations

import torch

MAX_POSITIONS = 1024  # rows of each axis table (the official rope_params(1024, ...))


def rope_pairs(head_dim: int) -> tuple[int, int, int]:
    c = head_dim // 2
    return (c - 2 * (c // 3), c // 3, c // 3)


def axis_angles(n_pairs: int, max_positions: int = MAX_POSITIONS) -> torch.Tensor:
    """float64 [max_positions, n_pairs]: angle(p, j) = p / 10000^(2j / (2 n_pairs))."""
    n = 2 * n_pairs
    inv_freq = 1.0 / torch.pow(10000, torch.arange(0, n, 2, dtype=torch.float64).div(n))
    return torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)


class RopeTable:
    """cos/sin of the three axis tables side by side, float64 [MAX_POSITIONS, c]."""

    def __init__(self, head_dim: int, device: torch.device | str = "cpu"):
        self.head_dim = head_dim
        self.pairs = rope_pairs(head_dim)
        angles = torch.cat([axis_angles(n) for n in self.pairs], dim=1)
        # torch.polar on the CPU, as the official table is made (its cos/sin can differ
        # from torch.cos/torch.sin in the last bit).
        unit = torch.polar(torch.ones_like(angles), angles)
        self.cos = unit.real.contiguous().to(device)
        self.sin = unit.imag.contiguous().to(device)

    def complex(self) -> torch.Tensor:
        """The table as the official model keeps it: complex128 [MAX_POSITIONS, c]."""
        return torch.complex(self.cos, self.sin)

    def for_grid(self, f: int, h: int, w: int) -> torch.Tensor:
        """complex128 [f*h*w, c]: the rotation of each token of an (f, h, w) grid (w fastest)."""
        if max(f, h, w) > MAX_POSITIONS:
            raise ValueError(f"a latent grid of {f}x{h}x{w} patches exceeds the {MAX_POSITIONS} rope positions")
        a, b, _ = self.pairs
        table = self.complex()
        grid = torch.cat(
            [
                table[:f, :a].view(f, 1, 1, -1).expand(f, h, w, -1),
                table[:h, a : a + b].view(1, h, 1, -1).expand(f, h, w, -1),
                table[:w, a + b :].view(1, 1, w, -1).expand(f, h, w, -1),
            ],
            dim=-1,
        )
        return grid.reshape(f * h * w, -1)


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [L, N, d] (any float dtype) times the rotations freqs (complex128 [L, d/2]) in
    float64, as the official rope_apply; returns float32."""
    L, n, d = x.shape
    pairs = torch.view_as_complex(x.to(torch.float64).view(L, n, d // 2, 2))
    return torch.view_as_real(pairs * freqs[:, None, :]).view(L, n, d).float()

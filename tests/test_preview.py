"""Latent previews: the linear channel -> RGB map for both Wan latent spaces."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.preview import RGB_FACTORS, latent_to_rgb


@pytest.mark.parametrize("channels", sorted(RGB_FACTORS))
def test_linear_map_per_pixel(channels):
    factors, bias = RGB_FACTORS[channels]
    assert len(factors) == channels and all(len(row) == 3 for row in factors) and len(bias) == 3
    g = torch.Generator().manual_seed(channels)
    latent = torch.randn(channels, 3, 4, 5, generator=g) * 2
    out = latent_to_rgb(latent)
    assert out.shape == (3, 4, 5, 3) and out.dtype == np.uint8
    for f, y, x in [(0, 0, 0), (1, 2, 3), (2, 3, 4)]:
        for c in range(3):
            value = sum(float(latent[k, f, y, x]) * factors[k][c] for k in range(channels)) + bias[c]
            want = int(min(max((value + 1) / 2, 0.0), 1.0) * 255)
            assert abs(int(out[f, y, x, c]) - want) <= 1  # float32 vs float64 sum at a boundary


def test_zero_latent_shows_the_bias_and_batch_and_scale():
    _, bias = RGB_FACTORS[16]
    out = latent_to_rgb(torch.zeros(1, 16, 2, 3, 3), scale=4)
    assert out.shape == (2, 12, 12, 3)
    want = [int((b + 1) / 2 * 255) for b in bias]
    assert (out.reshape(-1, 3) == np.array(want, np.uint8)).all()
    extreme = latent_to_rgb(torch.full((16, 1, 1, 1), 1e6))
    assert set(extreme.ravel().tolist()) <= {0, 255}


def test_bad_inputs():
    with pytest.raises(ValueError, match="C in"):
        latent_to_rgb(torch.zeros(4, 1, 2, 2))
    with pytest.raises(ValueError, match="scale"):
        latent_to_rgb(torch.zeros(16, 1, 2, 2), scale=0)

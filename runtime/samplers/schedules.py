"""Noise schedules of the flow-matching samplers: which sigmas, which timesteps.

Flow matching: x_sigma = (1 - sigma) * x0 + sigma * noise, sigma from 1 (noise) to 0 (data);
the model sees t = 1000 * sigma. Every schedule here has `steps` timesteps and `steps + 1`
float32 sigmas whose last entry is 0.

The official Wan 2.2 code builds the UniPC and DPM++ schedules in float64 NumPy and only
then rounds (sigmas to float32, timesteps truncated to int64), so NumPy is used here the
same way: a last-bit difference in a float64 linspace can move a truncated timestep by one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000

# The official schedulers are constructed over 1000 training sigmas 1 - linspace(1, 1/1000)
# reversed, stored in float32; UniPC's inference schedule starts at the largest of them.
UNIPC_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


@dataclass(frozen=True)
class Schedule:
    timesteps: torch.Tensor  # [steps], what the model sees (int64, or float32 for Euler)
    sigmas: torch.Tensor  # [steps + 1] float32, last entry 0

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The flow shift s' = shift * s / (1 + (shift - 1) * s) (more time at high noise)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _check(steps: int, shift: float) -> None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not np.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a positive number, got {shift!r} (Wan 2.2 I2V uses 5.0)")


def _finish(shifted: np.ndarray, timestep_dtype: torch.dtype) -> Schedule:
    # shifted: float64 [steps]; timesteps from the float64 values, sigmas rounded after.
    sigmas = torch.from_numpy(np.concatenate([shifted, [0.0]]).astype(np.float32))
    if timestep_dtype == torch.int64:
        timesteps = torch.from_numpy(shifted * NUM_TRAIN_TIMESTEPS).to(torch.int64)  # truncates
    else:
        timesteps = sigmas[:-1] * NUM_TRAIN_TIMESTEPS
    return Schedule(timesteps=timesteps, sigmas=sigmas)


def unipc_schedule(steps: int, shift: float) -> Schedule:
    """Official UniPC schedule: linspace(float32(0.999), 0, steps + 1) without its last
    point, shifted, then a final 0; int64-truncated timesteps (40 steps, shift 5 start at 999)."""
    _check(steps, shift)
    base = np.linspace(UNIPC_SIGMA_MAX, 0.0, steps + 1)[:-1]
    return _finish(shift_sigmas(base, shift), torch.int64)


def dpmpp_schedule(steps: int, shift: float) -> Schedule:
    """Official DPM++ schedule (`get_sampling_sigmas`): linspace(1, 0, steps + 1) without its
    last point, shifted, then a final 0; int64-truncated timesteps starting at 1000."""
    _check(steps, shift)
    base = np.linspace(1.0, 0.0, steps + 1)[:steps]
    return _finish(shift_sigmas(base, shift), torch.int64)


def euler_schedule(steps: int, shift: float) -> Schedule:
    """Few-step (distilled) schedule: sigmas = shift(linspace(1, 0, steps + 1)), float
    timesteps 1000 * sigma passed to the model as they are.

    At 4 steps and shift 5 this is the LightX2V / Lightning schedule
    [1, 0.9375, 0.8333, 0.625, 0] with t = [1000, 937.5, 833.33, 625]: LightX2V picks its
    sigmas from a 1000-point linspace at t in [1000, 750, 500, 250], ComfyUI's `simple`
    scheduler from its 1000 shifted training sigmas; both land on these points whenever
    `steps` divides 1000."""
    _check(steps, shift)
    base = np.linspace(1.0, 0.0, steps + 1)[:steps]
    return _finish(shift_sigmas(base, shift), torch.float32)

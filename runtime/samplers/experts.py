"""Which Wan 2.2 expert denoises which step, and with which guide scale.

Official rule (wan/image2video.py): the high-noise expert takes every step whose timestep
t >= boundary * 1000 (boundary 0.9 for I2V-A14B, 0.875 for T2V-A14B), the low-noise expert
the rest. Timesteps fall monotonically, so the switch happens once. Guide scales come as a
pair in the official order (low, high): guide_scale[1] for the high-noise expert.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .schedules import NUM_TRAIN_TIMESTEPS

HIGH_NOISE = "high_noise"
LOW_NOISE = "low_noise"

GuideScale = Union[float, Sequence[float]]


def expert_for_timestep(t: float | int | torch.Tensor, boundary: float) -> str:
    """HIGH_NOISE if t >= boundary * 1000 else LOW_NOISE (float or integer t alike)."""
    return HIGH_NOISE if float(t) >= boundary * NUM_TRAIN_TIMESTEPS else LOW_NOISE


def expert_schedule(timesteps: Sequence | torch.Tensor, boundary: float) -> list[str]:
    """The expert of every step of a schedule."""
    return [expert_for_timestep(t, boundary) for t in timesteps]


def switch_step(timesteps: Sequence | torch.Tensor, boundary: float) -> int:
    """Index of the first low-noise step (len(timesteps) if the high-noise expert does all)."""
    experts = expert_schedule(timesteps, boundary)
    return experts.index(LOW_NOISE) if LOW_NOISE in experts else len(experts)


def guide_scale_for(expert: str, guide_scale: GuideScale) -> float:
    """The guide scale of an expert; a single number applies to both, a pair is (low, high)."""
    if isinstance(guide_scale, (int, float)):
        return float(guide_scale)
    low, high = guide_scale  # official tuple order
    if expert == HIGH_NOISE:
        return float(high)
    if expert == LOW_NOISE:
        return float(low)
    raise ValueError(f"unknown expert {expert!r}; expected {HIGH_NOISE!r} or {LOW_NOISE!r}")

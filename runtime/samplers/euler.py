"""Euler on the flow: x' = x + (sigma' - sigma) * v. The sampler of the few-step distilled
recipes (LightX2V / Lightning 4-step: shift 5, no CFG), with float timesteps 1000 * sigma.
The official Wan 2.2 code has no Euler solver; this one follows LightX2V and ComfyUI."""
from __future__ import annotations

import torch

from .base import FlowSampler
from .schedules import euler_schedule


class EulerSampler(FlowSampler):
    name = "euler"

    def __init__(self, steps: int, shift: float):
        super().__init__(euler_schedule(steps, shift), shift)

    def _step(self, v: torch.Tensor, k: int, x: torch.Tensor) -> torch.Tensor:
        self.orders.append(1)
        return x + (self.sigmas[k + 1] - self.sigmas[k]) * v

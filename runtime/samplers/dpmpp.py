"""DPM-Solver++ 2M for flow matching (official `FlowDPMSolverMultistepScheduler`:
"dpmsolver++", midpoint, solver_order 2, final sigma 0).

DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095), multistep second order. With
alpha = 1 - sigma, lambda = log(alpha / sigma) and h = lambda_next - lambda_now:

    order 1:  x' = (sigma'/sigma) x - alpha' (e^-h - 1) x0_k
    order 2:  x' = (sigma'/sigma) x - alpha' (e^-h - 1) (x0_k + 0.5 D1),
              D1 = (x0_k - x0_{k-1}) / r,  r = (lambda_k - lambda_{k-1}) / h

Order 1 at the first step (no history) and at the last (sigma' = 0: lambda' = +inf,
e^-inf = 0, so x' = x0_k), order 2 in between.
"""
from __future__ import annotations

import torch

from .base import FlowSampler, log_snr
from .schedules import dpmpp_schedule


class DPMPPSampler(FlowSampler):
    name = "dpm++"

    def __init__(self, steps: int, shift: float):
        super().__init__(dpmpp_schedule(steps, shift), shift)

    def reset(self) -> None:
        super().reset()
        self._x0: list[torch.Tensor] = []  # the last two data predictions, newest last

    def _step(self, v: torch.Tensor, k: int, x: torch.Tensor) -> torch.Tensor:
        s, s_next = self.sigmas[k], self.sigmas[k + 1]
        x0 = x - s * v
        self._x0 = (self._x0 + [x0])[-2:]
        order = 1 if k == 0 or k == self.steps - 1 else 2
        self.orders.append(order)

        lam = log_snr(s)
        h = log_snr(s_next) - lam
        coef = (1 - s_next) * (torch.exp(-h) - 1.0)
        x_next = s_next / s * x - coef * x0
        if order == 2:
            r = (lam - log_snr(self.sigmas[k - 1])) / h
            d1 = (1.0 / r) * (x0 - self._x0[-2])
            x_next = x_next - 0.5 * coef * d1
        return x_next

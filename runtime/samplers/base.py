"""What every sampler shares: its schedule, the step bookkeeping, the flow-matching algebra.

A sampler is used as

    sampler = make_sampler("unipc", steps=40, shift=5.0)
    for k, t in enumerate(sampler.timesteps):
        v = model(x, t)                      # flow prediction noise - x0
        x = sampler.step(v, k, x)

Step k must follow step k - 1; step 0 starts a new run (so does `reset()`). Steps are
indexed explicitly: the official schedulers find their first index by timestep value and,
when the first two int64 timesteps coincide (UniPC at shift 20 with 54+ steps: 999, 999),
start one step late and fail at the end; here such schedules simply run.
All arithmetic is float32, the coefficients are 0-dim float32 tensors as in the official
solvers, so results agree with them to the last bits.
"""
from __future__ import annotations

import torch

from .schedules import Schedule


def log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha) - log(sigma) with alpha = 1 - sigma; +inf at sigma = 0, which the
    solvers' last step relies on (exp(-inf) = 0, expm1(-inf) = -1)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class FlowSampler:
    """Base class: holds the schedule and checks that steps come in order."""

    name = "flow"

    def __init__(self, schedule: Schedule, shift: float):
        self.schedule = schedule
        self.shift = float(shift)
        self.reset()

    @property
    def timesteps(self) -> torch.Tensor:
        """[steps] what the model sees at each step."""
        return self.schedule.timesteps

    @property
    def sigmas(self) -> torch.Tensor:
        """[steps + 1] float32 noise levels, the last one 0."""
        return self.schedule.sigmas

    @property
    def steps(self) -> int:
        return self.schedule.steps

    def reset(self) -> None:
        """Forget every earlier step; the next call must be step 0."""
        self._next_index = 0
        self.orders: list[int] = []  # solver order used at each step of this run

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """Advance `sample` from sigmas[step_index] to sigmas[step_index + 1] given the
        model's flow prediction at that step; returns the new float32 sample."""
        step_index = int(step_index)
        if step_index == 0:
            self.reset()
        if step_index != self._next_index:
            raise ValueError(
                f"{self.name}: step {step_index} requested but step {self._next_index} is next; "
                "steps must run in order 0..steps-1 (call reset() or start again at step 0)")
        if step_index >= self.steps:
            raise ValueError(f"{self.name}: step {step_index} is past the last step "
                             f"({self.steps - 1}) of this {self.steps}-step schedule")
        if model_output.shape != sample.shape:
            raise ValueError(f"{self.name}: model_output shape {tuple(model_output.shape)} "
                             f"differs from sample shape {tuple(sample.shape)}")
        out = self._step(model_output.float(), step_index, sample.float())
        self._next_index = step_index + 1
        return out

    def denoised(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """The data estimate x0 = x - sigma * v at a step (e.g. for a preview)."""
        return sample.float() - self.sigmas[int(step_index)] * model_output.float()

    def _step(self, v: torch.Tensor, k: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, shift={self.shift})"

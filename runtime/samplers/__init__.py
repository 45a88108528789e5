"""Flow-matching samplers for Wan 2.2: UniPC (official default), DPM++ 2M, Euler (few-step).

`make_sampler(name, steps, shift)` returns an object with `.timesteps` (what the model
sees), `.sigmas` (float32, steps + 1, last 0), `.step(model_output, step_index, sample)`
and `.reset()`. Expert choice and guide scales per step live in `experts`, named recipes
in `presets`.
"""
from __future__ import annotations

from .base import FlowSampler
from .dpmpp import DPMPPSampler
from .euler import EulerSampler
from .experts import (HIGH_NOISE, LOW_NOISE, expert_for_timestep, expert_schedule,
                      guide_scale_for, switch_step)
from .presets import PRESETS, SamplingPreset, get_preset
from .schedules import (Schedule, dpmpp_schedule, euler_schedule, shift_sigmas,
                        unipc_schedule)
from .unipc import UniPCSampler

SAMPLERS = {
    "unipc": UniPCSampler,
    "dpm++": DPMPPSampler,
    "euler": EulerSampler,
}
_ALIASES = {"dpmpp": "dpm++", "dpm++2m": "dpm++", "dpmpp_2m": "dpm++", "uni_pc": "unipc"}


def make_sampler(name: str, steps: int, shift: float) -> FlowSampler:
    """A fresh sampler: "unipc" (default of the official code), "dpm++" or "euler"."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[key](steps, shift)


__all__ = [
    "FlowSampler", "UniPCSampler", "DPMPPSampler", "EulerSampler", "SAMPLERS", "make_sampler",
    "Schedule", "unipc_schedule", "dpmpp_schedule", "euler_schedule", "shift_sigmas",
    "HIGH_NOISE", "LOW_NOISE", "expert_for_timestep", "expert_schedule", "switch_step",
    "guide_scale_for", "PRESETS", "SamplingPreset", "get_preset",
]

"""Named sampling recipes: the official Wan 2.2 I2V defaults and the LightX2V 4-step one."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingPreset:
    name: str
    sampler: str  # a name make_sampler knows
    steps: int
    shift: float
    guide_scale: tuple[float, float]  # (low-noise expert, high-noise expert), official order
    boundary: float  # high-noise expert while t >= boundary * 1000

    @property
    def uses_cfg(self) -> bool:
        """Guide scale 1 means no unconditional pass is needed."""
        return any(g != 1.0 for g in self.guide_scale)


PRESETS = {
    # wan/configs/wan_i2v_A14B.py + generate.py defaults for --task i2v-A14B.
    "default": SamplingPreset("default", "unipc", 40, 5.0, (3.5, 3.5), 0.9),
    # LightX2V / Lightning distilled LoRAs: Euler, 4 steps, shift 5, no CFG; the official
    # 0.9 boundary gives their 2 high-noise + 2 low-noise split.
    "lightx2v-4step": SamplingPreset("lightx2v-4step", "euler", 4, 5.0, (1.0, 1.0), 0.9),
}


def get_preset(name: str) -> SamplingPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown sampling preset {name!r}; known: {', '.join(PRESETS)}") from None

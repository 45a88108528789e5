"""What the user asks for -> LoraSpecs; LoRA files read against a model's own names.

Reading itself (every naming, the alpha rules, the report) lives in quant.lora_file so
that the converter can bake LoRAs without the runtime; this is its runtime edge."""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from torch import nn

from quant.lora_file import LoraError, LoraFile, LoraSpec, check_lora_file, parse_lora_arg, read_lora

from .keys import model_tensor_shapes

# One LoRA as a caller may give it (see `as_spec`).
LoraLike = LoraSpec | str | os.PathLike | tuple


def as_spec(value: LoraLike) -> LoraSpec:
    """A LoraSpec from a LoraSpec, a CLI string `[high=|low=|both=]PATH[:STRENGTH]`, a Path
    (strength 1, both experts), or a tuple (path, strength[, expert])."""
    if isinstance(value, LoraSpec):
        return value
    if isinstance(value, str):
        return parse_lora_arg(value)
    if isinstance(value, os.PathLike):
        return LoraSpec(value)
    if isinstance(value, tuple) and 1 <= len(value) <= 3:
        return LoraSpec(*value)
    raise LoraError(f"a LoRA is given as LoraSpec(path, strength, expert), 'high=PATH:STRENGTH' or "
                    f"(path, strength[, expert]); got {value!r}")


def as_specs(loras: Iterable[LoraLike] | LoraLike | None) -> list[LoraSpec]:
    """One LoRA or several (each as `as_spec` takes it) -> a list of LoraSpecs."""
    if loras is None:
        return []
    single = isinstance(loras, (LoraSpec, str, os.PathLike)) or (
        isinstance(loras, tuple) and len(loras) in (2, 3) and isinstance(loras[1], (int, float)))
    return [as_spec(loras)] if single else [as_spec(v) for v in loras]


def check_loras(loras) -> list[LoraSpec]:
    """The specs, every file checked (exists, safetensors header readable) before any
    model is loaded; all problems named at once."""
    specs = as_specs(loras)
    problems = []
    for spec in specs:
        try:
            check_lora_file(spec.path)
        except LoraError as e:
            problems.append(str(e))
    if problems:
        raise LoraError("; ".join(problems))
    return specs


def loras_for(specs: Sequence[LoraSpec], expert: str | None) -> list[LoraSpec]:
    """The specs that go on `expert` ("high", "low"; None: all)."""
    return [s for s in specs if s.applies_to(expert)]


def load_lora(path, model: nn.Module) -> LoraFile:
    """The LoRA at `path`, its keys resolved against `model`'s own tensor names."""
    return read_lora(path, model_tensor_shapes(model))

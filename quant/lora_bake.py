"""Merge LoRAs into a checkpoint while it is converted, for people who always use the
same ones:

    python -m quant.convert high_noise_model/ high-q8_0.gguf --type q8_0 --lora lightx2v_high.safetensors:1.0

Each weight is patched in float32 before it is typed and quantized: W + Σ strength ·
alpha/rank · up @ down (float32 product), and the dense patches (norms, biases,
modulation, head) as base + Σ strength · diff summed in float64, rounded once: the same
arithmetic the runtime uses, so a baked F32 file equals the runtime's application.
A LoRA that names an expert (`high=...`, `low=...`) is baked only into that expert.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .checkpoint import open_checkpoint
from .lora_file import Diff, LoraError, LoraFile, LoraSpec, LowRank, merge_dense, parse_lora_arg, read_lora

_EXPERT_OF_CHECKPOINT = {"high_noise": "high", "low_noise": "low"}


class LoraBake:
    """A convert weight hook: `hook(name, x float32) -> x` with the LoRAs merged in."""

    def __init__(self, loras: Sequence[tuple[LoraFile, float]], notes: Sequence[str] = ()):
        self.loras = list(loras)
        self.notes = list(notes)
        self.low_rank: dict[str, list[tuple[LowRank, float]]] = {}
        self.dense: dict[str, list[tuple[Diff, float]]] = {}
        for lora, strength in self.loras:
            for p in lora.low_rank:
                self.low_rank.setdefault(p.target, []).append((p, strength))
            for d in lora.diffs:
                self.dense.setdefault(d.target, []).append((d, strength))

    @property
    def targets(self) -> set[str]:
        return set(self.low_rank) | set(self.dense)

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        patches = self.low_rank.get(name)
        if patches:
            x = x.to(torch.float32).clone()
            for p, strength in patches:
                x += p.delta(strength)
        dense = self.dense.get(name)
        if dense:
            x = merge_dense(x, dense)
        return x


def bake_hook(source, loras: Sequence[str | LoraSpec], *, expert: str | None = None) -> LoraBake:
    """The hook that merges `loras` (`[EXPERT=]PATH[:STRENGTH]` strings or LoraSpecs) into
    the checkpoint `source`; every file is read and checked against the checkpoint's own
    tensor names now, before anything is written. `expert` ("high_noise" / "low_noise",
    None: from the checkpoint) picks the LoRAs meant for this expert."""
    specs = [s if isinstance(s, LoraSpec) else parse_lora_arg(s) for s in loras]
    with open_checkpoint(source) as ckpt:
        shapes = {n: tuple(ckpt.info(n).shape) for n in ckpt.names()}
        known = expert if expert not in (None, "none") else ckpt.expert
    this = _EXPERT_OF_CHECKPOINT.get(known) if known else None
    chosen, notes = [], []
    for spec in specs:
        if spec.expert != "both":
            if this is None:
                raise LoraError(f"LoRA {spec} is for the {spec.expert}-noise expert, but {source} is not marked as "
                                "either expert; pass --expert high_noise or --expert low_noise")
            if spec.expert != this:
                notes.append(f"LoRA {spec.path} is for the {spec.expert}-noise expert: not baked into this "
                             f"{this}-noise expert")
                continue
        chosen.append((read_lora(spec.path, shapes), spec.strength))
    for lora, strength in chosen:
        notes.append(f"baking LoRA {lora.report.summary()}, strength {strength:g}")
        notes.extend(lora.report.messages())
    return LoraBake(chosen, notes)

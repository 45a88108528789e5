"""Put LoRAs on one expert, take them off, choose how they run.

    state = apply_loras(model, ["high=lightx2v_high.safetensors:1.0"], expert="high")
    ...                                  # forwards now include the LoRA
    remove_loras(model)                  # the exact base weights again

Low-rank patches never touch the stored (quantized) weights: each linear gets its
factors as buffers (`QLinear.set_lora`) and applies them per call, merged into the
freshly decoded weight or as a side path (runtime/qlinear.py). Dense patches (`.diff`
on norms, `head.head`, modulation tables, biases) have no low-rank form: their targets
are small, so the patched value is computed once per expert (float64 sum, rounded once
to float32) and put in place of the tensor, whose original object is kept and put back
by `remove_loras`, so removing or changing LoRAs never drifts.

Applying the same LoRAs again is free (the state remembers what is applied); another set
first restores the base. Every file is read and checked before the model is changed.

For a streaming engine: the factors are buffers of their block, so a layout built after
`apply_loras` carries them; a module whose tensor was replaced by a dense patch names it
in `module.lora_patched` (a frozenset of attribute names): that value is in memory only
and must not be read from the checkpoint file. Layouts must be rebuilt when LoRAs change.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from quant.lora_file import Diff, LoraError, LoraReport, LoraSpec, LowRank, merge_dense
from quant.packed import PackedTensor

from ..qlinear import FP8_TYPES, LORA_MODES, QLinear
from .keys import linear_of, owner
from .load import as_specs, load_lora, loras_for


@dataclass
class AppliedLoras:
    """What is on a model: `model.lora_state` (None when nothing is)."""

    key: tuple  # identity of the files and strengths applied
    specs: tuple[LoraSpec, ...]
    reports: tuple[LoraReport, ...]
    mode: str
    linears: tuple[str, ...]  # weights of the linears that carry factors
    merged: tuple[str, ...]  # tensors replaced by their patched value (dense patches)
    originals: dict = field(default_factory=dict, repr=False)  # name -> what remove_loras puts back


def lora_state(model: nn.Module) -> AppliedLoras | None:
    return getattr(model, "lora_state", None)


def apply_loras(
    model: nn.Module,
    loras,
    *,
    expert: str | None = None,
    mode: str = "auto",
    log: Callable[[str], None] | None = None,
) -> AppliedLoras | None:
    """Put on `model` the LoRAs of `loras` (LoraSpecs, 'high=PATH:1.0' strings, paths or
    (path, strength[, expert]) tuples) meant for `expert` ("high" / "low"; None: all),
    replacing whatever was on it. `mode`: "auto", "merge" or "side" (QLinear.lora_merges).
    Skipped keys and warnings go to `log`, else to warnings.warn."""
    if mode not in LORA_MODES:
        raise LoraError(f"LoRA mode {mode!r}: expected one of {', '.join(LORA_MODES)}")
    specs = loras_for(as_specs(loras), expert)
    key = tuple(_identity(s) for s in specs)
    state = lora_state(model)
    if state is not None and state.key == key:
        set_lora_mode(model, mode)
        return state
    if state is None and not specs:
        return None
    files = [load_lora(s.path, model) for s in specs]  # all read and checked before any change
    remove_loras(model)
    if not specs:
        return None

    low_rank: dict[str, list[tuple[LowRank, float]]] = {}
    dense: dict[str, list[tuple[Diff, float]]] = {}
    for spec, lora in zip(specs, files):
        for p in lora.low_rank:
            low_rank.setdefault(p.target, []).append((p, spec.strength))
        for d in lora.diffs:
            dense.setdefault(d.target, []).append((d, spec.strength))

    originals: dict[str, object] = {}
    for target, patches in low_rank.items():
        _set_factors(linear_of(model, target), patches, mode)
    for target, patches in dense.items():
        originals[target] = _merge_dense_patch(model, target, patches)

    state = AppliedLoras(key, tuple(specs), tuple(f.report for f in files), mode, tuple(low_rank), tuple(dense),
                         originals)
    model.lora_state = state
    for spec, lora in zip(specs, files):
        if log is not None:
            log(f"LoRA {lora.report.summary()}, strength {spec.strength:g}")
        for message in lora.report.messages():
            log(message) if log is not None else warnings.warn(message, stacklevel=2)
    return state


def remove_loras(model: nn.Module) -> None:
    """Take every LoRA off `model`: factors dropped, replaced tensors put back (the same
    objects, so the base weights are exactly what they were)."""
    for m in model.modules():
        if isinstance(m, QLinear) and m.lora_down is not None:
            m.clear_lora()
    state = lora_state(model)
    if state is not None:
        for name, original in state.originals.items():
            module, attr = owner(model, name)
            if isinstance(module, QLinear) and attr == "weight":
                module.weight, module.ggml_type, module.weight_scale = original
            else:
                _put(module, attr, original)
            module.__dict__.pop("lora_patched", None)
    model.lora_state = None


def set_lora_mode(model: nn.Module, mode: str) -> None:
    """How every linear of `model` applies its LoRA: "auto", "merge" or "side"."""
    if mode not in LORA_MODES:
        raise LoraError(f"LoRA mode {mode!r}: expected one of {', '.join(LORA_MODES)}")
    for m in model.modules():
        if isinstance(m, QLinear):
            m.lora_mode = mode
    state = lora_state(model)
    if state is not None:
        state.mode = mode


# ---- helpers ---------------------------------------------------------------------------


def _identity(spec: LoraSpec) -> tuple:
    p = Path(spec.path)
    st = p.stat() if p.exists() else None
    return (str(p.resolve()), st and st.st_mtime_ns, st and st.st_size, spec.strength)


def _set_factors(lin: QLinear, patches: list[tuple[LowRank, float]], mode: str) -> None:
    """Stack the factors of every LoRA on this linear: down [R, in], up [out, R], and the
    scale (strength · alpha / rank) of each rank row, on the weight's device (the CPU
    for a weight a streaming engine will bring)."""
    dtypes = {p.down.dtype for p, _ in patches} | {p.up.dtype for p, _ in patches}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # keep 16-bit factors 16-bit
    if not dtype.is_floating_point:
        dtype = torch.float32
    device = torch.device("cpu") if lin.weight.is_meta else lin.weight.device
    down = torch.cat([p.down.to(dtype) for p, _ in patches]).to(device)
    up = torch.cat([p.up.to(dtype) for p, _ in patches], dim=1).to(device)
    scale = torch.cat([torch.full((p.rank,), s * p.scale, dtype=torch.float64) for p, s in patches])
    lin.set_lora(down, up, scale.to(device=device, dtype=torch.float32), mode)


def _get(module: nn.Module, attr: str) -> torch.Tensor:
    return module._buffers[attr] if attr in module._buffers else module._parameters[attr]


def _put(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._buffers:
        module._buffers[attr] = value
    else:
        module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)


def _merge_dense_patch(model: nn.Module, name: str, patches: list[tuple[Diff, float]]):
    """Replace tensor `name` by base + Σ strength·scale·diff (float32); returns what
    restores it."""
    module, attr = owner(model, name)
    module.lora_patched = frozenset(getattr(module, "lora_patched", ())) | {attr}
    if isinstance(module, QLinear) and attr == "weight":
        original = (module.weight, module.ggml_type, module.weight_scale)
        if module.weight.is_meta:
            base, device = _stored_value(model, name), torch.device("cpu")
        else:
            base, device = module.decoded(torch.float32), module.weight.device
        module.set_weight(merge_dense(base.cpu(), patches).to(device))
        return original
    original = _get(module, attr)
    if original.is_meta:
        base, device = _stored_value(model, name), torch.device("cpu")
    else:
        base, device = original, original.device
    _put(module, attr, merge_dense(base.cpu(), patches).to(device))
    return original


def _stored_value(model: nn.Module, name: str) -> torch.Tensor:
    """The float32 value of a tensor that is not loaded (left on meta for a streaming
    engine), read from the model's checkpoint."""
    source = getattr(model, "source", None)
    if source is None:
        raise LoraError(f"{name} is not loaded and the model has no checkpoint to read it from; load the model "
                        "with its tensors before applying this LoRA's dense patches")
    from quant.checkpoint import open_checkpoint

    with open_checkpoint(source) as ckpt:
        value = ckpt.load(name)
    if isinstance(value, PackedTensor):
        return value.dequantize(torch.float32)
    if value.dtype in FP8_TYPES:
        raise LoraError(f"{name}: a dense LoRA patch on an fp8 weight that is not loaded is not supported; "
                        "load the model with its tensors (load_blocks=True) first")
    return value.to(torch.float32)

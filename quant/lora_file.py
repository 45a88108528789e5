"""Read a LoRA file of any Wan naming into patches on the official tensor names.

    lora = read_lora("x.safetensors", shapes)    # shapes: the model's official names -> shapes
    lora.low_rank    # LowRank(target, down [r, in], up [out, r], scale): W += s·scale·up@down
    lora.diffs       # Diff(target, value, scale): T += s·scale·value
    lora.report      # namings, what is patched, what was skipped and why

Scale rule (LORA.md section 2): delta W = strength · alpha / rank · up @ down, rank =
down.shape[0]. alpha comes from the module's `.alpha` key, else from diffusers'
`lora_adapter_metadata` (a PEFT LoraConfig: r, lora_alpha, rank_pattern, alpha_pattern,
use_rslora), else it is missing and the scale is 1 (the factors carry it). An alpha of 0
is read as missing, with a warning: tools disagree (ComfyUI applies nothing, LightX2V and
kijai's loader scale 1) and a LoRA that does nothing is never what was meant.
Dense patches (`.diff` on a weight or a modulation table, `.diff_b`, `.diff_m`, PEFT's
`lora_B.bias` times the module's scale) add strength · value.

Keys of the Wan 2.1 image branch (k_img, v_img, norm_k_img, img_emb) are skipped and
named as such; every other key that patches nothing is listed with the reason. A LoRA
whose factors do not fit the tensors they name is refused, naming them.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .lora_names import (ALPHA, DIFFUSERS, DOWN, LOW_RANK_ROLES, UP, UP_BIAS, Resolved,
                         TargetNames, Unresolved, split_prefix, split_role, unsupported_kind)

PEFT_METADATA_KEY = "lora_adapter_metadata"
MAX_LISTED = 50  # unknown keys named one by one in a message (all are in the report)

EXPERTS = ("high", "low", "both")
_EXPERT_NAMES = {
    "high": "high", "high_noise": "high", "high-noise": "high",
    "low": "low", "low_noise": "low", "low-noise": "low",
    "both": "both", "all": "both",
}


class LoraError(ValueError):
    """A LoRA that cannot be used as asked: what is wrong, what was expected, the fix."""


# ---- what the user asks for ------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: its file, its strength, and the expert it is for ("high",
    "low" or "both")."""

    path: str | os.PathLike
    strength: float = 1.0
    expert: str = "both"

    def __post_init__(self):
        expert = _EXPERT_NAMES.get(str(self.expert).lower())
        if expert is None:
            raise LoraError(f"LoRA expert {self.expert!r}: expected one of high, low, both")
        try:
            strength = float(self.strength)
        except (TypeError, ValueError):
            raise LoraError(f"LoRA strength {self.strength!r} is not a number") from None
        if not math.isfinite(strength):
            raise LoraError(f"LoRA strength {self.strength!r} is not finite")
        object.__setattr__(self, "expert", expert)
        object.__setattr__(self, "strength", strength)

    def applies_to(self, expert: str | None) -> bool:
        """Whether this LoRA goes on `expert` ("high"/"low"; None: a model outside a pair)."""
        if expert is None or self.expert == "both":
            return True
        return self.expert == _EXPERT_NAMES.get(str(expert).lower(), expert)

    def __str__(self) -> str:
        return f"{self.expert}={self.path}:{self.strength:g}"


def parse_lora_arg(text: str) -> LoraSpec:
    """`[EXPERT=]PATH[:STRENGTH]` -> LoraSpec: `high=a.safetensors:1.0`, `low=b.safetensors`,
    `both=c.safetensors:0.6`, a bare `c.safetensors:0.6` (both experts). Strength 1 when
    left out; a Windows drive letter (C:\\...) is part of the path."""
    text = str(text).strip()
    expert = "both"
    head, eq, rest = text.partition("=")
    if eq and head.strip().lower() in _EXPERT_NAMES:
        expert, text = head.strip().lower(), rest.strip()
    path, strength = text, 1.0
    base, colon, tail = text.rpartition(":")
    if colon and base:
        try:
            strength = float(tail)
            path = base
        except ValueError:
            if not any(c in tail for c in "/\\"):
                raise LoraError(f"LoRA {text!r}: strength {tail!r} is not a number; write PATH:STRENGTH, "
                                "e.g. high=lora.safetensors:1.0") from None
    if not path:
        raise LoraError(f"LoRA {text!r} names no file; write [high=|low=|both=]PATH[:STRENGTH]")
    return LoraSpec(path, strength, expert)


# ---- patches ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LowRank:
    """target += strength · scale · up @ down, for a linear's weight [out, in]."""

    target: str
    down: torch.Tensor  # [rank, in], as stored
    up: torch.Tensor  # [out, rank], as stored
    scale: float  # alpha / rank (1 when the file has no alpha)
    alpha: float | None
    keys: tuple[str, ...]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, strength: float) -> torch.Tensor:
        """The float32 weight delta (products in float32: bf16 products drift by ~1% of it)."""
        return (self.up.float() * (strength * self.scale)) @ self.down.float()


@dataclass(frozen=True)
class Diff:
    """target += strength · scale · value (norms, biases, modulation tables, small weights)."""

    target: str
    value: torch.Tensor  # the target's shape, as stored
    scale: float
    keys: tuple[str, ...]


def merge_dense(base: torch.Tensor, patches: list[tuple[Diff, float]]) -> torch.Tensor:
    """base + Σ strength·scale·value, summed in float64 and rounded once to float32."""
    total = base.to(torch.float64)
    for diff, strength in patches:
        total = total + diff.value.to(torch.float64).reshape(base.shape) * (strength * diff.scale)
    return total.to(torch.float32)


@dataclass(frozen=True)
class LoraReport:
    path: str
    namings: tuple[str, ...]  # e.g. ("official (lora_A/lora_B)",)
    alpha: str  # where the scale came from
    patched: tuple[str, ...]  # official tensor names this LoRA changes
    image_branch: tuple[str, ...]  # keys for the Wan 2.1 image branch, skipped
    unmatched: Mapping[str, str]  # other keys that patch nothing -> why
    warnings: tuple[str, ...] = ()

    @property
    def skipped(self) -> tuple[str, ...]:
        return (*self.image_branch, *self.unmatched)

    def summary(self) -> str:
        name = Path(self.path).name
        skipped = f"; {len(self.skipped)} key(s) skipped" if self.skipped else ""
        return f"{name}: {', '.join(self.namings)} naming, alpha {self.alpha}; patches {len(self.patched)} tensors{skipped}"

    def messages(self) -> list[str]:
        """What a user should be told: warnings, skipped image-branch keys, unknown keys."""
        name = Path(self.path).name
        out = list(self.warnings)
        if self.image_branch:
            out.append(f"{name}: {len(self.image_branch)} key(s) for the Wan 2.1 image branch (k_img / v_img / "
                       f"norm_k_img / img_emb) skipped, Wan 2.2 has no such branch: {_list(self.image_branch)}")
        if self.unmatched:
            shown = "; ".join(f"{k} ({why})" for k, why in list(self.unmatched.items())[:MAX_LISTED])
            more = f"; ... ({len(self.unmatched)} in all)" if len(self.unmatched) > MAX_LISTED else ""
            out.append(f"{name}: {len(self.unmatched)} key(s) patch nothing in this model and were skipped: "
                       f"{shown}{more}")
        return out


@dataclass(frozen=True)
class LoraFile:
    path: Path
    low_rank: tuple[LowRank, ...]
    diffs: tuple[Diff, ...]
    report: LoraReport = field(repr=False)

    @property
    def targets(self) -> set[str]:
        return set(self.report.patched)


def _list(names, limit: int = 6) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ---- reading ---------------------------------------------------------------------------


def check_lora_file(path: str | os.PathLike) -> Path:
    """Refuse a LoRA path that is missing or not a safetensors file, reading its header only."""
    p = Path(path)
    if p.is_dir():
        raise LoraError(f"LoRA path {p} is a folder; give the .safetensors file")
    if not p.is_file():
        raise LoraError(f"LoRA file {p} does not exist; check the path")
    if p.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin"):
        raise LoraError(f"{p}: LoRAs are read from .safetensors files only (pickles are never run); "
                        "convert it to safetensors first")
    try:
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise LoraError(f"{p}: not a readable safetensors LoRA file ({' '.join(str(e).split())})") from None
    return p


def read_lora(path: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]]) -> LoraFile:
    """Read the LoRA at `path` for the model whose tensors are `shapes` (official names ->
    shapes). Raises LoraError when it does not fit or patches nothing."""
    from safetensors import safe_open

    path = check_lora_file(path)
    names = TargetNames(shapes)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata() or {}
        resolved: list[Resolved] = []
        unmatched: dict[str, str] = {}
        image_branch: list[str] = []
        for key in keys:
            r = names.resolve(key)
            if isinstance(r, Unresolved):
                if unsupported_kind(key) == "DoRA":
                    raise LoraError(f"{path}: a DoRA LoRA ({key}); wanrt applies plain LoRA only")
                if r.image_branch:
                    image_branch.append(key)
                else:
                    unmatched[key] = r.reason
            else:
                resolved.append(r)
        tensors = {r.key: f.get_tensor(r.key) for r in resolved}
    config = _peft_config(path, metadata)
    return _build(path, names, resolved, tensors, unmatched, image_branch, config, len(keys))


def _build(path, names: TargetNames, resolved, tensors, unmatched, image_branch, config, n_keys) -> LoraFile:
    groups: dict[str, dict[str, Resolved]] = {}
    dense: list[Resolved] = []
    for r in resolved:
        if r.role in LOW_RANK_ROLES:
            group = groups.setdefault(r.module, {})
            if r.role in group:
                raise LoraError(f"{path}: two keys give the {r.role} of {r.module}: {group[r.role].key} and {r.key}")
            group[r.role] = r
        else:
            dense.append(r)

    misfits: list[str] = []
    low_rank: list[LowRank] = []
    diffs: list[Diff] = []
    alpha_sources: set[str] = set()
    zero_alpha: list[str] = []
    for module, group in groups.items():
        if DOWN not in group or UP not in group:
            have = ", ".join(sorted(group))
            for r in group.values():
                unmatched[r.key] = f"{module} has {have} but no {'lora_up' if DOWN in group else 'lora_down'}"
            continue
        down, up = tensors[group[DOWN].key], tensors[group[UP].key]
        target = group[DOWN].target
        want = names.shapes[target]
        if not (names.is_linear(target) and down.dim() == 2 and up.dim() == 2 and down.shape[0] == up.shape[1]
                and (up.shape[0], down.shape[1]) == want):
            misfits.append(f"{target} {list(want)} <- {group[DOWN].key} {list(down.shape)}, "
                           f"{group[UP].key} {list(up.shape)}")
            continue
        rank = int(down.shape[0])
        alpha, scale, source = _scale(path, group, tensors, config, rank)
        alpha_sources.add(source)
        if alpha == 0:
            zero_alpha.append(module)
        keys = tuple(r.key for r in group.values())
        low_rank.append(LowRank(target, down, up, scale, alpha, keys))
        if UP_BIAS in group:  # PEFT lora_bias: bias += strength · scale · lora_B.bias
            r = group[UP_BIAS]
            bias = _fitted(tensors[r.key], names.shapes[r.target])
            if bias is None:
                misfits.append(f"{r.target} {list(names.shapes[r.target])} <- {r.key} {list(tensors[r.key].shape)}")
            else:
                diffs.append(Diff(r.target, bias, scale, (r.key,)))
    for r in dense:
        value = _fitted(tensors[r.key], names.shapes[r.target])
        if value is None:
            misfits.append(f"{r.target} {list(names.shapes[r.target])} <- {r.key} {list(tensors[r.key].shape)}")
            continue
        diffs.append(Diff(r.target, value, 1.0, (r.key,)))

    if misfits:
        raise LoraError(
            f"{path}: this LoRA does not fit the model: {len(misfits)} patch(es) have other shapes than the "
            f"tensors they name ({'; '.join(misfits[:4])}{'; ...' if len(misfits) > 4 else ''}). It was made for "
            "a model of other dimensions (another Wan version or size); use a LoRA made for this one")
    seen: dict[str, str] = {}
    for d in diffs:
        if d.target in seen:
            raise LoraError(f"{path}: {d.target} is patched twice, by {seen[d.target]} and {d.keys[0]}")
        seen[d.target] = d.keys[0]
    if not low_rank and not diffs:
        why = "; ".join(sorted({v for v in unmatched.values()})[:3]) or "only Wan 2.1 image-branch keys"
        raise LoraError(f"{path}: none of its {n_keys} keys patches this model ({why}); is it a LoRA for a "
                        "Wan 2.2 diffusion transformer?")

    warnings_: list[str] = []
    if zero_alpha:
        warnings_.append(
            f"{path.name}: alpha is 0 for {len(zero_alpha)} module(s) ({_list(zero_alpha, 3)}); read as no alpha "
            "(scale 1), as LightX2V and kijai's loader do (ComfyUI would apply nothing); adjust the strength "
            "if the effect is wrong")
    namings = _naming_labels(r for r in resolved if r.key not in unmatched)
    patched = tuple([p.target for p in low_rank] + [d.target for d in diffs])
    report = LoraReport(str(path), tuple(namings), _alpha_label(alpha_sources), patched, tuple(image_branch),
                        dict(unmatched), tuple(warnings_))
    return LoraFile(path, tuple(low_rank), tuple(diffs), report)


def _fitted(value: torch.Tensor, want: tuple[int, ...] | None) -> torch.Tensor | None:
    """`value` in the shape `want`, also from a shape that differs only by 1-sized dims
    ([6, dim] for a [1, 6, dim] modulation table); None when it does not fit."""
    if want is None:
        return None
    if tuple(value.shape) == tuple(want):
        return value
    squeeze = lambda s: [d for d in s if d != 1]  # noqa: E731
    if squeeze(value.shape) == squeeze(want):
        return value.reshape(want)
    return None


def _naming_labels(resolved) -> list[str]:
    """e.g. ["official (lora_down/lora_up)", "kohya (lora_down/lora_up)"]."""
    styles: dict[str, set[str]] = {}
    for r in resolved:
        kinds = styles.setdefault(r.naming, set())
        if r.role in (DOWN, UP):
            kinds.add("lora_A/lora_B" if ".lora_A." in r.key or ".lora_B." in r.key else "lora_down/lora_up")
    return [f"{n} ({', '.join(sorted(k))})" if k else n for n, k in sorted(styles.items())]


def _alpha_label(sources: set[str]) -> str:
    if not sources:
        return "n/a (dense patches only)"
    return " + ".join(sorted(sources))


def _scale(path, group: dict[str, Resolved], tensors, config: dict | None, rank: int) -> tuple[float | None, float, str]:
    """(alpha, scale, where alpha came from) of one low-rank module."""
    if ALPHA in group:
        value = tensors[group[ALPHA].key]
        if value.numel() != 1:
            raise LoraError(f"{path}: {group[ALPHA].key} holds {value.numel()} values, expected one alpha")
        alpha = float(value.double().item())  # any dtype: some files store it as an integer
        if not math.isfinite(alpha):
            raise LoraError(f"{path}: {group[ALPHA].key} is {alpha}, not a usable alpha")
        return alpha, (alpha / rank if alpha != 0 else 1.0), "per-module .alpha keys"
    down = group[DOWN]
    if config is not None and down.naming == DIFFUSERS:
        module = split_prefix(split_role(down.key)[0])[1]
        r = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank)))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r)))
        if r != rank:
            raise LoraError(f"{path}: {PEFT_METADATA_KEY} gives {module} rank {r} but its factors have rank {rank}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        return alpha, (scale if alpha != 0 else 1.0), PEFT_METADATA_KEY
    return None, 1.0, "none (scale 1)"


def _pattern_value(patterns: Mapping[str, float], module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of
    the module name (as a regular expression, at a '.' boundary)."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def _peft_config(path: Path, metadata: Mapping[str, str]) -> dict | None:
    """The transformer's LoraConfig from diffusers' `lora_adapter_metadata`, if any."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if raw is None:
        return None
    try:
        conf = json.loads(raw)
    except ValueError:
        raise LoraError(f"{path}: the {PEFT_METADATA_KEY} metadata is not JSON") from None
    prefixed = {k[len("transformer."):]: v for k, v in conf.items() if k.startswith("transformer.")}
    conf = prefixed or {k: v for k, v in conf.items() if "." not in k}
    if conf.get("use_dora"):
        raise LoraError(f"{path}: a DoRA LoRA (use_dora in {PEFT_METADATA_KEY}); wanrt applies plain LoRA only")
    return conf

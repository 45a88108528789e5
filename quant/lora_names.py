"""LoRA key names in every Wan spelling -> the official tensor they patch.

A LoRA key is <prefix><module><suffix>: the prefix says the naming, the suffix the
role of the tensor (a low-rank factor, an alpha, a dense diff). Namings in circulation
(LORA.md section 1):

    official   diffusion_model.blocks.0.self_attn.q.lora_A.weight   (also lora_down/lora_up,
               no prefix, or model.diffusion_model.)
    kohya      lora_unet_blocks_0_self_attn_q.lora_down.weight      (Wan-Fun: lora_unet__)
    diffusers  transformer.blocks.0.attn1.to_q.lora_A.weight

Keys are looked up from the names of the model they are for (`TargetNames`), never by
parsing: a kohya name cannot be split back into modules (`self_attn` holds a `_`), so
every official module of the model is spelled the kohya way and looked up. diffusers
module names go through `wan_names.diffusers_to_official`, the one diffusers map.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from .wan_names import diffusers_to_official

OFFICIAL = "official"
KOHYA = "kohya"
KOHYA_FUN = "kohya (Wan-Fun)"
DIFFUSERS = "diffusers"

# Roles of a key's tensor.
DOWN = "lora_down"  # A [rank, in]
UP = "lora_up"  # B [out, rank]
UP_BIAS = "lora_up.bias"  # PEFT lora_bias: added to the linear's bias
ALPHA = "alpha"
DIFF = "diff"  # added to <module>.weight, or to <module> itself (a modulation table)
DIFF_B = "diff_b"  # added to <module>.bias
DIFF_M = "diff_m"  # added to <module>.modulation (LightX2V's spelling)

LOW_RANK_ROLES = (DOWN, UP, UP_BIAS, ALPHA)

# Longest first: ".diff_b" must not be read as ".diff".
_ROLE_SUFFIXES = (
    (".lora_down.weight", DOWN),
    (".lora_A.weight", DOWN),
    (".lora_up.weight", UP),
    (".lora_B.weight", UP),
    (".lora_up.bias", UP_BIAS),
    (".lora_B.bias", UP_BIAS),
    (".alpha", ALPHA),
    (".diff_b", DIFF_B),
    (".diff_m", DIFF_M),
    (".diff", DIFF),
)

# Patch types other tools write that are not plain LoRA; named in reports.
UNSUPPORTED_KINDS = (
    (re.compile(r"\.(dora_scale|lora_magnitude_vector)(\.weight)?$"), "DoRA"),
    (re.compile(r"\.hada_"), "LoHa"),
    (re.compile(r"\.lokr_"), "LoKr"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon (conv)"),
    (re.compile(r"\.(set_weight|reshape_weight|w_norm|b_norm)$"), "set/reshape/norm patch"),
)

_PREFIXES = (
    ("lora_unet__", KOHYA_FUN),
    ("lora_unet_", KOHYA),
    ("model.diffusion_model.", OFFICIAL),
    ("diffusion_model.", OFFICIAL),
    ("transformer.", DIFFUSERS),
    ("base_model.model.", None),  # a raw PEFT save: official or diffusers module names
)
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoders.")

# The Wan 2.1 I2V CLIP image branch (absent from Wan 2.2), in official, kohya and
# diffusers spellings.
_IMAGE_BRANCH = re.compile(
    r"(^|[._])(k_img|v_img|norm_k_img|add_k_proj|add_v_proj|norm_added_k)([._]|$)|^(img_emb|condition_embedder\.image_embedder)([._]|$)"
)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class Resolved:
    key: str
    naming: str
    module: str  # official module path, e.g. blocks.0.self_attn.q
    role: str
    target: str  # official tensor the key's tensor goes to


@dataclass(frozen=True)
class Unresolved:
    key: str
    reason: str
    image_branch: bool = False  # a key for the Wan 2.1 image branch


def split_role(key: str) -> tuple[str, str] | None:
    """(stem, role) of a key, None when its suffix is no patch type wanrt applies."""
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def split_prefix(stem: str) -> tuple[str | None, str]:
    """(naming or None when the prefix does not say, module part)."""
    for prefix, naming in _PREFIXES:
        if stem.startswith(prefix):
            return naming, stem[len(prefix):]
    return None, stem


def unsupported_kind(key: str) -> str | None:
    for pattern, kind in UNSUPPORTED_KINDS:
        if pattern.search(key):
            return kind
    return None


def is_image_branch(module: str) -> bool:
    return _IMAGE_BRANCH.search(module) is not None


class TargetNames:
    """The tensors of one model (official names -> shapes) and every spelling of their
    modules, to resolve LoRA keys against."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        modules = set(self.shapes)
        modules.update(n.rsplit(".", 1)[0] for n in self.shapes if n.endswith((".weight", ".bias")))
        self.modules = modules
        self.kohya = {m.replace(".", "_"): m for m in modules}
        blocks = [int(m.group(1)) for m in map(_BLOCK.match, self.shapes) if m]
        self.num_blocks = max(blocks) + 1 if blocks else 0

    def is_linear(self, name: str) -> bool:
        return name.endswith(".weight") and len(self.shapes.get(name, ())) == 2

    def _official_module(self, naming: str | None, rest: str) -> tuple[str, str | None]:
        """(naming, official module or None) of a key's module part."""
        if naming in (KOHYA, KOHYA_FUN):
            return naming, self.kohya.get(rest)
        if naming == OFFICIAL:
            return naming, rest
        if naming is None and rest in self.modules:
            return OFFICIAL, rest
        weight = diffusers_to_official(rest + ".weight")
        module = weight[: -len(".weight")] if weight is not None else diffusers_to_official(rest)
        if naming is None:  # no prefix: diffusers when the name is one, else official
            return (DIFFUSERS, module) if module is not None else (OFFICIAL, rest)
        return naming, module

    def _target(self, module: str, role: str) -> str:
        if role == DIFF:
            weight = module + ".weight"
            return weight if weight in self.shapes or module not in self.shapes else module
        if role in (DIFF_B, UP_BIAS):
            return module + ".bias"
        if role == DIFF_M:
            return module + ".modulation"
        return module + ".weight"

    def resolve(self, key: str) -> Resolved | Unresolved:
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            return Unresolved(key, "a text-encoder LoRA key (LoRAs apply to the diffusion transformer only)")
        split = split_role(key)
        if split is None:
            kind = unsupported_kind(key)
            if is_image_branch(split_prefix(key)[1]):
                return Unresolved(key, "Wan 2.1 image branch (k_img / v_img / norm_k_img / img_emb), absent in "
                                  "Wan 2.2", image_branch=True)
            if kind is not None:
                return Unresolved(key, f"{kind} patch, not supported (plain LoRA and diffs only)")
            tail = ".".join(key.split(".")[-2:] if key.endswith((".weight", ".bias")) else key.split(".")[-1:])
            return Unresolved(key, f"unknown patch type '.{tail}'")
        stem, role = split
        naming, rest = split_prefix(stem)
        naming, module = self._official_module(naming, rest)
        if module is None or is_image_branch(module):
            if is_image_branch(rest) or (module is not None and is_image_branch(module)):
                return Unresolved(key, "Wan 2.1 image branch (k_img / v_img / norm_k_img / img_emb), absent in "
                                  "Wan 2.2", image_branch=True)
            return Unresolved(key, f"no module '{rest}' in this model ({naming} naming)")
        target = self._target(module, role)
        if target not in self.shapes:
            block = _BLOCK.match(module)
            if block and int(block.group(1)) >= self.num_blocks:
                why = f"block {block.group(1)} does not exist: this model has {self.num_blocks} blocks"
            else:
                why = f"no tensor {target} in this model"
            return Unresolved(key, why)
        return Resolved(key, naming, module, role, target)

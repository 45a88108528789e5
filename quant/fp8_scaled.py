"""ComfyUI's scaled fp8 checkpoints (`wan2.2_*_fp8_scaled.safetensors`): which tensor
scales which weight, and which tensors are not weights at all.

A scaled linear stores `<layer>.weight` in fp8 and its scale beside it: older files
mark themselves with a `scaled_fp8` tensor and name the scale `<layer>.scale_weight`;
newer ones name it `<layer>.weight_scale` and describe the layer in `<layer>.comfy_quant`
(JSON bytes). The weight is value x scale (one scale, or one per output row).
`scale_input` / `input_scale` serve only ComfyUI's fp8 matmul; a reader that decodes
the weight has no use for them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
LAYER_DESCRIPTION_SUFFIX = ".comfy_quant"
MARKERS = ("scaled_fp8",)


class ScaledFP8Error(ValueError):
    pass


@dataclass
class FP8Scales:
    scales: dict[str, str] = field(default_factory=dict)  # weight name -> its scale tensor's name
    extra: set[str] = field(default_factory=set)  # every name that is not a model tensor (scales included)

    def __bool__(self) -> bool:
        return bool(self.extra)


def find_fp8_scales(ckpt) -> FP8Scales:
    """The scaled fp8 layout of an opened checkpoint (`quant.checkpoint.Checkpoint`);
    empty for any other file. Raises ScaledFP8Error for a layer format other than fp8,
    a scale without its weight, or a scaled weight that is not fp8."""
    names = set(ckpt.names())
    found = FP8Scales()
    for n in sorted(names):
        if n in MARKERS or n.endswith(INPUT_SCALE_SUFFIXES):
            found.extra.add(n)
        elif n.endswith(LAYER_DESCRIPTION_SUFFIX):
            fmt = layer_description(ckpt, n).get("format")
            if fmt not in ("float8_e4m3fn", "float8_e5m2"):
                raise ScaledFP8Error(f"{ckpt.path}: {n} declares the quantization format {fmt!r}; only ComfyUI's "
                                     "fp8 (float8_e4m3fn / float8_e5m2) weights can be read")
            found.extra.add(n)
        elif n.endswith(WEIGHT_SCALE_SUFFIXES):
            weight = n.rsplit(".", 1)[0] + ".weight"
            if weight not in names:
                raise ScaledFP8Error(f"{ckpt.path}: {n} scales {weight}, which is not in the file")
            if ckpt.info(weight).dtype not in FP8_DTYPES:
                raise ScaledFP8Error(f"{ckpt.path}: {weight} has a scale but is stored as "
                                     f"{ckpt.info(weight).dtype}, not fp8")
            found.scales[weight] = n
            found.extra.add(n)
    return found


def layer_description(ckpt, name: str) -> dict:
    raw = ckpt.load(name)
    try:
        return json.loads(bytes(raw.to(torch.uint8).flatten().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ScaledFP8Error(f"{ckpt.path}: {name} is not the JSON layer description ComfyUI writes") from None


def scaled_value(value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """value x scale in float32: one scale for the tensor, or one per output row."""
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        return value.to(torch.float32) * scale.reshape(())
    if scale.numel() == value.shape[0]:
        return value.to(torch.float32) * scale.reshape(-1, *([1] * (value.dim() - 1)))
    raise ScaledFP8Error(f"a scale of shape {list(scale.shape)} fits neither one scale nor one per row of a "
                         f"weight of shape {list(value.shape)}")

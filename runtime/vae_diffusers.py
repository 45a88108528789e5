"""Wan 2.1 VAE state dicts in diffusers' `AutoencoderKLWan` naming -> the official names.

The two layouts hold the same tensors under other module names:

| diffusers | official |
| --- | --- |
| `encoder.conv_in`, `decoder.conv_in` | `encoder.conv1`, `decoder.conv1` |
| `quant_conv`, `post_quant_conv` | `conv1`, `conv2` |
| `{coder}.norm_out`, `{coder}.conv_out` | `{coder}.head.0`, `{coder}.head.2` |
| `{coder}.mid_block.resnets.i` / `.attentions.i` | `{coder}.middle.2i` / `.middle.2i+1` |
| `encoder.down_blocks.n` (one flat list) | `encoder.downsamples.n` (the same list) |
| `decoder.up_blocks.i.resnets.j`, `.upsamplers.0` | `decoder.upsamples.k`, k counting on across stages |

and inside a residual block `norm1, conv1, norm2, conv2, conv_shortcut` are
`residual.0, residual.2, residual.3, residual.6, shortcut`. Resample (`resample.1`,
`time_conv`) and attention (`norm`, `to_qkv`, `proj`) parameters keep their names.
Everything is read from the names present, so any width, depth or number of stages
translates. The Wan 2.2 VAE (`is_residual`, z 48) nests its stages differently and is
refused.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# Parameter names inside one module: diffusers -> official.
RESIDUAL = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias",
}
RESAMPLE = {p: p for p in ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")}
ATTENTION = {p: p for p in ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")}
OPTIONAL = {"conv_shortcut.weight", "conv_shortcut.bias", "time_conv.weight", "time_conv.bias"}

TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv1", "encoder.norm_out": "encoder.head.0", "encoder.conv_out": "encoder.head.2",
    "quant_conv": "conv1", "post_quant_conv": "conv2",
    "decoder.conv_in": "decoder.conv1", "decoder.norm_out": "decoder.head.0", "decoder.conv_out": "decoder.head.2",
}
TOP_LEVEL_PARAMS = tuple(f"{m}.{p}" for m in TOP_LEVEL for p in (("gamma",) if m.endswith("norm_out") else ("weight", "bias")))

_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_DOWN = re.compile(r"encoder\.down_blocks\.(\d+)\.(.+)")
_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)")


def is_diffusers_vae(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether `sd` is a Wan VAE (2.1 or 2.2) in diffusers naming: RMS-norm `gamma`s or 3-D
    convs under diffusers' module names (image VAEs have 2-D convs and GroupNorm weights)."""
    return any(k.endswith((".norm1.gamma", ".norm2.gamma")) for k in sd) or any(
        k in sd and sd[k].dim() == 5 for k in ("encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight"))


def official_names(sd: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The same tensors under the official Wan 2.1 VAE names (see `name_map`)."""
    names = name_map(sd, name)
    return {names[k]: v for k, v in sd.items()}


def name_map(sd: Mapping[str, torch.Tensor], name: str) -> dict[str, str]:
    """diffusers name -> official name for every tensor of `sd`; a clear error for the Wan
    2.2 VAE, unknown names and missing parameters (named in diffusers' terms)."""
    _refuse_wan22(sd, name)
    offsets = _upsample_offsets(sd)
    names = {key: _translate(key, offsets) for key in sd}
    unknown = sorted(k for k, v in names.items() if v is None)
    if unknown:
        raise ValueError(f"{name}: a Wan VAE in diffusers naming with {len(unknown)} tensor(s) of no known Wan 2.1 "
                         f"VAE module: {', '.join(unknown[:4])}{'...' if len(unknown) > 4 else ''}; expected "
                         f"the state dict of diffusers' AutoencoderKLWan (vae/diffusion_pytorch_model.safetensors)")
    missing = _missing(sd)
    if missing:
        raise ValueError(f"{name}: an incomplete Wan VAE in diffusers naming: {', '.join(missing[:6])}"
                         f"{'...' if len(missing) > 6 else ''} missing ({len(missing)} in all); re-download "
                         f"vae/diffusion_pytorch_model.safetensors or pass the official Wan2.1_VAE.pth")
    return names


def _refuse_wan22(sd, name: str) -> None:
    conv_in = sd.get("encoder.conv_in.weight")
    z = sd.get("post_quant_conv.weight")
    nested = any(k.startswith("encoder.down_blocks.") and ".resnets." in k for k in sd)
    if nested or (conv_in is not None and conv_in.shape[1] == 12) or (z is not None and z.shape[0] == 48):
        seen = f"z_dim {z.shape[0]}" if z is not None else "residual stages, 12-channel patchified input"
        raise ValueError(f"{name}: this is the Wan 2.2 VAE in diffusers' AutoencoderKLWan naming ({seen}); "
                         f"only the Wan 2.1 VAE is translated from diffusers names. Pass the official "
                         f"Wan2.2_VAE.pth or ComfyUI's wan2.2_vae.safetensors")


def _upsample_offsets(sd) -> dict[int, tuple[int, int]]:
    """Per decoder stage: its first index in the official flat `upsamples` list and its
    number of residual blocks (the stage's upsampler, if any, follows them)."""
    resnets, upsampler = {}, set()
    for key in sd:
        m = _UP.fullmatch(key)
        if m:
            stage = int(m.group(1))
            resnets.setdefault(stage, set())
            if m.group(3) is None:
                upsampler.add(stage)
            else:
                resnets[stage].add(int(m.group(3)))
    offsets, start = {}, 0
    for stage in sorted(resnets):
        count = max(resnets[stage], default=-1) + 1
        offsets[stage] = (start, count)
        start += count + (stage in upsampler)
    return offsets


def _translate(key: str, offsets: dict[int, tuple[int, int]]) -> str | None:
    module, _, param = key.rpartition(".")
    if module in TOP_LEVEL:
        return f"{TOP_LEVEL[module]}.{param}"
    block = _block(key)
    if block is None:
        return None
    _, param, table = block
    if m := _MID.fullmatch(key):
        index = 2 * int(m.group(3)) + (m.group(2) == "attentions")
        return f"{m.group(1)}.middle.{index}.{table[param]}"
    if m := _DOWN.fullmatch(key):
        return f"encoder.downsamples.{m.group(1)}.{table[param]}"
    m = _UP.fullmatch(key)
    start, count = offsets[int(m.group(1))]
    index = start + (count if m.group(3) is None else int(m.group(3)))
    return f"decoder.upsamples.{index}.{table[param]}"


def _block(key: str) -> tuple[str, str, dict[str, str]] | None:
    """(module, parameter, its name table) for a key inside a middle, down or up block;
    None for other keys and for parameters the module kind does not have."""
    if m := _MID.fullmatch(key):
        param, tables = m.group(4), (RESIDUAL if m.group(2) == "resnets" else ATTENTION,)
    elif m := _DOWN.fullmatch(key):
        param, tables = m.group(2), (RESIDUAL, RESAMPLE, ATTENTION)  # one flat list of all three
    elif m := _UP.fullmatch(key):
        param, tables = m.group(4), (RESAMPLE if m.group(3) is None else RESIDUAL,)
    else:
        return None
    table = next((t for t in tables if param in t), None)
    return None if table is None else (key[: -len(param) - 1], param, table)


def _missing(sd) -> list[str]:
    """Diffusers names of required parameters that are absent: top-level ones, those of the
    fixed middle (resnet, attention, resnet), those of a module that has others, and
    whole modules absent from the middle of a numbered list."""
    needed = {f"{coder}.mid_block.{kind}": table for coder in ("encoder", "decoder")
              for kind, table in (("resnets.0", RESIDUAL), ("attentions.0", ATTENTION), ("resnets.1", RESIDUAL))}
    for key in sd:
        if block := _block(key):
            needed.setdefault(block[0], block[2])
    missing = [p for p in TOP_LEVEL_PARAMS if p not in sd]
    missing += [f"{module}.{p}" for module, table in needed.items() for p in table
                if p not in OPTIONAL and f"{module}.{p}" not in sd]
    stages = _indices(needed, "decoder.up_blocks")
    for listing in ("encoder.down_blocks", "decoder.up_blocks", *(f"decoder.up_blocks.{s}.resnets" for s in sorted(stages))):
        present = _indices(needed, listing)
        missing += [f"{listing}.{i} (all of it)" for i in range(max(present, default=-1)) if i not in present]
    return missing


def _indices(modules, listing: str) -> set[int]:
    pat = re.compile(re.escape(listing) + r"\.(\d+)(\.|$)")
    return {int(m.group(1)) for module in modules for m in [pat.match(module)] if m}

"""Load a Wan 2.2 DiT from any checkpoint format, or refuse it by name.

`load_dit(source)` reads our GGUF, city96's GGUF, an official sharded folder, a ComfyUI
single file (bf16, fp16 or scaled fp8) or a diffusers folder through
`quant.checkpoint.open_checkpoint`, which translates names to the official ones. The
configuration is detected from the weights; the weights keep their stored format
(packed GGUF blocks stay packed, f16/bf16 stay 16-bit) and are placed one tensor at a
time, so loading never holds a second copy of the model.

The refusals users meet most: text-to-video weights asked to do image-to-video, experts
of two different models paired together, a Wan 2.1 checkpoint, a GGUF cut short by
city96's converter before fix_5d_tensors.py, or a file of another model.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Iterable

import torch

from quant.checkpoint import Checkpoint, open_checkpoint
from quant.fp8_scaled import ScaledFP8Error, find_fp8_scales, scaled_value
from quant.packed import PackedTensor
from quant import wan_names

from .attention import resolve_kernel
from .dit import ComputeSettings, WanDiT
from .dit_config import DiTConfig, detect_config, expected_shapes
from .qlinear import FP8_TYPES, QLinear

# What each `expect` value is for, and the checkpoint it needs.
EXPECT = {
    "i2v": ("image-to-video", "the I2V-A14B experts, in_dim 36"),
    "t2v": ("text-to-video", "the T2V-A14B experts, in_dim 16"),
    "ti2v": ("text-image-to-video", "the TI2V-5B model, in_dim 48"),
}
COMPUTE_DTYPES = (torch.float32, torch.bfloat16)

# GGUF metadata keys that may carry the head count (ours first, then llama.cpp style).
HEAD_KEYS = ("wan.num_heads", "wan.attention.head_count")

# Linears that run in float32 whatever the compute dtype (inside the official float32
# autocast islands): their weights are never narrowed at load.
FLOAT32_LINEARS = ("time_embedding.", "time_projection.", "head.")

# Name prefixes of Wan DiT tensors: a file with some of them is an incomplete Wan DiT.
_WAN_PREFIXES = ("blocks.", "patch_embedding.", "text_embedding.", "time_embedding.", "time_projection.", "head.")


class DiTLoadError(ValueError):
    """A checkpoint that cannot be used as asked: what is wrong, what was expected, the fix."""


def load_dit(
    source,
    *,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    expect: str | None = None,
    num_heads: int | None = None,
    load_blocks: bool = True,
) -> WanDiT:
    """A ready WanDiT from a file, folder or list of shard files. `dtype` is the compute
    dtype (float32, or bfloat16 = the official bf16 autocast numerics); `expect` in
    {None, "i2v", "t2v", "ti2v"} refuses a checkpoint of another kind.

    `load_blocks=False` leaves every tensor of `model.blocks` on the meta device, in its
    stored type and shape (packed weights as meta uint8 bytes with their ggml_type), for
    a streaming engine to fill from the file; everything else is loaded to `device`."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {dtype} is not supported; use torch.float32 or torch.bfloat16")
    if expect is not None and expect not in EXPECT:
        raise ValueError(f"expect={expect!r}: expected one of None, {', '.join(map(repr, EXPECT))}")
    device = torch.device(device)
    with open_checkpoint(source) as ckpt:
        plan = inspect_checkpoint(ckpt, num_heads=num_heads)
        if expect is not None:
            check_expected(plan.config, expect, ckpt.path)
        model = WanDiT(plan.config, ComputeSettings(dtype=dtype, attention=resolve_kernel(None)), device="meta")
        for name in expected_shapes(plan.config):
            if not load_blocks and name.startswith("blocks."):
                _place_meta(model, name, ckpt, plan.scales.get(name))
            else:
                _place(model, name, ckpt.load(name), plan.scales.get(name), ckpt, dtype=dtype, device=device)
        model.fingerprint = _fingerprint(model)
    model.source = str(ckpt.path)
    model.expert = ckpt.expert
    model.load_notes = list(ckpt.notes)
    return model


# ---- what is in the checkpoint ---------------------------------------------------------


class LoadPlan:
    def __init__(self, config: DiTConfig, scales: dict):
        self.config = config
        self.scales = scales  # weight name -> its fp8 scale tensor name


def _list(names: Iterable[str], limit: int = 6) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def inspect_checkpoint(ckpt: Checkpoint, *, num_heads: int | None = None) -> LoadPlan:
    """Detect the configuration and check every tensor; raise DiTLoadError naming the
    problem otherwise."""
    where = ckpt.path
    names = ckpt.names()
    arch = ckpt.metadata.get("general.architecture") if ckpt.format == "gguf" else None
    no_arch = ckpt.format == "gguf" and arch is None
    if arch is not None and arch != "wan":
        raise DiTLoadError(
            f"{where}: this GGUF holds a {arch!r} model (general.architecture), not a Wan DiT; "
            "pass a Wan 2.2 expert (general.architecture 'wan')"
        )
    arch_note = " The file has no general.architecture either." if no_arch else ""
    if ckpt.kind in (wan_names.T5, wan_names.VAE):
        loader = "load_text_encoder" if ckpt.kind == wan_names.T5 else "load_vae"
        raise DiTLoadError(
            f"{where}: this is {wan_names.KIND_DESCRIPTIONS[ckpt.kind]}, not a Wan 2.2 DiT "
            f"(load it with runtime.{loader})"
        )
    if ckpt.kind != wan_names.WAN_DIT and not any(n.startswith(_WAN_PREFIXES) for n in names):
        raise DiTLoadError(
            f"{where}: not a Wan 2.2 DiT: none of its {len(names)} tensors has a Wan DiT name "
            f"({_list(names, 4)}).{arch_note}"
        )
    if any(n.startswith("img_emb.") or ".k_img." in n for n in names):
        raise DiTLoadError(
            f"{where}: this is a Wan 2.1 I2V checkpoint (it has the CLIP image branch img_emb / k_img); "
            "Wan 2.2 has no image encoder branch and uses two experts (high noise, low noise): "
            "pass a Wan 2.2 I2V-A14B expert"
        )
    if "patch_embedding.weight" not in names and "patch_embedding.bias" in names:
        raise DiTLoadError(
            f"{where}: patch_embedding.weight is missing. This is city96's convert.py output before "
            "fix_5d_tensors.py (convert.py cannot store the 5-D patch embedding and saves it to "
            "fix_5d_tensors_wan.safetensors instead). Fix it with ComfyUI-GGUF's "
            "`python tools/fix_5d_tensors.py --src <this file> --dst <fixed file>` next to that "
            "safetensors file, or convert the original checkpoint with `python -m quant.convert`."
        )

    try:
        fp8 = find_fp8_scales(ckpt)
    except ScaledFP8Error as e:
        raise DiTLoadError(str(e)) from None
    scales = fp8.scales
    shapes = {n: tuple(ckpt.info(n).shape) for n in names if n not in fp8.extra}
    heads, heads_source = _num_heads(ckpt, num_heads)
    text_len, eps = 512, 1e-6
    if ckpt.config:
        text_len = int(ckpt.config.get("text_len", text_len))
        eps = float(ckpt.config.get("eps", eps))
    try:
        config = detect_config(shapes, num_heads=heads, heads_source=heads_source, text_len=text_len, eps=eps)
    except KeyError:
        raise DiTLoadError(
            f"{where}: not a complete Wan 2.2 DiT: {_missing_extra(shapes, None)} "
            f"({len(names)} tensors in the file).{arch_note}"
        ) from None
    except ValueError as e:
        raise DiTLoadError(f"{where}: not a usable Wan 2.2 DiT: {e}.{arch_note}") from None

    want = expected_shapes(config)
    problems = _missing_extra(shapes, want)
    if problems:
        raise DiTLoadError(f"{where}: not a complete {config.model_type.upper()} Wan 2.2 DiT: {problems}")
    for name, shape in want.items():
        if shapes[name] != shape:
            raise DiTLoadError(
                f"{where}: {name} has shape {list(shapes[name])}, expected {list(shape)} for {config.describe()}"
            )
    return LoadPlan(config, scales)


def _missing_extra(shapes: dict, want: dict | None) -> str:
    if want is None:  # no configuration yet: list the anchors that are absent
        anchors = ("patch_embedding.weight", "blocks.0.ffn.0.weight", "time_embedding.0.weight",
                   "text_embedding.0.weight", "head.head.weight")
        return f"tensor(s) missing: {_list([a for a in anchors if a not in shapes])}"
    missing = [n for n in want if n not in shapes]
    extra = [n for n in shapes if n not in want]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing: {_list(missing)}")
    if extra:
        parts.append(f"{len(extra)} unexpected tensor(s): {_list(extra)}")
    return "; ".join(parts)


def _num_heads(ckpt: Checkpoint, given: int | None) -> tuple[int | None, str]:
    if given is not None:
        return int(given), "argument"
    for key in HEAD_KEYS:
        if key in ckpt.metadata:
            return int(ckpt.metadata[key]), "gguf metadata" if ckpt.format == "gguf" else "file metadata"
    config = ckpt.config or {}
    for key in ("num_heads", "num_attention_heads"):
        if key in config:
            return int(config[key]), "config.json"
    return None, "dim/128"


def check_expected(config: DiTConfig, expect: str, where) -> None:
    """Refuse a checkpoint that is not the kind of model the caller is about to run."""
    if config.model_type == expect:
        return
    kind = {"i2v": "an I2V", "t2v": "a T2V", "ti2v": "a TI2V-5B"}[config.model_type]
    task, needs = EXPECT[expect]
    raise DiTLoadError(f"{where}: this is {kind} checkpoint, in_dim {config.in_dim}; {task} needs {needs}")


# ---- placing tensors -------------------------------------------------------------------


def _place(model: WanDiT, name: str, value, scale_name, ckpt: Checkpoint, *, dtype, device) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    fp8 = not isinstance(value, PackedTensor) and value.dtype in FP8_TYPES
    scale = ckpt.load(scale_name).float() if scale_name else torch.ones(()) if fp8 else None  # plain fp8: scale 1
    if isinstance(module, QLinear) and attr == "weight":
        module.set_weight(_linear_weight(name, value, dtype, device), None if scale is None else scale.to(device))
        return
    if isinstance(value, PackedTensor):  # a small tensor some tool quantized: decode once
        value = value.dequantize(torch.float32)
    elif fp8:
        value = scaled_value(value, scale)
    elif not value.dtype.is_floating_point:
        value = value.to(torch.float32)
    setattr(module, attr, value.to(device))


def _meta(ckpt: Checkpoint, name: str):
    info = ckpt.info(name)
    if info.dtype is None:  # a block format
        return PackedTensor(torch.empty(info.nbytes, dtype=torch.uint8, device="meta"), info.ggml_type, info.shape)
    return torch.empty(info.shape, dtype=info.dtype, device="meta")


def _place_meta(model: WanDiT, name: str, ckpt: Checkpoint, scale_name) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    value = _meta(ckpt, name)
    if isinstance(module, QLinear) and attr == "weight":
        module.set_weight(value, _meta(ckpt, scale_name) if scale_name else None)
    elif isinstance(value, PackedTensor):
        setattr(module, attr, torch.empty(value.shape, dtype=torch.float32, device="meta"))
    else:
        setattr(module, attr, value)


def _linear_weight(name: str, value, dtype, device):
    """Packed and fp8 weights stay as stored; 16-bit weights stay 16-bit; a float32 weight
    of a linear that computes in a 16-bit dtype is narrowed now, exactly as autocast would
    narrow it at every use."""
    if isinstance(value, PackedTensor):
        return value.to(device)
    target = torch.float32 if name.startswith(FLOAT32_LINEARS) else dtype
    if value.dtype in FP8_TYPES or value.dtype == target:
        return value.to(device)
    if target != torch.float32:
        return value.to(device=device, dtype=target)
    if value.dtype in (torch.float16, torch.bfloat16):
        return value.to(device)
    return value.to(device=device, dtype=target)


def _fingerprint(model: WanDiT) -> str:
    """Identifies the weights whatever their block format: a hash of small tensors outside
    the blocks that converters keep as they are."""
    h = hashlib.sha1()
    for t in (model.head.modulation, model.patch_embedding.bias):
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ---- two experts -----------------------------------------------------------------------


def check_expert_pair(high, low) -> None:
    """Refuse a high-noise and a low-noise expert that belong to different models; warn
    when both are the same expert. Takes models (or their DiTConfig)."""
    ch = getattr(high, "config", high)
    cl = getattr(low, "config", low)
    fields = ("model_type", "in_dim", "out_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "num_heads",
              "num_layers", "patch_size", "text_len")
    diff = [f"{f} {getattr(ch, f)} vs {getattr(cl, f)}" for f in fields if getattr(ch, f) != getattr(cl, f)]
    if diff:
        raise DiTLoadError(
            f"the two experts are from different models ({ch.model_type.upper()} high-noise expert, "
            f"{cl.model_type.upper()} low-noise expert): {', '.join(diff)}; pass the high- and low-noise "
            "experts of one Wan 2.2 model"
        )
    same = []
    src_h, src_l = getattr(high, "source", None), getattr(low, "source", None)
    if src_h and src_l and Path(src_h).resolve() == Path(src_l).resolve():
        same.append("the same file")
    fp_h, fp_l = getattr(high, "fingerprint", None), getattr(low, "fingerprint", None)
    if fp_h and fp_h == fp_l and not same:
        same.append("identical weights")
    exp_h, exp_l = getattr(high, "expert", None), getattr(low, "expert", None)
    if exp_h and exp_h == exp_l:
        same.append(f"both marked {exp_h!r}")
    if same:
        warnings.warn(
            f"the high-noise and low-noise experts look like the same expert ({', '.join(same)}): "
            f"{src_h} and {src_l}; the video will be worse than with the two experts",
            stacklevel=2,
        )

"""The tensors a LoRA can patch, read from the model's own modules.

LoRA keys are resolved against these names (quant.lora_names), never by parsing a key
into modules: the official name of every tensor of the model, with its logical shape
(a packed QLinear weight counts as its [out, in], not its bytes)."""
from __future__ import annotations

from torch import nn

from ..qlinear import QLinear

# QLinear buffers that are not model tensors: its fp8 scale and its LoRA factors.
_NOT_MODEL_TENSORS = ("weight_scale", "lora_down", "lora_up", "lora_scale")


def model_tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Official name -> logical shape of every tensor of `model` (meta tensors included)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, QLinear):
            shapes[prefix + "weight"] = mod.shape
            if mod.bias is not None:
                shapes[prefix + "bias"] = tuple(mod.bias.shape)
            continue
        for attr, t in (*mod._parameters.items(), *mod._buffers.items()):
            if t is not None and attr not in _NOT_MODEL_TENSORS:
                shapes[prefix + attr] = tuple(t.shape)
    return shapes


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(module, attribute) that holds the tensor `name`."""
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def linear_of(model: nn.Module, weight_name: str) -> QLinear:
    """The QLinear whose weight is `weight_name`."""
    module, attr = owner(model, weight_name)
    if not isinstance(module, QLinear) or attr != "weight":
        raise KeyError(f"{weight_name} is not the weight of a linear layer")
    return module

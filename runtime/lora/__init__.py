"""LoRAs on Wan 2.2 experts, quantized or not, per expert.

    from runtime.lora import LoraSpec, apply_loras, remove_loras, parse_lora_arg

    apply_loras(high_model, [LoraSpec("lightx2v_high.safetensors", 1.0, "high")], expert="high")
    apply_loras(low_model, ["low=lightx2v_low.safetensors:1.0"], expert="low")
    remove_loras(high_model)            # the exact base weights again

Files in every naming Wan LoRAs ship in (official `diffusion_model.`, kohya/musubi
`lora_unet_`, diffusers `transformer.`), with alpha keys, folded alphas or diffusers'
metadata, and the dense patches of distill LoRAs (`.diff`, `.diff_b`, `.diff_m`,
`.modulation.diff`). Quantized weights are never rewritten (runtime/qlinear.py).
`quant.lora_bake` merges LoRAs into a checkpoint at conversion time instead.
"""
from quant.lora_file import LoraError, LoraFile, LoraReport, LoraSpec, parse_lora_arg

from .apply import AppliedLoras, apply_loras, lora_state, remove_loras, set_lora_mode
from .keys import model_tensor_shapes
from .load import as_specs, check_loras, load_lora, loras_for

__all__ = [
    "AppliedLoras", "LoraError", "LoraFile", "LoraReport", "LoraSpec", "apply_loras", "as_specs", "check_loras",
    "load_lora", "lora_state", "loras_for", "model_tensor_shapes", "parse_lora_arg", "remove_loras",
    "set_lora_mode",
]

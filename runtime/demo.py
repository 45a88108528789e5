"""A tiny Wan 2.2 I2V model with random weights, written on the fly in the official
folder layout, and a built-in input image: `python -m runtime.generate --demo` runs the
whole pipeline (model folder recognition, tokenizer, umt5, VAE, both experts, sampler,
video writer) in seconds on a CPU, without downloading anything.

The weights are random, so the video shows moving colour noise, not the picture: the demo
proves that everything is installed and works together, not what the model can do.
Random init as in the golden reference sets: linear/conv weights N(0, 1/fan_in), biases
N(0, 0.05²), norm weights 1 + N(0, 0.1²), modulation tables N(0, 0.3²).
"""
from __future__ import annotations

import json
import math
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from .model_folder import OFFICIAL_HIGH, OFFICIAL_LOW, OFFICIAL_T5, OFFICIAL_TOKENIZER, OFFICIAL_VAE

DEMO_PROMPT = "a red sun sets behind green hills, clouds drift, the camera pans slowly to the right"
DEMO_SIZE = (128, 80)  # width, height of the built-in image and of the demo video
DEMO_FRAMES = 17
DEMO_STEPS = 10

# The tiny model: widths that keep every shape rule of the real one (heads of even size,
# text_dim = the encoder width, a VAE with the 8x spatial / 4x temporal strides).
DIT = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=256, in_dim=36, out_dim=16)
TEXT_DIM = 32
T5 = dict(dim=TEXT_DIM, dim_attn=TEXT_DIM, dim_ffn=64, num_heads=2, num_layers=2, num_buckets=32)
VAE = dict(dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1, temporal_downsample=(False, True, True))


def demo_image(width: int = DEMO_SIZE[0], height: int = DEMO_SIZE[1]) -> Image.Image:
    """A small landscape: sky gradient, a sun, two rows of hills."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    v = yy / max(1, height - 1)
    img = np.stack([255 * (0.35 + 0.5 * v), 255 * (0.55 + 0.3 * v), 255 * (0.95 - 0.2 * v)], axis=-1)
    sun = (xx - 0.7 * width) ** 2 + (yy - 0.35 * height) ** 2 < (0.12 * height) ** 2
    img[sun] = (250, 90, 40)
    for base, amp, color in ((0.62, 0.08, (70, 150, 60)), (0.75, 0.06, (40, 110, 40))):
        ridge = height * (base + amp * np.sin(xx / width * 2 * math.pi * 1.5 + base * 10))
        img[yy > ridge] = color
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


def _random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "modulation":
        return torch.randn(shape, generator=g) * 0.3
    if leaf == "gamma" or (leaf == "weight" and len(shape) == 1):  # norms
        return 1 + torch.randn(shape, generator=g) * 0.1
    if leaf == "bias" or len(shape) == 1:
        return torch.randn(shape, generator=g) * 0.05
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def _random_state(shapes: dict[str, tuple[int, ...]], g: torch.Generator, dtype=torch.float32) -> dict:
    return {name: _random_tensor(name, tuple(shape), g).to(dtype).contiguous()
            for name, shape in sorted(shapes.items())}


def _write_expert(folder: Path, g: torch.Generator) -> None:
    from .dit_config import DiTConfig, expected_shapes

    cfg = DiTConfig(model_type="i2v", text_dim=TEXT_DIM, patch_size=(1, 2, 2), heads_source="config.json", **DIT)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_random_state(expected_shapes(cfg), g), str(folder / "diffusion_pytorch_model.safetensors"))
    config = {"_class_name": "WanModel", "model_type": "i2v", "text_len": cfg.text_len, "eps": cfg.eps, **DIT}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _tokenizer_json() -> str:
    """A character-level Unigram tokenizer with umt5's special tokens (pad 0, </s> 1, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return tok.to_str()


def write_demo_model(folder: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny model into `folder` in the official Wan2.2-I2V-A14B layout."""
    from .t5 import T5Config
    from .vae import build_model
    from .vae_blocks import VAEConfig

    root = Path(folder)
    g = torch.Generator("cpu").manual_seed(seed)
    _write_expert(root / OFFICIAL_HIGH, g)
    _write_expert(root / OFFICIAL_LOW, g)

    tokenizer = root / OFFICIAL_TOKENIZER
    tokenizer.mkdir(parents=True, exist_ok=True)
    text = _tokenizer_json()
    (tokenizer / "tokenizer.json").write_text(text)
    vocab = len(json.loads(text)["model"]["vocab"])
    t5 = T5Config(vocab=vocab, **T5)
    torch.save(_random_state(t5.shapes(), g, torch.bfloat16), root / OFFICIAL_T5)

    with torch.device("meta"):
        vae = build_model(VAEConfig(version="2.1", dec_dim=VAE["dim"], **VAE))
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    torch.save(_random_state(shapes, g), root / OFFICIAL_VAE)
    return root

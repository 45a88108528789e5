"""What a Wan 2.2 DiT is, read from the shapes of its weights.

Every size comes from a tensor shape and the depth from the block indices, because the
official loader ignores several of its own config.json fields (text_dim, patch_size, ...).
Only the head count is invisible in the weights: it comes from the caller, from the
file's metadata or config.json, or from dim / 128 (the head size of every real Wan model).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

# The head size of every released Wan model (1.3B, 5B, 14B).
WAN_HEAD_DIM = 128

_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class DiTConfig:
    model_type: str  # "i2v" (in 36 = 16 noise + 4 mask + 16 image latent), "t2v" (16), "ti2v" (48)
    in_dim: int
    out_dim: int
    dim: int
    ffn_dim: int
    freq_dim: int
    text_dim: int
    num_heads: int
    num_layers: int
    patch_size: tuple[int, int, int]
    heads_source: str  # where num_heads came from: "argument", "gguf metadata", "config.json", "dim/128"
    text_len: int = 512  # contexts are zero-padded to this many rows
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_pairs(self) -> tuple[int, int, int]:
        """Complex channel pairs of a head given to the (frame, height, width) axes."""
        c = self.head_dim // 2
        return (c - 2 * (c // 3), c // 3, c // 3)

    @property
    def patch_numel(self) -> int:
        return math.prod(self.patch_size)

    def describe(self) -> str:
        return (
            f"Wan 2.2 {self.model_type.upper()} DiT: dim {self.dim}, {self.num_layers} blocks, "
            f"{self.num_heads} heads of {self.head_dim} (from {self.heads_source}), ffn {self.ffn_dim}, "
            f"in {self.in_dim} / out {self.out_dim} channels, text_dim {self.text_dim}, patch {list(self.patch_size)}"
        )


def model_type_for(in_dim: int, out_dim: int) -> str | None:
    """The Wan 2.2 variant that has these channel counts, or None."""
    if out_dim == 48 and in_dim == 48:
        return "ti2v"
    if in_dim == out_dim:
        return "t2v"
    if in_dim == out_dim + 20:  # y = 4 mask channels + the encoded first frame
        return "i2v"
    return None


def block_indices(names) -> list[int]:
    return sorted({int(m.group(1)) for n in names if (m := _BLOCK_INDEX.match(n))})


def detect_config(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    num_heads: int | None = None,
    heads_source: str = "argument",
    text_len: int = 512,
    eps: float = 1e-6,
) -> DiTConfig:
    """Sizes from tensor shapes (official names). `num_heads` None means dim / 128.
    Raises KeyError for a missing anchor tensor and ValueError for inconsistent sizes;
    the loader turns both into a message about the file."""
    pe = shapes["patch_embedding.weight"]  # [dim, in_dim, pt, ph, pw]
    if len(pe) != 5:
        raise ValueError(f"patch_embedding.weight has shape {list(pe)}, expected 5 dimensions [dim, in, 1, 2, 2]")
    dim, in_dim, patch = pe[0], pe[1], (pe[2], pe[3], pe[4])
    ffn_dim = shapes["blocks.0.ffn.0.weight"][0]
    freq_dim = shapes["time_embedding.0.weight"][1]
    text_dim = shapes["text_embedding.0.weight"][1]
    head_out = shapes["head.head.weight"][0]
    if head_out % math.prod(patch):
        raise ValueError(f"head.head.weight has {head_out} outputs, not a multiple of the patch size {list(patch)}")
    out_dim = head_out // math.prod(patch)
    layers = block_indices(shapes)
    if layers != list(range(len(layers))):
        missing = sorted(set(range(max(layers) + 1)) - set(layers))
        raise ValueError(f"blocks {missing} are missing (found blocks {layers[0]}..{layers[-1]})")
    model_type = model_type_for(in_dim, out_dim)
    if model_type is None:
        raise ValueError(
            f"{in_dim} input and {out_dim} output channels match no Wan 2.2 model "
            "(I2V-A14B: 36/16, T2V-A14B: 16/16, TI2V-5B: 48/48)"
        )
    if num_heads is None:
        num_heads, heads_source = max(1, dim // WAN_HEAD_DIM), "dim/128"
    if dim % num_heads or (dim // num_heads) % 2:
        raise ValueError(f"{num_heads} heads do not split dim {dim} into heads of an even size")
    return DiTConfig(
        model_type=model_type,
        in_dim=in_dim,
        out_dim=out_dim,
        dim=dim,
        ffn_dim=ffn_dim,
        freq_dim=freq_dim,
        text_dim=text_dim,
        num_heads=num_heads,
        num_layers=len(layers),
        patch_size=patch,
        heads_source=heads_source,
        text_len=text_len,
        eps=eps,
    )


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official state dict, with its torch shape."""
    d, f = cfg.dim, cfg.ffn_dim
    out = {
        "patch_embedding.weight": (d, cfg.in_dim, *cfg.patch_size),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
        "head.head.weight": (cfg.patch_numel * cfg.out_dim, d),
        "head.head.bias": (cfg.patch_numel * cfg.out_dim,),
        "head.modulation": (1, 2, d),
    }
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                out[f"{p}{attn}.{proj}.weight"] = (d, d)
                out[f"{p}{attn}.{proj}.bias"] = (d,)
            out[f"{p}{attn}.norm_q.weight"] = (d,)
            out[f"{p}{attn}.norm_k.weight"] = (d,)
        out[f"{p}norm3.weight"] = (d,)
        out[f"{p}norm3.bias"] = (d,)
        out[f"{p}ffn.0.weight"] = (f, d)
        out[f"{p}ffn.0.bias"] = (f,)
        out[f"{p}ffn.2.weight"] = (d, f)
        out[f"{p}ffn.2.bias"] = (d,)
        out[f"{p}modulation"] = (1, 6, d)
    return out

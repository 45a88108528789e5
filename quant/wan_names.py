"""Tensor names of the Wan DiT: ComfyUI and diffusers spellings -> official Wan names.

The official names are those of `WanModel` in Wan's `wan/modules/model.py`
(`blocks.N.self_attn.q.weight`, `head.modulation`, ...). Two other spellings exist:

* ComfyUI single files prefix every key with `model.diffusion_model.` (sometimes
  `model.`, or `net.`). The prefix is removed the way city96's convert.py does it: a
  `model.diffusion_model.` or `model.` prefix counts when ANY key has it (the keys
  without it belong to other models bundled in the file and are dropped); `net.` only
  when ALL keys have it.
* diffusers' `WanTransformer3DModel` renames most modules (its
  `convert_wan_transformer_to_diffusers`); the inverse is written here as rules. The
  trap: diffusers `norm2` is the official `norm3` (the affine cross-attention norm);
  the official norm1/norm2 have no weights.

`detect_model_kind` tells a Wan DiT from the text encoder and the VAE by key sets, so
that a caller can say "this file is a VAE" instead of failing on a missing tensor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Prefixes in city96's order: the first one any key starts with wins.
_ANY_KEY_PREFIXES = ("model.diffusion_model.", "model.")
_ALL_KEYS_PREFIXES = ("net.",)


@dataclass(frozen=True)
class PrefixStrip:
    prefix: str | None  # the prefix removed, None when the keys had none
    kept: dict[str, str]  # stripped name -> name in the file, in file order
    dropped: tuple[str, ...]  # keys without the prefix (other models in the same file)


def strip_prefix(names: list[str]) -> PrefixStrip:
    prefix = next((p for p in _ANY_KEY_PREFIXES if any(n.startswith(p) for n in names)), None)
    if prefix is None and names:
        prefix = next((p for p in _ALL_KEYS_PREFIXES if all(n.startswith(p) for n in names)), None)
    if prefix is None:
        return PrefixStrip(None, {n: n for n in names}, ())
    kept = {n[len(prefix):]: n for n in names if n.startswith(prefix)}
    dropped = tuple(n for n in names if not n.startswith(prefix))
    return PrefixStrip(prefix, kept, dropped)


# ---- diffusers -> official ----------------------------------------------------------

# Whole-name renames outside the blocks (prefix of the diffusers name -> official).
_GLOBAL_RENAMES = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    # Wan 2.1 I2V / FLF2V image branch.
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("proj_out.", "head.head."),
    ("patch_embedding.", "patch_embedding."),
)
_GLOBAL_EXACT = {
    "scale_shift_table": "head.modulation",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
}

# Inside blocks.N. (diffusers module path -> official module path).
_BLOCK_MODULES = {
    "attn1": "self_attn",
    "attn2": "cross_attn",
}
_ATTN_MODULES = {
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "o",
    "norm_q": "norm_q",
    "norm_k": "norm_k",
    "add_k_proj": "k_img",
    "add_v_proj": "v_img",
    "norm_added_k": "norm_k_img",
}
_BLOCK_OTHER = {
    "norm2": "norm3",  # diffusers norm2 = official norm3 (affine cross-attention norm)
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}

_DIFFUSERS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def diffusers_to_official(name: str) -> str | None:
    """The official Wan name of a diffusers `WanTransformer3DModel` tensor, or None
    when the name is not one of its tensors."""
    if name in _GLOBAL_EXACT:
        return _GLOBAL_EXACT[name]
    m = _DIFFUSERS_BLOCK.match(name)
    if m is None:
        for src, dst in _GLOBAL_RENAMES:
            if name.startswith(src):
                return dst + name[len(src):]
        return None
    index, rest = m.groups()
    if rest == "scale_shift_table":
        return f"blocks.{index}.modulation"
    module, _, leaf = rest.rpartition(".")  # leaf: weight / bias
    if leaf not in ("weight", "bias"):
        return None
    head, _, tail = module.partition(".")
    if head in _BLOCK_MODULES and tail in _ATTN_MODULES:
        return f"blocks.{index}.{_BLOCK_MODULES[head]}.{_ATTN_MODULES[tail]}.{leaf}"
    if module in _BLOCK_OTHER:
        return f"blocks.{index}.{_BLOCK_OTHER[module]}.{leaf}"
    return None


# ---- what kind of model a set of names belongs to ------------------------------------

WAN_DIT = "wan_dit"
WAN_DIT_DIFFUSERS = "wan_dit_diffusers"
T5 = "t5"
VAE = "vae"
UNKNOWN = "unknown"

# Each kind: alternatives, each a set of keys that must all be present.
_KIND_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    # city96's detection keys for arch "wan".
    WAN_DIT: (("blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation"),),
    WAN_DIT_DIFFUSERS: (
        ("blocks.0.attn1.norm_q.weight", "condition_embedder.text_embedder.linear_2.weight", "scale_shift_table"),
    ),
    T5: (
        ("token_embedding.weight", "blocks.0.attn.q.weight", "norm.weight"),  # official Wan T5Encoder
        ("encoder.block.0.layer.0.SelfAttention.q.weight",),  # Hugging Face (u)mT5
        ("token_embd.weight", "enc.blk.0.attn_q.weight"),  # llama.cpp t5encoder GGUF
    ),
    VAE: (
        ("encoder.conv1.weight", "decoder.conv1.weight", "conv1.weight"),  # official Wan 2.1 / 2.2 VAE
        ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight"),  # diffusers AutoencoderKLWan
    ),
}

KIND_DESCRIPTIONS = {
    WAN_DIT: "a Wan DiT (diffusion transformer)",
    WAN_DIT_DIFFUSERS: "a Wan DiT in diffusers naming",
    T5: "a umt5 text encoder",
    VAE: "a Wan VAE",
    UNKNOWN: "not a model wanrt knows",
}


def detect_model_kind(names) -> str:
    """One of WAN_DIT, WAN_DIT_DIFFUSERS, T5, VAE, UNKNOWN for a set of tensor names
    (prefixes already stripped)."""
    present = set(names)
    for kind, alternatives in _KIND_KEYS.items():
        if any(all(k in present for k in keys) for keys in alternatives):
            return kind
    return UNKNOWN

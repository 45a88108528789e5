"""Tensor names of the umt5 text encoder: Hugging Face and llama.cpp -> official Wan.

The official names are those of `T5Encoder` in Wan's `wan/modules/t5.py`
(`blocks.N.attn.q.weight`, ...). Hugging Face `UMT5EncoderModel` files use
`encoder.block.N.layer.M...`, llama.cpp `t5encoder` GGUF files (city96's
umt5-xxl-encoder-*.gguf) use `enc.blk.N.attn_q.weight`, ... (gguf-py tensor_mapping).
The tables pair each official per-block name with its two foreign spellings.
"""
from __future__ import annotations

import re

# official suffix of blocks.N.<suffix> -> (HF suffix of encoder.block.N.<suffix>, GGUF suffix of enc.blk.N.<suffix>)
BLOCK_NAMES: dict[str, tuple[str, str]] = {
    "norm1.weight": ("layer.0.layer_norm.weight", "attn_norm.weight"),
    "attn.q.weight": ("layer.0.SelfAttention.q.weight", "attn_q.weight"),
    "attn.k.weight": ("layer.0.SelfAttention.k.weight", "attn_k.weight"),
    "attn.v.weight": ("layer.0.SelfAttention.v.weight", "attn_v.weight"),
    "attn.o.weight": ("layer.0.SelfAttention.o.weight", "attn_o.weight"),
    "pos_embedding.embedding.weight": ("layer.0.SelfAttention.relative_attention_bias.weight", "attn_rel_b.weight"),
    "norm2.weight": ("layer.1.layer_norm.weight", "ffn_norm.weight"),
    # The GELU branch: HF wi_0, llama.cpp ffn_gate. The linear branch: wi_1, ffn_up.
    "ffn.gate.0.weight": ("layer.1.DenseReluDense.wi_0.weight", "ffn_gate.weight"),
    "ffn.fc1.weight": ("layer.1.DenseReluDense.wi_1.weight", "ffn_up.weight"),
    "ffn.fc2.weight": ("layer.1.DenseReluDense.wo.weight", "ffn_down.weight"),
}

# official name -> (HF names, GGUF name) for the tensors outside the blocks. HF ties
# the encoder's embedding to `shared`; save_pretrained writes `shared.weight` only,
# other writers `encoder.embed_tokens.weight` instead or as well.
GLOBAL_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "token_embedding.weight": (("shared.weight", "encoder.embed_tokens.weight"), "token_embd.weight"),
    "norm.weight": (("encoder.final_layer_norm.weight",), "enc.output_norm.weight"),
}

# Parts of full encoder-decoder checkpoints that the encoder does not use.
_NOT_ENCODER = re.compile(r"^(decoder\.|dec\.|lm_head\.|output\.weight$)")

_OFFICIAL_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")
_GGUF_BLOCK = re.compile(r"^enc\.blk\.(\d+)\.(.+)$")

_FROM_HF = {hf: official for official, (hf, _) in BLOCK_NAMES.items()}
_FROM_GGUF = {gg: official for official, (_, gg) in BLOCK_NAMES.items()}
_GLOBAL_FROM_FOREIGN = {
    foreign: official
    for official, (hf_names, gguf_name) in GLOBAL_NAMES.items()
    for foreign in (*hf_names, gguf_name)
}


def official_name(name: str) -> str | None:
    """The official Wan name of a umt5 encoder tensor given under its official, HF or
    llama.cpp name; None when the name is not one of the encoder's tensors."""
    if name in GLOBAL_NAMES:
        return name
    if name in _GLOBAL_FROM_FOREIGN:
        return _GLOBAL_FROM_FOREIGN[name]
    for pattern, table in ((_OFFICIAL_BLOCK, None), (_HF_BLOCK, _FROM_HF), (_GGUF_BLOCK, _FROM_GGUF)):
        m = pattern.match(name)
        if m:
            index, suffix = m.groups()
            official = suffix if table is None else table.get(suffix)
            if official is None or official not in BLOCK_NAMES:
                return None
            return f"blocks.{int(index)}.{official}"
    return None


def is_decoder_part(name: str) -> bool:
    """True for tensors of a full T5 (decoder, LM head) that an encoder load skips."""
    return bool(_NOT_ENCODER.match(name))


def official_names(num_layers: int) -> list[str]:
    """Every tensor name of an encoder with `num_layers` blocks, in model order."""
    names = ["token_embedding.weight"]
    for i in range(num_layers):
        names += [f"blocks.{i}.{suffix}" for suffix in BLOCK_NAMES]
    names.append("norm.weight")
    return names

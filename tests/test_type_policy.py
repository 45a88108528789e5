"""The tensor-type table: city96's layout, derived from the golden files' own listings."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from quant.ggml_types import GGMLType
from quant.type_policy import (
    Override,
    base_float_type,
    is_quantizable,
    parse_override,
    plan_tensor,
)
from quant.wan_names import strip_prefix


def _source_dtypes(path):
    with safe_open(str(path), "pt") as f:
        kept = strip_prefix(list(f.keys())).kept
        return {name: f.get_slice(raw).get_dtype() for name, raw in kept.items()}, {
            name: tuple(f.get_slice(raw).get_shape()) for name, raw in kept.items()
        }


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@pytest.mark.golden
def test_plan_reproduces_every_golden_file_layout(golden, city96_routes):
    listing = {e["file"]: e for e in json.loads((golden / "gguf/wan_tiny/listing.json").read_text())}
    routes = city96_routes
    assert set(routes) == set(listing)
    for file, (src, target, base) in routes.items():
        dtype_names, shapes = _source_dtypes(golden / "gguf/wan_tiny" / src)
        dtypes = {n: _DTYPES[d] for n, d in dtype_names.items()}
        for via in (base, None):
            floats = base_float_type(target, via)
            for t in listing[file]["tensors"]:
                plan = plan_tensor(t["name"], shapes[t["name"]], dtypes[t["name"]], target=target, base=floats, via=via)
                assert plan.ggml_type.name == t["ggml_type"], (file, t["name"], plan)
                assert list(plan.shape) == t["torch_shape"]


def test_block_linear_weights_are_quantized_and_ffn_down_is_bumped():
    kw = dict(base=GGMLType.F16)
    f32 = torch.float32
    for target, down in ((GGMLType.Q4_0, GGMLType.Q4_1), (GGMLType.Q5_0, GGMLType.Q5_1),
                         (GGMLType.Q8_0, GGMLType.Q8_0), (GGMLType.Q4_1, GGMLType.Q4_1)):
        assert plan_tensor("blocks.3.ffn.2.weight", (5120, 13824), f32, target=target, **kw).ggml_type == down
        assert plan_tensor("blocks.3.ffn.0.weight", (13824, 5120), f32, target=target, **kw).ggml_type == target
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                name = f"blocks.3.{attn}.{p}.weight"
                assert plan_tensor(name, (5120, 5120), f32, target=target, **kw).ggml_type == target
    # Embeddings, head, projections: the base float type; biases/norms/modulation F32.
    for name, shape in (("text_embedding.0.weight", (5120, 4096)), ("time_embedding.2.weight", (5120, 5120)),
                        ("time_projection.1.weight", (30720, 5120)), ("head.head.weight", (64, 5120))):
        assert plan_tensor(name, shape, f32, target=GGMLType.Q8_0, **kw).ggml_type == GGMLType.F16
        assert plan_tensor(name, shape, f32, target=GGMLType.Q8_0, base=GGMLType.BF16).ggml_type == GGMLType.BF16
    for name, shape in (("blocks.0.ffn.0.bias", (13824,)), ("blocks.0.norm3.weight", (5120,)),
                        ("blocks.0.modulation", (1, 6, 5120)), ("head.modulation", (1, 2, 5120))):
        assert plan_tensor(name, shape, f32, target=GGMLType.Q8_0, **kw).ggml_type == GGMLType.F32
    pe = plan_tensor("patch_embedding.weight", (5120, 36, 1, 2, 2), f32, target=GGMLType.Q4_0, **kw)
    assert pe.ggml_type == GGMLType.F32


def test_f16_sources_keep_small_tensors_f16_and_5d_stays_f32():
    f16 = torch.float16
    kw = dict(target=GGMLType.Q8_0, base=GGMLType.F16)
    for name, shape in (("blocks.0.ffn.0.bias", (13824,)), ("blocks.0.modulation", (1, 6, 5120)),
                        ("blocks.0.self_attn.norm_q.weight", (5120,))):
        assert plan_tensor(name, shape, f16, **kw).ggml_type == GGMLType.F16
    assert plan_tensor("patch_embedding.weight", (5120, 36, 1, 2, 2), f16, **kw).ggml_type == GGMLType.F32
    # <= 1024 elements: F32 only from f32/bf16 sources.
    assert plan_tensor("text_embedding.0.weight", (32, 32), torch.bfloat16, **kw).ggml_type == GGMLType.F32
    assert plan_tensor("text_embedding.0.weight", (32, 32), f16, **kw).ggml_type == GGMLType.F16
    # ...but a small block weight is still quantized (llama-quantize reads its F32 base).
    assert plan_tensor("blocks.0.self_attn.q.weight", (32, 32), torch.bfloat16, **kw).ggml_type == GGMLType.Q8_0


def test_float_targets():
    f32 = torch.float32
    assert plan_tensor("blocks.0.self_attn.q.weight", (64, 64), f32, target=GGMLType.F32, base=GGMLType.F32).ggml_type == GGMLType.F32
    assert plan_tensor("blocks.0.ffn.0.bias", (64,), f32, target=GGMLType.F32, base=GGMLType.F32).ggml_type == GGMLType.F32
    assert plan_tensor("blocks.0.self_attn.q.weight", (64, 64), f32, target=GGMLType.BF16, base=GGMLType.BF16).ggml_type == GGMLType.BF16
    assert base_float_type(GGMLType.F16, GGMLType.BF16) == GGMLType.F16
    assert base_float_type(GGMLType.Q8_0, GGMLType.F16) == GGMLType.F16
    # No route given: each tensor keeps a float type like its own, as city96's convert.py does.
    assert base_float_type(GGMLType.Q8_0, None) is None
    emb = "text_embedding.0.weight"
    for dtype, want in ((torch.bfloat16, GGMLType.BF16), (torch.float32, GGMLType.F16), (torch.float16, GGMLType.F16)):
        assert plan_tensor(emb, (64, 64), dtype, target=GGMLType.Q8_0, base=None).ggml_type == want


def test_round_via_only_for_quantized_tensors_with_a_float_base():
    f32 = torch.float32
    q = plan_tensor("blocks.0.self_attn.q.weight", (64, 64), f32, target=GGMLType.Q8_0, base=GGMLType.F16, via=GGMLType.F16)
    assert q.round_via == GGMLType.F16
    # An F32-base tensor (<= 1024 elements) is quantized from its own values, as llama-quantize does.
    small = plan_tensor("blocks.0.self_attn.q.weight", (32, 32), f32, target=GGMLType.Q8_0, base=GGMLType.F16, via=GGMLType.F16)
    assert small.ggml_type == GGMLType.Q8_0 and small.round_via is None
    emb = plan_tensor("text_embedding.0.weight", (64, 64), f32, target=GGMLType.Q8_0, base=GGMLType.F16, via=GGMLType.F16)
    assert emb.ggml_type == GGMLType.F16 and emb.round_via is None
    assert plan_tensor("blocks.0.self_attn.q.weight", (64, 64), f32, target=GGMLType.Q8_0, base=GGMLType.F16).round_via is None


def test_overrides_last_match_wins_and_bad_rows_fall_back_to_f16():
    f32 = torch.float32
    keep = (parse_override("blocks.0.*=q8_0"), parse_override("blocks.0.ffn.*=f16"), parse_override("head.head.weight=q4_0"))
    kw = dict(target=GGMLType.Q4_0, base=GGMLType.F16, overrides=keep)
    assert plan_tensor("blocks.0.self_attn.q.weight", (64, 64), f32, **kw).ggml_type == GGMLType.Q8_0
    assert plan_tensor("blocks.0.ffn.2.weight", (64, 128), f32, **kw).ggml_type == GGMLType.F16
    assert plan_tensor("blocks.1.ffn.2.weight", (64, 128), f32, **kw).ggml_type == GGMLType.Q4_1
    assert plan_tensor("head.head.weight", (64, 128), f32, **kw).ggml_type == GGMLType.Q4_0
    odd = plan_tensor("blocks.1.self_attn.q.weight", (64, 100), f32, target=GGMLType.Q8_0, base=GGMLType.F16)
    assert odd.ggml_type == GGMLType.F16 and "not a multiple of 32" in odd.reason
    pe = plan_tensor("patch_embedding.weight", (64, 36, 1, 2, 2), f32, target=GGMLType.Q8_0, base=GGMLType.F16,
                     overrides=(Override("patch_*", GGMLType.Q8_0),))
    assert pe.ggml_type == GGMLType.F16


def test_parse_override_errors():
    assert parse_override(" blocks.1?.* = q5_1") == Override("blocks.1?.*", GGMLType.Q5_1)
    for bad in ("blocks.0.*", "=q8_0", "blocks.0.*=q9_9", "blocks.0.*=q4_k"):
        with pytest.raises(ValueError):
            parse_override(bad)


def test_is_quantizable():
    assert is_quantizable("blocks.0.cross_attn.o.weight", (64, 64))
    assert not is_quantizable("blocks.0.cross_attn.o.bias", (64,))
    assert not is_quantizable("blocks.0.modulation", (1, 6, 64))
    assert not is_quantizable("img_emb.proj.1.weight", (64, 64))

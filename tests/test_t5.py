"""The umt5 encoder against the golden outputs of Wan's own T5Encoder (tiny random model)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quant.ggml_types import GGMLType
from quant.t5_names import official_name
from runtime.t5 import T5Config, fp16_clamp, load_text_encoder, position_buckets
from runtime.tokenizer import TEXT_LEN, Tokenizer, load_tokenizer

pytestmark = pytest.mark.golden

ATOL_FP32 = 1e-4  # README: an fp32 implementation matches to a few 1e-6


@pytest.fixture(scope="module")
def t5(golden):
    return golden / "t5"


@pytest.fixture(scope="module")
def io(t5):
    return load_file(str(t5 / "io.safetensors"))


@pytest.fixture(scope="module")
def encoder(t5):
    return load_text_encoder(t5 / "weights.safetensors", dtype=torch.float32, cache=False)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_config_from_weights(encoder, t5):
    cfg = json.loads((t5 / "config.json").read_text())["resolved_T5Encoder_args"]
    c = encoder.config
    assert (c.vocab, c.dim, c.dim_attn, c.dim_ffn, c.num_heads, c.num_layers, c.num_buckets) == (
        cfg["vocab"], cfg["dim"], cfg["dim_attn"], cfg["dim_ffn"], cfg["num_heads"], cfg["num_layers"], cfg["num_buckets"]
    )
    # every weight is a buffer of the model, under its official name, none left unset
    names = {n for n, _ in encoder.model.named_buffers()}
    assert names == set(load_file(str(t5 / "weights.safetensors")))
    assert not any(b.is_meta for b in encoder.model.buffers())


def test_default_config_is_umt5_xxl(t5):
    full = json.loads((t5 / "config.json").read_text())["full_size_umt5_xxl"]
    c = T5Config()
    assert (c.vocab, c.dim, c.dim_attn, c.dim_ffn, c.num_heads, c.num_layers, c.num_buckets) == (
        full["vocab_size"], full["dim"], full["dim_attn"], full["dim_ffn"], full["num_heads"],
        full["encoder_layers"], full["num_buckets"],
    )
    assert TEXT_LEN == full["text_len"]


def test_position_buckets(io):
    key = next(k for k in io if k.startswith("rel_pos_bucket_for_rel_"))
    lo, hi = (int(v) for v in key.removeprefix("rel_pos_bucket_for_rel_").split("_to_"))
    assert torch.equal(position_buckets(torch.arange(lo, hi + 1)), io[key])


def test_forward_matches_official(encoder, io):
    out = encoder.forward(io["ids"], io["mask"])
    torch.testing.assert_close(out, io["out"], atol=ATOL_FP32, rtol=0)
    long = encoder.forward(io["long_ids"], io["long_mask"])
    torch.testing.assert_close(long, io["long_out"], atol=ATOL_FP32, rtol=0)


def test_intermediates_through_the_block_hook(t5, io):
    enc = load_text_encoder(t5 / "weights.safetensors", dtype=torch.float32, cache=False)
    seen = {}
    run = enc.model.run_block

    def spy(index, x, buckets, masked_keys):
        seen[index] = y = run(index, x, buckets, masked_keys)
        if index == 0:
            seen["bias0"] = enc.model.blocks[0].pos_embedding(buckets, x.dtype)
        return y

    enc.model.run_block = spy  # the override point a streaming engine uses
    enc.forward(io["ids"], io["mask"])
    n = enc.config.num_layers
    assert sorted(k for k in seen if isinstance(k, int)) == list(range(n))
    for i in range(n):
        torch.testing.assert_close(seen[i], io[f"hidden_after_block{i}"], atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(seen["bias0"], io["pos_bias_block0"], atol=0, rtol=0)


def test_masked_keys_get_exactly_zero_weight(encoder, io):
    ids, mask = io["long_ids"].clone(), io["long_mask"]
    ref = encoder.forward(ids, mask)
    pads = mask == 0
    assert pads.any()
    ids[pads] = torch.randint(3, encoder.config.vocab, (int(pads.sum()),), generator=torch.Generator().manual_seed(0))
    out = encoder.forward(ids, mask)
    valid = mask.bool()
    assert torch.equal(out[valid], ref[valid])  # bit for bit: pad content cannot leak
    unmasked = encoder.forward(ids, torch.ones_like(mask))
    assert not torch.allclose(unmasked[valid], ref[valid], atol=1e-3)


def test_hf_names(t5, io):
    keymap = json.loads((t5 / "key_map_official_to_hf.json").read_text())
    for official, hf in keymap.items():
        assert official_name(hf) == official and official_name(official) == official
    assert official_name("encoder.embed_tokens.weight") == "token_embedding.weight"
    enc = load_text_encoder(t5 / "hf_weights.safetensors", dtype=torch.float32, cache=False)
    torch.testing.assert_close(enc.forward(io["ids"], io["mask"]), io["out"], atol=ATOL_FP32, rtol=0)


def test_hf_file_with_embed_tokens_and_decoder(t5, io, tmp_path):
    weights = load_file(str(t5 / "hf_weights.safetensors"))
    weights["encoder.embed_tokens.weight"] = weights.pop("shared.weight")
    weights["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(2, 2)  # full T5: skipped
    save_file(weights, str(tmp_path / "model.safetensors"))
    enc = load_text_encoder(tmp_path, dtype=torch.float32, cache=False)  # an HF folder
    torch.testing.assert_close(enc.forward(io["ids"], io["mask"]), io["out"], atol=ATOL_FP32, rtol=0)


def test_sharded_hf_folder(t5, io, tmp_path):
    weights = load_file(str(t5 / "hf_weights.safetensors"))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(tmp_path / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    enc = load_text_encoder(tmp_path, dtype=torch.float32, cache=False)
    torch.testing.assert_close(enc.forward(io["ids"], io["mask"]), io["out"], atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("style", ["scale_weight", "weight_scale"])
def test_comfyui_scaled_fp8(t5, io, tmp_path, style):
    """fp8 weights with a per-tensor scale (ComfyUI's fp8_scaled files: the older
    `scale_weight` + `scaled_fp8` layout, or `weight_scale` + `comfy_quant`) stay fp8."""
    weights = load_file(str(t5 / "hf_weights.safetensors"))
    scaled, dequantized = {}, {}
    if style == "scale_weight":
        scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    for name, w in weights.items():
        if w.dim() == 2 and name != "shared.weight" and "relative_attention_bias" not in name:
            scale = w.abs().amax() / 448.0
            w8 = (w / scale).to(torch.float8_e4m3fn)
            layer = name.removesuffix(".weight")
            scaled[name] = w8
            if style == "scale_weight":
                scaled[layer + ".scale_weight"], scaled[layer + ".scale_input"] = scale.reshape(1), torch.ones(1)
            else:
                scaled[layer + ".weight_scale"], scaled[layer + ".input_scale"] = scale.reshape(()), torch.ones(())
                scaled[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
            dequantized[name] = w8.to(torch.float32) * scale
        else:
            scaled[name] = dequantized[name] = w
    save_file(scaled, str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    save_file(dequantized, str(tmp_path / "dequantized.safetensors"))
    enc = load_text_encoder(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", dtype=torch.float32, cache=False)
    assert enc.model.blocks[0].attn.q.weight.dtype == torch.float8_e4m3fn
    ref = load_text_encoder(tmp_path / "dequantized.safetensors", dtype=torch.float32, cache=False)
    out = enc.forward(io["ids"], io["mask"])
    torch.testing.assert_close(out, ref.forward(io["ids"], io["mask"]), atol=ATOL_FP32, rtol=0)
    assert _rel_l2(out, io["out"]) < 0.2  # fp8 is coarse, but it is the same model


def test_gguf_q8_0_stays_packed(t5, golden):
    meta = json.loads((t5 / "gguf_tensors.json").read_text())
    ref = load_file(str(t5 / "gguf_io.safetensors"))["out_q8_0_weights"]
    io = load_file(str(t5 / "io.safetensors"))
    enc = load_text_encoder(t5 / meta["file"], t5 / "tokenizer", dtype=torch.float32, cache=False)
    types = {t["official"]: t["type"] for t in meta["tensors"]}
    for name, ggml_type in types.items():
        module = enc.model.get_submodule(name.rpartition(".")[0])
        if ggml_type not in ("F32", "F16", "BF16"):
            assert module.ggml_type == GGMLType[ggml_type], name  # kept in its block format
            assert module.weight.dtype == torch.uint8
    torch.testing.assert_close(enc.forward(io["ids"], io["mask"]), ref, atol=ATOL_FP32, rtol=0)


def test_gguf_without_tokenizer_folder_uses_its_metadata(t5, io):
    meta = json.loads((t5 / "gguf_tensors.json").read_text())
    with pytest.warns(UserWarning, match="tokenizer stored in the GGUF"):
        enc = load_text_encoder(t5 / meta["file"], dtype=torch.float32, cache=False)
    prompts = json.loads((t5 / "config.json").read_text())["prompts"]
    ids, mask = Tokenizer(enc.tokenizer.backend, text_len=io["ids"].shape[1])(prompts)
    assert torch.equal(ids, io["ids"]) and torch.equal(mask, io["mask"])


def test_official_pth_both_torch_formats(t5, io, tmp_path):
    state = load_file(str(t5 / "weights.safetensors"))
    for zipped in (True, False):
        path = tmp_path / f"enc_{zipped}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=zipped)
        enc = load_text_encoder(path, dtype=torch.float32, cache=False)
        torch.testing.assert_close(enc.forward(io["ids"], io["mask"]), io["out"], atol=ATOL_FP32, rtol=0)


class _Armed:
    """Unpickling this creates a file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_running_pickle_is_refused(t5, tmp_path):
    state = load_file(str(t5 / "weights.safetensors"))
    marker = tmp_path / "pwned"
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({**state, "payload": _Armed(marker)}, path)
    with pytest.raises(ValueError, match="never executes pickled code"):
        load_text_encoder(path, dtype=torch.float32, cache=False)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # control: the file is really armed
    assert marker.exists()


def test_bf16_like_official(t5, io):
    report = json.loads((t5 / "report.json").read_text())["tolerances"]
    enc = load_text_encoder(t5 / "weights.safetensors", dtype=torch.bfloat16, cache=False)
    assert enc.dtype == torch.bfloat16
    out = enc.forward(io["ids"], io["mask"])
    assert out.dtype == torch.bfloat16
    valid = io["mask"].bool()
    bound = report["bf16_model_vs_fp32__valid_positions"]["rel_l2"]
    assert _rel_l2(out[valid], io["out"][valid]) <= 1.25 * bound


def test_encode_returns_trimmed_rows(t5, io):
    prompts = json.loads((t5 / "config.json").read_text())["prompts"]
    tok = load_tokenizer(t5 / "tokenizer", text_len=io["ids"].shape[1])
    enc = load_text_encoder(t5 / "weights.safetensors", tok, dtype=torch.float32, cache=False)
    ids, mask = tok(prompts)
    assert torch.equal(ids, io["ids"]) and torch.equal(mask, io["mask"])
    out = enc.encode(prompts)
    assert [tuple(o.shape) for o in out] == [(int(n), enc.config.dim) for n in io["seq_lens"]]
    for i, o in enumerate(out):
        torch.testing.assert_close(o, io[f"trimmed_{i}"], atol=ATOL_FP32, rtol=0)
    # a repeated prompt gives the same rows
    again = enc.encode([prompts[1], prompts[1]])
    torch.testing.assert_close(again[0], io["trimmed_1"], atol=ATOL_FP32, rtol=0)
    assert torch.equal(again[0], again[1])


def test_tokenizer_found_beside_the_weights(t5, tmp_path):
    (tmp_path / "google").mkdir()
    shutil.copytree(t5 / "tokenizer", tmp_path / "google" / "umt5-xxl")
    shutil.copy(t5 / "weights.safetensors", tmp_path / "text_encoder.safetensors")
    enc = load_text_encoder(tmp_path / "text_encoder.safetensors", dtype=torch.float32, cache=False)
    assert enc.tokenizer is not None and enc.tokenizer.text_len == 512
    bare = load_text_encoder(t5 / "weights.safetensors", dtype=torch.float32, cache=False)
    with pytest.raises(ValueError, match="tokenizer="):
        bare.encode(["a prompt"])


def test_fp16_clamp_only_in_fp16():
    big = torch.tensor([float("inf"), -float("inf"), 1.0])
    clamped = fp16_clamp(big.half())
    assert torch.isfinite(clamped).all() and clamped[2] == 1
    assert torch.isinf(fp16_clamp(big.bfloat16())).sum() == 2


def test_clear_errors_for_wrong_files(t5, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_text_encoder(tmp_path / "nope.pth")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not weights")
    with pytest.raises(ValueError, match="not a GGUF, safetensors or torch file"):
        load_text_encoder(junk)
    state = load_file(str(t5 / "weights.safetensors"))
    state.pop("blocks.1.ffn.fc2.weight")
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match="blocks.1.ffn.fc2.weight"):
        load_text_encoder(tmp_path / "cut.safetensors")
    save_file({"patch_embedding.weight": torch.zeros(2, 2)}, str(tmp_path / "dit.safetensors"))
    with pytest.raises(ValueError, match="not a umt5 text encoder"):
        load_text_encoder(tmp_path / "dit.safetensors")


@pytest.mark.gpu
def test_cuda_bf16_and_packed(t5, io):
    """On the GPU: Wan's dtype, quantized weights decoded there, the token table in host memory."""
    report = json.loads((t5 / "report.json").read_text())["tolerances"]
    valid = io["mask"].bool()
    tok = load_tokenizer(t5 / "tokenizer", text_len=io["ids"].shape[1])
    enc = load_text_encoder(t5 / "weights.safetensors", tok, device="cuda", cache=False)
    assert enc.model.token_embedding.weight.device.type == "cpu"
    assert enc.model.blocks[0].attn.q.weight.device.type == "cuda"
    out = enc.forward(io["ids"], io["mask"])
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16
    bound = report["bf16_model_vs_fp32__valid_positions"]["rel_l2"]
    assert _rel_l2(out.cpu()[valid], io["out"][valid]) <= 1.5 * bound
    fp32 = load_text_encoder(t5 / "weights.safetensors", device="cuda", dtype=torch.float32, cache=False)
    torch.testing.assert_close(fp32.forward(io["ids"], io["mask"]).cpu(), io["out"], atol=ATOL_FP32, rtol=0)
    meta = json.loads((t5 / "gguf_tensors.json").read_text())
    ref = load_file(str(t5 / "gguf_io.safetensors"))["out_q8_0_weights"]
    q8 = load_text_encoder(t5 / meta["file"], tok, device="cuda", dtype=torch.float32, cache=False)
    torch.testing.assert_close(q8.forward(io["ids"], io["mask"]).cpu(), ref, atol=ATOL_FP32, rtol=0)
    trimmed = enc.encode(json.loads((t5 / "config.json").read_text())["prompts"])
    assert [t.shape[0] for t in trimmed] == io["seq_lens"].tolist() and trimmed[0].device.type == "cuda"

"""Applying LoRAs to a loaded expert: the golden merged weights and forward through the
side path and through the merge, per expert, several at once, exact removal, packed
weights, and experts whose blocks a streaming engine will bring."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from runtime import load_dit
from runtime.lora import LoraSpec, apply_loras, lora_state, remove_loras, set_lora_mode
from runtime.qlinear import QLinear

MODES = ("merge", "side")

pytestmark = pytest.mark.filterwarnings("ignore:.*key\\(s\\)")


@pytest.fixture(scope="module")
def root(golden):
    return golden / "lora"


@pytest.fixture(scope="module")
def manifest(root):
    return json.loads((root / "manifest.json").read_text())


@pytest.fixture(scope="module")
def base_path(root, manifest):
    return root / manifest["base_checkpoint"]


@pytest.fixture(scope="module")
def heads(manifest):
    return manifest["base_config"]["num_heads"]


@pytest.fixture(scope="module")
def base(base_path):
    return load_file(str(base_path))


@pytest.fixture(scope="module")
def ref(base_path):
    """The official forward's inputs (beside the base checkpoint) and the merged outputs."""
    path = base_path.parent / "ref_forward.safetensors"
    with safe_open(str(path), "pt") as f:
        seq_len = int(f.metadata()["seq_len"])
    return load_file(str(path)), seq_len


@pytest.fixture(scope="module")
def merged_out(root):
    return load_file(str(root / "ref_forward_merged.safetensors"))


def forward(model, ref):
    r, seq_len = ref
    return model([r["x"]], r["t"], [r["context"]], seq_len, y=[r["y"]])[0]


def applicable(manifest):
    return [e for e in manifest["files"] if e["patched_tensors"]]


def expected(root, entry, strength, base) -> dict[str, torch.Tensor]:
    merged = load_file(str(root / f"merged_s{strength}.safetensors"))
    return {n: merged[n] if n in entry["patched_tensors"] else t for n, t in base.items()}


def effective(model, name: str) -> torch.Tensor:
    """What the model computes with for tensor `name`: for a linear's weight, read back
    through its forward on the identity (y = I·W'ᵀ + b'), so the side path is seen too."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, QLinear) and attr == "weight":
        eye = torch.eye(module.in_features)
        return (module(eye) - module.bias).T
    return getattr(module, attr)


def max_abs(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.golden
@pytest.mark.parametrize("mode", MODES)
def test_every_naming_gives_the_merged_weights(root, manifest, base_path, base, heads, mode):
    model = load_dit(base_path, num_heads=heads)
    for strength in manifest["strengths"]:
        for e in applicable(manifest):
            apply_loras(model, [LoraSpec(root / e["file"], strength)], mode=mode)
            want = expected(root, e, strength, base)
            for name in base:
                assert max_abs(effective(model, name), want[name]) <= 1e-6, (e["file"], strength, mode, name)
                if mode == "merge" and name.endswith(".weight") and isinstance(model.get_submodule(name[:-7]),
                                                                               QLinear):
                    lin = model.get_submodule(name[:-7])
                    assert max_abs(lin.dense_weight(torch.float32), want[name]) <= 1e-6
    remove_loras(model)


@pytest.mark.golden
@pytest.mark.parametrize("mode", MODES)
def test_forward_equals_the_forward_on_merged_weights(tmp_path, root, manifest, base_path, base, heads, ref,
                                                      merged_out, mode):
    """Files that patch every tensor of the reference: the official forward on merged
    weights (ref_forward_merged); the others: our forward on their expected weights."""
    model = load_dit(base_path, num_heads=heads)
    all_patched = set(load_file(str(root / "delta_s1.0.safetensors")))
    assert max_abs(forward(model, ref), merged_out["out_base"]) <= 1e-4
    for strength in manifest["strengths"]:
        for e in applicable(manifest):
            apply_loras(model, [LoraSpec(root / e["file"], strength)], mode=mode)
            out = forward(model, ref)
            if set(e["patched_tensors"]) == all_patched:
                want = merged_out[f"out_s{strength}"]
            else:
                path = tmp_path / "expected.safetensors"
                save_file(expected(root, e, strength, base), str(path))
                want = forward(load_dit(path, num_heads=heads), ref)
            assert max_abs(out, want) <= 1e-4, (e["file"], strength, mode)
    remove_loras(model)
    assert torch.equal(forward(model, ref), forward(load_dit(base_path, num_heads=heads), ref))


@pytest.mark.golden
def test_per_expert_targeting_and_several_loras(root, manifest, base_path, base, heads):
    entries = applicable(manifest)
    full = next(e for e in entries if e["naming"].startswith("a:"))
    kohya = next(e for e in entries if e["naming"].startswith("b:"))
    specs = [f"high={root / full['file']}:1.0", LoraSpec(root / kohya["file"], 0.6, "low")]
    high, low = load_dit(base_path, num_heads=heads), load_dit(base_path, num_heads=heads)
    apply_loras(high, specs, expert="high")
    apply_loras(low, specs, expert="low")
    assert set(lora_state(high).reports[0].patched) == set(full["patched_tensors"])
    assert set(lora_state(low).reports[0].patched) == set(kohya["patched_tensors"])
    for model, entry, strength in ((high, full, 1.0), (low, kohya, 0.6)):
        want = expected(root, entry, strength, base)
        for name in base:
            assert max_abs(effective(model, name), want[name]) <= 1e-6, name

    # Two LoRAs on one expert add up: a at 0.6 + a2 (same values, other spelling) at 0.4 = a at 1.0.
    a2 = next(e for e in entries if e["naming"].startswith("a2:"))
    both = [LoraSpec(root / full["file"], 0.6), LoraSpec(root / a2["file"], 0.4, "high")]
    apply_loras(high, both, expert="high")
    assert len(lora_state(high).reports) == 2
    want = expected(root, full, 1.0, base)
    for name in base:
        assert max_abs(effective(high, name), want[name]) <= 1e-6, name
    apply_loras(low, both, expert="low")  # only the first is for the low-noise expert
    assert len(lora_state(low).reports) == 1


@pytest.mark.golden
def test_removing_and_changing_restores_the_exact_base(root, manifest, base_path, heads, ref):
    entries = applicable(manifest)
    model = load_dit(base_path, num_heads=heads)
    before = dict(model.named_buffers())
    copies = {n: t.clone() for n, t in before.items()}
    out0 = forward(model, ref)
    for _ in range(3):
        for e in entries:
            apply_loras(model, [LoraSpec(root / e["file"], 0.6)])
    state = lora_state(model)
    assert apply_loras(model, [LoraSpec(root / entries[-1]["file"], 0.6)]) is state  # same LoRAs: no work
    remove_loras(model)
    assert lora_state(model) is None
    after = dict(model.named_buffers())
    assert set(after) == set(before)
    for n, t in after.items():
        assert t is before[n] and torch.equal(t, copies[n]), n
    assert torch.equal(forward(model, ref), out0)

    # Changing the strength gives what a fresh application gives, bit for bit.
    e = entries[0]
    apply_loras(model, [LoraSpec(root / e["file"], 1.0)])
    apply_loras(model, [LoraSpec(root / e["file"], 0.6)])
    fresh = load_dit(base_path, num_heads=heads)
    apply_loras(fresh, [LoraSpec(root / e["file"], 0.6)])
    assert torch.equal(forward(model, ref), forward(fresh, ref))
    assert apply_loras(model, []) is None and lora_state(model) is None


@pytest.mark.golden
def test_factors_are_buffers_of_their_block_and_modes_switch(root, manifest, base_path, heads, ref):
    e = applicable(manifest)[0]
    model = load_dit(base_path, num_heads=heads)
    apply_loras(model, [LoraSpec(root / e["file"], 1.0)])
    names = dict(model.blocks[0].named_buffers())
    assert "self_attn.q.lora_down" in names and "self_attn.q.lora_up" in names and "self_attn.q.lora_scale" in names
    outs = []
    for mode in ("auto", *MODES):
        set_lora_mode(model, mode)
        outs.append(forward(model, ref))
    for out in outs[1:]:
        assert max_abs(out, outs[0]) <= 1e-5


def test_auto_mode_picks_the_cheaper_path():
    lin = QLinear(96, 32)
    lin.set_weight(torch.randn(32, 96))
    lin.set_lora(torch.randn(4, 96), torch.randn(32, 4), torch.ones(4))
    break_even = 96 * 32 / (96 + 32)  # side path's multiply-adds = the merge's
    assert not lin.lora_merges(int(break_even) - 1) and lin.lora_merges(int(break_even) + 1)
    assert lin.lora_beside(1) and not lin.lora_beside(10_000)
    x = torch.randn(5, 96)
    y = {}
    for mode in MODES:
        lin.lora_mode = mode
        y[mode] = lin(x)
    torch.testing.assert_close(y["merge"], y["side"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        lin.set_lora(torch.randn(4, 95), torch.randn(32, 4), torch.ones(4))


@pytest.mark.golden
@pytest.mark.parametrize("mode", MODES)
def test_lora_on_packed_q8_0_equals_lora_on_its_dequantized_weight(root, manifest, base_path, heads, ref, mode):
    """The same LoRA on the golden Q8_0 GGUF and on its float32 dequantization."""
    folder = base_path.parent
    dense_path = next(p for p in sorted(folder.glob("*Q8_0*.dequant.safetensors")))
    packed_path = folder / dense_path.name.replace(".dequant.safetensors", ".gguf")
    e = applicable(manifest)[0]
    packed, dense = load_dit(packed_path, num_heads=heads), load_dit(dense_path, num_heads=heads)
    assert packed.blocks[0].ffn[0].ggml_type is not None
    small = packed.scratch.limit_bytes // 3  # also through the row-chunked decode
    for m in (packed, dense):
        apply_loras(m, [LoraSpec(root / e["file"], 0.6)], mode=mode)
    assert max_abs(forward(packed, ref), forward(dense, ref)) <= 1e-5
    packed.scratch.limit_bytes = small
    assert max_abs(forward(packed, ref), forward(dense, ref)) <= 1e-5
    for name in e["patched_tensors"]:
        assert max_abs(effective(packed, name), effective(dense, name)) <= 1e-6, name


@pytest.mark.golden
def test_blocks_left_for_a_streaming_engine(root, manifest, base_path, heads):
    """With the blocks on meta, factors wait on the CPU and dense patches are read from
    the checkpoint; removing puts the meta tensors back."""
    gguf = next(p for p in sorted(base_path.parent.glob("*Q8_0*.gguf")))
    e = applicable(manifest)[0]
    model = load_dit(gguf, num_heads=heads, load_blocks=False)
    ref_model = load_dit(gguf, num_heads=heads)
    apply_loras(model, [LoraSpec(root / e["file"], 1.0)])
    apply_loras(ref_model, [LoraSpec(root / e["file"], 1.0)])
    q = model.blocks[0].self_attn.q
    assert q.weight.is_meta and q.lora_down.device.type == "cpu"
    state = lora_state(model)
    for name in state.merged:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        assert attr in module.lora_patched  # in memory only: an engine must not read it from the file
        if name.startswith("blocks."):
            value = module.get_buffer(attr)
            assert not value.is_meta
            assert torch.equal(value, effective(ref_model, name)), name
    remove_loras(model)
    assert all(t.is_meta for n, t in model.blocks.named_buffers())
    assert not any(hasattr(m, "lora_patched") for m in model.modules())


@pytest.mark.golden
def test_skipped_keys_are_told_not_dropped(root, manifest, base_path, heads):
    entry = next(e for e in manifest["files"] if e.get("unmatched_keys"))
    model = load_dit(base_path, num_heads=heads)
    with pytest.warns(UserWarning, match="Wan 2.1 image branch"):
        apply_loras(model, [LoraSpec(root / entry["file"], 1.0)])
    remove_loras(model)
    lines = []
    apply_loras(model, [LoraSpec(root / entry["file"], 1.0)], log=lines.append)
    told = "\n".join(lines)
    image = [k for k in entry["unmatched_keys"] if any(m in k for m in ("k_img", "v_img", "norm_k_img", "img_emb"))]
    assert all(key in told for key in entry["unmatched_keys"] if key not in image)
    assert f"{len(image)} key(s) for the Wan 2.1 image branch" in told
    assert "strength 1" in told


@pytest.mark.golden
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_side_path_and_merge_agree_with_float32(root, manifest, base_path, heads, ref, device):
    """bf16 compute: both modes give the float32 merged forward within bf16 error."""
    e = applicable(manifest)[0]
    cpu = load_dit(base_path, num_heads=heads)
    apply_loras(cpu, [LoraSpec(root / e["file"], 1.0)])
    want = forward(cpu, ref)
    model = load_dit(base_path, num_heads=heads, device=device, dtype=torch.bfloat16)
    r, seq_len = ref
    outs = {}
    for mode in MODES:
        apply_loras(model, [LoraSpec(root / e["file"], 1.0)], mode=mode)
        assert model.blocks[0].self_attn.q.lora_down.device.type == device
        inputs = {k: v.to(device) for k, v in r.items()}
        outs[mode] = model([inputs["x"]], inputs["t"], [inputs["context"]], seq_len, y=[inputs["y"]])[0].cpu()
        rel = ((outs[mode] - want).norm() / want.norm()).item()
        assert rel <= 2e-2, (mode, rel)
    assert ((outs["side"] - outs["merge"]).norm() / want.norm()).item() <= 2e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float32])
def test_merged_bf16_weight_is_rounded_once(device, factor_dtype):
    """The merge gives round(W + up·scale·down) with the products and their sum formed
    in float32: half a bf16 ulp (at the size of the terms) from the float64 sum, plus
    float32 noise. A delta rounded to bf16 before the add is off by 0.93 here."""
    gen = torch.Generator().manual_seed(3)
    out_f, in_f, rank = 1536, 5120, 64
    w = torch.randn(out_f, in_f, generator=gen).to(torch.bfloat16)
    down = (torch.randn(rank, in_f, generator=gen) * 0.02).to(factor_dtype)
    up = (torch.randn(out_f, rank, generator=gen) * 0.02).to(factor_dtype)
    lin = QLinear(in_f, out_f, bias=False)
    lin.set_weight(w)
    lin.set_lora(down, up, torch.full((rank,), 0.75))
    lin.to(device)
    lin.lora_mode = "merge"
    merged = lin.dense_weight(torch.bfloat16).double().cpu()
    base, up, down = w.double(), 0.75 * up.double(), down.double()
    exact = base + up @ down
    _, exponent = torch.frexp(torch.maximum(torch.maximum(base.abs(), up.abs() @ down.abs()), exact.abs()))
    ulp = torch.ldexp(torch.ones_like(exact), exponent - 8)
    assert ((merged - exact).abs() / ulp).max().item() <= 0.51
    assert not torch.equal(merged, base)  # the delta is there

"""Reading LoRA files: every naming of golden/lora resolves to the tensors its manifest
entry lists, with the scale rules of each; unknown keys are reported, misfits refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quant.lora_file import LoraError, LoraSpec, check_lora_file, parse_lora_arg, read_lora


@pytest.fixture(scope="module")
def root(golden):
    return golden / "lora"


@pytest.fixture(scope="module")
def manifest(root):
    return json.loads((root / "manifest.json").read_text())


@pytest.fixture(scope="module")
def shapes(root, manifest):
    with safe_open(str(root / manifest["base_checkpoint"]), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.fixture(scope="module")
def delta(root):
    return load_file(str(root / "delta_s1.0.safetensors"))


def applicable(manifest):
    return [e for e in manifest["files"] if e["patched_tensors"]]


def tensors_of(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def expected_scale(entry, manifest, target) -> float:
    """alpha / rank from the manifest entry; 1 when the file stores no alpha."""
    if entry.get("alpha_storage", "").startswith("none"):
        return 1.0
    module = target.removesuffix(".weight")
    odd = manifest["odd_module"]
    per = entry.get("per_module", {odd["module"]: odd}).get(module)
    if per is not None:
        return per["alpha"] / per["rank"]
    return entry.get("default_alpha", manifest["default_alpha"]) / entry.get("default_rank", manifest["default_rank"])


@pytest.mark.golden
def test_every_naming_patches_what_its_manifest_lists(root, manifest, shapes):
    entries = applicable(manifest)
    assert len(entries) >= 7
    for e in entries:
        lora = read_lora(root / e["file"], shapes)
        assert set(lora.report.patched) == set(e["patched_tensors"]), e["file"]
        assert len(lora.report.patched) == len(e["patched_tensors"]), e["file"]
        assert not set(lora.report.patched) & set(e["not_carried"]), e["file"]
        assert set(lora.report.skipped) == set(e.get("unmatched_keys", [])), e["file"]


@pytest.mark.golden
def test_scales_and_deltas_match_the_golden_delta(root, manifest, shapes, delta):
    """Each low-rank patch gives the stored strength-1 delta, with its file's alpha rule;
    dense patches too (PEFT lora_B.bias times its module's scale)."""
    for e in applicable(manifest):
        lora = read_lora(root / e["file"], shapes)
        for p in lora.low_rank:
            if p.target.startswith("blocks."):  # diffusers carries head.head's diff as a rank-out LoRA
                assert p.scale == pytest.approx(expected_scale(e, manifest, p.target), rel=1e-6), (e["file"], p.target)
            assert p.rank == p.down.shape[0]
            assert (p.delta(1.0) - delta[p.target]).abs().max().item() <= 1e-6, (e["file"], p.target)
        for d in lora.diffs:
            value = d.value.double() * d.scale
            assert (value.float().reshape(delta[d.target].shape) - delta[d.target]).abs().max().item() <= 1e-6, \
                (e["file"], d.target)


@pytest.mark.golden
def test_unknown_keys_are_listed_and_image_branch_keys_named(root, manifest, shapes):
    entry = next(e for e in manifest["files"] if e.get("unmatched_keys"))
    lora = read_lora(root / entry["file"], shapes)
    image = {k for k in entry["unmatched_keys"] if any(m in k for m in ("k_img", "v_img", "norm_k_img", "img_emb"))}
    assert set(lora.report.image_branch) == image
    assert set(lora.report.unmatched) == set(entry["unmatched_keys"]) - image
    text = "\n".join(lora.report.messages())
    assert f"{len(image)} key(s) for the Wan 2.1 image branch" in text
    for key in set(entry["unmatched_keys"]) - image:
        assert key in text
    for key, why in lora.report.unmatched.items():
        assert why  # every skipped key says why


@pytest.mark.golden
def test_a_lora_that_does_not_fit_is_refused_by_name(root, manifest, shapes):
    entry = next(e for e in manifest["files"] if not e["patched_tensors"])
    with pytest.raises(LoraError, match="does not fit") as err:
        read_lora(root / entry["file"], shapes)
    keys, _ = tensors_of(root / entry["file"])
    named = [k for k in keys if k in str(err.value)]
    assert named, "the refusal names the offending keys"


# ---- spellings and alpha rules on files made from the golden ones ---------------------


def rewrite(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def entry_named(manifest, prefix):
    return next(e for e in manifest["files"] if e["naming"].startswith(prefix))


@pytest.mark.golden
@pytest.mark.parametrize("source_naming, old, new", [
    ("a2:", "diffusion_model.", ""),  # a0: official names, no prefix
    ("a2:", "diffusion_model.", "model.diffusion_model."),
    ("b:", "lora_unet_", "lora_unet__"),  # Wan-Fun kohya
    ("c:", "transformer.", ""),  # diffusers names without the prefix
])
def test_other_prefixes_resolve_the_same(tmp_path, root, manifest, shapes, source_naming, old, new):
    entry = entry_named(manifest, source_naming)
    tensors, meta = tensors_of(root / entry["file"])
    renamed = {new + k[len(old):] if k.startswith(old) else k: v for k, v in tensors.items()}
    lora = read_lora(rewrite(tmp_path, "x.safetensors", renamed, meta), shapes)
    want = read_lora(root / entry["file"], shapes)
    assert set(lora.report.patched) == set(want.report.patched)
    for a, b in zip(sorted(lora.low_rank, key=lambda p: p.target), sorted(want.low_rank, key=lambda p: p.target)):
        assert torch.equal(a.delta(1.0), b.delta(1.0))


@pytest.mark.golden
def test_alpha_zero_warns_and_scales_one_missing_alpha_scales_one_integer_alpha_reads(tmp_path, root, manifest,
                                                                                     shapes):
    entry = entry_named(manifest, "a:")
    tensors, _ = tensors_of(root / entry["file"])
    zero = {k: (torch.zeros(()) if k.endswith(".alpha") else v) for k, v in tensors.items()}
    lora = read_lora(rewrite(tmp_path, "zero.safetensors", zero), shapes)
    assert any("alpha is 0" in w for w in lora.report.warnings)
    assert all(p.scale == 1.0 for p in lora.low_rank)

    missing = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    lora = read_lora(rewrite(tmp_path, "missing.safetensors", missing), shapes)
    assert all(p.scale == 1.0 and p.alpha is None for p in lora.low_rank)
    assert lora.report.warnings == ()

    ints = {k: (torch.tensor(16, dtype=torch.int64) if k.endswith(".alpha") else v) for k, v in tensors.items()}
    lora = read_lora(rewrite(tmp_path, "int.safetensors", ints), shapes)
    assert all(p.scale == pytest.approx(16 / p.rank) for p in lora.low_rank)


@pytest.mark.golden
def test_peft_metadata_patterns_and_rslora(tmp_path, root, manifest, shapes):
    entry = entry_named(manifest, "c_meta:")
    tensors, meta = tensors_of(root / entry["file"])
    conf = json.loads(meta["lora_adapter_metadata"])
    conf["transformer.use_rslora"] = True
    meta = dict(meta, lora_adapter_metadata=json.dumps(conf))
    lora = read_lora(rewrite(tmp_path, "rs.safetensors", tensors, meta), shapes)
    for p in lora.low_rank:
        assert p.scale == pytest.approx(p.alpha / p.rank ** 0.5)

    conf["transformer.use_dora"] = True
    meta = dict(meta, lora_adapter_metadata=json.dumps(conf))
    with pytest.raises(LoraError, match="DoRA"):
        read_lora(rewrite(tmp_path, "dora.safetensors", tensors, meta), shapes)


@pytest.mark.golden
def test_refusals(tmp_path, root, manifest, shapes):
    entry = entry_named(manifest, "a:")
    tensors, _ = tensors_of(root / entry["file"])
    key = next(k for k in tensors if k.endswith(".lora_A.weight"))
    dora = dict(tensors, **{key.replace(".lora_A.weight", ".dora_scale"): torch.ones(1, 4)})
    with pytest.raises(LoraError, match="DoRA"):
        read_lora(rewrite(tmp_path, "dora.safetensors", dora), shapes)

    unknown = next(e for e in manifest["files"] if e.get("unmatched_keys"))
    only_skipped = {k: v for k, v in tensors_of(root / unknown["file"])[0].items() if k in unknown["unmatched_keys"]}
    with pytest.raises(LoraError, match="none of its"):
        read_lora(rewrite(tmp_path, "skipped.safetensors", only_skipped), shapes)

    # The same module in two spellings in one file.
    kohya = "lora_unet_" + key.removeprefix("diffusion_model.").removesuffix(".lora_A.weight").replace(".", "_")
    twice = dict(tensors, **{kohya + ".lora_down.weight": tensors[key].clone()})
    with pytest.raises(LoraError, match="two keys"):
        read_lora(rewrite(tmp_path, "twice.safetensors", twice), shapes)

    with pytest.raises(LoraError, match="does not exist"):
        check_lora_file(tmp_path / "nope.safetensors")
    (tmp_path / "x.pt").write_bytes(b"\0" * 16)
    with pytest.raises(LoraError, match="safetensors files only"):
        check_lora_file(tmp_path / "x.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(LoraError, match="not a readable safetensors"):
        check_lora_file(tmp_path / "bad.safetensors")


# ---- the CLI spelling ------------------------------------------------------------------


def test_parse_lora_arg():
    assert parse_lora_arg("high=a.safetensors:1.0") == LoraSpec("a.safetensors", 1.0, "high")
    assert parse_lora_arg("low=b.safetensors") == LoraSpec("b.safetensors", 1.0, "low")
    assert parse_lora_arg("both=c.safetensors:0.6") == LoraSpec("c.safetensors", 0.6, "both")
    assert parse_lora_arg("c.safetensors:0.6") == LoraSpec("c.safetensors", 0.6, "both")
    assert parse_lora_arg("high_noise=/x/y.safetensors:-0.5").expert == "high"
    assert parse_lora_arg(r"C:\loras\x.safetensors") == LoraSpec(r"C:\loras\x.safetensors", 1.0, "both")
    assert parse_lora_arg(r"low=C:\loras\x.safetensors:2") == LoraSpec(r"C:\loras\x.safetensors", 2.0, "low")
    assert parse_lora_arg("dir=1/x.safetensors").path == "dir=1/x.safetensors"  # not an expert name
    for bad in ("x.safetensors:strong", "high=", "x.safetensors:nan"):
        with pytest.raises(LoraError):
            parse_lora_arg(bad)
    with pytest.raises(LoraError, match="high, low, both"):
        LoraSpec("x.safetensors", 1.0, "middle")
    spec = LoraSpec("x", 1, "high")
    assert spec.applies_to("high") and not spec.applies_to("low") and spec.applies_to(None)
    assert LoraSpec("x").applies_to("low")

"""The LightX2V 4-step preset with a LoRA per expert, end to end through the pipeline on
the built-in tiny model: the stored schedule, the LoRA of each expert on its two steps,
the same video as experts with the LoRAs baked in, and the exact base once removed."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import runtime.pipeline as pipeline_mod
from quant.lora_bake import bake_hook
from runtime import load_pipeline
from runtime.demo import demo_image, write_demo_model
from runtime.samplers import expert_schedule, get_preset, make_sampler

HIGH_DIR, LOW_DIR = "high_noise_model", "low_noise_model"
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo"))


def write_lora(path, shapes: dict, seed: int, kohya: bool) -> None:
    """A rank-4 LoRA on every block linear plus a modulation diff, in official or kohya names."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        if not (name.startswith("blocks.") and name.endswith(".weight") and len(shape) == 2):
            continue
        module = name.removesuffix(".weight")
        key = "lora_unet_" + module.replace(".", "_") if kohya else "diffusion_model." + module
        out[f"{key}.lora_down.weight"] = torch.randn(4, shape[1], generator=g) / shape[1] ** 0.5
        out[f"{key}.lora_up.weight"] = torch.randn(shape[0], 4, generator=g) * 0.2
        out[f"{key}.alpha"] = torch.tensor(2.0)
    if not kohya:
        out["diffusion_model.blocks.0.diff_m"] = 0.05 * torch.randn(shapes["blocks.0.modulation"], generator=g)
    save_file(out, str(path))


@pytest.fixture(scope="module")
def loras(demo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    shapes = {k: tuple(v.shape) for k, v in load_file(str(demo / HIGH_DIR / WEIGHTS)).items()}
    high, low = folder / "high.safetensors", folder / "low.safetensors"
    write_lora(high, shapes, 1, kohya=False)
    write_lora(low, shapes, 2, kohya=True)
    return [f"high={high}:1.0", f"low={low}:0.8"]


SIZE = dict(width=32, height=32, frames=1, seed=3, preset="lightx2v-4step")


def run(model, loras=None):
    pipe = load_pipeline(model, device="cpu", prompt_cache=False, loras=loras)
    try:
        return pipe.generate(demo_image(), "a sunset", **SIZE)
    finally:
        pipe.close()


@pytest.mark.golden
def test_preset_schedule_is_the_stored_one(golden):
    root = golden / "lora"
    recipe = json.loads((root / "lightx2v_4step_schedule.json").read_text())
    stored = load_file(str(root / "lightx2v_4step_euler.safetensors"))
    preset = get_preset("lightx2v-4step")
    sampler = make_sampler(preset.sampler, preset.steps, preset.shift)
    assert preset.steps == recipe["recipe"]["steps"] and preset.shift == recipe["recipe"]["sample_shift"]
    assert preset.guide_scale == (1.0, 1.0)
    assert torch.equal(sampler.sigmas, stored["comfyui.sigmas"])
    assert torch.allclose(sampler.timesteps, stored["lightx2v.timesteps"], rtol=0, atol=1e-4)
    assert [e.removesuffix("_noise") for e in expert_schedule(sampler.timesteps, preset.boundary)] == \
        recipe["lightx2v"]["experts"]
    x = stored["start_latent"]
    for k in range(preset.steps):
        x = sampler.step(stored["model_outputs"][k], k, x)
        assert (x - stored["lightx2v.latents"][k + 1]).abs().max().item() <= 1e-5


def test_each_expert_runs_with_its_lora_baked_gives_the_same_video_and_removal_is_exact(demo, loras, tmp_path,
                                                                                        monkeypatch):
    calls = []
    real_apply = pipeline_mod.apply_loras

    def spy(model, specs, *, expert, **kw):
        state = real_apply(model, specs, expert=expert, **kw)
        calls.append((expert, None if state is None else [str(s.path) for s in state.specs], id(state)))
        return state

    monkeypatch.setattr(pipeline_mod, "apply_loras", spy)
    pipe = load_pipeline(demo, device="cpu", prompt_cache=False, loras=loras)
    try:
        with_lora = pipe.generate(demo_image(), "a sunset", **SIZE)
        lora_calls = list(calls)
        without = pipe.generate(demo_image(), "a sunset", loras=[], **SIZE)
        again = pipe.generate(demo_image(), "a sunset", **SIZE)
    finally:
        pipe.close()

    assert with_lora.settings["experts_per_step"] == ["high", "high", "low", "low"]
    assert with_lora.settings["sampler"] == "euler" and with_lora.settings["steps"] == 4
    high_path, low_path = (s.split("=", 1)[1].rsplit(":", 1)[0] for s in loras)
    assert [(e, p) for e, p, _ in lora_calls] == [("high", [high_path])] * 2 + [("low", [low_path])] * 2
    assert lora_calls[0][2] == lora_calls[1][2] and lora_calls[2][2] == lora_calls[3][2]  # read once per expert
    assert [lo["expert"] for lo in with_lora.settings["loras"]] == ["high", "low"]
    assert without.settings["loras"] == []

    # Removed: exactly the video of experts that never had a LoRA; put back: the same again.
    plain = run(demo)
    assert torch.equal(without.latent, plain.latent)
    assert torch.equal(again.latent, with_lora.latent)
    assert (plain.latent - with_lora.latent).abs().max().item() > 1e-3

    # The same experts with the LoRAs baked in (quant.lora_bake, float32) and no runtime LoRA.
    baked = tmp_path / "baked"
    shutil.copytree(demo, baked)
    for folder, spec in ((HIGH_DIR, loras[0]), (LOW_DIR, loras[1])):
        hook = bake_hook(demo / folder, [spec.split("=", 1)[1]])
        tensors = load_file(str(demo / folder / WEIGHTS))
        save_file({n: hook(n, t.float()).contiguous() for n, t in tensors.items()}, str(baked / folder / WEIGHTS))
    torch.testing.assert_close(run(baked).latent, with_lora.latent, rtol=1e-4, atol=1e-4)


def test_missing_lora_refused_before_loading(demo, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_pipeline(demo, device="cpu", loras=[f"high={tmp_path / 'nope.safetensors'}"])
    with pytest.raises(ValueError, match="lora_mode"):
        load_pipeline(demo, device="cpu", lora_mode="fast")


def test_cli_lora_flags(loras, tmp_path, capsys):
    from runtime.generate import main

    out = tmp_path / "v.mp4"
    assert main(["--demo", "--preset", "lightx2v-4step", "--frames", "1", "-W", "32", "-H", "32", "--seed", "1",
                 "--lora", loras[0], "--lora", loras[1], "--lora-mode", "side", "-o", str(out)]) == 0
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert [(lo["expert"], lo["strength"]) for lo in settings["loras"]] == [("high", 1.0), ("low", 0.8)]
    assert "LoRA high.safetensors" in capsys.readouterr().err
    assert main(["--demo", "--lora", f"low={tmp_path / 'missing.safetensors'}", "-o", str(tmp_path / "w.mp4")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: LoRA file") and "does not exist" in last and not (tmp_path / "w.mp4").exists()

"""Samplers against the official solvers' recorded runs (golden sampler/ and lora/)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from runtime.samplers import (HIGH_NOISE, LOW_NOISE, PRESETS, euler_schedule, expert_schedule,
                              get_preset, guide_scale_for, make_sampler, switch_step)

TOL = 1e-5  # golden README: the samplers are pure float32 arithmetic


@pytest.fixture(scope="module")
def sampler_golden(golden):
    root = golden / "sampler"
    schedules = json.loads((root / "schedules.json").read_text())["schedules"]
    runs = json.loads((root / "runs.json").read_text())
    return schedules, runs, load_file(str(root / "steps.safetensors"))


def _run_names(golden):
    schedules = json.loads((golden / "sampler" / "schedules.json").read_text())["schedules"]
    return sorted(schedules)


def pytest_generate_tests(metafunc):
    if "run_name" in metafunc.fixturenames:
        from conftest import GOLDEN
        names = _run_names(GOLDEN) if GOLDEN is not None else []
        metafunc.parametrize("run_name", names)


@pytest.mark.golden
def test_every_recorded_run(sampler_golden, run_name):
    schedules, runs, tensors = sampler_golden
    meta = schedules[run_name]
    sampler = make_sampler(meta["solver"], meta["steps"], meta["shift"])

    assert sampler.timesteps.dtype == torch.int64
    assert torch.equal(sampler.timesteps, tensors[f"{run_name}.timesteps"])
    assert sampler.sigmas.dtype == torch.float32
    assert torch.equal(sampler.sigmas, tensors[f"{run_name}.sigmas"])
    assert sampler.timesteps.tolist() == meta["timesteps"]

    latents = tensors[f"{run_name}.latents"]
    outputs = tensors[f"{run_name}.model_outputs"]
    corrected = tensors.get(f"{run_name}.unipc_corrected_samples")
    x = latents[0]
    for k in range(sampler.steps):
        x = sampler.step(outputs[k], k, x)
        assert x.dtype == torch.float32
        assert (x - latents[k + 1]).abs().max().item() <= TOL, f"step {k}"
        if corrected is not None:
            assert (sampler.corrected_sample - corrected[k]).abs().max().item() <= TOL, f"step {k}"
    assert torch.isfinite(x).all()

    if runs[run_name]["unipc_predictor_orders"] is not None:
        assert sampler.orders == runs[run_name]["unipc_predictor_orders"]
    else:  # DPM++: order 1 at the first and the last step, 2 between
        assert sampler.orders == [1] + [2] * (sampler.steps - 2) + [1]


@pytest.mark.golden
def test_expert_choice_matches_recorded(sampler_golden):
    schedules, _, _ = sampler_golden
    found = 0
    for meta in schedules.values():
        for key, recorded in meta.items():
            if not key.startswith("expert_for_boundary_"):
                continue
            boundary = float(key.removeprefix("expert_for_boundary_").replace("_", "."))
            experts = expert_schedule(meta["timesteps"], boundary)
            assert experts == recorded, (meta["solver"], meta["steps"], boundary)
            assert switch_step(meta["timesteps"], boundary) == (
                recorded.index(LOW_NOISE) if LOW_NOISE in recorded else len(recorded))
            found += 1
    assert found >= 2 * len(schedules)


@pytest.mark.golden
def test_pipeline_run_expert_and_guide_scale(golden):
    run = json.loads((golden / "pipeline" / "run.json").read_text())
    boundary = run["pipeline_object"]["boundary"]
    guide = tuple(run["generate_call"]["guide_scale"])
    for step in run["steps"]:
        expert = expert_schedule([step["timestep"]], boundary)[0]
        assert f"{expert}_model" == step["expert"]
        assert guide_scale_for(expert, guide) == step["guide_scale"]


def test_guide_scale_tuple_order_is_low_high():
    assert guide_scale_for(HIGH_NOISE, (3.0, 4.0)) == 4.0
    assert guide_scale_for(LOW_NOISE, (3.0, 4.0)) == 3.0
    assert guide_scale_for(HIGH_NOISE, 5.0) == 5.0
    with pytest.raises(ValueError):
        guide_scale_for("middle", (1.0, 2.0))


@pytest.mark.golden
def test_lightx2v_4step_preset(golden):
    root = golden / "lora"
    recipe = json.loads((root / "lightx2v_4step_schedule.json").read_text())
    tensors = load_file(str(root / "lightx2v_4step_euler.safetensors"))
    steps = recipe["recipe"]["steps"]
    shift = recipe["recipe"]["sample_shift"]

    preset = get_preset("lightx2v-4step")
    assert (preset.steps, preset.shift, preset.sampler) == (steps, shift, "euler")
    assert not preset.uses_cfg

    sampler = make_sampler(preset.sampler, preset.steps, preset.shift)
    assert sampler.timesteps.is_floating_point()
    assert torch.equal(sampler.sigmas[:-1], tensors["lightx2v.sigmas"])
    assert torch.equal(sampler.sigmas, tensors["comfyui.sigmas"])
    assert torch.allclose(sampler.timesteps, tensors["lightx2v.timesteps"], rtol=0, atol=1e-4)
    assert sampler.timesteps.tolist() == pytest.approx(recipe["lightx2v"]["timesteps"], abs=1e-4)

    x = tensors["start_latent"]
    latents = tensors["lightx2v.latents"]
    for k in range(sampler.steps):
        x = sampler.step(tensors["model_outputs"][k], k, x)
        assert (x - latents[k + 1]).abs().max().item() <= TOL

    experts = expert_schedule(sampler.timesteps, preset.boundary)
    assert [e.removesuffix("_noise") for e in experts] == recipe["official_boundary_0.9_experts"]
    assert [e.removesuffix("_noise") for e in experts] == recipe["lightx2v"]["experts"]


def test_euler_schedule_is_shifted_linspace():
    sched = euler_schedule(4, 5.0)
    base = torch.linspace(1, 0, 5, dtype=torch.float64)
    want = (5 * base / (1 + 4 * base)).float()
    assert torch.allclose(sched.sigmas, want, rtol=0, atol=1e-7)
    assert sched.sigmas[-1] == 0


def test_last_step_lands_on_the_data_prediction():
    # sigma' = 0 goes through lambda' = +inf; every solver must return x0 exactly.
    g = torch.Generator().manual_seed(0)
    for name in ("unipc", "dpm++", "euler"):
        s = make_sampler(name, 3, 5.0)
        x = torch.randn(2, 3, 4, generator=g)
        for k in range(s.steps):
            v = torch.randn(2, 3, 4, generator=g)
            x_in = x
            x = s.step(v, k, x)
            assert torch.isfinite(x).all(), name
        # x0 of the last step, from its input as the model saw it (before UniPC's corrector)
        assert torch.allclose(x, x_in - s.sigmas[-2] * v, rtol=0, atol=1e-6), name
        assert torch.equal(s.denoised(v, s.steps - 1, x_in), x_in - s.sigmas[-2] * v)


def test_schedules_with_repeated_first_timesteps_run():
    s = make_sampler("unipc", 60, 20.0)
    assert s.timesteps[0] == s.timesteps[1]  # int64 truncation merges them
    x = torch.ones(3)
    for k in range(s.steps):
        x = s.step(-x, k, x)
    assert torch.isfinite(x).all() and len(s.orders) == 60


def test_restart_gives_identical_runs():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 5, generator=g)
    vs = torch.randn(6, 4, 5, generator=g)
    s = make_sampler("unipc", 6, 3.0)

    def run():
        x = x0
        for k in range(s.steps):
            x = s.step(vs[k], k, x)
        return x

    first = run()
    assert torch.equal(run(), first)  # step 0 starts over
    s.step(vs[0], 0, x0)
    s.reset()
    assert torch.equal(run(), first)


def test_out_of_order_steps_are_refused():
    s = make_sampler("dpm++", 4, 5.0)
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="step 2 requested but step 0 is next"):
        s.step(x, 2, x)
    s.step(x, 0, x)
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(4), 1, x)


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("ddim", 10, 5.0)
    with pytest.raises(ValueError, match="steps"):
        make_sampler("unipc", 0, 5.0)
    with pytest.raises(ValueError, match="shift"):
        make_sampler("unipc", 10, -1.0)
    with pytest.raises(ValueError, match="preset"):
        get_preset("nope")
    assert make_sampler("DPMPP", 4, 5.0).name == "dpm++"
    assert set(PRESETS) >= {"default", "lightx2v-4step"}

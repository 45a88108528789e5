"""The I2V pipeline: the golden end-to-end run of the official code, and the pipeline's
behaviour (guidance, presets, seeds, FLF2V, refusals) with stand-in models."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import runtime.pipeline as pipeline_mod
from runtime import load_pipeline
from runtime.conditioning import frame_mask
from runtime.dit_loading import DiTLoadError
from runtime.image_prep import ImageError, SizeError
from runtime.model_folder import ModelFiles, ModelFilesError
from runtime.pipeline import GenerationError, Pipeline, resolve_device, resolve_dtype, resolve_sampling
from runtime.prompts import DEFAULT_NEGATIVE_PROMPT
from runtime.samplers import make_sampler

EXPERT = {"high_noise_model": "high", "low_noise_model": "low"}


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


# ---- the golden run ------------------------------------------------------------------


class CountingExperts:
    """Wraps the experts object: records every forward (expert, batch, t, contexts)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    @property
    def config(self):
        return self.inner.config

    def activate(self, name):
        model = self.inner.activate(name)

        def forward(x, t, context, seq_len, y=None):
            self.calls.append(SimpleNamespace(expert=name, batch=len(x), t=t.clone(), seq_len=seq_len,
                                              same_x=all(u is x[0] for u in x), y=y[0].clone()))
            return model(x, t, context, seq_len, y=y)

        return forward

    def close(self):
        self.inner.close()


def run_golden(golden: Path, dtype):
    """The run of golden pipeline/run.json through load_pipeline + generate, with spies on
    the prepared image, y and the noise."""
    g = golden / "pipeline"
    run = json.loads((g / "run.json").read_text())
    call = run["generate_call"]
    contexts = load_file(g / "contexts.safetensors")
    seen = {}

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen[name] = out
            return out
        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_mod, "prepare_image", spy("prepared", pipeline_mod.prepare_image))
        mp.setattr(pipeline_mod, "image_condition", spy("y", pipeline_mod.image_condition))
        mp.setattr(pipeline_mod, "initial_noise", spy("noise", pipeline_mod.initial_noise))
        real_open = pipeline_mod.open_experts
        mp.setattr(pipeline_mod, "open_experts", lambda *a, **k: spy("experts", CountingExperts)(real_open(*a, **k)))
        pipe = load_pipeline(high_noise=g / "checkpoint" / "high_noise_model",
                             low_noise=g / "checkpoint" / "low_noise_model", vae=g / "vae.safetensors",
                             device="cpu", dtype=dtype)
        latents = []
        result = pipe.generate(
            g / call["img"].split()[0], call["input_prompt"], call["n_prompt"],
            context=contexts["context_pos"], negative_context=contexts["context_neg"],
            max_area=call["max_area"], frames=call["frame_num"], steps=call["sampling_steps"],
            guide_scale=tuple(call["guide_scale"]), shift=call["shift"], sampler=call["sample_solver"],
            seed=call["seed"], callback=lambda k, n, x: latents.append((k, n, x.clone())))
        pipe.close()
    return run, result, latents, seen


@pytest.fixture(scope="module")
def golden_fp32(golden):
    return run_golden(golden, torch.float32)


@pytest.mark.golden
def test_golden_inputs(golden, golden_fp32):
    run, result, _, seen = golden_fp32
    trace = load_file(golden / "pipeline" / "trace.safetensors")
    d = run["derived"]
    prepared = seen["prepared"]
    assert (prepared.size.height, prepared.size.width) == (d["h"], d["w"])
    torch.testing.assert_close(prepared.pixels, trace["image_resized"], atol=1e-5, rtol=0)
    assert torch.equal(seen["noise"], trace["noise"])
    assert result.seed == run["noise"]["seed"]
    torch.testing.assert_close(seen["y"], trace["y"], atol=1e-4, rtol=0)


@pytest.mark.golden
def test_golden_steps_experts_and_one_batch2_forward_per_step(golden, golden_fp32):
    run, result, _, seen = golden_fp32
    trace = load_file(golden / "pipeline" / "trace.safetensors")
    calls = seen["experts"].calls
    assert len(calls) == len(run["steps"])
    for call, step, t in zip(calls, run["steps"], trace["timesteps"]):
        assert call.expert == EXPERT[step["expert"]]
        assert call.batch == 2 and call.same_x  # cond and uncond in one forward
        assert call.t.tolist() == [int(t)] * 2 and call.t.dtype == torch.int64
        assert call.seq_len == run["derived"]["seq_len"]
    assert result.settings["experts_per_step"] == [EXPERT[s["expert"]] for s in run["steps"]]


@pytest.mark.golden
def test_golden_latents_and_video_fp32(golden, golden_fp32):
    _, result, latents, _ = golden_fp32
    trace = load_file(golden / "pipeline" / "trace.safetensors")
    steps = trace["latents"].shape[0] - 1
    assert [(k, n) for k, n, _ in latents] == [(k + 1, steps) for k in range(steps)]
    for k, _, x in latents:
        torch.testing.assert_close(x, trace["latents"][k], atol=1e-4, rtol=0)
    torch.testing.assert_close(result.latent, trace["final_latent"], atol=1e-4, rtol=0)
    torch.testing.assert_close(result.video, trace["video"], atol=1e-4, rtol=0)
    _, frames, h, w = trace["video"].shape
    assert result.frames.shape == (frames, h, w, 3) and result.frames.dtype == np.uint8


@pytest.mark.golden
def test_golden_bf16_against_the_official_bf16_run(golden):
    """bf16 numerics differ from float32 by the amount the official bf16 run does; ours
    must sit at that distance from float32 and close to the official bf16 outputs."""
    _, result, latents, _ = run_golden(golden, torch.bfloat16)
    trace = load_file(golden / "pipeline" / "trace.safetensors")
    ref = load_file(golden / "pipeline" / "bf16_reference.safetensors")
    for ours, key in ((result.latent, "final_latent"), (result.video, "video")):
        official_drift = rel_l2(ref[key], trace[key])
        assert rel_l2(ours, ref[key]) < 2e-2
        assert rel_l2(ours, trace[key]) < 2 * official_drift + 1e-3
    for k, _, x in latents:
        assert rel_l2(x, ref["latents"][k]) < 2e-2


# ---- stand-in models -----------------------------------------------------------------


class FakeModel:
    """Returns cond = `value`, uncond = 0 everywhere, so v = g·value (or value without CFG)."""

    def __init__(self, name, log, value):
        self.name, self.log, self.value = name, log, value

    def __call__(self, x, t, context, seq_len, y=None):
        self.log.append(SimpleNamespace(expert=self.name, batch=len(x), t=t.clone(), contexts=list(context),
                                        y=y[0].clone(), seq_len=seq_len))
        out = [torch.full_like(x[0], self.value)]
        return out + [torch.zeros_like(x[0])] * (len(x) - 1)


class FakeExperts:
    def __init__(self, text_dim=8, value=0.0):
        self.config = SimpleNamespace(patch_size=(1, 2, 2), text_dim=text_dim)
        self.calls = []
        self.value = value

    def activate(self, name):
        return FakeModel(name, self.calls, self.value)

    def close(self):
        pass


class FakeVAE:
    config = SimpleNamespace(z_dim=16, version="2.1")

    def __init__(self, log):
        self.log = log

    def encode(self, videos):
        self.log.append(("encode", videos[0].clone()))
        _, f, h, w = videos[0].shape
        return [torch.zeros(16, (f - 1) // 4 + 1, h // 8, w // 8)]

    def decode(self, latents, output_device=None):
        z = latents[0]
        self.log.append(("decode", z.clone()))
        return [torch.zeros(3, 4 * (z.shape[1] - 1) + 1, z.shape[2] * 8, z.shape[3] * 8)]


@pytest.fixture
def fake(tmp_path):
    """A Pipeline whose experts, VAE and text encoder are stand-ins that record their use."""
    files = ModelFiles(tmp_path, tmp_path, tmp_path, tmp_path, tmp_path)
    pipe = Pipeline(files, device=torch.device("cpu"), dtype=torch.float32)
    pipe.experts = FakeExperts()
    pipe.vae_log = []
    pipe._vae = lambda: FakeVAE(pipe.vae_log)
    pipe.encoded = []

    def encode_prompts(prompts):
        pipe.encoded.append(list(prompts))
        return [torch.randn(3 + i, pipe.experts.config.text_dim) for i in range(len(prompts))]

    pipe.encode_prompts = encode_prompts
    return pipe


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def small(**kw):
    return dict(dict(width=64, height=48, frames=9, steps=4, seed=1), **kw)


def test_default_negative_prompt_when_none_or_empty(fake, image):
    for negative in (None, ""):
        fake.encoded.clear()
        fake.generate(image, "a cat", negative, **small())
        assert fake.encoded == [["a cat", DEFAULT_NEGATIVE_PROMPT]]
    fake.encoded.clear()
    fake.generate(image, "a cat", "blurry", **small())
    assert fake.encoded == [["a cat", "blurry"]]


def test_cfg_is_one_batch2_forward_per_step(fake, image):
    fake.generate(image, "a cat", **small(steps=5))
    calls = fake.experts.calls
    assert len(calls) == 5 and all(c.batch == 2 for c in calls)
    assert all(c.contexts[0].shape[0] == 3 and c.contexts[1].shape[0] == 4 for c in calls)  # prompt, negative


def test_guide_scale_one_skips_the_negative_pass(fake, image):
    result = fake.generate(image, "a cat", **small(guide_scale=1.0))
    assert fake.encoded == [["a cat"]]  # the negative prompt is not even encoded
    assert [c.batch for c in fake.experts.calls] == [1] * 4
    assert "not used" in result.settings["negative_prompt"]


def test_guide_scales_are_low_high_and_cfg_per_expert(fake, image):
    fake.experts.value = 1.0  # v = g for the expert of the step
    low, high = 1.0, 3.0
    latents = []
    fake.generate(image, "a cat", **small(steps=6, sampler="euler", guide_scale=(low, high),
                                          callback=lambda k, n, x: latents.append(x.clone())))
    sampler = make_sampler("euler", 6, 5.0)
    experts = [c.expert for c in fake.experts.calls]
    assert experts == ["high" if t >= 900 else "low" for t in sampler.timesteps]
    assert [c.batch for c in fake.experts.calls] == [2 if e == "high" else 1 for e in experts]
    for k in range(1, 6):
        g = high if experts[k] == "high" else low
        expected = float(sampler.sigmas[k + 1] - sampler.sigmas[k]) * g
        torch.testing.assert_close(latents[k] - latents[k - 1], torch.full_like(latents[k], expected),
                                   atol=1e-5, rtol=1e-4)


def test_lightx2v_preset_and_overrides(fake, image):
    result = fake.generate(image, "a cat", **small(steps=None, preset="lightx2v-4step"))
    calls = fake.experts.calls
    assert [c.expert for c in calls] == ["high", "high", "low", "low"]
    assert all(c.batch == 1 for c in calls)  # cfg 1: one forward per step
    assert all(c.t.dtype == torch.float32 for c in calls)
    assert [round(float(c.t), 2) for c in calls] == [1000.0, 937.5, 833.33, 625.0]
    assert result.notes == [] and result.settings["sampler"] == "euler"

    fake.experts.calls.clear()
    result = fake.generate(image, "a cat", **small(steps=8, preset="lightx2v-4step"))
    assert len(fake.experts.calls) == 8
    assert any("steps 8 overrides the lightx2v-4step preset's 4" in n for n in result.notes)


def test_resolve_sampling_defaults_and_refusals():
    s, notes = resolve_sampling()
    assert (s.sampler, s.steps, s.shift, s.guide_scale, s.boundary) == ("unipc", 40, 5.0, (3.5, 3.5), 0.9)
    assert notes == []
    s, _ = resolve_sampling(guide_scale=4)
    assert s.guide_scale == (4.0, 4.0)
    for bad in (dict(steps=0), dict(shift=-1), dict(guide_scale=(1, 2, 3)), dict(guide_scale=float("nan")),
                dict(boundary=1.5), dict(sampler="ddim")):
        with pytest.raises(ValueError):
            resolve_sampling(**bad)
    with pytest.raises(ValueError, match="unknown sampling preset"):
        resolve_sampling("turbo")


def test_seed_gives_the_cpu_generator_noise(fake, image):
    result = fake.generate(image, "a cat", **small(seed=123, sampler="euler"))  # v = 0: x stays the noise
    g = torch.Generator("cpu").manual_seed(123)
    assert torch.equal(result.latent, torch.randn(16, 3, 6, 8, dtype=torch.float32, generator=g))
    assert result.seed == 123 and result.settings["seed"] == 123
    again = fake.generate(image, "a cat", **small(seed=123, sampler="euler"))
    assert torch.equal(again.latent, result.latent)


def test_random_seed_is_drawn_and_reported(fake, image):
    a = fake.generate(image, "a cat", **small(seed=None))
    b = fake.generate(image, "a cat", **small(seed=-1))
    assert a.seed != b.seed
    assert any(f"seed {a.seed} (random)" in n for n in a.notes)
    with pytest.raises(ValueError, match="seed"):
        fake.generate(image, "a cat", **small(seed=-5))


def test_flf2v_conditioning(fake, image, tmp_path):
    last = tmp_path / "last.png"
    Image.fromarray(np.full((96, 128, 3), 200, np.uint8)).save(last)
    fake.generate(image, "a cat", **small(frames=13, last_image=last))
    kind, video = fake.vae_log[0]
    assert kind == "encode" and video.shape == (3, 13, 48, 64)
    assert torch.allclose(video[:, -1], torch.full((3, 48, 64), 200 / 255 * 2 - 1), atol=1e-5)
    assert not video[:, 1:-1].any()
    y = fake.experts.calls[0].y
    assert torch.equal(y[:4], frame_mask(13, 6, 8, last_frame=True))


def test_result_fields(fake, image):
    seen = []
    result = fake.generate(image, "a cat", **small(callback=lambda k, n, x: seen.append((k, n, tuple(x.shape)))))
    assert seen == [(k, 4, (16, 3, 6, 8)) for k in range(1, 5)]
    assert result.frames.dtype == np.uint8 and result.frames.shape == (9, 48, 64, 3)
    assert result.video.shape == (3, 9, 48, 64) and result.video.dtype == torch.float32
    assert set(result.timings) >= {"prepare", "text", "vae_encode", "denoise", "vae_decode", "total"}
    assert len(result.step_times) == 4
    assert result.memory["host_peak_rss"] > 0
    json.dumps(result.settings)  # the sidecar must be JSON
    assert [k for k, _ in fake.vae_log] == ["encode", "decode"]


def test_frames_rounding_and_explicit_size_are_noted(fake, image):
    result = fake.generate(image, "a cat", **small(frames=10, width=70))
    assert result.frames.shape[:3] == (9, 48, 64)
    assert any("4n+1" in n for n in result.notes)
    assert any("width 70" in n for n in result.notes)


def test_non_finite_latent_stops_the_run(fake, image):
    fake.experts.value = float("nan")
    with pytest.raises(GenerationError, match="after step 1"):
        fake.generate(image, "a cat", **small())


# ---- refusals before anything is loaded ----------------------------------------------


class NothingLoads:
    """Fails the test if any component is loaded or run."""

    config = SimpleNamespace(patch_size=(1, 2, 2), text_dim=8)

    def activate(self, name):
        raise AssertionError("an expert ran")


@pytest.fixture
def strict(fake):
    fake.experts = NothingLoads()
    fake._vae = lambda: (_ for _ in ()).throw(AssertionError("the VAE was loaded"))
    fake.encode_prompts = lambda prompts: (_ for _ in ()).throw(AssertionError("the text encoder ran"))
    return fake


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(width=8), SizeError, "too small"),
    (dict(width=64, height=48, max_area=3000), SizeError, "either max_area or width/height"),
    (dict(frames=0), SizeError, "frames"),
    (dict(frames=1, last_image="x.png"), SizeError, "at least 5 frames"),
    (dict(guide_scale=(1, 2, 3)), ValueError, "guide_scale"),
    (dict(sampler="ddim"), ValueError, "unknown sampler"),
    (dict(preset="turbo"), ValueError, "unknown sampling preset"),
    (dict(context=torch.zeros(5, 7)), ValueError, "width 7"),
    (dict(last_image="missing.png", frames=9), ImageError, "no such file"),
])
def test_bad_requests_are_refused_before_loading(strict, image, kwargs, error, match):
    with pytest.raises(error, match=match):
        strict.generate(image, "a cat", **kwargs)


def test_unreadable_image_is_refused_before_loading(strict, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(ImageError, match="not an image format"):
        strict.generate(bad, "a cat")


@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr(pipeline_mod, "open_experts", lambda *a, **k: pytest.fail("experts were loaded"))
    monkeypatch.setattr("runtime.vae.load_vae", lambda *a, **k: pytest.fail("the VAE was loaded"))


@pytest.mark.golden
def test_missing_text_encoder_is_named_before_loading(golden, image, no_loading):
    ckpt = golden / "pipeline" / "checkpoint"
    pipe = load_pipeline(high_noise=ckpt / "high_noise_model", low_noise=ckpt / "low_noise_model",
                         vae=golden / "pipeline" / "vae.safetensors", device="cpu")
    with pytest.raises(ModelFilesError, match="text-encoder.*--text-encoder"):
        pipe.generate(image, "a cat")


@pytest.mark.golden
@pytest.mark.parametrize("high,low,match", [
    ("dit/t2v/weights.safetensors", "dit/t2v/weights.safetensors", "T2V checkpoint"),
    ("pipeline/checkpoint/high_noise_model", "dit/i2v/weights.safetensors", "different models"),
    ("pipeline/checkpoint/low_noise_model", "pipeline/checkpoint/high_noise_model", "swap"),
])
def test_wrong_experts_are_refused_before_loading(golden, image, no_loading, high, low, match):
    contexts = load_file(golden / "pipeline" / "contexts.safetensors")
    pipe = load_pipeline(high_noise=golden / high, low_noise=golden / low,
                         vae=golden / "pipeline" / "vae.safetensors", device="cpu")
    with pytest.raises(DiTLoadError, match=match):
        pipe.generate(image, context=contexts["context_pos"], negative_context=contexts["context_neg"],
                      width=64, height=48, frames=5)


def test_device_dtype_and_budgets_are_checked_at_load(tmp_path):
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="bf16 or fp32"):
        resolve_dtype("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="vram"):
        load_pipeline(tmp_path, vram="lots")
    pipe = load_pipeline(tmp_path, vram="auto", ram=24)
    assert pipe.vram == "auto" and pipe.ram == 24 << 30


# ---- the prompt cache, with a real (tiny) text encoder ---------------------------------


def test_cached_prompts_skip_loading_the_text_encoder(tmp_path, monkeypatch, image):
    from runtime import demo
    from runtime.model_folder import find_model_files

    monkeypatch.setenv("WANRT_CACHE", str(tmp_path / "cache"))
    folder = demo.write_demo_model(tmp_path / "model")
    files = find_model_files(folder)
    pipe = Pipeline(files, device=torch.device("cpu"), dtype=torch.float32)
    pipe.experts = FakeExperts(text_dim=demo.TEXT_DIM)
    pipe._vae = lambda: FakeVAE([])
    pipe.generate(image, "a cat", **small(steps=1))
    first = pipe.experts.calls[0].contexts

    monkeypatch.setattr("runtime.t5.load_text_encoder", lambda *a, **k: pytest.fail("the text encoder was loaded"))
    pipe.experts.calls.clear()
    pipe.generate(image, "a cat", **small(steps=1))
    for a, b in zip(first, pipe.experts.calls[0].contexts):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.golden
def test_golden_run_on_cuda(golden):
    """On the GPU the noise is the same (CPU generator); bf16 lands near the official bf16 run."""
    g = golden / "pipeline"
    call = json.loads((g / "run.json").read_text())["generate_call"]
    contexts = load_file(g / "contexts.safetensors")
    trace = load_file(g / "trace.safetensors")
    ref = load_file(g / "bf16_reference.safetensors")
    pipe = load_pipeline(high_noise=g / "checkpoint" / "high_noise_model",
                         low_noise=g / "checkpoint" / "low_noise_model", vae=g / "vae.safetensors", device="cuda")
    result = pipe.generate(g / "input.png", context=contexts["context_pos"], negative_context=contexts["context_neg"],
                           max_area=call["max_area"], frames=call["frame_num"], steps=call["sampling_steps"],
                           guide_scale=tuple(call["guide_scale"]), shift=call["shift"], seed=call["seed"])
    assert rel_l2(result.latent, ref["final_latent"]) < 2e-2
    assert rel_l2(result.video, trace["video"]) < 2 * rel_l2(ref["video"], trace["video"]) + 1e-3
    assert result.memory["cuda_peak_allocated"] > 0


# ---- what fits on the device -----------------------------------------------------------


@pytest.mark.golden
def test_expert_bytes_from_the_headers(golden):
    ckpt = golden / "pipeline" / "checkpoint"
    stored = sum(t.numel() * t.element_size() for d in ("high_noise_model", "low_noise_model")
                 for f in sorted((ckpt / d).glob("*.safetensors")) for t in load_file(f).values())
    config, fp32 = pipeline_mod.check_expert_files(ckpt / "high_noise_model", ckpt / "low_noise_model")
    _, bf16 = pipeline_mod.check_expert_files(ckpt / "high_noise_model", ckpt / "low_noise_model", torch.bfloat16)
    assert config.model_type == "i2v"
    assert fp32 == stored and stored / 2 < bf16 < stored  # linear weights narrowed, the rest kept

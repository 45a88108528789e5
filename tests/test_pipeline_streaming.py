"""The pipeline on the streaming engine: which path runs where, plans from the headers,
refusals before anything loads, streamed runs equal to resident runs (on the CPU the
engine runs with synchronous copies, the same code as on a GPU; the GPU tests run the
real streams), the text encoder streamed or sent to the CPU, the VAE tiled to the
budget, the CLI's budget errors, peak memory in the result."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import runtime.pipeline as pipeline_mod
from quant.convert import ConvertOptions, convert
from quant.ggml_types import GGMLType
from runtime import load_pipeline
from runtime.generate import EXIT_USAGE, main
from runtime.image_prep import VideoSize
from runtime.model_folder import ModelFiles
from runtime.pipeline import Pipeline, ResidentExperts, expert_requests, use_expandable_segments, uses_streaming
from runtime.samplers import HIGH_NOISE, LOW_NOISE
from runtime.stream import AUTO, BlockWeights, FileSource, PlanError, Request
from runtime.stream.budget import DEFAULT_DEVICE_OVERHEAD, GiB
from runtime.stream.plan import WORKSPACE_BYTES
from runtime.streamed_experts import StreamedExperts, device_info, header_weights, plan_experts

# Budgets that hold everything the tiny models need, and one below the planner's fixed
# costs (the assumed CUDA context plus half the workspace it reserves): always refused.
AMPLE = "64GiB"
TOO_SMALL = f"{DEFAULT_DEVICE_OVERHEAD + WORKSPACE_BYTES // 2}B"


# ---- the golden run, resident and streamed ----------------------------------------------


@pytest.fixture(scope="module")
def gguf_experts(golden, tmp_path_factory):
    """The golden experts converted to q8_0 GGUF (the files the engine streams from)."""
    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for name in ("high", "low"):
        path = folder / f"{name}-q8_0.gguf"
        convert(golden / "pipeline" / "checkpoint" / f"{name}_noise_model", path,
                ConvertOptions(type=GGMLType.Q8_0, progress=False))
        out[name] = path
    return out


def experts_of(golden, gguf_experts, kind: str) -> dict:
    if kind == "gguf":
        return {"high_noise": gguf_experts["high"], "low_noise": gguf_experts["low"]}
    ckpt = golden / "pipeline" / "checkpoint"
    return {"high_noise": ckpt / "high_noise_model", "low_noise": ckpt / "low_noise_model"}


def golden_kwargs(golden, **over) -> dict:
    g = golden / "pipeline"
    call = json.loads((g / "run.json").read_text())["generate_call"]
    contexts = load_file(g / "contexts.safetensors")
    kwargs = dict(context=contexts["context_pos"], negative_context=contexts["context_neg"],
                  max_area=call["max_area"], frames=call["frame_num"], steps=call["sampling_steps"],
                  guide_scale=tuple(call["guide_scale"]), shift=call["shift"], sampler=call["sample_solver"],
                  seed=call["seed"])
    return dict(kwargs, **over)


def make_pipe(golden, experts: dict, *, streaming: bool, device="cpu", dtype=torch.float32, vram=AMPLE,
              ram=AMPLE, resident="auto", loras=None):
    pipe = load_pipeline(vae=golden / "pipeline" / "vae.safetensors", device=device, dtype=dtype, vram=vram,
                         ram=ram, loras=loras, **experts)
    pipe.streaming = streaming
    pipe.resident_blocks = resident
    return pipe


@pytest.fixture(scope="module")
def resident_runs(golden, gguf_experts):
    out = {}
    for kind in ("gguf", "flat"):
        with make_pipe(golden, experts_of(golden, gguf_experts, kind), streaming=False) as pipe:
            out[kind] = pipe.generate(golden / "pipeline" / "input.png", **golden_kwargs(golden))
            assert type(pipe.experts) is ResidentExperts
    return out


@pytest.mark.golden
@pytest.mark.parametrize("kind", ["gguf", "flat"])
@pytest.mark.parametrize("resident", [0, 1, "auto"])
def test_streamed_run_equals_the_resident_run(golden, gguf_experts, resident_runs, kind, resident):
    """Every block streamed, some, or all resident: the same latent and video bit for bit,
    for experts streamed from a GGUF file and for experts held in host memory."""
    ref = resident_runs[kind]
    with make_pipe(golden, experts_of(golden, gguf_experts, kind), streaming=True, resident=resident) as pipe:
        result = pipe.generate(golden / "pipeline" / "input.png", **golden_kwargs(golden))
        assert isinstance(pipe.experts, StreamedExperts)
        plans = pipe.experts.plans
        n = plans["high"].n_blocks
        want = n if resident == "auto" else resident  # everything fits the ample budget
        assert all(len(p.resident) == want for p in plans.values())
        assert torch.equal(result.latent, ref.latent)
        assert torch.equal(result.video, ref.video)
        assert {"plan", "load_experts", "denoise_high", "denoise_low", "swap"} <= set(result.timings)
        assert result.timings["denoise_high"] + result.timings["denoise_low"] == pytest.approx(sum(result.step_times))
        assert result.settings["experts_per_step"] == ref.settings["experts_per_step"]


@pytest.mark.golden
def test_attached_experts_serve_the_next_video_of_the_same_shape(golden, gguf_experts, resident_runs):
    with make_pipe(golden, experts_of(golden, gguf_experts, "gguf"), streaming=True, resident=0) as pipe:
        pipe.generate(golden / "pipeline" / "input.png", **golden_kwargs(golden))
        first = pipe.experts
        assert first.set.arena is None  # the device memory went back for the decode
        again = pipe.generate(golden / "pipeline" / "input.png", **golden_kwargs(golden))
        assert pipe.experts is first
        assert torch.equal(again.latent, resident_runs["gguf"].latent)
        frames = golden_kwargs(golden)["frames"]
        pipe.generate(golden / "pipeline" / "input.png", **golden_kwargs(golden, frames=frames + 4))
        assert pipe.experts is not first and first.set is None  # planned again, the old ones closed
        no_cfg = pipe.experts
        pipe.generate(golden / "pipeline" / "input.png", **golden_kwargs(golden, guide_scale=1.0))
        assert pipe.experts is not no_cfg
        assert all("× 1," in p.title for p in pipe.experts.plans.values())  # one forward per step: batch 1


@pytest.mark.golden
def test_the_cpu_runs_resident_and_cuda_streams(golden):
    assert uses_streaming(torch.device("cuda")) and not uses_streaming(torch.device("cpu"))
    files = ModelFiles(golden / "pipeline" / "checkpoint" / "high_noise_model")
    assert Pipeline(files, device=torch.device("cuda"), dtype=torch.bfloat16).streaming
    assert not Pipeline(files, device=torch.device("cpu"), dtype=torch.float32).streaming
    with Pipeline(files, device=torch.device("cpu"), dtype=torch.float32) as pipe:
        assert pipe.plan_experts(None, {"high": Request(64, 48, 5)}) is None  # nothing to plan on the CPU


# ---- plans and refusals before loading ---------------------------------------------------


@pytest.fixture
def nothing_loads(monkeypatch):
    def fail(what):
        return lambda *a, **k: pytest.fail(f"{what} was loaded")

    monkeypatch.setattr("runtime.dit_loading.load_dit", fail("an expert"))
    monkeypatch.setattr(pipeline_mod, "open_experts", fail("an expert"))
    monkeypatch.setattr("runtime.vae.load_vae", fail("the VAE"))
    monkeypatch.setattr("runtime.t5.load_text_encoder", fail("the text encoder"))


@pytest.mark.golden
@pytest.mark.parametrize("kind", ["gguf", "flat"])
def test_too_small_a_vram_budget_is_refused_before_anything_loads(golden, gguf_experts, nothing_loads, kind):
    pipe = make_pipe(golden, experts_of(golden, gguf_experts, kind), streaming=True, vram=TOO_SMALL)
    with pytest.raises(PlanError, match=r"^the high-noise expert needs [0-9.]+ GiB at .*; the budget is "):
        pipe.generate(golden / "pipeline" / "input.png", **golden_kwargs(golden))
    assert pipe.experts is None


@pytest.mark.golden
def test_experts_outside_a_gguf_must_fit_the_ram_budget_together(golden, gguf_experts, nothing_loads):
    sources = {"high": golden / "pipeline" / "checkpoint" / "high_noise_model",
               "low": golden / "pipeline" / "checkpoint" / "low_noise_model"}
    both = sum(header_weights(s, torch.float32).total for s in sources.values())
    pipe = make_pipe(golden, experts_of(golden, gguf_experts, "flat"), streaming=True, ram=f"{both - 1}B")
    with pytest.raises(PlanError, match=r"not GGUF files.*python -m quant\.convert .*--type q8_0.*or raise --ram") as err:
        pipe.generate(golden / "pipeline" / "input.png", **golden_kwargs(golden))
    for role in ("high", "low"):  # one command per expert, its output named for its role
        assert f"quant.convert {sources[role]} wan2.2-i2v-a14b-{role}-noise-Q8_0.gguf" in str(err.value)
        assert f"--expert {role}_noise" in str(err.value)
    # GGUF experts stream from their files: only the active one needs host memory
    gguf = {n: header_weights(gguf_experts[n], torch.float32) for n in ("high", "low")}
    one = max(w.total for w in gguf.values())
    stream = make_pipe(golden, experts_of(golden, gguf_experts, "gguf"), streaming=True, resident=0,
                       ram=f"{one}B")
    assert one < sum(w.total for w in gguf.values())
    plans = stream.plan_experts(stream._check_experts(), {n: Request(64, 48, 5) for n in gguf})
    assert all(p.ram.pinned <= one for p in plans.values())


@pytest.mark.golden
def test_header_weights_are_what_the_loaded_experts_weigh(golden, gguf_experts):
    from runtime.dit_loading import load_dit

    flat = golden / "pipeline" / "checkpoint" / "high_noise_model"
    for dtype in (torch.float32, torch.bfloat16):
        model = load_dit(gguf_experts["high"], dtype=dtype, load_blocks=False)
        assert header_weights(gguf_experts["high"], dtype) == BlockWeights.of(model, FileSource.from_gguf(
            gguf_experts["high"]))
        exact = BlockWeights.of(load_dit(flat, dtype=dtype), None)
        predicted = header_weights(flat, dtype)
        assert not predicted.reloadable and not exact.reloadable
        assert (predicted.block_bytes, predicted.other_bytes) == (exact.block_bytes, exact.other_bytes)
        assert (predicted.linear_params, predicted.linear_bytes) == (exact.linear_params, exact.linear_bytes)


def test_each_expert_is_planned_for_its_own_batch():
    size = VideoSize(height=48, width=64)
    schedule = [HIGH_NOISE, HIGH_NOISE, LOW_NOISE]
    requests = expert_requests(schedule, (1.0, 3.5), size, 9, torch.bfloat16)  # (low, high)
    assert requests == {"high": Request(64, 48, 9, batch=2, dtype=torch.bfloat16),
                        "low": Request(64, 48, 9, batch=1, dtype=torch.bfloat16)}
    assert list(expert_requests([HIGH_NOISE], (3.5, 3.5), size, 9, torch.float32)) == ["high"]


def test_planning_without_a_gpu_needs_a_number():
    with pytest.raises(PlanError, match="--vram auto needs a CUDA device"):
        device_info(torch.device("cpu"), AUTO)
    info = device_info(torch.device("cpu"), 8 * GiB)
    assert info.room(8 * GiB) == 8 * GiB - info.overhead


@pytest.mark.golden
def test_plan_messages_name_the_expert(golden, gguf_experts):
    from runtime.dit_loading import inspect_checkpoint
    from quant.checkpoint import open_checkpoint

    with open_checkpoint(gguf_experts["high"]) as ckpt:
        config = inspect_checkpoint(ckpt).config
    budget = DEFAULT_DEVICE_OVERHEAD + WORKSPACE_BYTES // 2
    with pytest.raises(PlanError) as err:
        plan_experts(config, {"low": gguf_experts["low"]}, {"low": Request(64, 48, 5)}, vram=budget, ram=AUTO,
                     info=device_info(torch.device("cpu"), budget), dtype=torch.float32)
    assert str(err.value).startswith("the low-noise expert needs") and err.value.budget == budget


# ---- LoRAs on streamed experts -------------------------------------------------------------


@pytest.mark.golden
def test_loras_stream_with_their_expert(golden, gguf_experts, tmp_path):
    """A LoRA on every block linear plus a dense patch of a block tensor the file holds in
    the same type: the streamed run equals the resident one (the patched tensor is not
    read back from the file)."""
    from safetensors.torch import save_file

    from runtime.dit_loading import load_dit

    model = load_dit(gguf_experts["high"], load_blocks=False)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, t in model.blocks.named_buffers():
        module = f"blocks.{name.removesuffix('.weight')}"
        if name.endswith(".weight") and getattr(model.get_submodule(module), "in_features", None):
            lin = model.get_submodule(module)
            tensors[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(4, lin.in_features, generator=g) * 0.1
            tensors[f"diffusion_model.{module}.lora_up.weight"] = torch.randn(lin.out_features, 4, generator=g) * 0.1
    tensors["diffusion_model.blocks.0.diff_m"] = 0.05 * torch.randn(tuple(model.blocks[0].modulation.shape),
                                                                    generator=g)
    lora = tmp_path / "lora.safetensors"
    save_file(tensors, str(lora))
    experts = experts_of(golden, gguf_experts, "gguf")
    with make_pipe(golden, experts, streaming=False, loras=[f"high={lora}:0.7"]) as pipe:
        ref = pipe.generate(golden / "pipeline" / "input.png", **golden_kwargs(golden))
    with make_pipe(golden, experts, streaming=True, resident=0, loras=[f"high={lora}:0.7"]) as pipe:
        out = pipe.generate(golden / "pipeline" / "input.png", **golden_kwargs(golden))
        assert "blocks.0.modulation" not in pipe.experts.sources["high"]
    assert torch.equal(out.latent, ref.latent)


# ---- the text encoder ----------------------------------------------------------------------


@pytest.fixture
def t5_pipe(golden, tmp_path):
    folder = golden / "t5"
    files = ModelFiles(text_encoder=next(folder.glob("*.gguf")), tokenizer=folder / "tokenizer")
    return Pipeline(files, device=torch.device("cpu"), dtype=torch.float32, vram=64 * GiB, ram=64 * GiB,
                    prompt_cache=False)


PROMPTS = ["a cat turns its head", "blurry, static, low quality, many words to make this one longer"]


@pytest.mark.golden
def test_text_encoder_streams_to_the_plan(t5_pipe):
    ref = t5_pipe.encode_prompts(PROMPTS)  # the CPU path: loaded whole
    lines = []
    t5_pipe.streaming, t5_pipe.log = True, lines.append
    out = t5_pipe.encode_prompts(PROMPTS)
    assert any(line.startswith("streaming plan: umt5 encoder, 2 prompts") for line in lines)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


@pytest.mark.golden
def test_text_encoder_that_cannot_stream_runs_on_the_cpu(t5_pipe):
    ref = t5_pipe.encode_prompts(PROMPTS)
    lines = []
    t5_pipe.streaming, t5_pipe.log, t5_pipe.vram = True, lines.append, int(TOO_SMALL[:-1])
    out = t5_pipe.encode_prompts(PROMPTS)
    assert any("the text encoder needs" in line and "runs on the CPU instead" in line for line in lines)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    t5_pipe.text_device = t5_pipe.device  # asked for explicitly: the plan's refusal stands
    with pytest.raises(PlanError, match="the text encoder needs"):
        t5_pipe.encode_prompts(PROMPTS)


# ---- the VAE's budget ----------------------------------------------------------------------------


def test_vae_tiles_to_the_room_the_budget_leaves(tmp_path, monkeypatch):
    from runtime.stream import DeviceInfo

    seen = {}

    class StopHere(Exception):
        pass

    def load_vae(path, **kwargs):
        seen.update(kwargs)
        raise StopHere

    monkeypatch.setattr("runtime.vae.load_vae", load_vae)
    pipe = Pipeline(ModelFiles(vae=tmp_path / "vae.pth"), device=torch.device("cuda"), dtype=torch.bfloat16,
                    vram=8 * GiB)
    info = DeviceInfo("test", 24 * GiB, 20 * GiB, 0, 3 * GiB, GiB // 2, "measured")
    pipe.device_info = lambda: info
    with pytest.raises(StopHere):
        pipe._vae()
    assert seen["vram_budget"] == info.room(8 * GiB) == 8 * GiB - GiB // 2 - 3 * GiB
    pipe.streaming = False
    with pytest.raises(StopHere):
        pipe._vae()
    assert seen["vram_budget"] is None


# ---- memory and the allocator -----------------------------------------------------------------


def test_memory_report_has_every_peak_the_cli_prints(golden, gguf_experts):
    with make_pipe(golden, experts_of(golden, gguf_experts, "gguf"), streaming=True) as pipe:
        result = pipe.generate(golden / "pipeline" / "input.png", **golden_kwargs(golden))
    assert result.memory["host_peak_rss"] > 0
    assert result.memory["host_pinned_peak"] == 0  # nothing is page-locked without CUDA


def test_expandable_segments_unless_configured(monkeypatch):
    for var in pipeline_mod.ALLOC_CONF_VARS:
        monkeypatch.delenv(var, raising=False)
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised in this process")
    use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


# ---- the CLI -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    from runtime import demo

    return demo.write_demo_model(tmp_path_factory.mktemp("model"))


def cli_fails(argv, capsys, match: str) -> str:
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


def test_cli_refuses_a_video_that_does_not_fit_before_loading(tmp_path, demo_folder, capsys, monkeypatch,
                                                              nothing_loads):
    from runtime import demo

    monkeypatch.setattr(pipeline_mod, "uses_streaming", lambda device: True)  # the GPU path, planned on the CPU
    image = tmp_path / "in.png"
    demo.demo_image().save(image)
    out = tmp_path / "o.mp4"
    line = cli_fails(["--model", str(demo_folder), "-i", str(image), "-p", "a cat", "-o", str(out),
                      "--vram", TOO_SMALL, "--device", "cpu"], capsys, "the high-noise expert needs")
    assert "; the budget is" in line
    assert not out.exists()


@pytest.mark.parametrize("flag,value,match", [
    ("--vram", "lots", "--vram expects 'auto' or a size in GiB"),
    ("--vram", "0", "--vram must be positive"),
    ("--ram", "-3", "--ram expects 'auto'"),
    ("--ram", "8 GB of it", "--ram expects 'auto'"),
])
def test_cli_budget_mistakes_are_one_line(tmp_path, demo_folder, capsys, nothing_loads, flag, value, match):
    cli_fails(["--model", str(demo_folder), "-i", "x.png", "-p", "a cat", "-o", str(tmp_path / "o.mp4"),
               flag, value], capsys, match)


def test_cli_budgets_default_to_auto():
    from runtime.generate import build_parser

    args = build_parser().parse_args([])
    assert (args.vram, args.ram) == ("auto", "auto")


# ---- on the GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.golden
@pytest.mark.parametrize("kind", ["gguf", "flat"])
@pytest.mark.parametrize("resident", [0, "auto"])
def test_gpu_streamed_pipeline_equals_resident_pipeline(golden, gguf_experts, kind, resident):
    experts = experts_of(golden, gguf_experts, kind)
    kwargs = golden_kwargs(golden)
    with make_pipe(golden, experts, streaming=False, device="cuda", dtype=torch.bfloat16) as pipe:
        ref = pipe.generate(golden / "pipeline" / "input.png", **kwargs)
        assert type(pipe.experts) is ResidentExperts
    with make_pipe(golden, experts, streaming=True, device="cuda", dtype=torch.bfloat16, vram=AUTO, ram=AUTO,
                   resident=resident) as pipe:
        assert pipe.streaming  # the default on CUDA
        out = pipe.generate(golden / "pipeline" / "input.png", **kwargs)
        assert isinstance(pipe.experts, StreamedExperts)
        again = pipe.generate(golden / "pipeline" / "input.png", **kwargs)
    for result in (out, again):
        assert torch.equal(result.latent, ref.latent)
        assert torch.equal(result.video, ref.video)
    assert out.memory["cuda_peak_allocated"] > 0 and out.memory["cuda_peak_driver"] >= out.memory["cuda_peak_reserved"]
    if resident == 0:
        assert out.memory["host_pinned_peak"] > 0  # streamed blocks come from page-locked memory


@pytest.mark.gpu
@pytest.mark.golden
def test_gpu_too_small_a_budget_is_refused_before_any_device_memory_is_taken(golden, gguf_experts, nothing_loads):
    info = device_info(torch.device("cuda"), AUTO)
    before = torch.cuda.memory_allocated()
    budget = f"{info.overhead + WORKSPACE_BYTES // 2}B"
    pipe = make_pipe(golden, experts_of(golden, gguf_experts, "gguf"), streaming=True, device="cuda",
                     dtype=torch.bfloat16, vram=budget)
    with pytest.raises(PlanError, match="the high-noise expert needs"):
        pipe.generate(golden / "pipeline" / "input.png", **golden_kwargs(golden))
    assert torch.cuda.memory_allocated() == before


@pytest.mark.gpu
@pytest.mark.golden
def test_gpu_text_encoder_streams_exactly(golden):
    folder = golden / "t5"
    files = ModelFiles(text_encoder=next(folder.glob("*.gguf")), tokenizer=folder / "tokenizer")
    pipe = Pipeline(files, device=torch.device("cuda"), dtype=torch.bfloat16, prompt_cache=False)
    assert pipe.streaming
    out = pipe.encode_prompts(PROMPTS)
    pipe.streaming = False
    ref = pipe.encode_prompts(PROMPTS)  # loaded whole on the GPU
    for a, b in zip(out, ref):
        assert torch.equal(a, b)

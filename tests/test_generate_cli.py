"""`python -m runtime.generate`: the demo writes a real video; every mistake is one line,
exit code 2, before any model is loaded; nothing is left under the output name."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

import runtime.pipeline as pipeline_mod
from runtime import demo
from runtime.generate import (ENV_DEFAULTS, EXIT_INTERRUPTED, EXIT_USAGE, UsageError, apply_environment, build_parser,
                              main, parse_max_area)
from runtime.samplers import PRESETS
from runtime.video_io import DEFAULT_FPS


def read_video(path: Path) -> tuple[dict, int]:
    frames = imageio_ffmpeg.read_frames(str(path))
    meta = next(frames)
    return meta, sum(1 for _ in frames)


def test_demo_writes_a_video_that_reads_back(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["--demo", "-o", str(out)]) == 0
    meta, count = read_video(out)
    assert count == demo.DEMO_FRAMES
    assert tuple(meta["size"]) == demo.DEMO_SIZE
    assert meta["fps"] == DEFAULT_FPS
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["settings"]["frames"] == demo.DEMO_FRAMES
    stdout = capsys.readouterr().out
    assert f"seed {sidecar['settings']['seed']}" in stdout and "wrote" in stdout


def test_demo_with_a_preset_says_what_overrides_it(tmp_path, capsys):
    out = tmp_path / "short.webp"
    preset = PRESETS["lightx2v-4step"]
    steps = preset.steps - 1
    argv = ["--demo", "-o", str(out), "--preset", preset.name, "--steps", str(steps), "-W", "64", "-H", "48",
            "-l", "5", "--fps", "8"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"steps {steps} overrides the {preset.name} preset's {preset.steps}" in err
    settings = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert settings["steps"] == steps and settings["sampler"] == preset.sampler
    assert (settings["width"], settings["height"], settings["frames"]) == (64, 48, 5)


# ---- arguments and the environment ----------------------------------------------------


def test_environment_gives_defaults_and_flags_win():
    env = {"INPUT_IMAGE": "in.png", "POSITIVE_PROMPT": "a cat", "NEGATIVE_PROMPT": "blur", "WIDTH": "832",
           "HEIGHT": " 480 ", "LENGTH": "33", "SEED": "-1"}
    assert set(env) == set(ENV_DEFAULTS)
    args = build_parser().parse_args(["-W", "640"])
    notes = apply_environment(args, env)
    assert (args.image, args.prompt, args.negative_prompt) == ("in.png", "a cat", "blur")
    assert (args.width, args.height, args.frames, args.seed) == (640, 480, 33, -1)
    assert "--width from WIDTH" not in notes and "--height from HEIGHT" in notes


def test_empty_environment_variables_count_as_unset():
    args = build_parser().parse_args([])
    apply_environment(args, {"WIDTH": "", "INPUT_IMAGE": "  "})
    assert args.width is None and args.image is None


def test_bad_environment_value_names_the_variable():
    with pytest.raises(UsageError, match="WIDTH='wide'"):
        apply_environment(build_parser().parse_args([]), {"WIDTH": "wide"})


def test_max_area_forms():
    assert parse_max_area("1280*720") == parse_max_area("1280x720") == parse_max_area("921600") == 921600
    assert parse_max_area(None) is None
    with pytest.raises(UsageError):
        parse_max_area("big")


# ---- failures: one line, exit 2, nothing loaded, nothing written -----------------------


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return demo.write_demo_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr(pipeline_mod, "open_experts", lambda *a, **k: pytest.fail("experts were loaded"))
    monkeypatch.setattr("runtime.vae.load_vae", lambda *a, **k: pytest.fail("the VAE was loaded"))
    monkeypatch.setattr("runtime.t5.load_text_encoder", lambda *a, **k: pytest.fail("the text encoder was loaded"))


def fails(argv, capsys, match: str) -> str:
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    return lines[0]


def test_usage_mistakes(tmp_path, image, capsys, demo_folder, no_loading):
    out = str(tmp_path / "o.mp4")
    base = ["--model", str(demo_folder), "-i", str(image), "-p", "a cat", "-o", out]
    fails(["-i", str(image), "-p", "a cat", "-o", out], capsys, "no model given")
    fails(base + ["--cfg", "1", "2", "3"], capsys, "--cfg takes one value or two")
    fails(base + ["--vram", "lots"], capsys, "--vram expects 'auto'")
    fails(base + ["--max-area", "huge"], capsys, "--max-area")
    fails(base + ["--fps", "0"], capsys, "--fps")
    fails(["--model", str(demo_folder), "-p", "a cat", "-o", out], capsys, "no input image")
    fails(["--demo", "--model", str(demo_folder)], capsys, "--demo brings its own")
    assert not Path(out).exists()


def test_bad_output_paths_are_refused_first(tmp_path, image, capsys, demo_folder, no_loading):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    base = ["--model", str(demo_folder), "-i", str(image), "-p", "a cat", "-o"]
    fails(base + [str(blocker / "out.mp4")], capsys, "cannot be created")
    fails(base + [str(tmp_path / "out.avi")], capsys, "unknown video format")
    existing = tmp_path / "old.mp4"
    existing.write_bytes(b"keep me")
    fails(base + [str(existing)], capsys, "would overwrite")
    assert existing.read_bytes() == b"keep me"


def test_bad_images_and_sizes_are_refused_before_loading(tmp_path, image, capsys, demo_folder, no_loading):
    out = str(tmp_path / "o.mp4")
    base = ["--model", str(demo_folder), "-p", "a cat", "-o", out]
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    fails(base + ["-i", str(text)], capsys, "not an image format")
    fails(base + ["-i", str(tmp_path / "absent.png")], capsys, "no such file")
    fails(base + ["-i", str(image), "-W", "8"], capsys, "too small")
    fails(base + ["-i", str(image), "-W", "64", "--max-area", "1280*720"], capsys, "either --max-area")
    assert not Path(out).exists()


def test_environment_image_is_used(tmp_path, capsys, demo_folder, no_loading, monkeypatch):
    missing = tmp_path / "from_env.png"
    monkeypatch.setenv("INPUT_IMAGE", str(missing))
    monkeypatch.setenv("POSITIVE_PROMPT", "a cat")
    line = fails(["--model", str(demo_folder), "-o", str(tmp_path / "o.mp4")], capsys, "no such file")
    assert str(missing) in line
    monkeypatch.setenv("LENGTH", "many")
    fails(["--model", str(demo_folder), "-o", str(tmp_path / "o.mp4")], capsys, "LENGTH='many'")


def test_missing_model_files_are_named(tmp_path, image, capsys, no_loading):
    empty = tmp_path / "models"
    empty.mkdir()
    line = fails(["--model", str(empty), "-i", str(image), "-p", "a cat", "-o", str(tmp_path / "o.mp4")],
                 capsys, "missing model files")
    for flag in ("--high-noise", "--low-noise", "--vae"):
        assert flag in line


@pytest.mark.golden
def test_t2v_experts_are_refused_with_the_loader_message(golden, tmp_path, image, capsys, demo_folder, no_loading):
    t2v = golden / "dit" / "t2v" / "weights.safetensors"
    fails(["--model", str(demo_folder), "--high-noise", str(t2v), "--low-noise", str(t2v), "-i", str(image),
           "-p", "a cat", "-o", str(tmp_path / "o.mp4")], capsys, "T2V checkpoint")


def test_debug_shows_the_exception(tmp_path, image):
    with pytest.raises(ValueError, match="--vram"):
        main(["--demo", "--vram", "lots", "-o", str(tmp_path / "o.mp4"), "--debug"])


def test_interrupt_or_failure_mid_run_leaves_no_output(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run.mp4"
    small = ["--demo", "-o", str(out), "-W", "64", "-H", "48", "-l", "5", "--steps", "2"]
    real = pipeline_mod._velocity
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline_mod, "_velocity", interrupted)
    assert main(small) == EXIT_INTERRUPTED
    assert "no video was written" in capsys.readouterr().err

    def broken(video, tmp, **kwargs):
        tmp.write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_mod, "_velocity", real)
    monkeypatch.setattr("runtime.video_io._encode_mp4", broken)
    assert main(small) == EXIT_INTERRUPTED
    assert list(tmp_path.iterdir()) == []  # no partial file, no sidecar, no temporary


def test_parser_knows_every_documented_flag():
    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    for flag in ("-i", "--image", "-p", "--prompt", "-n", "--negative-prompt", "-W", "--width", "-H", "--height",
                 "--max-area", "-l", "--frames", "--steps", "--cfg", "--shift", "--seed", "--sampler",
                 "--last-image", "--preset", "--model", "--high-noise", "--low-noise", "--text-encoder",
                 "--tokenizer", "--vae", "--vram", "--ram", "-o", "--output", "--fps", "--device", "--dtype",
                 "--demo", "--debug"):
        assert flag in flags, flag
    assert isinstance(parser.parse_args(["--cfg", "3", "4"]), argparse.Namespace)

"""Image preparation: official to_tensor + size rule + bicubic resize, and wanrt's extras."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from runtime.image_prep import (MIN_SIDE, ImageError, SizeError, VideoSize, center_crop_to_aspect,
                                check_video_size, explicit_size, load_image, max_area_size,
                                prepare_image, round_frames, to_model_range)


@pytest.fixture(scope="module")
def pipeline_golden(golden):
    root = golden / "pipeline"
    return root, json.loads((root / "run.json").read_text()), load_file(str(root / "trace.safetensors"))


@pytest.mark.golden
def test_image_tensor_and_resize_match_official(pipeline_golden):
    root, run, trace = pipeline_golden
    unit, notes = load_image(root / "input.png")
    assert torch.equal(to_model_range(unit), trace["image_tensor"])
    assert notes == ()

    prepared = prepare_image(root / "input.png", max_area=run["generate_call"]["max_area"])
    derived = run["derived"]
    assert prepared.size == VideoSize(derived["h"], derived["w"])
    assert (prepared.size.lat_h, prepared.size.lat_w) == (derived["lat_h"], derived["lat_w"])
    assert prepared.source_size == (run["image"]["width"], run["image"]["height"])
    assert prepared.pixels.dtype == torch.float32
    assert torch.equal(prepared.pixels, trace["image_resized"])


@pytest.mark.golden
def test_size_rule_every_golden_case(golden):
    rows = json.loads((golden / "pipeline" / "size_rule.json").read_text())["rows"]
    assert rows
    for r in rows:
        size = max_area_size(r["image_w"], r["image_h"], r["max_area"])
        assert size == VideoSize(r["out_h"], r["out_w"]), r
        assert (size.lat_h, size.lat_w) == (r["lat_h"], r["lat_w"]), r
        # The official float rounding, not exact arithmetic, decides.
        if r["float_rounding_changed_result"]:
            assert (size.lat_h, size.lat_w) != (r["exact_arithmetic_lat_h"], r["exact_arithmetic_lat_w"])


def test_inputs_of_every_kind_agree(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    want = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    for source in (path, str(path), Image.fromarray(rgb), rgb,
                   torch.from_numpy(rgb).permute(2, 0, 1), want.clone(), want[None].clone()):
        got, notes = load_image(source)
        assert torch.equal(got, want), type(source)
        assert notes == ()


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under the transparent part: the official convert("RGB") keeps it
    rgba[:, :3, 3] = 255  # left half opaque
    rgba[:, 3:, 3] = 0
    for source in (Image.fromarray(rgba, "RGBA"), rgba, torch.from_numpy(rgba).permute(2, 0, 1)):
        got, notes = load_image(source)
        assert got.shape == (3, 4, 6)
        assert torch.equal(got[:, :, 3:], torch.ones(3, 4, 3))
        assert torch.allclose(got[0, :, :3], torch.full((4, 3), 200 / 255))
        assert torch.equal(got[1:, :, :3], torch.zeros(2, 4, 3))
        assert any("white" in n for n in notes)

    la = Image.fromarray(np.stack([np.full((4, 6), 10, np.uint8), rgba[..., 3]], -1), "LA")
    got, _ = load_image(la)
    assert torch.equal(got[:, :, 3:], torch.ones(3, 4, 3))
    assert torch.allclose(got[:, :, :3], torch.full((3, 4, 3), 10 / 255))

    pal = Image.new("P", (6, 4), 0)
    pal.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    pal.paste(1, (3, 0, 6, 4))
    pal.info["transparency"] = 0  # palette entry 0 (blue) is transparent
    path = tmp_path / "p.png"
    pal.save(path, transparency=0)
    got, _ = load_image(path)
    assert torch.equal(got[:, :, :3], torch.ones(3, 4, 3))
    assert torch.equal(got[:, :, 3:], torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 4, 3))


def test_gray_cmyk_and_16_bit(tmp_path):
    gray = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    got, notes = load_image(Image.fromarray(gray, "L"))
    assert torch.equal(got, torch.from_numpy(gray).float().div(255).expand(3, 4, 6))
    assert any("L to RGB" in n for n in notes)
    assert torch.equal(load_image(gray)[0], got)

    cmyk = Image.new("CMYK", (5, 3), (0, 255, 255, 0))  # pure red
    got, _ = load_image(cmyk)
    assert torch.equal(got, torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 3, 5))

    deep = (np.arange(24, dtype=np.uint16).reshape(4, 6) * 2000)
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    got, _ = load_image(path)
    assert torch.allclose(got[1], torch.from_numpy(deep).float() / 65535)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (30, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    got, notes = load_image(path)
    assert got.shape == (3, 30, 20)
    assert any("EXIF" in n for n in notes)


def test_unreadable_images_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="notes.png: not an image format"):
        load_image(text)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:400])
    with pytest.raises(ImageError, match="cut.png: the image data is truncated"):
        load_image(cut)
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match=r"expected \[0, 1\]"):
        load_image(np.full((4, 4, 3), -1.0, np.float32))
    with pytest.raises(ImageError, match="shape"):
        load_image(torch.zeros(5, 4, 4))
    with pytest.raises(ImageError, match="cannot use a list"):
        load_image([[0]])


def test_explicit_size_rounds_to_16_with_notes():
    size, notes = explicit_size(1000, 570, (1000, 570))
    assert size == VideoSize(576, 1008)
    assert len(notes) == 2 and "1008" in notes[0] and "576" in notes[1]
    size, notes = explicit_size(832, None, (1280, 720))
    assert size == VideoSize(464, 832)  # 832 * 720 / 1280 = 468 -> 464
    assert "aspect" in notes[0]
    size, notes = explicit_size(None, 480, (480, 832))
    assert size == VideoSize(480, 272)
    assert explicit_size(1280, 720, (3, 4)) == (VideoSize(720, 1280), ())
    with pytest.raises(SizeError, match="width must be a positive"):
        explicit_size(-16, 32, (4, 4))


def test_prepare_with_explicit_size_and_crop():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (60, 120, 3), dtype=np.uint8)  # 2:1
    stretched = prepare_image(img, width=64, height=64)
    assert stretched.pixels.shape == (3, 64, 64)
    assert any("stretched" in n for n in stretched.notes)

    cropped = prepare_image(img, width=64, height=64, crop=True)
    assert cropped.pixels.shape == (3, 64, 64)
    window = to_model_range(load_image(img)[0])[:, :, 30:90]  # the centre 60x60
    want = torch.nn.functional.interpolate(window[None], size=(64, 64), mode="bicubic",
                                           align_corners=False)[0]
    assert torch.equal(cropped.pixels, want)
    assert any("cropped" in n for n in cropped.notes)

    tall = center_crop_to_aspect(torch.zeros(3, 100, 50), VideoSize(32, 64))
    assert tall.shape == (3, 25, 50)
    with pytest.raises(SizeError, match="either max_area or width/height"):
        prepare_image(img, width=64, max_area=4096)


def test_impossible_sizes_are_refused_with_the_fix():
    img = np.zeros((60, 80, 3), np.uint8)
    with pytest.raises(SizeError, match=f"too small.*at least {MIN_SIDE} px"):
        prepare_image(img, max_area=500)
    with pytest.raises(SizeError, match="too small"):
        prepare_image(img, width=16, height=16)
    with pytest.raises(SizeError, match="too large"):
        prepare_image(img, width=16384, height=720)
    with pytest.raises(SizeError, match="max_area .* too large"):
        prepare_image(img, max_area=10**9)
    with pytest.raises(SizeError, match="max_area must be a positive"):
        prepare_image(img, max_area=0)
    # A panorama at the default area: the long side grows past the maximum.
    with pytest.raises(SizeError, match="too large.*crop the image"):
        prepare_image(np.zeros((4, 2000, 3), np.uint8))
    with pytest.raises(SizeError, match="multiple of 16"):
        check_video_size(VideoSize(40, 64))
    check_video_size(VideoSize(MIN_SIDE, MIN_SIDE))


def test_frames_round_to_4n_plus_1():
    assert round_frames(81) == (81, ())
    assert round_frames(1) == (1, ())
    frames, notes = round_frames(80)
    assert frames == 81 and "4n+1" in notes[0]
    assert round_frames(78)[0] == 77
    assert round_frames(79)[0] == 81  # ties go up
    assert round_frames(2)[0] == 1
    for bad in (0, -3, 2.5, True):
        with pytest.raises(SizeError, match="frames must be"):
            round_frames(bad)
    with pytest.raises(SizeError, match="too many"):
        round_frames(10_000)

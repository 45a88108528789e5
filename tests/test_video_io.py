"""Video output: formats read back, sidecar, atomic writes, path checks."""
from __future__ import annotations

import json
import os
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

import runtime
from runtime import video_io
from runtime.video_io import (OutputPathError, VideoWriteError, check_output_path, save_video,
                              to_uint8_frames)


def _clip(frames=9, h=48, w=64):
    """A smooth moving gradient: compresses well, so decoded frames stay close."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((frames, h, w, 3), np.uint8)
    for f in range(frames):
        out[f, ..., 0] = (x * 255 // (w - 1) + 8 * f) % 256
        out[f, ..., 1] = y * 255 // (h - 1)
        out[f, ..., 2] = 128
    return out


def _read_mp4(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in reader]
    return meta, np.stack(frames)


def _leftovers(folder):
    return [p for p in os.listdir(folder) if p.startswith(".")]


def test_mp4_reads_back(tmp_path):
    clip = _clip()
    saved = runtime.save_video(clip, tmp_path / "clip.mp4", fps=16, settings={"seed": 42})
    meta, frames = _read_mp4(saved.path)
    assert frames.shape == clip.shape
    assert meta["fps"] == 16
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert imageio_ffmpeg.count_frames_and_secs(str(saved.path))[0] == len(clip)
    assert np.abs(frames.astype(int) - clip).mean() < 4  # CRF 10 on a smooth clip
    side = json.loads((tmp_path / "clip.json").read_text())
    assert side["settings"] == {"seed": 42}
    assert side["video"] == {"file": "clip.mp4", "format": "mp4", "frames": 9, "width": 64,
                             "height": 48, "fps": 16, "crf": 10}
    assert saved.sidecar == tmp_path / "clip.json"
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_outputs_get_the_permissions_of_a_plain_file(tmp_path):
    """Written under a private temporary name, the outputs still end up as open() and
    mkdir() would make them (readable by others where the umask allows)."""
    umask = os.umask(0o022)
    try:
        runtime.save_video(_clip(), tmp_path / "clip.mp4", settings={"seed": 1})
        runtime.save_video(_clip(), f"{tmp_path}/frames/")
    finally:
        os.umask(umask)
    assert (tmp_path / "clip.mp4").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "clip.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "frames").stat().st_mode & 0o777 == 0o755


def test_mp4_odd_size_is_padded_with_a_note(tmp_path):
    clip = _clip(5, 33, 47)
    saved = save_video(clip, tmp_path / "odd.mp4", fps=24, crf=0)
    meta, frames = _read_mp4(saved.path)
    assert frames.shape == (5, 34, 48, 3)
    assert (saved.width, saved.height) == (48, 34)
    assert meta["fps"] == 24
    assert any("padded 47x33 to 48x34" in n for n in saved.notes)


def test_float_video_converts_like_official():
    v = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 6).expand(3, 2, 1, 6)
    u8 = to_uint8_frames(v)
    assert u8.shape == (2, 1, 6, 3) and u8.dtype == np.uint8
    want = ((v.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert np.array_equal(u8, want)
    assert u8[0, 0, :, 0].tolist() == [0, 0, 127, 191, 255, 255]
    assert np.array_equal(to_uint8_frames(v[None]), u8)
    assert np.array_equal(to_uint8_frames(v.numpy()), u8)
    with pytest.raises(ValueError, match=r"\[3, F, H, W\]"):
        to_uint8_frames(torch.zeros(2, 4, 4, 3))
    with pytest.raises(ValueError, match="uint8"):
        to_uint8_frames(np.zeros((2, 4, 4, 3), np.int16))


def test_webp_gif_and_png(tmp_path):
    clip = _clip(6, 20, 30)
    webp = save_video(clip, tmp_path / "a.webp", fps=10, quality=10)
    with Image.open(webp.path) as im:
        assert im.format == "WEBP" and im.n_frames == 6 and im.size == (30, 20)
        im.load()  # the frame duration is known once a frame is decoded
        assert im.info["duration"] == 100

    gif = save_video(clip, tmp_path / "a.gif", fps=16)
    with Image.open(gif.path) as im:
        assert im.format == "GIF" and im.n_frames == 6 and im.size == (30, 20)
        assert im.info["duration"] == 60
    assert any("1/100 s" in n for n in gif.notes)

    folder = save_video(clip, f"{tmp_path}/frames/", settings={"seed": 1})
    names = sorted(os.listdir(folder.path))
    assert len(names) == 6 and names[0] == "frame_00000.png"
    for i, name in enumerate(names):
        assert np.array_equal(np.asarray(Image.open(folder.path / name)), clip[i])
    assert json.loads((tmp_path / "frames.json").read_text())["settings"] == {"seed": 1}

    pattern = save_video(clip, tmp_path / "shots" / "s_%03d.png")
    assert sorted(os.listdir(tmp_path / "shots")) == [f"s_{i:03d}.png" for i in range(6)]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "shots" / "s_005.png")), clip[5])
    assert pattern.sidecar is None

    one = save_video(clip[:1], tmp_path / "still.png")
    assert np.array_equal(np.asarray(Image.open(one.path)), clip[0])
    with pytest.raises(OutputPathError, match="one frame"):
        save_video(clip, tmp_path / "many.png")
    assert not (tmp_path / "many.png").exists()
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "shots") == []


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "new" / "v.mp4").kind == "mp4"
    assert check_output_path(tmp_path / "v.MP4").sidecar == tmp_path / "v.json"
    assert check_output_path(str(tmp_path / "f") + "/").kind == "png-folder"
    assert check_output_path(tmp_path / "f_%05d.png").sidecar == tmp_path / "f.json"
    with pytest.raises(OutputPathError, match="unknown video format '.avi'.*mp4"):
        check_output_path(tmp_path / "v.avi")
    with pytest.raises(OutputPathError, match="no file extension"):
        check_output_path(tmp_path / "video")
    with pytest.raises(OutputPathError, match="placeholder"):
        check_output_path(tmp_path / "%d_%d.png")

    (tmp_path / "v.mp4").write_bytes(b"old")
    with pytest.raises(OutputPathError, match="would overwrite.*overwrite=True"):
        check_output_path(tmp_path / "v.mp4")
    check_output_path(tmp_path / "v.mp4", overwrite=True)
    (tmp_path / "w.json").write_text("{}")
    with pytest.raises(OutputPathError, match="w.json"):
        check_output_path(tmp_path / "w.gif")
    check_output_path(tmp_path / "w.gif", sidecar=False)
    (tmp_path / "f_00003.png").write_bytes(b"")
    with pytest.raises(OutputPathError, match="f_00003.png"):
        check_output_path(tmp_path / "f_%05d.png")

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        check_output_path(tmp_path / "afile" / "v.mp4")
    with pytest.raises(OutputPathError, match="not a folder"):
        check_output_path(f"{tmp_path}/afile/")
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(OutputPathError, match="is a folder"):
        check_output_path(tmp_path / "dir.mp4")


def test_unwritable_folder_is_refused(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(video_io.tempfile, "TemporaryFile", denied)  # works as root too
    with pytest.raises(OutputPathError, match="cannot write in .*Permission denied"):
        check_output_path(tmp_path / "v.mp4")


def test_overwrite_replaces_only_when_complete(tmp_path):
    clip = _clip(3, 16, 16)
    target = tmp_path / "v.mp4"
    target.write_bytes(b"old")
    with pytest.raises(OutputPathError):
        save_video(clip, target)
    save_video(clip, target, overwrite=True)
    assert _read_mp4(target)[1].shape == (3, 16, 16, 3)

    folder = tmp_path / "frames"
    save_video(clip, str(folder) + "/")
    save_video(clip[:2], str(folder) + "/", overwrite=True)
    assert len(os.listdir(folder)) == 2
    assert _leftovers(tmp_path) == []


def test_interrupt_leaves_no_partial_output(tmp_path, monkeypatch):
    clip = _clip(4, 16, 16)
    target = tmp_path / "v.mp4"
    target.write_bytes(b"previous video")
    real_popen = subprocess.Popen
    started = []

    class InterruptingPipe:
        def __init__(self, pipe):
            self.pipe = pipe

        def write(self, data):
            raise KeyboardInterrupt

        def close(self):
            self.pipe.close()

    def popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        proc.stdin = InterruptingPipe(proc.stdin)
        return proc

    monkeypatch.setattr(video_io.subprocess, "Popen", popen)
    with pytest.raises(KeyboardInterrupt):
        save_video(clip, target, overwrite=True, settings={"seed": 3})
    assert target.read_bytes() == b"previous video"
    assert not (tmp_path / "v.json").exists()
    assert started and started[0].poll() is not None  # ffmpeg was stopped
    assert _leftovers(tmp_path) == []


def test_encoder_failure_is_reported_and_cleaned(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: "false")
    with pytest.raises(VideoWriteError, match="exit code"):
        save_video(_clip(2, 16, 16), tmp_path / "v.mp4")
    assert os.listdir(tmp_path) == []


def test_bad_arguments(tmp_path):
    clip = _clip(2, 16, 16)
    with pytest.raises(ValueError, match="fps"):
        save_video(clip, tmp_path / "a.gif", fps=0)
    with pytest.raises(ValueError, match="quality"):
        save_video(clip, tmp_path / "a.webp", quality=11)
    with pytest.raises(ValueError, match="crf"):
        save_video(clip, tmp_path / "a.mp4", crf=60)
    with pytest.raises(ValueError, match="JSON"):
        save_video(clip, tmp_path / "a.gif", settings={"model": object()})
    assert os.listdir(tmp_path) == []

"""Writing generated videos: H.264 MP4, animated WebP, GIF, or PNG frames, plus a JSON
sidecar with the settings that made them.

Every output is written under a temporary name in the target folder and renamed when
complete, so an error or Ctrl-C never leaves a partial file under the final name.
`check_output_path` runs the same checks up front, so a command line can refuse a bad
path before it spends minutes loading models.

Frames are uint8 [F, H, W, 3], or the decoder's float video [3, F, H, W] in [-1, 1],
converted as the official `save_video` does: clamp, (x + 1) / 2 * 255, truncated to uint8.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import torch

DEFAULT_FPS = 16  # Wan 2.2 A14B models
DEFAULT_QUALITY = 8  # imageio's 0..10 scale, as the official save_video passes it
FRAME_PATTERN = re.compile(r"%(0\d+)?d")
FORMATS = {".mp4": "mp4", ".webp": "webp", ".gif": "gif", ".png": "png"}
_KNOWN = ".mp4 (H.264), .webp, .gif, a folder ending in / (PNG frames) or a pattern like frame_%05d.png"

Frames = Union[np.ndarray, torch.Tensor]


class OutputPathError(ValueError):
    """The output path cannot be written (format, folder, or an existing file)."""


class VideoWriteError(RuntimeError):
    """The encoder failed while writing."""


@dataclass(frozen=True)
class OutputTarget:
    path: Path  # final file, PNG folder, or PNG pattern
    kind: str  # "mp4", "webp", "gif", "png" (one frame), "png-folder", "png-pattern"
    sidecar: Path  # where the settings JSON goes


@dataclass(frozen=True)
class SavedVideo:
    path: Path
    sidecar: Path | None  # None when no settings were given
    frames: int
    width: int
    height: int
    fps: float
    notes: tuple[str, ...]  # adjustments made while writing (padding, GIF timing)


# 1. The output path ------------------------------------------------------------------------

def check_output_path(path: str | os.PathLike, *, overwrite: bool = False,
                      sidecar: bool = True) -> OutputTarget:
    """Check, before any work, that `path` names a known format in a writable folder and
    does not replace an existing output (unless `overwrite`). Missing folders are created
    when writing. Raises OutputPathError saying what to change."""
    raw = os.fspath(path)
    if not raw:
        raise OutputPathError(f"empty output path; give a file name ending in {_KNOWN}")
    target = Path(raw).expanduser()
    suffix = target.suffix.lower()
    if target.is_dir() and suffix in FORMATS and not raw.endswith(("/", os.sep)):
        raise OutputPathError(f"{raw}: is a folder; give a file name inside it, or end the path "
                              "with / to write PNG frames into it")
    if raw.endswith(("/", os.sep)) or target.is_dir():
        kind, side = "png-folder", target.parent / f"{target.name}.json"
    elif suffix not in FORMATS:
        what = f"unknown video format {target.suffix!r}" if target.suffix else "no file extension"
        raise OutputPathError(f"{raw}: {what}; use {_KNOWN}")
    elif suffix == ".png" and FRAME_PATTERN.search(target.name):
        if len(FRAME_PATTERN.findall(target.name)) > 1:
            raise OutputPathError(f"{raw}: more than one frame-number placeholder; use one, "
                                  "like frame_%05d.png")
        stem = FRAME_PATTERN.sub("", target.stem).rstrip("_-. ") or "frames"
        kind, side = "png-pattern", target.parent / f"{stem}.json"
    else:
        kind, side = FORMATS[suffix], target.with_suffix(".json")

    if kind == "png-folder" and target.exists() and not target.is_dir():
        raise OutputPathError(f"{raw}: is a file, not a folder for PNG frames")
    _check_writable_folder(target.parent, raw)  # temporary files go beside the output
    if not overwrite:
        existing = _existing_outputs(target, kind)
        if sidecar and side.exists():
            existing.append(side)
        if existing:
            shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
            raise OutputPathError(f"{raw}: would overwrite {shown}; choose another name or allow "
                                  "overwriting (overwrite=True, --overwrite)")
    return OutputTarget(target, kind, side)


def _check_writable_folder(folder: Path, raw: str) -> None:
    probe = folder
    while not probe.exists():  # the nearest folder that exists decides
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputPathError(f"{raw}: {probe} is a file, so the folder cannot be created")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise OutputPathError(f"{raw}: cannot write in {probe} ({e.strerror or e}); "
                              "choose a folder you can write to") from None


def _existing_outputs(target: Path, kind: str) -> list[Path]:
    if kind == "png-folder":
        return [target] if target.is_dir() and any(target.iterdir()) else []
    if kind == "png-pattern":
        if not target.parent.is_dir():
            return []
        m = FRAME_PATTERN.search(target.name)
        regex = re.compile(re.escape(target.name[:m.start()]) + r"\d+" + re.escape(target.name[m.end():]))
        return sorted(p for p in target.parent.iterdir() if regex.fullmatch(p.name))
    return [target] if target.exists() else []


# 2. Frames -------------------------------------------------------------------------------

def to_uint8_frames(video: Frames) -> np.ndarray:
    """uint8 [F, H, W, 3] from uint8 [F, H, W, 3] (or [F, H, W, 1]), or from a float video
    [3, F, H, W] / [1, 3, F, H, W] in [-1, 1] (converted like the official save_video)."""
    if isinstance(video, torch.Tensor):
        if video.dtype == torch.uint8:
            video = video.detach().cpu().numpy()
        elif video.is_floating_point():
            v = video.detach().cpu().float()
            if v.dim() == 5 and v.shape[0] == 1:
                v = v[0]
            if v.dim() != 4 or v.shape[0] != 3:
                raise ValueError(f"a float video must be [3, F, H, W] in [-1, 1], got shape "
                                 f"{tuple(video.shape)}; uint8 frames must be [F, H, W, 3]")
            u8 = ((v.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)  # truncation, as official
            return u8.permute(1, 2, 3, 0).contiguous().numpy()
        else:
            raise ValueError(f"video tensor of dtype {video.dtype}; expected uint8 frames "
                             "[F, H, W, 3] or a float video [3, F, H, W] in [-1, 1]")
    if not isinstance(video, np.ndarray):
        raise ValueError(f"cannot write a {type(video).__name__} as video; pass uint8 frames "
                         "[F, H, W, 3] (NumPy or torch) or a float video tensor [3, F, H, W]")
    if np.issubdtype(video.dtype, np.floating):
        return to_uint8_frames(torch.from_numpy(video))
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] not in (1, 3):
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {video.dtype} {video.shape}")
    if video.shape[0] < 1 or video.shape[1] < 1 or video.shape[2] < 1:
        raise ValueError(f"no frames to write (shape {video.shape})")
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    return np.ascontiguousarray(video)


# 3. Writing ------------------------------------------------------------------------------

def save_video(frames: Frames, path: str | os.PathLike, fps: float = DEFAULT_FPS, *,
               settings: Mapping[str, Any] | None = None, quality: float = DEFAULT_QUALITY,
               crf: int | None = None, overwrite: bool = False) -> SavedVideo:
    """Write `frames` to `path`; the extension picks the format (see check_output_path).

    quality: 0 (worst) .. 10 (best), imageio's scale; for MP4 it becomes the x264 CRF
    int((1 - quality / 10) * 51) (8 -> CRF 10, the official setting) unless `crf` is given;
    for WebP it is the encoder quality x 10. settings: written with the video's size,
    frame count and fps to `<name>.json` next to it (put the seed in there)."""
    target = check_output_path(path, overwrite=overwrite, sidecar=settings is not None)
    video = to_uint8_frames(frames)
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and 0 < fps <= 1000):
        raise ValueError(f"fps must be a number in (0, 1000], got {fps!r}")
    if not 0 <= quality <= 10:
        raise ValueError(f"quality must be in 0..10 (10 best), got {quality!r}")
    if crf is not None and not (isinstance(crf, int) and 0 <= crf <= 51):
        raise ValueError(f"crf must be an integer in 0..51 (lower is better), got {crf!r}")

    notes: list[str] = []
    if target.kind == "mp4":
        video = _even(video, notes)
    n, h, w = video.shape[:3]
    sidecar_text = None
    if settings is not None:
        sidecar_text = _sidecar_json(settings, target, n, w, h, fps, quality, crf)

    if target.kind == "png" and n != 1:
        raise OutputPathError(f"{target.path}: a single .png holds one frame, this video has {n}; "
                              "use a pattern like frame_%05d.png or a folder ending in /")
    target.path.parent.mkdir(parents=True, exist_ok=True)
    if target.kind == "png-folder":
        _write_png_folder(video, target.path)
    elif target.kind == "png-pattern":
        _write_png_pattern(video, target.path)
    else:
        writer = {"mp4": _encode_mp4, "webp": _encode_webp, "gif": _encode_gif, "png": _encode_png}
        with _atomic_file(target.path) as tmp:
            writer[target.kind](video, tmp, fps=fps, quality=quality, crf=crf, notes=notes)
    if sidecar_text is not None:
        with _atomic_file(target.sidecar) as tmp:
            tmp.write_text(sidecar_text, encoding="utf-8")
    return SavedVideo(target.path, target.sidecar if sidecar_text is not None else None,
                      n, w, h, float(fps), tuple(notes))


def _as_if_created(path: Path, mode: int) -> None:
    """Give a temporary file or folder the permissions a plain open() or mkdir() would
    (mkstemp/mkdtemp make them private, and the rename would keep that)."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


class _atomic_file:
    """A temporary file beside `final`; renamed onto it only if the block completes."""

    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.final.parent, prefix=f".{self.final.name}.",
                                    suffix=".partial")
        os.close(fd)
        self.tmp = Path(name)
        _as_if_created(self.tmp, 0o666)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.final)
        else:
            self.tmp.unlink(missing_ok=True)


def _sidecar_json(settings, target: OutputTarget, n, w, h, fps, quality, crf) -> str:
    video = {"file": target.path.name, "format": target.kind, "frames": n, "width": w,
             "height": h, "fps": fps}
    if target.kind == "mp4":
        video["crf"] = _crf(quality, crf)
    elif target.kind == "webp":
        video["quality"] = quality
    try:
        return json.dumps({"video": video, "settings": dict(settings)}, indent=2,
                          ensure_ascii=False, default=_jsonable) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"settings cannot be written as JSON: {e}") from None


def _jsonable(value):
    if isinstance(value, (os.PathLike, torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _crf(quality: float, crf: int | None) -> int:
    # imageio-ffmpeg's mapping of its 0..10 quality onto libx264's CRF.
    return crf if crf is not None else int((1 - quality / 10) * 51)


def _even(video: np.ndarray, notes: list[str]) -> np.ndarray:
    """yuv420p halves the chroma resolution: H.264 needs even sides. Pad by repeating the
    last row/column rather than dropping pixels."""
    n, h, w, _ = video.shape
    pad_h, pad_w = h % 2, w % 2
    if not (pad_h or pad_w):
        return video
    notes.append(f"padded {w}x{h} to {w + pad_w}x{h + pad_h} (H.264 yuv420p needs even sides)")
    return np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _encode_mp4(video, tmp: Path, *, fps, quality, crf, notes) -> None:
    import imageio_ffmpeg

    _, h, w, _ = video.shape
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(Fraction(fps).limit_denominator(1_000_000)), "-i", "-",
           "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(_crf(quality, crf)),
           "-preset", "medium", "-movflags", "+faststart", "-f", "mp4", str(tmp)]
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: ffmpeg can never block on it
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        broken = False
        try:
            try:
                for frame in video:
                    proc.stdin.write(frame.tobytes())
                proc.stdin.close()
            except BrokenPipeError:  # ffmpeg stopped reading: its log says why
                broken = True
            rc = proc.wait()
        except BaseException:  # Ctrl-C or an error here: stop ffmpeg before the file goes
            proc.kill()
            proc.wait()
            raise
        if rc != 0 or broken:
            log.seek(0)
            message = log.read().decode(errors="replace").strip() or "no message"
            raise VideoWriteError(f"ffmpeg (libx264) failed with exit code {rc}: {message}")


def _pil_frames(video):
    from PIL import Image

    return [Image.fromarray(frame) for frame in video]


def _encode_webp(video, tmp: Path, *, fps, quality, crf, notes) -> None:
    images = _pil_frames(video)
    images[0].save(tmp, format="WEBP", save_all=True, append_images=images[1:], loop=0,
                   duration=round(1000 / fps), quality=int(round(quality * 10)), method=4)


def _encode_gif(video, tmp: Path, *, fps, quality, crf, notes) -> None:
    delay = max(2, round(100 / fps))  # GIF stores frame delays in 1/100 s; browsers clamp below 2
    if abs(100 / delay - fps) > 1e-6:
        notes.append(f"GIF frame delays are in 1/100 s: {fps:g} fps plays at {100 / delay:.4g} fps")
    images = _pil_frames(video)
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=delay * 10, optimize=False)


def _encode_png(video, tmp: Path, *, fps, quality, crf, notes) -> None:
    _pil_frames(video)[0].save(tmp, format="PNG")


def _frame_name(i: int, count: int) -> str:
    return f"frame_{i:0{max(5, len(str(count - 1)))}d}.png"


def _write_png_folder(video, folder: Path) -> None:
    """Frames go to a temporary folder that takes the final name when complete."""
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
    try:
        _as_if_created(tmp, 0o777)
        for i, image in enumerate(_pil_frames(video)):
            image.save(tmp / _frame_name(i, len(video)), format="PNG")
        old = None
        if folder.exists():
            if any(folder.iterdir()):  # allowed by check_output_path: overwrite=True
                old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
                os.replace(folder, old / folder.name)
            else:
                folder.rmdir()
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_png_pattern(video, pattern: Path) -> None:
    """Frames are written to a temporary folder, then each is renamed to its final name."""
    tmp = Path(tempfile.mkdtemp(dir=pattern.parent, prefix=".frames.", suffix=".partial"))
    try:
        names = []
        for i, image in enumerate(_pil_frames(video)):
            name = FRAME_PATTERN.sub(lambda m: f"{i:{m.group(1) or ''}d}", pattern.name)
            image.save(tmp / name, format="PNG")
            names.append(name)
        for name in names:
            os.replace(tmp / name, pattern.parent / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""Input image preparation for image-to-video: load, to [-1, 1], pick the video size, resize.

What the official Wan 2.2 I2V pipeline does (wan/image2video.py, WanI2V.generate):
1. `TF.to_tensor(rgb)` (uint8 / 255, [3, H, W]) then (x - 0.5) / 0.5.
2. Size from a pixel budget `max_area` and the image aspect a = H / W, in float64:
   lat_h = round(sqrt(max_area * a) // 8 // 2 * 2), lat_w likewise with max_area / a;
   h, w = 8 * lat_h, 8 * lat_w. The float evaluation matters: an 832x480 image at
   max_area 832*480 gets 832x464 (sqrt gives 479.99999999999994).
3. Bicubic resize straight to (h, w): `F.interpolate(mode="bicubic", align_corners=False)`,
   no antialias, no crop, no clamp (values can leave [-1, 1]).

wanrt adds, around that: images from paths, PIL images, arrays and tensors; transparency
composited on white (the official `convert("RGB")` drops alpha, leaving whatever colour
the transparent pixels hold); EXIF rotation applied; an explicit width/height (rounded to
multiples of 16); an optional centre crop to the target aspect instead of a stretch; and
frame counts rounded to 4n + 1. Adjustments are returned as notes, never printed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

VAE_STRIDE = 8  # pixels per latent cell (Wan 2.1 VAE)
PATCH = 2  # latent cells per DiT patch side
SIZE_MULTIPLE = VAE_STRIDE * PATCH  # 16
MIN_SIDE = 2 * SIZE_MULTIPLE  # at least 2 x 2 patches in the latent
MAX_SIDE = 8192  # far beyond any trained size, well within the 1024-patch rope table
MAX_PIXELS = 3840 * 2160  # 4K UHD: already ~9x the tokens of 1280x720
DEFAULT_MAX_AREA = 1280 * 720  # official default --size for i2v-A14B
TIME_STRIDE = 4  # pixel frames per latent frame after the first
MAX_FRAMES = 4 * 1023 + 1  # the rope table covers 1024 latent frames

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


class ImageError(ValueError):
    """The input image cannot be read or has a form that cannot be used."""


class SizeError(ValueError):
    """The requested video size (or frame count) cannot be generated."""


class VideoSize(NamedTuple):
    height: int
    width: int

    @property
    def lat_h(self) -> int:
        return self.height // VAE_STRIDE

    @property
    def lat_w(self) -> int:
        return self.width // VAE_STRIDE


@dataclass(frozen=True)
class PreparedImage:
    pixels: torch.Tensor  # [3, height, width] float32, (x - 0.5) / 0.5 then resized
    size: VideoSize  # the video size
    source_size: tuple[int, int]  # (width, height) of the image as given
    notes: tuple[str, ...]  # what was adjusted, for the user


# 1. Loading -------------------------------------------------------------------------------

def load_image(source: ImageSource) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Any supported image -> float32 [3, H, W] in [0, 1] (`TF.to_tensor` semantics for
    8-bit images), with notes on what was converted.

    Accepted: a path; a PIL image; a NumPy array [H, W], [H, W, 1|2|3|4] (uint8, uint16, or
    float in [0, 1]); a torch tensor [C, H, W] or [1, C, H, W], C in 1..4 (uint8, or float in
    [0, 1]). Two channels are gray + alpha, four are RGBA; alpha is composited on white."""
    if isinstance(source, (str, os.PathLike)):
        return _pil_to_unit(_open(source), os.fspath(source))
    if isinstance(source, Image.Image):
        return _pil_to_unit(source, "image")
    if isinstance(source, np.ndarray):
        return _array_to_unit(source, "image array")
    if isinstance(source, torch.Tensor):
        t = source.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 2, 3, 4):
            raise ImageError(f"image tensor has shape {tuple(source.shape)}; expected [C, H, W] "
                             "with C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)")
        if t.is_floating_point():
            t = t.float()  # NumPy has no bfloat16
        return _array_to_unit(t.permute(1, 2, 0).numpy(), "image tensor")
    raise ImageError(f"cannot use a {type(source).__name__} as an image; pass a file path, "
                     "a PIL image, a NumPy array [H, W, C] or a torch tensor [C, H, W]")


def _open(path) -> Image.Image:
    name = os.fspath(path)
    try:
        with Image.open(name) as im:
            im.load()
            return im.copy()  # detached from the file, which closes here
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file; check the path") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(f"{name}: no permission to read this file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image format that can be read (expected PNG, JPEG, "
                         "WebP, BMP, TIFF, ...); convert it to PNG or JPEG") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused as too large to decode safely ({e}); "
                         "downscale it first") from None
    except OSError as e:
        raise ImageError(f"{name}: the image data is truncated or corrupt ({e}); "
                         "re-export the image") from None


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info


def _pil_to_unit(im: Image.Image, name: str) -> tuple[torch.Tensor, tuple[str, ...]]:
    notes = []
    if im.width < 1 or im.height < 1:
        raise ImageError(f"{name}: the image is empty ({im.width}x{im.height})")
    if _exif_orientation(im) not in (1, None):
        im = ImageOps.exif_transpose(im)
        notes.append(f"{name}: rotated as its EXIF orientation says")
    if im.mode.startswith("I"):
        # 16-bit gray ("I;16", or "I" from a 16-bit PNG): PIL's 8-bit conversion clips it.
        arr = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
        return _array_to_unit(arr, name, prior_notes=notes)
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append(f"{name}: transparent pixels composited on white")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    elif im.mode != "RGB":
        if im.mode != "P":
            notes.append(f"{name}: converted from {im.mode} to RGB")
        im = im.convert("RGB")
    pixels = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.float().div(255), tuple(notes)  # TF.to_tensor: uint8 / 255


def _exif_orientation(im: Image.Image) -> int | None:
    try:
        return im.getexif().get(0x0112)
    except Exception:  # malformed EXIF: treat as absent, as viewers do
        return None


def _array_to_unit(arr: np.ndarray, name: str, prior_notes=()) -> tuple[torch.Tensor, tuple[str, ...]]:
    notes = list(prior_notes)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ImageError(f"{name} has shape {arr.shape}; expected [H, W] or [H, W, C] with "
                         "C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"{name} is empty ({arr.shape[1]}x{arr.shape[0]})")
    if arr.dtype == np.uint8:
        unit = torch.from_numpy(np.ascontiguousarray(arr)).float().div(255)
    elif arr.dtype == np.uint16:
        unit = torch.from_numpy(arr.astype(np.float32)).div(65535)
    elif np.issubdtype(arr.dtype, np.floating):
        unit = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        lo, hi = float(unit.min()), float(unit.max())
        if not np.isfinite([lo, hi]).all() or lo < 0 or hi > 1:
            raise ImageError(f"{name} holds floats in [{lo:.3g}, {hi:.3g}]; expected [0, 1] "
                             "(for a [-1, 1] image pass (x + 1) / 2, for 0..255 pass x / 255)")
    else:
        raise ImageError(f"{name} has dtype {arr.dtype}; expected uint8, uint16 or float in [0, 1]")
    unit = unit.permute(2, 0, 1)  # [C, H, W]
    c = unit.shape[0]
    if c in (2, 4):
        color, alpha = unit[:-1], unit[-1:]
        if bool((alpha < 1).any()):
            notes.append(f"{name}: transparent pixels composited on white")
        unit = color * alpha + (1 - alpha)
    if unit.shape[0] == 1:
        unit = unit.expand(3, -1, -1)
    return unit.contiguous(), tuple(notes)


def to_model_range(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] as the official code writes it: sub_(0.5).div_(0.5)."""
    return unit.sub(0.5).div(0.5)


# 2. The video size -----------------------------------------------------------------------

def max_area_size(image_width: int, image_height: int, max_area: int = DEFAULT_MAX_AREA) -> VideoSize:
    """The official size rule, including its float64 rounding (no validation)."""
    aspect = image_height / image_width
    lat_h = round(np.sqrt(max_area * aspect) // VAE_STRIDE // PATCH * PATCH)
    lat_w = round(np.sqrt(max_area / aspect) // VAE_STRIDE // PATCH * PATCH)
    return VideoSize(lat_h * VAE_STRIDE, lat_w * VAE_STRIDE)


def _round16(value: float) -> int:
    return max(SIZE_MULTIPLE, int(np.floor(value / SIZE_MULTIPLE + 0.5)) * SIZE_MULTIPLE)


def explicit_size(width: int | None, height: int | None,
                  image_size: tuple[int, int]) -> tuple[VideoSize, tuple[str, ...]]:
    """A size the user asked for; a missing side follows the image's aspect ratio. Sides
    are rounded to multiples of 16 (8x VAE downsampling, then 2x2 patches)."""
    notes = []
    for label, value in (("width", width), ("height", height)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                                  or value < 1):
            raise SizeError(f"{label} must be a positive whole number of pixels, got {value!r}")
    img_w, img_h = image_size
    out = {}
    for label, value in (("width", width), ("height", height)):
        if value is None:
            continue
        rounded = _round16(value)
        if rounded != value:
            notes.append(f"{label} {value} is not a multiple of {SIZE_MULTIPLE}; using {rounded}")
        out[label] = rounded
    if "width" not in out:
        out["width"] = _round16(out["height"] * img_w / img_h)
        notes.append(f"width {out['width']} follows the image's aspect ratio")
    if "height" not in out:
        out["height"] = _round16(out["width"] * img_h / img_w)
        notes.append(f"height {out['height']} follows the image's aspect ratio")
    return VideoSize(out["height"], out["width"]), tuple(notes)


def check_video_size(size: VideoSize, how: str = "", fix: str | None = None) -> None:
    """Refuse sizes the model cannot use, saying how to get a usable one."""
    h, w = size
    where = f" ({how})" if how else ""
    if h < MIN_SIDE or w < MIN_SIDE:
        raise SizeError(
            f"video size {w}x{h}{where} is too small: each side needs at least {MIN_SIDE} px "
            f"(2 x 2 patches of {SIZE_MULTIPLE} px in the latent); "
            + (fix or "ask for a larger size or area"))
    if h > MAX_SIDE or w > MAX_SIDE or h * w > MAX_PIXELS:
        raise SizeError(
            f"video size {w}x{h}{where} is too large: at most {MAX_SIDE} px a side and "
            f"{MAX_PIXELS:,} pixels (4K UHD); "
            + (fix or "the model was trained at 1280x720 and 832x480, ask for one of those areas"))
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise SizeError(f"video size {w}x{h}{where} is not a multiple of {SIZE_MULTIPLE} on each "
                        "side; round it (explicit_size does)")


def round_frames(frames: int) -> tuple[int, tuple[str, ...]]:
    """Frame counts must be 4n + 1 (the VAE packs 4 frames per latent frame after the first);
    others are rounded to the nearest such count, ties upwards."""
    if not isinstance(frames, (int, np.integer)) or isinstance(frames, bool) or frames < 1:
        raise SizeError(f"frames must be a positive whole number, got {frames!r} (default 81)")
    n = (frames - 1 + TIME_STRIDE // 2) // TIME_STRIDE
    rounded = TIME_STRIDE * n + 1
    if rounded > MAX_FRAMES:
        raise SizeError(f"{frames} frames is too many: at most {MAX_FRAMES} (the model's position "
                        "table covers 1024 latent frames); the model was trained on 81")
    notes = () if rounded == frames else (
        f"frames {frames} is not of the form 4n+1; using {rounded}",)
    return rounded, notes


# 3. Crop and resize ----------------------------------------------------------------------

def center_crop_to_aspect(pixels: torch.Tensor, size: VideoSize) -> torch.Tensor:
    """The largest centred window of `pixels` [C, H, W] with the aspect ratio of `size`."""
    _, src_h, src_w = pixels.shape
    if src_w * size.height > src_h * size.width:  # source wider: trim the sides
        new_w = max(1, min(src_w, round(src_h * size.width / size.height)))
        left = (src_w - new_w) // 2
        return pixels[:, :, left:left + new_w]
    new_h = max(1, min(src_h, round(src_w * size.height / size.width)))
    top = (src_h - new_h) // 2
    return pixels[:, top:top + new_h, :]


def resize_bicubic(pixels: torch.Tensor, size: VideoSize) -> torch.Tensor:
    """The official resize: bicubic, align_corners False, no antialias, no clamp."""
    out = F.interpolate(pixels[None].float(), size=(size.height, size.width), mode="bicubic",
                        align_corners=False)
    return out[0]


# 4. Everything together ------------------------------------------------------------------

def prepare_image(source: ImageSource, *, max_area: int | None = None, width: int | None = None,
                  height: int | None = None, crop: bool = False) -> PreparedImage:
    """Load `source` and bring it to the video size, the way the I2V pipeline needs it.

    The size is `width` x `height` when either is given (multiples of 16; a missing side
    follows the aspect ratio), else the official max-area rule with `max_area` (default
    1280*720). The image is stretched to that size like the official code, or centre-cropped
    to its aspect ratio first when `crop` is true."""
    unit, notes = load_image(source)
    notes = list(notes)
    src_h, src_w = unit.shape[1:]
    if width is not None or height is not None:
        if max_area is not None:
            raise SizeError("give either max_area or width/height, not both")
        size, size_notes = explicit_size(width, height, (src_w, src_h))
        notes += size_notes
        how = "requested"
    else:
        area = DEFAULT_MAX_AREA if max_area is None else max_area
        if not isinstance(area, (int, np.integer, float)) or not np.isfinite(area) or area <= 0:
            raise SizeError(f"max_area must be a positive number of pixels, got {max_area!r}")
        if area > MAX_PIXELS:
            raise SizeError(f"max_area {area:,} is too large: at most {MAX_PIXELS:,} pixels (4K UHD); "
                            "the model was trained at 1280*720 and 832*480")
        size = max_area_size(src_w, src_h, area)
        how = f"max area {area:,} for a {src_w}x{src_h} image"
    extreme = max(src_w / src_h, src_h / src_w) > 4
    check_video_size(size, how, fix="crop the image nearer to 16:9, or give width and height "
                                    "with crop=True" if extreme else None)

    pixels = to_model_range(unit)
    if crop:
        cropped = center_crop_to_aspect(pixels, size)
        if cropped.shape != pixels.shape:
            notes.append(f"cropped the {src_w}x{src_h} image to its centre "
                         f"{cropped.shape[2]}x{cropped.shape[1]} to match {size.width}x{size.height}")
        pixels = cropped
    else:
        src_aspect, dst_aspect = src_w / src_h, size.width / size.height
        if abs(src_aspect / dst_aspect - 1) > 0.01:
            notes.append(f"the {src_w}x{src_h} image is stretched to {size.width}x{size.height} "
                         f"(aspect {src_aspect:.3f} -> {dst_aspect:.3f}); crop=True crops instead")
    return PreparedImage(resize_bicubic(pixels, size), size, (int(src_w), int(src_h)), tuple(notes))

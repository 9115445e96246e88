"""Image inputs: decode and sanitise, resize or crop per task, normalise and cut into patches.

Spec image.md section 3 (and backbone.md 4.2). Three ways an image becomes a token grid:

* understanding: Qwen2.5-VL "smart resize" into a pixel budget, bicubic cover + centre crop
  (``understand_resize``);
* editing: the candidate crop closest in aspect, taken from the centre at native resolution
  (``edit_crop``);
* generation: no image at all, only the grid ``t2i_grid(image_h, image_w)``.

Every path then goes through ``to_patches``: fp32 rescale, then mean/std, rows of 3*p*p values in
raster (row-major) order. Decisions where the spec is UNCERTAIN or silent are marked "Decision".
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import from_known_keys, read_json, require

log = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

# Decision: a guard of our own, below PIL's warning threshold (89.5 MP) so PIL never warns first.
# 64 MP covers camera photos; the model looks at most at 800x800 (understanding) or a centre crop of
# at most 512x512 px area (editing), so larger inputs only cost memory and time.
DEFAULT_MAX_PIXELS = 8192 * 8192

# Understanding budgets (spec 3.1): one image, or each of several images in one prompt.
UNDERSTAND_MIN_PIXELS = 128 * 128
UNDERSTAND_MAX_PIXELS = 800 * 800
UNDERSTAND_MAX_PIXELS_MULTI = 448 * 448
# The official resize aligns to 32 px (its patch 16 x merge 2); newer SGLang uses 16. Either way one
# token covers 16 px; 32 keeps every side even in tokens.
UNDERSTAND_FACTOR = 32
# Decision: the reference has no aspect limit; Qwen2.5-VL's smart resize rejects beyond 200:1. Without
# a limit a 1x50000 image is upscaled 32x to a 1.6-million-pixel-wide strip and the ViT runs out of
# memory, so we use Qwen's bound.
MAX_UNDERSTAND_ASPECT = 200.0

# Editing candidates (spec 3.3): (512 // 32)^2 = 256 patches of 32 px, aspect at most 4:1.
EDIT_AREA_SIDE = 512
EDIT_PATCH = 32
EDIT_MAX_RATIO = 4.0

# Generation (spec 3.5): one token per 32 output px (16 px semantic patch x resolution multiplier 2).
T2I_PIXELS_PER_TOKEN = 32

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageInputError(ValueError):
    """An image that cannot be used as model input; the message says why."""


# --------------------------------------------------------------------------------------------------
# Preprocessor config


@dataclass
class PreprocessorConfig:
    """``image_tokenizer/preprocessor_config.json``; unknown keys (processor class names...) dropped.

    Defaults are the published file's values (backbone.md 4.2: patch 16, temporal 1, merge 1,
    rescale 1/255, mean/std 0.5), not the reference code's fallbacks (patch 14, temporal 2, merge 2,
    OpenAI-CLIP mean/std), which cannot run with this vision tower (spec 2.1, UNCERTAIN).

    ``merge_size`` is kept as read but only used when ``to_patches(..., block_order=True)`` asks for
    the Qwen2-VL 2x2-block token order; by default tokens are row-major (spec 3.4 recommendation).
    """

    patch_size: int = 16
    temporal_patch_size: int = 1
    merge_size: int = 1
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self) -> None:
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        checks = [
            (isinstance(self.patch_size, int) and self.patch_size > 0,
             f"patch_size must be a positive integer, got {self.patch_size!r}"),
            # With 2 every row holds two copies of the frame: the patch embed's view(-1, 3, p, p)
            # doubles the row count and the reference fails adding position embeddings (spec 2.1).
            (self.temporal_patch_size == 1,
             f"temporal_patch_size {self.temporal_patch_size!r} is not supported: the vision tower "
             "embeds 2-D patches of one frame (the published file has 1)"),
            (isinstance(self.merge_size, int) and self.merge_size >= 1,
             f"merge_size must be a positive integer, got {self.merge_size!r}"),
            (len(self.image_mean) == 3 and len(self.image_std) == 3,
             "image_mean and image_std need one value per RGB channel"),
            (all(s > 0 for s in self.image_std), f"image_std must be positive, got {self.image_std}"),
            (self.rescale_factor > 0, f"rescale_factor must be positive, got {self.rescale_factor}"),
        ]
        require(checks, "preprocessor config: ")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PreprocessorConfig":
        if "image_mean" not in raw or "image_std" not in raw:
            log.warning("preprocessor config has no image_mean/image_std: using 0.5/0.5 (the "
                        "published value); the reference code would fall back to OpenAI-CLIP values")
        if raw.get("merge_size", 1) != 1:
            log.info("preprocessor merge_size=%s is ignored: tokens are row-major unless "
                     "block_order=True is asked for (spec image.md 3.4)", raw["merge_size"])
        return from_known_keys(cls, raw)

    @classmethod
    def from_file(cls, path: str | Path) -> "PreprocessorConfig":
        return cls.from_dict(read_json(path, "preprocessor config"))


# --------------------------------------------------------------------------------------------------
# Decoding and colour


def load_image(src: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``src`` (path, encoded bytes or a PIL image) into a fully loaded 8-bit RGB image.

    * Size: 0-pixel images are rejected; more than ``max_pixels`` pixels is rejected before any pixel
      is decoded (decompression-bomb guard). 1-pixel images are accepted (understanding upscales
      them into its minimum budget).
    * Broken input (not an image, truncated, corrupt) raises ``ImageInputError`` naming the problem.
    * Animated images: the first frame. EXIF orientation is not applied (as the reference).
    * Colour: see ``to_rgb``.
    """
    if isinstance(src, Image.Image):
        return _checked_rgb(src, "image", max_pixels)
    img, what = _open(src)
    with img:  # closes the file; the result must not share the closed image's memory
        out = _checked_rgb(img, what, max_pixels)
        return img.copy() if out is img else out


def _checked_rgb(img: Image.Image, what: str, max_pixels: int) -> Image.Image:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageInputError(f"{what} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageInputError(
            f"{what} is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
            "(decompression-bomb guard); downscale it or pass a larger max_pixels")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageInputError(f"{what} is truncated or corrupt: {e}") from None
    return to_rgb(img)


def _open(src: ImageSource) -> tuple[Image.Image, str]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageInputError("image bytes are empty")
        fp, what = io.BytesIO(bytes(src)), f"image data ({len(src)} bytes)"
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src).expanduser()
        if not path.exists():
            raise ImageInputError(f"no image file at {path}")
        if not path.is_file():
            raise ImageInputError(f"{path} is not a file")
        fp, what = path, f"image file {path}"
    else:
        raise ImageInputError(f"cannot read an image from a {type(src).__name__}; "
                              "pass a path, encoded bytes or a PIL image")
    try:
        return Image.open(fp), what
    except UnidentifiedImageError:
        raise ImageInputError(f"{what} is not an image in a format PIL can read") from None
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"{what} is too large (decompression-bomb guard): {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageInputError(f"cannot read {what}: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. Transparency is composited onto white; high-bit-depth grey is scaled to 8 bits.

    * RGBA / LA / PA and palette or grey images with a transparent colour: alpha-composited on opaque
      white. The reference does this for RGBA only; its README paths call ``convert("RGB")`` first,
      which drops alpha and shows whatever colour hides under transparent pixels (spec 3.2).
    * I;16 (16-bit grey) and I (32-bit int, as PIL opens 16-bit PNG/TIFF): value / 257, i.e.
      0..65535 -> 0..255, rounded, clipped. PIL's own convert clips at 255 and turns a 16-bit image
      nearly white.
    * F (float grey): assumed in [0, 1], scaled by 255, rounded, clipped.
    * Everything else (L, 1, P, CMYK, YCbCr, LAB, HSV): PIL's ``convert("RGB")``.
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img).astype(np.float64)
        scaled = values * 255.0 if img.mode == "F" else values / 257.0
        grey = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------------
# Understanding: smart resize (spec 3.1)


def smart_resize_dims(height: int, width: int, *, factor: int = UNDERSTAND_FACTOR,
                      min_pixels: int = UNDERSTAND_MIN_PIXELS,
                      max_pixels: int = UNDERSTAND_MAX_PIXELS) -> tuple[int, int]:
    """Target (H', W'), multiples of ``factor``, inside [min_pixels, max_pixels] (Qwen2.5-VL rule).

    Python ``round`` (half to even) as the reference: a side of 400 px gives round(12.5) = 12 -> 384.
    """
    if height < 1 or width < 1:
        raise ImageInputError(f"image has no pixels ({width}x{height})")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_UNDERSTAND_ASPECT:
        raise ImageInputError(f"image {width}x{height} has aspect ratio {aspect:.0f}:1, beyond the "
                              f"{MAX_UNDERSTAND_ASPECT:.0f}:1 the understanding resize accepts")
    h = max(round(height / factor) * factor, factor)
    w = max(round(width / factor) * factor, factor)
    if h * w > max_pixels:
        scale = math.sqrt(max_pixels / (height * width))
        h = max(math.floor(height * scale / factor) * factor, factor)
        w = max(math.floor(width * scale / factor) * factor, factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def understand_resize(img: Image.Image, num_images: int = 1, *,
                      factor: int = UNDERSTAND_FACTOR) -> Image.Image:
    """Resize for understanding: budget by image count, bicubic scale to cover, centre crop.

    The crop keeps ``max(floor(new / factor) * factor, target)`` per side, as the reference does, so
    a side can come out larger than the smart-resize target (a 1000x112 image becomes 1120x128, not
    992x128): the grid is read from the returned image, never from ``smart_resize_dims``.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    img = to_rgb(img)
    width, height = img.size
    max_pixels = UNDERSTAND_MAX_PIXELS if num_images == 1 else UNDERSTAND_MAX_PIXELS_MULTI
    th, tw = smart_resize_dims(height, width, factor=factor, min_pixels=UNDERSTAND_MIN_PIXELS,
                               max_pixels=max_pixels)
    scale = max(th / height, tw / width)
    new_h, new_w = int(round(height * scale)), int(round(width * scale))
    img = img.resize((new_w, new_h), resample=Image.BICUBIC)
    crop_h = max((new_h // factor) * factor, th)
    crop_w = max((new_w // factor) * factor, tw)
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    return img.crop((left, top, left + crop_w, top + crop_h))


# --------------------------------------------------------------------------------------------------
# Editing: aspect-matched centre crop (spec 3.3)


def crop_size_list(num_patches: int = (EDIT_AREA_SIDE // EDIT_PATCH) ** 2, patch: int = EDIT_PATCH,
                   max_ratio: float = EDIT_MAX_RATIO) -> list[tuple[int, int]]:
    """Candidate (width, height) crops: at most ``num_patches`` patches, aspect at most ``max_ratio``.

    Walks the staircase from (num_patches, 1) patches: narrow by one column when one more row would
    not fit, else add a row; keep each step whose aspect is within bounds. Order matters only for
    equal scores, which ``edit_crop`` breaks by size.
    """
    if num_patches < 1 or patch < 1 or max_ratio < 1:
        raise ValueError("num_patches and patch must be positive and max_ratio at least 1")
    sizes = []
    wp, hp = num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            sizes.append((wp * patch, hp * patch))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return sizes


def choose_crop_size(width: int, height: int,
                     sizes: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """The candidate closest in aspect: score min(cw/w, ch/h) / max(cw/w, ch/h); ties go to the
    larger (cw, ch), as the reference's descending sort of (score, size) tuples does."""
    if width < 1 or height < 1:
        raise ImageInputError(f"image has no pixels ({width}x{height})")
    sizes = crop_size_list() if sizes is None else sizes

    def score(size: tuple[int, int]) -> float:
        rw, rh = size[0] / width, size[1] / height
        return min(rw, rh) / max(rw, rh)

    return max(sizes, key=lambda s: (score(s), s))


def edit_crop(img: Image.Image, sizes: list[tuple[int, int]] | None = None) -> Image.Image:
    """Editing source: a window of the chosen candidate size from the centre, at native resolution.

    This is the reference (``var_center_crop``): nothing is scaled, so a large photo keeps only its
    central window; a side shorter than the window is filled with black beyond its end (the window's
    offset is clamped at 0, so the image sits top-left on that axis). Decision: images more extreme
    than 4:1 are accepted as in the reference (the closest candidate is 4:1, the rest is cropped or
    padded); padding and heavy cropping are logged, since the model then sees a different picture.
    SGLang's ``ImageOps.fit`` (scale then crop) is not reference-equivalent and not used.
    """
    img = to_rgb(img)
    width, height = img.size
    cw, ch = choose_crop_size(width, height, sizes)
    left, top = max(0, (width - cw) // 2), max(0, (height - ch) // 2)
    if cw > width or ch > height:
        log.warning("edit source %dx%d is smaller than its %dx%d crop window: padded with black "
                    "(reference behaviour)", width, height, cw, ch)
    elif cw * ch * 4 < width * height:
        log.info("edit source %dx%d: only its central %dx%d window is used (reference behaviour)",
                 width, height, cw, ch)
    # The reference then resizes the crop to (cw, ch) with Lanczos: a no-op at equal size.
    return img.crop((left, top, left + cw, top + ch))


# --------------------------------------------------------------------------------------------------
# Generation grid (spec 3.5)


def t2i_grid(image_h: int, image_w: int, *,
             pixels_per_token: int = T2I_PIXELS_PER_TOKEN) -> tuple[int, int]:
    """Token grid (h, w) of a generated image_h x image_w image; sides must be positive multiples
    of ``pixels_per_token`` (32: 16-px patches decoded at resolution multiplier 2)."""
    for name, value in (("image_h", image_h), ("image_w", image_w)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ImageInputError(f"{name} must be an integer number of pixels, got {value!r}")
        if value <= 0 or value % pixels_per_token:
            raise ImageInputError(f"{name}={value} must be a positive multiple of {pixels_per_token}")
    return int(image_h) // pixels_per_token, int(image_w) // pixels_per_token


# --------------------------------------------------------------------------------------------------
# Normalisation and patches (spec 3.2)


def to_patches(img: Image.Image, cfg: PreprocessorConfig, *,
               block_order: bool = False) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Pixels -> (pixel_values fp32 [gh*gw, 3*p*p], grid (1, gh, gw)).

    fp32 ``x * rescale_factor`` then ``(x - mean) / std``, in two steps: a fused single affine map
    rounds differently and flips VQ codes that sit near a codebook boundary (spec 3.2). Each row is
    one p x p patch in (channel, y, x) order. Rows are row-major over the grid; ``block_order=True``
    gives the Qwen2-VL order for ``cfg.merge_size`` (m x m blocks row-major, patches row-major
    inside each), which is what the reference emits when the file says merge_size=2 (spec 3.4).
    """
    img = to_rgb(img)
    width, height = img.size
    p = cfg.patch_size
    m = cfg.merge_size if block_order else 1
    if width % (p * m) or height % (p * m) or width == 0 or height == 0:
        raise ImageInputError(
            f"image {width}x{height} is not a positive multiple of {p * m} px per side; resize or crop "
            "it first (encode mode 'understand' or 'edit')")
    gh, gw = height // p, width // p
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).to(torch.float32)
    if cfg.do_rescale:
        x = x * cfg.rescale_factor
    if cfg.do_normalize:
        mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(cfg.image_std, dtype=torch.float32).view(-1, 1, 1)
        x = (x - mean) / std
    c = x.shape[0]
    x = x.view(c, gh // m, m, p, gw // m, m, p)  # [C, bh, mh, py, bw, mw, px]
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # [bh, bw, mh, mw, C, py, px]
    return x.reshape(gh * gw, c * p * p).contiguous(), (1, gh, gw)

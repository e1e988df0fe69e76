"""Image sizing for Qwen2-VL: the one resize that the trainer's processor and vLLM both see.

Qwen2-VL cuts an image into 14x14 patches and merges 2x2 of them into one
visual token, so both sides must be multiples of 28. `smart_resize` is
Qwen2-VL's rule (round each side to a multiple of 28; if the area is outside
[min_pixels, max_pixels], scale both sides by the same factor, flooring or
ceiling to multiples of 28), plus a repair step for the corner cases where
that rule lands outside the bounds (very elongated images, narrow pixel
ranges, and sizes whose aspect the rounding pushes past 200: Qwen2-VL's rule
takes a 10000x50 image to 6328x28, which the processors then refuse as an
input). An image resized by `resize_image` is a fixed point of the
Hugging Face / vLLM Qwen2-VL processors with the same bounds: they do not
resize it again, so every engine sees the same pixels.
"""
from __future__ import annotations

import math

from PIL import Image

FACTOR = 28  # patch 14 x spatial merge 2
MAX_ASPECT = 200  # Qwen2-VL's processor refuses more elongated images
DEFAULT_MIN_PIXELS = 56 * 56  # Qwen2-VL's and the R1-VL authors' defaults
DEFAULT_MAX_PIXELS = 12845056


def _round(x: float, f: int) -> int:
    return round(x / f) * f


def _floor(x: float, f: int) -> int:
    return math.floor(x / f) * f


def _ceil(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def check_pixel_bounds(min_pixels: int, max_pixels: int, factor: int = FACTOR) -> None:
    """Raise ValueError unless some width x height, both multiples of factor, fits the bounds."""
    block = factor * factor
    if not (min_pixels <= max_pixels and max_pixels // block >= max(1, math.ceil(min_pixels / block))):
        raise ValueError(f"no size with both sides multiples of {factor} has min_pixels={min_pixels} "
                         f"<= width*height <= max_pixels={max_pixels}")


def smart_resize(height: int, width: int, *, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, factor: int = FACTOR) -> tuple[int, int]:
    """(new_height, new_width): multiples of `factor`, min_pixels <= h*w <= max_pixels, aspect kept
    (at most 200: the processors refuse a more elongated input, this size included).

    Raises ValueError for an empty image, an aspect ratio above 200 (which
    Qwen2-VL's processor rejects) or bounds that no such size can meet.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} of a {width}x{height} "
                         f"image exceeds {MAX_ASPECT} (Qwen2-VL's limit)")
    check_pixel_bounds(min_pixels, max_pixels, factor)
    block = factor * factor
    lo_blocks, hi_blocks = math.ceil(min_pixels / block), math.floor(max_pixels / block)

    # Qwen2-VL's rule, as in transformers' Qwen2-VL image processor (a side under 14
    # pixels rounds to 0 there, which sends the image down the scale-up branch)
    h = _round(height, factor)
    w = _round(width, factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, _floor(height / beta, factor))
        w = max(factor, _floor(width / beta, factor))
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = _ceil(height * beta, factor)
        w = _ceil(width * beta, factor)
    if min_pixels <= h * w <= max_pixels and max(h, w) <= MAX_ASPECT * min(h, w):
        return h, w

    # Repair: the block counts (a, b) with lo <= a*b <= hi and an aspect of at most 200 whose
    # aspect is closest to the image's, then whose area is closest to the image's.
    target = math.log(width / height)
    area = math.log(height * width / block)
    best: tuple[float, float, int, int] | None = None
    for a in range(1, hi_blocks + 1):
        b_lo, b_hi = max(1, math.ceil(lo_blocks / a)), hi_blocks // a
        if b_lo > b_hi:
            continue
        b_lo, b_hi = max(b_lo, math.ceil(a / MAX_ASPECT)), min(b_hi, a * MAX_ASPECT)
        if b_lo > b_hi:
            continue
        for b in {min(max(math.floor(a * width / height), b_lo), b_hi),
                  min(max(math.ceil(a * width / height), b_lo), b_hi)}:
            key = (round(abs(math.log(b / a) - target), 12), abs(math.log(a * b) - area), a, b)
            if best is None or key < best:
                best = key
    if best is None:  # e.g. min_pixels = max_pixels = a prime number of blocks above 200
        raise ValueError(f"no size with both sides multiples of {factor} and an aspect of at most {MAX_ASPECT} has "
                         f"min_pixels={min_pixels} <= width*height <= max_pixels={max_pixels}")
    return best[2] * factor, best[3] * factor


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited onto white (a plain convert would make them
    black), and high-bit-depth greyscale scaled to 0..255 (a plain convert clips it)."""
    if "transparency" in img.info and img.mode in ("L", "RGB", "P"):  # a colour key (PNG tRNS, GIF)
        img = img.convert("RGBA")
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        return _grey_to_8bit(img).convert("RGB")
    return img.convert("RGB")


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """Mode L from 16-bit (I;16*: 0..65535 onto 0..255), 32-bit integer (I: 0..255 as is,
    0..65535 as 16-bit, other ranges min-max scaled) or float (F: 0..1 times 255, 0..255 as is,
    other ranges min-max scaled; a constant one clipped) greyscale. Non-finite float pixels
    (NaN, inf) take the darkest finite value and do not count in the range."""
    import numpy as np

    a = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(a)
    lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
    if not finite.all():
        a = np.where(finite, a, lo)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        a = a / 257
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    elif (lo < 0 or hi > 255) and hi > lo:
        a = (a - lo) * (255 / (hi - lo))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def resize_image(img: Image.Image, *, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB copy of `img` resized (bicubic, as Qwen2-VL's processor) to `smart_resize`'s size."""
    rgb = to_rgb(img)
    h, w = smart_resize(rgb.height, rgb.width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (w, h) == rgb.size:
        return rgb.copy() if rgb is img else rgb
    return rgb.resize((w, h), Image.Resampling.BICUBIC)

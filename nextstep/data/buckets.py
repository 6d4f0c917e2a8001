"""Aspect-ratio buckets: train every image at (about) the base area, at its own aspect ratio.

NextStep-1's training code lists 17 (h, w) shapes in units of base/16 pixels,
from 8x32 (1:4) through 16x16 to 32x8 (4:1), each with h*w close to 16*16.
`OFFICIAL_HW_UNITS` is that list. For a base resolution R the bucket of
(h, w) units is (h*R/16, w*R/16) pixels, so for R = 256 the buckets are 128x512,
144x448, ..., 256x256, ..., 512x128, exactly the official ones. Every bucket
side must be a multiple of 16 pixels (8x VAE downsampling times 2x2 latent
patches = one image token); when R is not a multiple of 256 the scaled sides
are rounded to the nearest multiple of 16 and duplicates are dropped (at
R = 64: 32x128, 32x112, 48x96, 48x80, 64x80, 64x64 and their transposes).

An image goes to the bucket whose aspect ratio is closest in log space
(|log(h/w) - log(bh/bw)|), so a 1:3 and a 3:1 image are treated alike (the
official code compares h/w linearly, which favours tall buckets); it is then
resized keeping its aspect ratio until it covers the bucket, and centre-cropped.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageOps

# (h, w) in units of base/16 pixels, from NextStep-1's aspect-ratio table.
OFFICIAL_HW_UNITS: tuple[tuple[int, int], ...] = (
    (8, 32), (9, 28), (10, 25), (11, 23), (12, 21), (13, 19), (14, 18), (15, 17), (16, 16),
    (17, 15), (18, 14), (19, 13), (21, 12), (23, 11), (25, 10), (28, 9), (32, 8),
)
TOKEN_PIXELS = 16  # pixels per image token side: VAE factor 8 x latent patch 2

# Pillow refuses images over this many pixels with DecompressionBombError (a corrupt
# or hostile header); we keep its default but name it here so it is easy to find.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


@lru_cache(maxsize=None)
def buckets(base: int) -> tuple[tuple[int, int], ...]:
    """The (height, width) buckets in pixels for base resolution `base` (a multiple of 16)."""
    if not isinstance(base, int) or base < TOKEN_PIXELS or base % TOKEN_PIXELS:
        raise ValueError(f"base resolution must be a positive multiple of {TOKEN_PIXELS}, got {base!r}")
    out: list[tuple[int, int]] = []
    for h, w in OFFICIAL_HW_UNITS:
        hw = (_round16(h * base / 16), _round16(w * base / 16))
        if hw not in out:
            out.append(hw)
    return tuple(out)


def _round16(x: float) -> int:
    # Round half up (not Python's half-to-even), never below one token.
    return max(TOKEN_PIXELS, int(x / TOKEN_PIXELS + 0.5) * TOKEN_PIXELS)


def closest_bucket(height: int, width: int, base: int) -> tuple[int, int]:
    """The bucket (h, w) of `buckets(base)` whose aspect ratio is closest to height:width."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(height / width)
    return min(buckets(base), key=lambda hw: abs(math.log(hw[0] / hw[1]) - target))


def open_image(data: bytes | str | Path, draft_side: int | None = None) -> Image.Image:
    """Decode an image file (bytes or path) fully, apply its EXIF rotation, return RGB.

    With `draft_side`, a JPEG may be decoded at a reduced scale as long as its
    shorter side stays >= draft_side (Pillow's `draft`): several times cheaper
    for large photos. Raises whatever Pillow raises on a corrupt file; callers
    that must not stop (the loaders) catch it and skip the sample.
    """
    image = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    if draft_side and image.format == "JPEG":
        w, h = image.size
        s = draft_side / min(w, h)
        if s < 1:
            image.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
    image.load()  # Image.open is lazy: force the decode here so errors surface now
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        if "A" in image.getbands() or "transparency" in image.info:
            # Transparent pixels go on white, not on whatever colour the alpha hid.
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert("RGB")
    return image


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize `image` keeping its aspect ratio so it covers `bucket` (h, w), then centre-crop to it."""
    bh, bw = bucket
    w, h = image.size
    if (w, h) == (bw, bh):
        return image
    scale = max(bh / h, bw / w)
    new_w, new_h = max(bw, round(w * scale)), max(bh, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (new_w - bw) // 2, (new_h - bh) // 2
    return image.crop((left, top, left + bw, top + bh))


def load_bucketed(data: bytes | str | Path, base: int, bucket: tuple[int, int] | None = None) -> Image.Image:
    """Open an image and fit it to its closest bucket at `base` (or to the given `bucket`).

    A JPEG may be decoded at reduced scale, as long as the largest side it could
    need is still covered.
    """
    largest = max(max(b) for b in buckets(base)) if bucket is None else max(bucket)
    image = open_image(data, draft_side=largest)
    if bucket is None:
        bucket = closest_bucket(image.height, image.width, base)
    return fit_to_bucket(image, bucket)

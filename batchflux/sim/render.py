"""Deterministic images with Pillow: the size an aspect ratio implies, and the pixels.

The one table of sizes lives here (``ASPECT_SIZES``): about one megapixel, both sides multiples
of 16. Ratios not in the table get the same treatment computed on the spot.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import math
import textwrap
from collections import OrderedDict
from collections.abc import Hashable
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

TARGET_PIXELS = 1024 * 1024
MIN_SIDE = 16
MAX_SIDE = 2048

#: Pixel size for the common aspect ratios (width, height).
ASPECT_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1360, 768),
    "9:16": (768, 1360),
    "3:2": (1248, 832),
    "2:3": (832, 1248),
    "4:3": (1184, 896),
    "3:4": (896, 1184),
    "5:4": (1136, 912),
    "4:5": (912, 1136),
    "21:9": (1568, 672),
    "9:21": (672, 1568),
}

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def round16(value: float) -> int:
    """Nearest multiple of 16, at least 16."""
    return max(MIN_SIDE, round(value / 16.0) * 16)


def size_for(
    aspect_ratio: str,
    width: int | None = None,
    height: int | None = None,
    input_size: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """The ``(width, height)`` the simulator renders for a request.

    ``"W:H"`` -> about 1 MP at that ratio (the table above, else computed; sides capped at
    2048); ``"custom"`` -> ``width`` x ``height`` rounded to 16; ``"match_input_image"`` -> the
    first input image's size (scaled down to fit 2048, rounded to 16), or 1:1 when unknown.

    >>> size_for("16:9")
    (1360, 768)
    >>> size_for("custom", 1000, 500)
    (992, 496)
    """
    if aspect_ratio == "custom":
        if width is None or height is None:
            raise ValueError("custom needs width and height")
        return round16(width), round16(height)
    if aspect_ratio == "match_input_image":
        if input_size is None:
            return ASPECT_SIZES["1:1"]
        in_w, in_h = input_size
        scale = min(1.0, MAX_SIDE / max(in_w, in_h))
        return round16(in_w * scale), round16(in_h * scale)
    if aspect_ratio in ASPECT_SIZES:
        return ASPECT_SIZES[aspect_ratio]
    left, _, right = aspect_ratio.partition(":")
    ratio_w, ratio_h = int(left), int(right)
    if ratio_w <= 0 or ratio_h <= 0:
        raise ValueError(f"aspect ratio sides must be positive: {aspect_ratio!r}")
    w = math.sqrt(TARGET_PIXELS * ratio_w / ratio_h)
    h = TARGET_PIXELS / w
    scale = min(1.0, MAX_SIDE / max(w, h))
    return min(MAX_SIDE, round16(w * scale)), min(MAX_SIDE, round16(h * scale))


def seed_colour(seed: int, *, lightness: float = 0.45,
                hue_shift: float = 0.0) -> tuple[int, int, int]:
    """A pleasant, saturated colour derived from ``seed``."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    hue = (digest[0] / 256.0 + hue_shift) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, lightness, 0.55 + digest[1] / 1024.0)
    return int(r * 255), int(g * 255), int(b * 255)


#: Flat colours for "fast" mode: few enough that encoded images are shared across jobs.
FAST_PALETTE_SIZE = 24


def fast_colour(seed: int) -> tuple[int, int, int]:
    """The flat colour of a "fast" image: one of ``FAST_PALETTE_SIZE`` hues."""
    hue = (seed % FAST_PALETTE_SIZE) / FAST_PALETTE_SIZE
    r, g, b = colorsys.hls_to_rgb(hue, 0.5, 0.6)
    return int(r * 255), int(g * 255), int(b * 255)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def encode(image: Image.Image, output_format: str, quality: int) -> bytes:
    """Encode ``image`` as jpg/png/webp; quality is ignored for png (as the API does)."""
    buffer = io.BytesIO()
    pil_format = FORMATS[output_format]
    if pil_format == "PNG":
        image.save(buffer, "PNG", compress_level=1)
    elif pil_format == "WEBP":
        image.save(buffer, "WEBP", quality=quality, method=0)
    else:
        image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def render_full(*, prompt: str, seed: int, size: tuple[int, int], label: str) -> Image.Image:
    """A seed-coloured gradient with the wrapped prompt and a caption such as
    ``seed 42 · 16:9 · simulated``. Pure: the same arguments give the same pixels."""
    width, height = size
    top = Image.new("RGB", size, seed_colour(seed, lightness=0.62))
    bottom = Image.new("RGB", size, seed_colour(seed, lightness=0.22, hue_shift=0.12))
    mask = Image.linear_gradient("L").resize(size)
    image = Image.composite(bottom, top, mask)
    glow = Image.radial_gradient("L").resize((width, height))
    image = Image.composite(image, Image.new("RGB", size, seed_colour(seed, lightness=0.75)),
                            glow.point(lambda v: 150 + v * 105 // 255))

    draw = ImageDraw.Draw(image, "RGBA")
    side = min(width, height)
    margin = max(8, side // 16)
    font_size = max(10, side // 22)
    font = _font(font_size)
    chars_per_line = max(8, int((width - 2 * margin) / (font_size * 0.48)))
    max_lines = max(1, int((height - 3 * margin) / (font_size * 1.25)) - 2)
    lines = textwrap.wrap(prompt, chars_per_line)[:max_lines] or [""]
    line_height = int(font_size * 1.25)
    block = line_height * len(lines)
    y = max(margin, (height - block) // 2 - line_height)
    draw.rounded_rectangle(
        (margin // 2, y - margin // 2, width - margin // 2, y + block + margin // 2),
        radius=max(4, margin // 2), fill=(0, 0, 0, 90),
    )
    for line in lines:
        draw.text((margin, y), line, font=font, fill=(255, 255, 255, 240))
        y += line_height
    caption_font = _font(max(8, font_size * 2 // 3))
    draw.text((margin, height - margin - font_size), label, font=caption_font,
              fill=(255, 255, 255, 200))
    return image


class ImageCache:
    """A small LRU of encoded image bytes."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(1, max_entries)
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()

    def get(self, key: Hashable) -> bytes | None:
        data = self._entries.get(key)
        if data is not None:
            self._entries.move_to_end(key)
        return data

    def put(self, key: Hashable, data: bytes) -> None:
        self._entries[key] = data
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def render_bytes(
    *,
    prompt: str,
    seed: int,
    size: tuple[int, int],
    output_format: str,
    quality: int,
    aspect_label: str,
    mode: str = "full",
) -> bytes:
    """Encoded image bytes for one result (uncached; see ``ImageCache``)."""
    if mode == "fast":
        return encode(Image.new("RGB", size, fast_colour(seed)), output_format, quality)
    label = f"seed {seed} · {aspect_label} · {size[0]}x{size[1]} · simulated"
    return encode(render_full(prompt=prompt, seed=seed, size=size, label=label),
                  output_format, quality)


def image_size(data: bytes) -> tuple[int, int] | None:
    """The pixel size of an encoded image, or None if Pillow cannot read it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None

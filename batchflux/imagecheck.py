"""Verify a downloaded image: it decodes whole, its format is what was asked for, and its size
fits what the job implies. The only place on the runner side that imports Pillow."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

Image.MAX_IMAGE_PIXELS = 64_000_000  # a decompression bomb is refused, never decoded

_PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class ImageCheckError(ValueError):
    """The file is not the image the job promised."""


@dataclass(frozen=True, slots=True)
class ImageFacts:
    width: int
    height: int
    format: str  # jpg | png | webp


def inspect_image(path: Path) -> ImageFacts:
    """Decode the whole file (a truncated or corrupt body fails here) and return its facts."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt = _PIL_FORMATS.get(im.format or "")
                im.load()
                width, height = im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ImageCheckError(f"image does not decode: {exc}") from exc
    if fmt is None:
        raise ImageCheckError("image is not JPEG, PNG or WebP")
    return ImageFacts(width, height, fmt)


def image_size(path: Path) -> tuple[int, int] | None:
    """The size of a local reference image, or None when it cannot be read."""
    try:
        with warnings.catch_warnings():
            # Over the pixel cap is refused even unread: whoever decodes it later is bombed.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning):
        return None


def check_expected(facts: ImageFacts, params: Mapping[str, Any], *,
                   input_size: tuple[int, int] | None = None) -> None:
    """Raise ImageCheckError when the image cannot be what ``params`` asked for.

    The exact pixel table is the API's to choose (REFERENCE.md decision 3), so this checks the
    contract, not a table: the format, the aspect ratio within rounding to 16 px, and for
    ``custom`` the requested width and height within that rounding.
    """
    wanted_format = str(params.get("output_format", "webp"))
    if wanted_format == "jpeg":
        wanted_format = "jpg"
    if facts.format != wanted_format:
        raise ImageCheckError(f"asked for {wanted_format}, got {facts.format}")
    if facts.width < 16 or facts.height < 16:
        raise ImageCheckError(f"image is only {facts.width}x{facts.height}")
    ratio = str(params.get("aspect_ratio", "1:1"))
    if ratio == "custom":
        for name, got in (("width", facts.width), ("height", facts.height)):
            asked = params.get(name)
            if isinstance(asked, int) and abs(got - asked) > 32:
                raise ImageCheckError(f"asked for {name} {asked}, got {got}")
        return
    if ratio == "match_input_image":
        if input_size is None:
            return
        rw, rh = input_size
    else:
        try:
            rw_s, rh_s = ratio.split(":")
            rw, rh = int(rw_s), int(rh_s)
        except ValueError:
            return
        if rw <= 0 or rh <= 0:
            return
    # Both sides may be rounded to a multiple of 16 (or 32): allow that much slack.
    slack = 32
    if abs(facts.width * rh - facts.height * rw) > slack * max(rw, rh) * 2:
        raise ImageCheckError(
            f"asked for {ratio}, got {facts.width}x{facts.height}"
        )

"""Verify a downloaded image: it decodes whole, its format is what was asked for, and its size
fits what the job implies. The only place on the runner side that imports Pillow."""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import ImageCheckError

Image.MAX_IMAGE_PIXELS = 64_000_000  # a decompression bomb is refused, never decoded

_PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


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


def inspect_container(path: Path) -> ImageFacts:
    """Check that a downloaded image is whole, without decoding its pixels.

    The container is walked end to end: PNG chunk lengths and every chunk's CRC up to an
    IEND that ends the file; WebP's RIFF size against the file size and each chunk's length;
    JPEG from SOI through the segment lengths to the EOI that ends the file. A truncated,
    padded or spliced body fails here, as it would fail a full decode; a bit flipped inside
    the compressed pixel data does not (TCP and the sha256 we record cover transport).
    Width and height come from the header the walk passes (PNG's IHDR, WebP's VP8X, VP8L or
    VP8 frame header, JPEG's start of frame): no second read, no Pillow plugin (whose WebP
    opener demuxed the whole file on the event loop: 4 % of a no-latency run's CPU).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageCheckError(f"cannot read the image: {exc.strerror or exc}") from exc
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        fmt, size = "png", _check_png(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt, size = "webp", _check_webp(data)
    elif data.startswith(b"\xff\xd8"):
        fmt, size = "jpg", _check_jpeg(data)
    else:
        raise ImageCheckError("image is not JPEG, PNG or WebP")
    if size is None or size[0] <= 0 or size[1] <= 0:
        raise ImageCheckError("image header does not parse")
    if size[0] * size[1] > (Image.MAX_IMAGE_PIXELS or 0) > 0:
        raise ImageCheckError(f"image of {size[0]}x{size[1]} is over the "
                              f"{Image.MAX_IMAGE_PIXELS:,}-pixel cap (a decompression bomb)")
    return ImageFacts(size[0], size[1], fmt)


def _check_png(data: bytes) -> tuple[int, int] | None:
    """Walk the chunks; the size from IHDR, which must come first."""
    size = None
    if data[12:16] == b"IHDR" and len(data) >= 24:
        size = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    pos, end = 8, len(data)
    while pos + 12 <= end:
        length = int.from_bytes(data[pos:pos + 4], "big")
        chunk_end = pos + 12 + length
        if chunk_end > end:
            break
        kind = data[pos + 4:pos + 8]
        crc = int.from_bytes(data[chunk_end - 4:chunk_end], "big")
        if zlib.crc32(data[pos + 4:chunk_end - 4]) != crc:
            raise ImageCheckError(f"PNG chunk {kind!r} fails its CRC")
        pos = chunk_end
        if kind == b"IEND":
            if pos != end:
                raise ImageCheckError("PNG has data after IEND")
            return size
    raise ImageCheckError("PNG is truncated (no IEND)")


def _check_webp(data: bytes) -> tuple[int, int] | None:
    """Walk the RIFF chunks; the size from the first of VP8X (the canvas), VP8L or VP8."""
    end, size = len(data), None
    if int.from_bytes(data[4:8], "little") + 8 != end:
        raise ImageCheckError("WebP RIFF size does not match the file (truncated?)")
    pos, image = 12, False
    while pos < end:
        if pos + 8 > end:
            raise ImageCheckError("WebP chunk header is truncated")
        kind = data[pos:pos + 4]
        length = int.from_bytes(data[pos + 4:pos + 8], "little")
        if size is None:
            size = _webp_size(kind, data[pos + 8:pos + 8 + min(length, 16)])
        pos += 8 + length + (length & 1)
        if pos > end:
            raise ImageCheckError(f"WebP chunk {kind!r} is truncated")
        image = image or kind in (b"VP8 ", b"VP8L", b"ANMF")
    if not image:
        raise ImageCheckError("WebP holds no image data")
    return size


def _webp_size(kind: bytes, head: bytes) -> tuple[int, int] | None:
    """The size a WebP chunk's first bytes give (RFC 9649), or None for other chunks."""
    if kind == b"VP8X" and len(head) >= 10:
        return (int.from_bytes(head[4:7], "little") + 1,
                int.from_bytes(head[7:10], "little") + 1)
    if kind == b"VP8L" and len(head) >= 5 and head[0] == 0x2F:
        bits = int.from_bytes(head[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 " and len(head) >= 10 and head[3:6] == b"\x9d\x01\x2a":
        return (int.from_bytes(head[6:8], "little") & 0x3FFF,
                int.from_bytes(head[8:10], "little") & 0x3FFF)
    return None


#: JPEG start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC): they carry the size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _check_jpeg(data: bytes) -> tuple[int, int] | None:
    """Walk the segments to the scan and the EOI; the size from the start of frame."""
    pos, end, size = 2, len(data), None
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            raise ImageCheckError("JPEG segment marker missing")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _JPEG_SOF and size is None and pos + 9 <= end:
            size = (int.from_bytes(data[pos + 7:pos + 9], "big"),
                    int.from_bytes(data[pos + 5:pos + 7], "big"))
        pos += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data runs to EOI
            if not data.rstrip(b"\x00").endswith(b"\xff\xd9") or pos > end:
                raise ImageCheckError("JPEG is truncated (no EOI)")
            return size
    raise ImageCheckError("JPEG is truncated")

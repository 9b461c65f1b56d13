"""Image verification: the container walk, the full decode, and what the job implies."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from PIL import Image

from batchflux.cli import build_parser
from batchflux.imagecheck import (
    ImageCheckError,
    ImageFacts,
    check_expected,
    inspect_container,
    inspect_image,
)
from batchflux.runner import Runner, RunSettings
from batchflux.store import ResumeIndex


def encoded(fmt: str, size: tuple[int, int] = (256, 192)) -> bytes:
    image = Image.effect_noise(size, 60).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, fmt, quality=80)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "ext"), [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_whole_images_pass_both_checks(tmp_path: Path, fmt: str, ext: str) -> None:
    path = tmp_path / f"ok.{ext}"
    path.write_bytes(encoded(fmt))
    assert inspect_container(path) == inspect_image(path) == ImageFacts(256, 192, ext)


#: An EXIF block with an empty IFD: it makes JPEG write an APP1 before the frame and WebP a VP8X.
EXIF = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00"
VARIANTS: list[tuple[str, str, str, dict[str, object]]] = [
    ("PNG", "png", "RGB", {}), ("PNG", "png", "RGBA", {}), ("PNG", "png", "L", {}),
    ("PNG", "png", "P", {}), ("PNG", "png", "RGB", {"optimize": True}),
    ("JPEG", "jpg", "RGB", {"quality": 90}), ("JPEG", "jpg", "L", {}),
    ("JPEG", "jpg", "RGB", {"progressive": True}),
    ("JPEG", "jpg", "RGB", {"exif": EXIF}),
    ("WEBP", "webp", "RGB", {"quality": 80}), ("WEBP", "webp", "RGB", {"lossless": True}),
    ("WEBP", "webp", "RGBA", {"quality": 80}), ("WEBP", "webp", "RGBA", {"lossless": True}),
    ("WEBP", "webp", "RGB", {"quality": 80, "exif": EXIF}),
]


@pytest.mark.parametrize(("fmt", "ext", "mode", "options"), VARIANTS)
def test_the_walk_reads_the_size_pillow_reads(tmp_path: Path, fmt: str, ext: str, mode: str,
                                              options: dict[str, object]) -> None:
    """The container walk takes width and height from the header it passes (IHDR; VP8X,
    VP8L or VP8; a JPEG start of frame), for every flavour Pillow writes, at odd sizes."""
    rng = random.Random(f"{fmt}{mode}{sorted(options)}")
    for _ in range(3):
        size = (rng.randint(1, 700), rng.randint(1, 700))
        image = Image.effect_noise(size, 60).convert(mode)
        path = tmp_path / f"img.{ext}"
        image.save(path, fmt, **options)
        assert inspect_container(path) == inspect_image(path) == ImageFacts(*size, ext)


def test_a_header_over_the_pixel_cap_is_refused_unread(tmp_path: Path) -> None:
    """A 9,000 x 9,000 PNG header (81 MP, over the 64 MP cap) is refused by the walk, as
    Pillow would refuse to open it: whoever decodes it later is not bombed."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body))

    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 0,
                                                               0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(body)
    with pytest.raises(ImageCheckError, match="pixel cap"):
        inspect_container(path)


@pytest.mark.parametrize(("fmt", "ext"), [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_truncated_or_padded_bodies_fail_both_checks(tmp_path: Path, fmt: str, ext: str) -> None:
    data = encoded(fmt)
    for name, body in (("cut", data[: len(data) * 2 // 3]), ("padded", data + b"\0junk" * 9)):
        path = tmp_path / f"{name}.{ext}"
        path.write_bytes(body)
        with pytest.raises(ImageCheckError):
            inspect_container(path)
        if name == "cut":
            with pytest.raises(ImageCheckError):
                inspect_image(path)


def test_decode_catches_pixel_data_corruption_the_structure_walk_cannot(tmp_path: Path) -> None:
    """Why decoding is the default: bytes garbled inside a JPEG's entropy-coded data keep the
    segment structure intact, and only a decoder notices."""
    data = encoded("JPEG")
    rng = random.Random(7)
    caught_only_by_decode = 0
    for trial in range(40):
        garbled = bytearray(data)
        start = len(garbled) // 3
        for i in range(start, start + 64):
            garbled[i] = rng.randrange(256)
        path = tmp_path / f"garbled-{trial}.jpg"
        path.write_bytes(bytes(garbled))
        try:
            inspect_container(path)
        except ImageCheckError:
            continue
        try:
            inspect_image(path)
        except ImageCheckError:
            caught_only_by_decode += 1
    assert caught_only_by_decode > 0


def test_auto_verification_is_the_default() -> None:
    assert RunSettings().verify == "auto"
    args = build_parser().parse_args(["run", "m.yaml"])
    assert args.verify == "auto"


def test_size_and_format_must_fit_the_request() -> None:
    params = {"aspect_ratio": "16:9", "output_format": "webp"}
    check_expected(ImageFacts(1360, 768, "webp"), params)
    with pytest.raises(ImageCheckError, match="asked for webp"):
        check_expected(ImageFacts(1360, 768, "png"), params)
    with pytest.raises(ImageCheckError, match="16:9"):
        check_expected(ImageFacts(1024, 1024, "webp"), params)
    custom = {"aspect_ratio": "custom", "width": 800, "height": 304, "output_format": "jpg"}
    check_expected(ImageFacts(800, 304, "jpg"), custom)
    with pytest.raises(ImageCheckError, match="width"):
        check_expected(ImageFacts(1024, 304, "jpg"), custom)
    matched = {"aspect_ratio": "match_input_image", "output_format": "png"}
    check_expected(ImageFacts(1248, 832, "png"), matched, input_size=(600, 400))
    with pytest.raises(ImageCheckError):
        check_expected(ImageFacts(832, 1248, "png"), matched, input_size=(600, 400))


def test_auto_decodes_while_decoding_stays_under_its_share_of_the_run() -> None:
    now = [0.0]
    runner = Runner(client=None, store=None, index=ResumeIndex(),  # type: ignore[arg-type]
                    settings=RunSettings(verify="auto", decode_share=0.1),
                    clock=lambda: now[0])
    runner.lifecycle.started = 0.0
    now[0] = 30.0
    runner.stats.decode_seconds = 2.9
    assert runner.lifecycle.fetcher._should_decode()  # 2.9 s of 30 s: under a tenth
    runner.stats.decode_seconds = 3.1
    assert not runner.lifecycle.fetcher._should_decode()  # decoding would become the bottleneck
    for mode, expected in (("decode", True), ("structure", False)):
        forced = Runner(client=None, store=None, index=ResumeIndex(),  # type: ignore[arg-type]
                        settings=RunSettings(verify=mode), clock=lambda: now[0])
        forced.stats.decode_seconds = 1e9
        assert forced.lifecycle.fetcher._should_decode() is expected

"""Image sizes and deterministic rendering."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from batchflux.sim import size_for
from batchflux.sim.render import ASPECT_SIZES, render_bytes


@pytest.mark.parametrize(("args", "expected"), [
    (("1:1",), (1024, 1024)),
    (("16:9",), (1360, 768)),
    (("9:16",), (768, 1360)),
    (("7:3",), (1568, 672)),
    (("custom", 1000, 500), (992, 496)),
    (("custom", 2048, 256), (2048, 256)),
    (("match_input_image", None, None, (640, 480)), (640, 480)),
    (("match_input_image", None, None, (4000, 3000)), (2048, 1536)),
    (("match_input_image",), (1024, 1024)),
])
def test_size_for(args: tuple, expected: tuple[int, int]) -> None:
    assert size_for(*args) == expected


def test_table_sizes_are_about_a_megapixel_in_multiples_of_16() -> None:
    for ratio, (w, h) in ASPECT_SIZES.items():
        assert w % 16 == 0 and h % 16 == 0
        assert 0.9e6 < w * h < 1.15e6, ratio
        rw, rh = map(int, ratio.split(":"))
        assert abs(w / h - rw / rh) < 0.03, ratio


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_rendering_is_deterministic_and_honours_format(mode: str) -> None:
    args = {"prompt": "a fox in the snow", "seed": 42, "size": (320, 240), "output_format": "jpg",
                "quality": 60, "aspect_label": "4:3", "mode": mode}
    first = render_bytes(**args)
    assert first == render_bytes(**args)
    with Image.open(io.BytesIO(first)) as image:
        assert (image.format, image.size) == ("JPEG", (320, 240))
    assert render_bytes(**{**args, "seed": 43}) != first


def test_quality_changes_lossy_output() -> None:
    args = {"prompt": "quality", "seed": 1, "size": (256, 256), "output_format": "webp",
                "aspect_label": "1:1"}
    assert render_bytes(**args, quality=10) != render_bytes(**args, quality=95)

"""Validation of ``POST /v2/images/generate`` bodies, reporting every problem at once.

Mirrors the OpenAPI ``GenerateImageRequest`` flux variant (``additionalProperties: false`` at both
levels) with the project's decision 1: ``aspect_ratio`` may also be ``"match_input_image"`` or
``"custom"``. Problems are keyed by dotted JSON path, as the API's Zod errors are.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from batchflux.models import FLUX_MODELS

ASPECT_RE = re.compile(r"^\d+:\d+$")
TOP_LEVEL_KEYS = frozenset({"prompt", "model", "webhookUrl", "webhookEvents", "fluxParams"})
WEBHOOK_EVENTS = ("progress", "completed", "failed")
OUTPUT_FORMATS = ("jpg", "png", "webp")

#: Params blocks of the other model families: named in the error for a clearer message.
OTHER_PARAM_BLOCKS = frozenset({
    "midjourneyParams", "nanoBananaParams", "seedreamParams", "ideogramParams",
    "stableDiffusionParams", "imagenParams", "dalleParams", "gptImageParams", "gptImage2Params",
    "klingImageParams", "qwenImageParams", "qwenImage2Params", "wanImageParams",
    "wanImage27Params", "grokImagineParams", "reveParams", "fluxLoraParams",
})

#: Reference images allowed per model (docs pages; OAS allows 10 for the rest).
MAX_INPUT_IMAGES = {"flux-2-dev": 5, "flux-2-pro": 8, "flux-2-max": 8, "flux-2-flex": 10}

Details = dict[str, list[str]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_http_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _is_uri(value: Any) -> bool:
    if not isinstance(value, str) or ":" not in value:
        return False
    parts = urlsplit(value)
    return bool(parts.scheme) and bool(parts.netloc or parts.path)


def validate_generate(body: Any) -> Details:
    """Every problem in a generate request body, by dotted path; empty when it is valid."""
    details: Details = {}

    def add(path: str, message: str) -> None:
        details.setdefault(path, []).append(message)

    if not isinstance(body, dict):
        add("", "Expected object")
        return details

    for key in sorted(set(body) - TOP_LEVEL_KEYS):
        if key in OTHER_PARAM_BLOCKS:
            add(key, f"'{key}' is not allowed for flux models; use 'fluxParams'")
        else:
            add(key, f"Unrecognized key: '{key}'")

    prompt = body.get("prompt")
    if "prompt" not in body:
        add("prompt", "Required")
    elif not isinstance(prompt, str):
        add("prompt", "Expected string")
    elif not 1 <= len(prompt) <= 2000:
        add("prompt", "String must contain between 1 and 2000 character(s)")

    model = body.get("model")
    if "model" not in body:
        add("model", "Required")
    elif not isinstance(model, str):
        add("model", "Expected string")
    elif model not in FLUX_MODELS:
        add("model", f"Unknown or unsupported model: '{model}'. Expected one of: "
                     + ", ".join(FLUX_MODELS))

    if "webhookUrl" in body and not (
        isinstance(body["webhookUrl"], str) and is_http_url(body["webhookUrl"])
    ):
        add("webhookUrl", "Invalid url")
    if "webhookEvents" in body:
        events = body["webhookEvents"]
        if not isinstance(events, list):
            add("webhookEvents", "Expected array")
        elif not events:
            add("webhookEvents", "Array must contain at least 1 element(s)")
        else:
            for i, event in enumerate(events):
                if event not in WEBHOOK_EVENTS:
                    add(f"webhookEvents.{i}", "Invalid enum value. Expected 'progress' | "
                                              "'completed' | 'failed'")

    if "fluxParams" in body:
        params = body["fluxParams"]
        if not isinstance(params, dict):
            add("fluxParams", "Expected object")
        else:
            max_images = MAX_INPUT_IMAGES.get(model, 10) if isinstance(model, str) else 10
            _validate_flux_params(params, max_images, add)
    return details


_FLUX_KEYS = frozenset({
    "aspect_ratio", "go_fast", "guidance", "height", "image_prompt", "image_prompt_strength",
    "input_images", "output_format", "output_quality", "prompt_upsampling", "raw", "resolution",
    "seed", "steps", "width",
})


def _validate_flux_params(params: dict[str, Any], max_images: int, add: Any) -> None:
    p = "fluxParams."
    for key in sorted(set(params) - _FLUX_KEYS):
        add(p + key, f"Unrecognized key: '{key}'")

    images = params.get("input_images")
    image_count = 0
    if "input_images" in params:
        if not isinstance(images, list):
            add(p + "input_images", "Expected array")
        else:
            image_count = len(images)
            if image_count > max_images:
                add(p + "input_images",
                    f"Array must contain at most {max_images} element(s)")
            for i, url in enumerate(images):
                if not is_http_url(url):
                    add(f"{p}input_images.{i}", "Invalid url: expected an http(s) URL")

    ratio = params.get("aspect_ratio")
    if "aspect_ratio" in params:
        if not isinstance(ratio, str):
            add(p + "aspect_ratio", "Expected string")
        elif ratio == "match_input_image":
            if image_count == 0:
                add(p + "aspect_ratio", "'match_input_image' needs at least one input image")
        elif ratio == "custom":
            pass
        elif not ASPECT_RE.match(ratio):
            add(p + "aspect_ratio", "Invalid: expected 'W:H', 'match_input_image' or 'custom'")
        elif any(int(side) == 0 for side in ratio.split(":")):
            add(p + "aspect_ratio", "Both sides of 'W:H' must be positive integers")

    for side in ("width", "height"):
        if side in params:
            value = params[side]
            if not _is_int(value):
                add(p + side, "Expected integer")
            elif not 256 <= value <= 2048:
                add(p + side, "Number must be between 256 and 2048")
            elif ratio != "custom":
                add(p + side, "Only allowed when aspect_ratio is 'custom'")
        elif ratio == "custom":
            add(p + side, "Required when aspect_ratio is 'custom'")

    if "output_format" in params and params["output_format"] not in OUTPUT_FORMATS:
        add(p + "output_format", "Invalid enum value. Expected 'jpg' | 'png' | 'webp'")
    if "output_quality" in params:
        value = params["output_quality"]
        if not _is_int(value):
            add(p + "output_quality", "Expected integer")
        elif not 0 <= value <= 100:
            add(p + "output_quality", "Number must be between 0 and 100")
    if "seed" in params and not _is_int(params["seed"]):
        add(p + "seed", "Expected integer")
    for flag in ("go_fast", "prompt_upsampling", "raw"):
        if flag in params and not isinstance(params[flag], bool):
            add(p + flag, "Expected boolean")
    if "steps" in params:
        value = params["steps"]
        if not _is_int(value):
            add(p + "steps", "Expected integer")
        elif not 1 <= value <= 50:
            add(p + "steps", "Number must be between 1 and 50")
    for name, low, high in (("guidance", 1.5, 10), ("image_prompt_strength", 0, 1)):
        if name in params:
            value = params[name]
            if not _is_number(value):
                add(p + name, "Expected number")
            elif not low <= value <= high:
                add(p + name, f"Number must be between {low} and {high}")
    if "image_prompt" in params and not _is_uri(params["image_prompt"]):
        add(p + "image_prompt", "Invalid url")
    if "resolution" in params and not isinstance(params["resolution"], str):
        add(p + "resolution", "Expected string")

"""Reference images (``input_images``): resolve each local one, then check and hash it once.

A local reference is resolved against the directory of the file that names it and recorded
in the :class:`~batchflux.manifest.raw.Context` with every place that names it. After all
entries are read, :func:`check_images` opens each file once with Pillow (identify only:
decoding is the API's job) and hashes its content; a problem is reported at every place that
names the image. The content hash, not the path, is what goes into item keys, so moving a
manifest directory does not change them. Pillow is imported here only when there is an image
to check.
"""

from __future__ import annotations

import os

from ..fileutil import sha256_file
from ..models import is_remote_ref
from .positions import Doc, FieldPath
from .raw import Context

__all__ = ["check_images", "resolve_ref"]


def resolve_ref(ref: str, doc: Doc, path: FieldPath, ctx: Context) -> str:
    """``ref`` as the request will name it: a URL unchanged, a local file as an absolute path
    (relative to ``doc.dir``, ``~`` expanded), recorded in ``ctx.images`` for checking."""
    if is_remote_ref(ref):
        return ref
    resolved = os.path.abspath(doc.dir / os.path.expanduser(ref))
    ctx.images.setdefault(resolved, []).append((doc, path, ref))
    return resolved


def check_images(ctx: Context) -> dict[str, str]:
    """``{absolute path: "sha256:<hex>"}`` for every local image in ``ctx.images`` that
    Pillow can identify; each one that it cannot is a diagnostic at every use."""
    from PIL import Image, UnidentifiedImageError

    hashes: dict[str, str] = {}
    for resolved, uses in ctx.images.items():
        problem = None
        try:
            with Image.open(resolved) as image:
                image.size  # noqa: B018 - identify only; decoding is the API's job
            hashes[resolved] = "sha256:" + sha256_file(resolved)
        except FileNotFoundError:
            problem = "no such file"
        except IsADirectoryError:
            problem = "is a directory"
        except UnidentifiedImageError:
            problem = "not an image Pillow can identify"
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            problem = f"cannot read image: {exc}"
        if problem:
            for doc, path, ref in uses:
                ctx.error(doc, path, f"input image {ref!r}: {problem}")
    return hashes

"""Bytes -> text: read a manifest or prompt file, refusing what is not UTF-8 text.

Every refusal is a :class:`~batchflux.errors.ManifestError` with one diagnostic naming the
file (and, for a bad byte, its line and column); line 0 means the whole file.

    >>> read_text(Path("no-such.yaml"), "no-such.yaml")
    Traceback (most recent call last):
    ...
    batchflux.errors.ManifestError: no-such.yaml:0:0: (root): no such file
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ManifestError
from ..models import Diagnostic

__all__ = ["read_text"]


def read_text(path: Path, display: str) -> str:
    """The text of ``path`` (UTF-8, a leading BOM dropped), or a ManifestError naming
    ``display``: missing, a directory, unreadable, empty, binary (NUL bytes), not UTF-8."""

    def fail(message: str, line: int = 0, col: int = 0) -> ManifestError:
        return ManifestError([Diagnostic(display, line, col, "", message)])

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise fail("no such file") from None
    except IsADirectoryError:
        raise fail("is a directory, not a manifest file") from None
    except PermissionError:
        raise fail("permission denied") from None
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from None
    if not data.strip():
        raise fail("file is empty")
    if b"\x00" in data:
        raise fail("binary file (NUL bytes), not a UTF-8 text manifest")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise fail(f"not valid UTF-8 (byte 0x{data[exc.start]:02x})", line, col) from None

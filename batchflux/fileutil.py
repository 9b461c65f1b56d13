"""Small file helpers shared by the post-run tools (merge, export, verify) and the loader.

Pure standard library and no batchflux imports, so that any module may use it.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_file"]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's content, read in blocks (flat memory for any size).

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = pathlib.Path(d, "x"); _ = p.write_bytes(b"abc"); sha256_file(p)[:12]
    'ba7816bf8f01'

    Raises ``OSError`` (``FileNotFoundError``, ``IsADirectoryError``...) as ``open`` does.
    """
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()

"""Small file helpers every module may use: the one atomic write, and the one file hash.

An atomic write never leaves a reader a half-written file: the bytes go to a temporary file in
the target's own directory, that file is flushed to disk (``fsync``), renamed over the target
(``os.replace``, atomic on POSIX), and the directory is flushed so that the rename itself
survives a power loss. A crash at any point leaves either the old file or the new one, whole
(and at worst a ``.NAME.*.tmp`` file beside it).

>>> import tempfile, pathlib
>>> with tempfile.TemporaryDirectory() as d:
...     path = pathlib.Path(d, "summary.json")
...     write_json_atomic(path, {"ok": 3})
...     path.read_text()
'{\\n  "ok": 3\\n}\\n'

Pure standard library and no batchflux imports, so that any module may use it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["copy_atomic", "replace_atomic", "sha256_file", "write_atomic", "write_json_atomic",
           "write_text_atomic"]

_CHUNK = 1 << 20
#: What ``fsync`` of a directory may answer on file systems that do not support it (some
#: network and FUSE file systems): the rename is then as durable as that file system makes it.
_NO_DIRECTORY_SYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


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


def _sync_path(path: Path) -> None:
    """``fsync`` a file or a directory by path."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIRECTORY_SYNC or not path.is_dir():
            raise
    finally:
        os.close(fd)


def replace_atomic(source: str | os.PathLike[str], target: str | os.PathLike[str], *,
                   durable: bool = True) -> None:
    """Move ``source`` (a finished file or directory on the same file system) to ``target``,
    replacing what is there in one step: ``source`` is flushed to disk first and ``target``'s
    directory after the rename, so that after a crash ``target`` is old or new, never torn.

    ``durable=False`` skips both flushes (for caches that are rebuilt when lost).
    This is the second half of :func:`write_atomic`, for content made another way (a hard
    link, a copy, a directory built beside its target).
    """
    source, target = Path(source), Path(target)
    if durable:
        _sync_path(source)
    os.replace(source, target)
    if durable:
        _sync_path(target.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes | Iterable[bytes], *,
                 durable: bool = True) -> None:
    """Replace ``path`` by ``data`` atomically (see the module doc).

    ``data`` is the content, or an iterable of chunks written in order (so a large file is
    never held in memory whole). The file gets the mode a new file gets (0o666 less the
    umask). If writing fails, or the iterable raises, ``path`` is left as it was and the
    temporary file is removed. ``durable=False`` skips the ``fsync`` calls: for caches that
    are rebuilt when lost (thumbnails), where atomicity matters and durability does not.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
                fh.write(chunk)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        _sync_path(path.parent)


def write_text_atomic(path: str | os.PathLike[str], text: str | Iterable[str], *,
                      durable: bool = True) -> None:
    """:func:`write_atomic` for text (UTF-8): a string, or an iterable of pieces."""
    if isinstance(text, str):
        write_atomic(path, text.encode("utf-8"), durable=durable)
    else:
        write_atomic(path, (piece.encode("utf-8") for piece in text), durable=durable)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """:func:`write_atomic` of ``data`` as indented JSON (UTF-8, non-ASCII kept, a final
    newline): how ``summary.json`` and the other JSON documents of a run directory look."""
    write_atomic(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            yield chunk


def copy_atomic(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Copy the file ``source`` to ``target`` with :func:`write_atomic` (streamed)."""
    write_atomic(target, _chunks(Path(source)))

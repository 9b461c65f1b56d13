"""Words that belong to the interface in use: how a message names a setting the user can change.

A message that advises changing a setting must name it the way the caller can change it: the
library by its keyword argument (``allow_insecure=True``), the command line by its flag
(``--insecure-http``). The library speaks :data:`LIBRARY` unless told otherwise; the command
line passes :data:`COMMAND_LINE` down with the call. Nothing guesses from ``sys.argv``.

Pure values; imports nothing of batchflux's own.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COMMAND_LINE", "LIBRARY", "Wording"]


@dataclass(frozen=True, slots=True)
class Wording:
    """How one interface spells each setting a message may advise changing.

    >>> LIBRARY.allow_insecure, COMMAND_LINE.allow_insecure
    ('allow_insecure=True', '--insecure-http')
    """

    #: permit a plain-http base URL on a host that is not loopback
    allow_insecure: str = "allow_insecure=True"
    #: accept result image URLs on one more host
    allow_download_host: str = "allowed_download_hosts=[HOST]"


#: The library's words: keyword arguments (the default everywhere).
LIBRARY = Wording()
#: The command line's words: its flags.
COMMAND_LINE = Wording(allow_insecure="--insecure-http",
                       allow_download_host="--allow-download-host HOST")

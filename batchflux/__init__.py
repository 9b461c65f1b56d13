"""batchflux: run many flux-2-dev generations through Apiframe's v2 API, safely and fast.

The public library API is re-exported here; see README.md for examples.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

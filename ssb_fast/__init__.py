"""ssb-fast: the Segmentation Schrödinger Bridge (SSB / SSB++) for ambiguous medical image segmentation."""

from __future__ import annotations

__version__ = "0.1.0"

from ssb_fast.bridge import Bridge  # noqa: E402
from ssb_fast.checkpoint import load_model  # noqa: E402

__all__ = ["Bridge", "__version__", "load_model"]

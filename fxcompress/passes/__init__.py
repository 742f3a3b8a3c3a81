"""The compiler passes around calibration: capture → find_sites → (``fxcompress.calibration``)
→ rewrite."""

from .capture import CaptureError, capture
from .rewrite import rewrite
from .sites import Site, find_sites

__all__ = ["CaptureError", "Site", "capture", "find_sites", "rewrite"]

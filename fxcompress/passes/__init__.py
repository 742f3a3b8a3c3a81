"""The compiler passes: capture → find_sites → calibrate → rewrite."""

from .calibrate import calibrate
from .capture import CaptureError, capture
from .rewrite import rewrite
from .sites import Site, find_sites

__all__ = ["CaptureError", "Site", "calibrate", "capture", "find_sites", "rewrite"]

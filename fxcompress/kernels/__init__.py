"""Operators (torch.library), their CPU and Triton paths, and bit layouts."""

from . import ops  # noqa: F401  (registers torch.ops.fxcompress.*)

"""precision: the matmul precision of a run's forward passes and statistics — float32, or
bf16-rounded inputs with float32 accumulation where the CPU multiplies bf16 natively (the
solves always compute in float32).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX) *and* this torch's
    oneDNN takes float32 matmuls to bf16 under ``fp32_precision="bf16"``. The second is
    probed once on a small product: some builds use that path only on AMX CPUs, and a run that
    says bf16 must compute in bf16. Elsewhere bf16 products are emulated, slower."""
    try:
        hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # a torch without these probes: assume not
        return False
    return bool(hardware) and torch.backends.mkldnn.is_available() and _bf16_matmuls_apply()


@functools.cache
def _bf16_matmuls_apply() -> bool:
    """Whether a float32 product changes under oneDNN's bf16 setting (bf16-rounded inputs
    leave a relative error near 2⁻⁹; float32's is near 2⁻²³)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=g), torch.randn(256, 64, generator=g)
    exact = a.double() @ b.double()
    with matmul_precision("bf16"):
        product = a @ b
    return bool((product.double() - exact).norm() > 1e-5 * exact.norm())


def resolve_precision(precision: str, device: torch.device) -> str:
    """The matmul precision a run calibrates with: ``precision`` (``"auto"``, ``"fp32"`` or
    ``"bf16"``) resolved for a model on ``device`` (see :func:`fxcompress.compile`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"calibration_precision={precision!r}: expected one of {PRECISIONS}")
    fast = device.type == "cpu" and torch.backends.mkldnn.is_available() and native_bf16()
    if precision == "bf16" and not fast:
        where = "a CPU without them" if device.type == "cpu" else str(device)
        raise ValueError("calibration_precision='bf16' needs a model on a CPU with native bf16 "
                         f"matmuls (AVX512-BF16 or AMX); this run is on {where}")
    return "bf16" if precision == "bf16" or (precision == "auto" and fast) else "fp32"


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """For ``"bf16"``: CPU float32 matmuls inside take bf16-rounded inputs and accumulate and
    return float32 (oneDNN's ``fp32_precision = "bf16"``), as a model run in bf16 computes;
    the setting comes back after. For ``"fp32"``: nothing changes."""
    if precision != "bf16":
        yield
        return
    saved = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = saved

"""Peak resident memory of a block of code, measured by the kernel (Linux).

``VmHWM`` in ``/proc/self/status`` is the process's peak RSS; writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS, so the peak of a block is measured
without the history of the process before it (imports, model loads, earlier tests).
"""

from __future__ import annotations

from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def rss() -> int:
    """Resident bytes now."""
    return _status("VmRSS")


class PeakRSS:
    """``with PeakRSS() as p: ...`` then ``p.growth``: peak RSS inside the block minus RSS at
    its start, in bytes."""

    def __enter__(self) -> PeakRSS:
        Path("/proc/self/clear_refs").write_text("5")
        self.start = rss()
        self.growth = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = _status("VmHWM") - self.start

"""Where a compression spends its time and memory, measured from outside the library.

``Profile()`` wraps the calibration run's steps (a segment of the forward, the statistics, a
solve, the writer) to add up their wall time per phase, record when each layer is done, and
measure the peak RSS growth of every segment and group solve with the kernel's high-water mark
(``VmHWM``, reset before each step through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import functools
import importlib
import time
from pathlib import Path

# Where the phases of a run happen: (module, attribute path, phase).
PHASES = [
    ("fxcompress.calibration.run", "Run.run_segment", "forward"),
    ("fxcompress.calibration.statistics", "pinned_sums", "statistics"),
    ("fxcompress.algorithms.hessian", "Hessian.value", "statistics"),
    ("fxcompress.calibration.run", "Run.solve", "solve"),
    ("fxcompress.streaming", "_Writer.write_dense", "write"),
    ("fxcompress.streaming", "_Writer.sink", "write"),
    ("fxcompress.streaming", "_Writer.finish", "write"),
    ("fxcompress.api", "rewrite", "write"),
]
STEPS = {"run_segment", "compress_group"}  # memory is measured around each of these


def status(key: str) -> int:
    """A field of ``/proc/self/status`` in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Profile:
    """Installs the timers; ``seconds`` per phase, ``done`` (layer, time) pairs, ``steps``
    (step name, argument, RSS before, peak RSS during) relative to ``baseline``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.done: list[tuple[str, float]] = []
        self.steps: list[tuple[str, str, int, int]] = []
        self.missing: list[str] = []
        self.baseline = status("VmRSS")
        self.peak = 0
        for module, path, phase in PHASES:
            owner = importlib.import_module(module)
            *outer, attr = path.split(".")
            for part in outer:
                owner = getattr(owner, part, None)
            if owner is None or not hasattr(owner, attr):
                self.missing.append(f"{module}.{path}")
                continue
            setattr(owner, attr, self._timed(getattr(owner, attr), phase, attr == "sink"))
        run = importlib.import_module("fxcompress.calibration.run").Run
        for step in STEPS:
            if hasattr(run, step):
                setattr(run, step, self._measured(getattr(run, step)))

    def start(self) -> None:
        """Take the baseline now (after loading the model and the data)."""
        self.baseline, self.peak = status("VmRSS"), 0
        reset_peak()

    def _timed(self, fn, phase: str, sink: bool):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t
                if sink:
                    self.done.append((args[1].fqn, time.perf_counter()))
        return timed

    def _measured(self, fn):
        @functools.wraps(fn)
        def measured(run, *args, **kwargs):
            self.peak = max(self.peak, status("VmHWM"))
            before = status("VmRSS")
            reset_peak()
            try:
                return fn(run, *args, **kwargs)
            finally:
                high = status("VmHWM")
                self.peak = max(self.peak, high)
                self.steps.append((fn.__name__, str(args[0]) if args else "", before, high))
        return measured

    def growth(self) -> int:
        """Peak RSS over the baseline since :meth:`start`."""
        return max(self.peak, status("VmHWM")) - self.baseline

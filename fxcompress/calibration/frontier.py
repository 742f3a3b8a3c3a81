"""frontier: where the values of a calibration run live — those kept across barriers for
every chunk (:class:`Frontier`: as they are, on CPU or on disk), the program's parameters
(:class:`Params`: resident, or loaded from a :class:`~.seams.WeightSource` while a segment
reads them), and one chunk's interpreter environment over both (:class:`ChunkEnv`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from .seams import WeightSource

OFFLOAD = (None, "cpu", "disk")


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` (any nesting of tensors) with every tensor on ``device``."""
    return pytree.tree_map_only(Tensor, lambda t: t.to(device), value)


def _has_tensor(value: Any) -> bool:
    return any(isinstance(t, Tensor) for t in pytree.tree_leaves(value))


class Frontier:
    """Values kept across barriers, one per chunk: as they are (``offload=None``), on CPU
    (``"cpu"``) or in files in the temporary directory (``"disk"``; ``TMPDIR`` chooses it).
    ``get`` returns them on ``device`` (when given), so the compute device only ever holds
    one chunk's values."""

    def __init__(self, chunks: int, offload: str | None = None,
                 device: torch.device | None = None):
        if offload not in OFFLOAD:
            raise ValueError(f"offload must be one of {OFFLOAD}, got {offload!r}")
        self.chunks, self.offload, self.device = chunks, offload, device
        self.values: dict[fx.Node, list[Any]] = {}
        self._tmp = None
        if offload == "disk":
            self._tmp = tempfile.TemporaryDirectory(prefix="fxcompress-spill-")

    def __contains__(self, node: object) -> bool:
        return node in self.values

    def __iter__(self) -> Iterator[fx.Node]:
        return iter(list(self.values))

    @property
    def spill(self) -> Path | None:
        """The folder of a disk frontier's files (None: in memory)."""
        return Path(self._tmp.name) if self._tmp is not None else None

    def put(self, node: fx.Node, chunk: int, value: Any) -> None:
        slots = self.values.setdefault(node, [None] * self.chunks)
        if self.offload == "cpu":
            value = to_device(value, "cpu")
        elif self.offload == "disk" and _has_tensor(value):
            path = self.spill / f"{node.name}.{chunk}.pt"
            torch.save(to_device(value, "cpu"), path)
            value = path
        slots[chunk] = value

    def get(self, node: fx.Node, chunk: int) -> Any:
        value = self.values[node][chunk]
        if isinstance(value, Path):
            value = torch.load(value, mmap=True, weights_only=True)
        return value if self.device is None else to_device(value, self.device)

    def release(self, node: fx.Node, chunk: int) -> None:
        """Forget chunk ``chunk``'s value of ``node`` (read for the last time)."""
        value, self.values[node][chunk] = self.values[node][chunk], None
        if isinstance(value, Path):
            value.unlink(missing_ok=True)

    def drop(self, node: fx.Node) -> None:
        for value in self.values.pop(node):
            if isinstance(value, Path):
                value.unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget every value (a disk frontier keeps its folder)."""
        for node in list(self.values):
            self.drop(node)

    def close(self) -> None:
        self.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp.name, ignore_errors=True)


class Params:
    """The program's non-input placeholders: real ones as they are, meta ones (a program
    captured from a model on the meta device) loaded from ``source`` while needed."""

    def __init__(self, ep: ExportedProgram, static: dict[fx.Node, Any],
                 source: WeightSource | None):
        self.static = {n: v for n, v in static.items()
                       if not (isinstance(v, Tensor) and v.is_meta)}
        lazy = [n for n in static if n not in self.static]
        if lazy and source is not None:  # buffers the checkpoint lacks join the weights
            self.static = {n: to_device(v, source.device) for n, v in self.static.items()}
        targets = {s.arg.name: s.target for s in ep.graph_signature.input_specs
                   if s.target is not None}
        self.names = {n: targets[n.name] for n in lazy}
        if lazy and source is None:
            raise ValueError(f"parameter {self.names[lazy[0]]!r} is on the meta device: "
                             f"calibrating this program needs a weight source")
        self.source = source
        self.live: dict[fx.Node, Tensor] = {}

    def __contains__(self, node: object) -> bool:
        return node in self.static or node in self.live

    def __getitem__(self, node: fx.Node) -> Any:
        return self.static[node] if node in self.static else self.live[node]

    def lazy(self, node: fx.Node) -> bool:
        return node in self.names

    def load(self, node: fx.Node, index: int | None = None) -> Tensor:
        """The value of ``node`` (with ``index``, its slice ``[index]``), loaded now if it is
        not resident (not kept resident)."""
        if node in self:
            return self[node] if index is None else self[node][index]
        return self.source.load(self.names[node], index)

    def fetch(self, nodes: set[fx.Node]) -> None:
        for n in sorted(nodes - set(self.live), key=lambda n: n.name):
            self.live[n] = self.source.load(self.names[n])

    def release(self, last_segment: Mapping[fx.Node, int], k: int) -> None:
        """Drop the loaded parameters no segment after ``k`` reads."""
        for n in [n for n in self.live if last_segment.get(n, -1) <= k]:
            del self.live[n]


class ChunkEnv(dict):
    """Interpreter environment of one chunk: values computed in the current segment, falling
    back to values kept across segments and to the (chunk-independent) parameters."""

    def __init__(self, chunk: int, kept: Frontier, params: Params):
        super().__init__()
        self.chunk, self.kept, self.params = chunk, kept, params

    def __contains__(self, node: object) -> bool:
        return dict.__contains__(self, node) or node in self.params or node in self.kept

    def __missing__(self, node: fx.Node):
        if node in self.params:
            return self.params[node]
        value = self[node] = self.kept.get(node, self.chunk)  # read once per chunk
        return value

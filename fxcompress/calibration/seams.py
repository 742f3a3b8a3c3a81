"""seams: what a calibration run asks of the world around it — where meta parameters come
from (:class:`WeightSource`), who calibrates with it (:class:`Team`, :class:`Local` here,
``fxcompress.distributed.Distributed`` across processes), and what it reports of each layer
(:class:`LayerReport`, handed to a sink with the result).

The in-memory path uses the defaults (the program's own tensors, one process); a streamed
or distributed run plugs its own in without the loop changing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..algorithms import Hessian


@dataclass
class LayerReport:
    """One compressed linear: what was done, the loss the algorithm measured, how long."""

    fqn: str
    method: str
    shape: tuple[int, int]
    loss: float
    seconds: float
    samples: int  # rows of X (tokens) in its Hessian, 0 without one
    rank: int = 0  # the process that solved it (0 unless calibration is distributed)
    routed: int | None = None  # an expert: the calibration rows routed to it (``samples``
    # counts every row of the block instead when fewer than its input features were routed)
    sparsity: float | None = None  # a pruning method's fraction removed (OWL: the layer's own)


class WeightSource(Protocol):
    """Where parameters the captured program holds only on the meta device come from."""

    device: torch.device

    def load(self, name: str, index: int | None = None) -> Tensor:
        """The tensor stored under ``name`` (a state-dict name), on :attr:`device`; with
        ``index``, only ``tensor[index]`` (one expert of a 3-D bank), read alone."""
        ...

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor :meth:`load` returns for ``name`` (for the memory estimate)."""
        ...


class Step:
    """What a process is doing, named in the errors a :class:`Team` raises."""

    def __init__(self, layer: str) -> None:
        self.layer = layer


class Team(Protocol):
    """The processes that calibrate together: who runs what, and how results are joined."""

    rank: int
    world: int

    def guard(self, layer: str) -> contextlib.AbstractContextManager[Step]:
        """Run a step that may fail on one process so that every process fails with it."""
        ...

    def reduce(self, h: Hessian, layer: str) -> None:
        """Sum the partial Hessians of all processes into ``h``, in place."""
        ...

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The rank that solves each of a group's sites, given their costs."""
        ...

    def share(self, owner: int, result: Any, layer: str) -> Any:
        """``result`` as computed on ``owner``, on every process."""
        ...


class Local:
    """One process does everything; errors propagate unchanged. (It also answers what the
    pipeline asks of a team: :class:`fxcompress.distributed.Team`.)"""

    rank, world = 0, 1

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def shard(self, chunks: Sequence[Any]) -> list[Any]:
        return list(chunks)

    def barrier(self, layer: str) -> None:
        pass

    @contextlib.contextmanager
    def guard(self, layer: str) -> Iterator[Step]:
        yield Step(layer)

    def reduce(self, h: Hessian, layer: str) -> None:
        pass

    def owners(self, costs: Sequence[float]) -> list[int]:
        return [0] * len(costs)

    def share(self, owner: int, result: Any, layer: str) -> Any:
        return result

"""Calibration spread over the ranks of a ``torch.distributed`` process group.

A :class:`Team` is the processes that compress together. The calibrate pass asks it four
things (:class:`~fxcompress.calibration.Team`: guard, reduce, owners, share), the
pipeline three more (shard, barrier, device); one process is a team of one
(:class:`~fxcompress.calibration.Local`). :class:`Distributed` answers them with
PyTorch's own collectives (gloo on CPU, nccl on GPUs), so any launcher that initialises a
process group — ``torchrun`` on one machine or many, SLURM, Kubernetes — works:

* **which chunks** — rank r runs calibration chunks ``r, r + world, ...`` (:meth:`shard`);
* **H** — each rank's partial ``Σ 2xᵀx`` and token count are summed with ``all_reduce``;
* **who solves** — a group's sites go to ranks by cost (``out·in²`` for GPTQ/SparseGPT),
  largest first onto the least-loaded rank, the load carried over from group to group, so
  the solves of a whole model are balanced; every rank computes the same assignment;
* **results** — each result is broadcast from the rank that solved it, so every rank holds
  the same compressed weights and continues identically.

Failures: every step that can fail on one rank runs inside :meth:`Distributed.guard`, which
ends with an exchange of error reports; if any rank failed, *every* rank raises
:class:`DistributedError` naming the failing rank and layer. A rank that dies (killed, out of
memory) makes the next collective fail or time out on the others, which then raise the same
error naming the layer they were at.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from .algorithms import Compressed, Hessian
from .calibration import Local, Step
from .calibration import Team as CalibrateTeam

log = logging.getLogger(__name__)
T = TypeVar("T")


class DistributedError(RuntimeError):
    """A rank failed (or vanished), raised on every rank naming the rank and the layer; or a
    launch that cannot work (several processes and no process group)."""


class Team(CalibrateTeam, Protocol):
    """The processes that compress together, as the pipeline sees them: the calibrate
    pass's team, plus how the calibration batches are shared, where a process computes by
    default, and a point every process reaches before any goes on."""

    device: torch.device

    def shard(self, chunks: Sequence[T]) -> list[T]:
        """This process's share of the calibration batches."""
        ...

    def barrier(self, layer: str) -> None:
        """Wait until every process gets here (``layer`` names the step in errors)."""
        ...


def active() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current_team() -> Team:
    """The ranks of the default process group, or this process alone when there is none."""
    return Distributed() if active() else Local()


def to_cpu(value: T) -> T:
    """A result with its tensors on CPU, for sending between ranks."""
    if isinstance(value, Compressed):
        return Compressed(**{k: v.cpu() if isinstance(v, torch.Tensor) else v
                             for k, v in vars(value).items()})
    if isinstance(value, tuple):
        return tuple(to_cpu(v) for v in value)
    return value


class Distributed:
    """The ranks of ``group`` (default: the world) calibrating together."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: launch with torchrun "
                               "(or call torch.distributed.init_process_group) first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.load = [0.0] * self.world
        backend = dist.get_backend(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if backend == "nccl" else torch.device("cpu")

    # -- the Team protocol --------------------------------------------------------------

    def shard(self, chunks: Sequence[T]) -> list[T]:
        """This rank's calibration chunks."""
        if len(chunks) < self.world:
            raise ValueError(f"{len(chunks)} calibration batches cannot be shared by "
                             f"{self.world} ranks: use more samples or a smaller batch size")
        return list(chunks[self.rank::self.world])

    def barrier(self, layer: str) -> None:
        self._collective(layer, dist.barrier, group=self.group)

    @contextlib.contextmanager
    def guard(self, layer: str) -> Iterator[Step]:
        step, error = Step(layer), None
        try:
            yield step
        except Exception as e:  # any failure must reach the other ranks
            error = e
        reports: list[Any] = [None] * self.world
        mine = None if error is None else (step.layer, f"{type(error).__name__}: {error}")
        self._collective(step.layer, dist.all_gather_object, reports, mine, group=self.group)
        failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
        if failed:
            rank, (where, what) = failed[0]
            others = f" (and ranks {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
            raise DistributedError(f"rank {rank}{others} failed while compressing {where}: "
                                   f"{what}") from error

    def reduce(self, h: Hessian, layer: str) -> None:
        count = torch.tensor([h.count], dtype=torch.float64, device=h.sum.device)
        self._collective(layer, dist.all_reduce, h.sum, group=self.group)
        self._collective(layer, dist.all_reduce, count, group=self.group)
        h.count = int(count.item())

    def owners(self, costs: Sequence[float]) -> list[int]:
        owners = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
            rank = min(range(self.world), key=lambda r: (self.load[r], r))
            owners[i] = rank
            self.load[rank] += costs[i]
        return owners

    def share(self, owner: int, result: Any, layer: str) -> Any:
        box = [to_cpu(result) if self.rank == owner else None]
        src = dist.get_global_rank(self.group, owner) if self.group is not None else owner
        self._collective(layer, dist.broadcast_object_list, box, src=src, group=self.group)
        return box[0]

    # -- helpers ------------------------------------------------------------------------

    def _collective(self, layer: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except DistributedError:
            raise
        except Exception as e:  # gloo/nccl raise RuntimeError subclasses on a lost peer
            raise DistributedError(
                f"rank {self.rank}: lost contact with the other ranks while compressing "
                f"{layer} (another rank was killed, ran out of memory or timed out): "
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
            ) from e


def check_launch() -> None:
    """Refuse to run as one of several launched processes without a process group.

    ``torchrun`` (or SLURM, Kubernetes ...) starts ``WORLD_SIZE`` processes, but the ranks only
    work together once ``torch.distributed`` is initialised. Without it every process would
    compress the whole model on its own and all of them would write the same output folder.
    We do not initialise the group ourselves: a process group is process-wide state (backend,
    timeout, CUDA device, ``destroy_process_group`` at the end) that belongs to the caller, and
    the fix is one line, named in the error.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            f"this process is rank {os.environ.get('RANK', '?')} of WORLD_SIZE={world} "
            f"(started by torchrun or another launcher), but torch.distributed is not "
            f"initialised: each rank would compress the whole model alone and write the same "
            f"output folder. Call fxcompress.distributed.init_from_env() first (and "
            f"torch.distributed.destroy_process_group() at the end) to share the work over the "
            f"ranks, or run one process without the launcher")


def init_from_env(backend: str | None = None, timeout: timedelta | None = None) -> bool:
    """Initialise the default process group from torchrun's environment variables
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), if they are set and no group exists yet.
    Backend: nccl when CUDA is available, gloo otherwise. Returns whether a group is active."""
    if dist.is_initialized():
        return active()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    return active()

"""snapshots: the frontier of a run saved now and then, so that an interrupted run continues
from the last snapshot instead of replaying the forward of every layer it completed.

:meth:`Snapshots.restore` only loads the frontier and says where to continue and which
completed sites the run must compute with from then on (:class:`Restored`); the run applies
that itself (``Run.resume``).
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from ..passes.sites import Site
from ..paths import inside_folder
from .frontier import Frontier, to_device
from .liveness import Liveness

log = logging.getLogger(__name__)


@dataclass
class Restored:
    """Where a run continues from a snapshot: after segment ``segment``, computing with the
    stored results of ``sites`` (every site compressed up to there)."""

    segment: int
    sites: list[Site]


class Snapshots:
    """The frontier of a run saved now and then (see the module docstring).

    A snapshot is taken after a barrier's sites are compressed, when nothing is pending
    (``ready()``: e.g. the checkpoint writer holds no expert results of an unfinished block)
    and at least ``every`` seconds after the last one: every path's frontier values for all
    chunks, one file each, written to a folder beside ``folder`` and swapped in. A snapshot
    is used only if the run plans the same frontier at that segment and every site before it
    is among the completed ones; otherwise the run replays (logged), with the same result."""

    STATE = "snapshot.json"

    def __init__(self, folder: str | Path, every: float = 300.0,
                 ready: Callable[[], bool] = lambda: True):
        self.folder, self.every, self.ready = Path(folder), every, ready
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every and self.ready()

    def save(self, k: int, plans: Sequence[Liveness], frontiers: Sequence[Frontier]) -> None:
        """Snapshot the frontier after segment ``k`` (``plans``: each path's, as
        ``frontiers``)."""
        tmp, old = self.folder.with_name(self.folder.name + ".tmp"), \
            self.folder.with_name(self.folder.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        paths = []
        for i, f in enumerate(frontiers):
            for node in f:
                for c, value in enumerate(f.values[node]):
                    dest = tmp / f"{i}.{node.name}.{c}.pt"
                    if isinstance(value, Path):
                        shutil.copyfile(value, dest)
                    else:
                        torch.save(to_device(value, "cpu"), dest)
            paths.append({"nodes": [n.name for n in f],
                          "keep": [n.name for n in plans[i].segments[k].keep]})
        state = {"segment": k, "chunks": frontiers[0].chunks, "paths": paths}
        (tmp / self.STATE).write_text(json.dumps(state))
        shutil.rmtree(old, ignore_errors=True)
        if self.folder.exists():
            self.folder.rename(old)
        tmp.rename(self.folder)
        shutil.rmtree(old, ignore_errors=True)
        self.last = time.monotonic()
        log.debug("frontier snapshot after segment %d in %s", k, self.folder)

    def restore(self, plans: Sequence[Liveness], groups: Mapping[fx.Node, Sequence[Site]],
                done: Mapping[str, Any], frontiers: Sequence[Frontier]) -> Restored | None:
        """Load the last snapshot into the (empty) ``frontiers`` of a run planned by
        ``plans`` whose ``done`` sites are complete; None (the frontiers left empty) when
        there is no usable one and the run replays from the start."""
        state = self._state(plans, frontiers)
        if state is None:
            return None
        k = state["segment"]
        before = [s for seg in plans[0].segments[:k + 1] if seg.barrier is not None
                  for s in groups[seg.barrier]]
        if any(s.fqn not in done for s in before):
            log.warning("fxcompress: frontier snapshot in %s not used: layers it follows are "
                        "not among the completed ones; replaying the completed layers",
                        self.folder)
            return None
        try:
            self._load(state, plans, frontiers)
        except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
            for f in frontiers:
                f.clear()
            log.warning("fxcompress: frontier snapshot in %s damaged (%s); replaying the "
                        "completed layers", self.folder, e)
            return None
        log.info("fxcompress: continuing after segment %d of %d from the frontier snapshot",
                 k + 1, len(plans[0].segments))
        return Restored(k, before)

    def _state(self, plans: Sequence[Liveness], frontiers: Sequence[Frontier]
               ) -> dict[str, Any] | None:
        """The snapshot's state, if it was made for this plan of the run."""
        try:
            inside_folder(self.folder.parent, self.folder.name, OSError, "the snapshot folder")
            state = json.loads((self.folder / self.STATE).read_text())
            k = state["segment"]
            same = k < len(plans[0].segments) and state["chunks"] == frontiers[0].chunks \
                and len(state["paths"]) == len(frontiers) \
                and all(p["keep"] == [n.name for n in plan.segments[k].keep]
                        for p, plan in zip(state["paths"], plans, strict=True))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("fxcompress: frontier snapshot in %s unreadable (%s); replaying the "
                        "completed layers", self.folder, e)
            return None
        if not same:
            log.warning("fxcompress: frontier snapshot in %s not used: it was made for another "
                        "plan of the run; replaying the completed layers", self.folder)
            return None
        return state

    def _load(self, state: dict[str, Any], plans: Sequence[Liveness],
              frontiers: Sequence[Frontier]) -> None:
        """Each path's saved values into its frontier (a disk frontier: copies, checked as
        far as mmap reads them)."""
        k = state["segment"]
        for i, (p, f) in enumerate(zip(state["paths"], frontiers, strict=True)):
            nodes = {n.name: n for n in plans[i].segments[k].keep}
            for name in p["nodes"]:
                if name not in nodes:  # before its name makes a path
                    raise KeyError(f"{name!r} is not a value the run keeps there")
                slots = []
                for c in range(f.chunks):
                    src = inside_folder(self.folder, f"{i}.{name}.{c}.pt", OSError,
                                        f"{self.folder / self.STATE}: node {name!r}")
                    if f.spill is not None:
                        slots.append(f.spill / src.name)
                        shutil.copyfile(src, slots[-1])
                        torch.load(slots[-1], mmap=True, weights_only=True)
                    else:
                        slots.append(torch.load(src, weights_only=True,
                                                map_location=f.device or "cpu"))
                f.values[nodes[name]] = slots

    def remove(self) -> None:
        for folder in (self.folder, self.folder.with_name(self.folder.name + ".tmp")):
            shutil.rmtree(folder, ignore_errors=True)

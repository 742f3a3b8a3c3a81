"""calibrate: run the captured graph over the calibration data and compress each site in turn.

The graph is interpreted *node by node over all calibration chunks*, not sample by sample
through the whole model: when the interpreter reaches the first linear that reads some
activation X, every chunk's X is available, so the layer Hessian ``H = 2XᵀX/n`` is complete;
all linears reading X (q/k/v, gate/up) are compressed with that one H, and the interpreter
continues with their compressed weights. Every later layer therefore sees the errors of the
layers before it (true-sequential, at the granularity of single linears), and each node runs
exactly once per chunk: one forward pass in all, where layer-wise calibrate-then-propagate
schemes run two per layer.

With dense-output calibration (a method's ``dense_output``), a second, *dense* frontier runs
the same segments with the original weights next to the compressed one, so that at each
barrier both the compressed model's inputs X̃ and the dense model's inputs X are complete: the
methods that ask for it get the cross moment ``2 (X - X̃)ᵀX̃ / n`` besides ``H = 2X̃ᵀX̃ / n``
(what a method needs is its own declaration, ``Method.needs``). Where the weights reading X
have fewer than half as many outputs as inputs (an MLP's down projection), it is gathered as
``W C = 2 ((X − X̃)Wᵀ)ᵀX̃ / n``, the form the solve uses (:func:`output_cross`).

Between two such barriers the nodes run chunk-major (chunk by chunk through the whole
segment), so only values that cross a barrier are held for all chunks at once; everything is
freed after its last use, and only the nodes that lead to some site's input run at all (the
language-model head of a decoder whose head is not compressed never runs).

The same loop scales past one process's memory and one process. Three small seams make that
possible without changing the in-memory path:

* **where parameters come from** — by default the captured program's own tensors; when the
  program was captured on the meta device, a :class:`WeightSource` loads each parameter just
  before the first segment that reads it and the loop drops it after its last use
  (``fxcompress.streaming`` reads them from safetensors files);
* **where the frontier lives** — values that cross a barrier are kept per chunk as they are,
  on CPU (``offload="cpu"``: moved to the compute device op by op as nodes read them) or on
  disk (``offload="disk"``);
* **who reduces H and who solves** — a :class:`Team`: :class:`Local` here, or
  ``fxcompress.distributed.Distributed``, whose ranks run disjoint chunks, sum their partial
  Hessians, split the solves by cost and share the results, so that every rank continues
  with the same compressed weights.

Results can be handed to a ``sink`` as they are made instead of being returned (a streamed
checkpoint writer), and sites already compressed by an interrupted run can be given as
``done``: the loop replays their forward with the stored weights and solves nothing for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ..algorithms import Compressed, Cross, Hessian, OutputCross, Statistics, WeightedCross
from ..kernels.ops import activation
from ..modules import EXPERT_BANKS, experts_activation
from ..paths import inside_folder
from ..recipe import CROSS, HESSIAN, Method
from . import liveness, owl
from .liveness import PRICE, Costs, Liveness, SegmentMemory, plan_of_schedule
from .sites import Site, weight_path

log = logging.getLogger(__name__)
OFFLOAD = (None, "cpu", "disk")
FIRST, SECOND = EXPERT_BANKS  # an experts block's projections: gate_up, then down


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


# ============================================================================ the seams


def _libc_trim() -> Any:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _libc_trim()


TRIM_SLACK = 256 << 20  # the most the heap may grow inside a calibration run between trims
_trimmed_at = 0  # resident bytes after the last trim


def trim_slack(estimate: int, budget: int | str | None) -> int:
    """How far a run lets the resident set grow past the last trim (see
    :func:`release_freed_memory`): not at all under a memory budget; else a quarter of its
    estimated peak, at most ``TRIM_SLACK``, so that the peak stays within the estimate's 25 %."""
    return 0 if budget is not None else min(TRIM_SLACK, estimate // 4)


def release_freed_memory(slack: int = 0) -> None:
    """Hand memory freed by tensors back to the OS (glibc keeps freed blocks below its
    dynamic mmap threshold — up to 32 MiB each — in its heap, where they count as RSS).

    With ``slack``, only once the resident set has grown by more than that since the last
    trim: a trimmed block is faulted in again page by page when the next chunk reuses it,
    and trimming after every chunk spent 15 % of a SparseGPT run in the kernel (SmolLM2,
    32 samples, 4 KiB pages: 13 M page faults, 21 s of 145; with 256 MiB of slack 5 M, 8 s)."""
    global _trimmed_at
    if _TRIM is None or slack and resident_bytes() <= _trimmed_at + slack:
        return
    _TRIM(0)
    _trimmed_at = resident_bytes()


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (clean file pages are dropped)


def file_mapped(tensors: Sequence[Tensor]) -> list[bool]:
    """Whether each tensor lies in a private mapping of a regular file (Linux
    ``/proc/self/maps``; all False elsewhere). transformers maps a safetensors checkpoint
    this way when it loads it at its stored dtype: such a weight's pages are the file's
    until something writes to them."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return [False] * len(tensors)
    ranges = []
    for line in lines:  # "lo-hi perms offset dev inode path"
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("p") and fields[4] != "0" \
                and fields[5].startswith("/") and not fields[5].startswith("/dev/"):
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((lo, hi))

    def mapped(t: Tensor) -> bool:
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            return False
        a = t.data_ptr()
        return any(lo <= a and a + t.numel() * t.element_size() <= hi for lo, hi in ranges)
    return [mapped(t) for t in tensors]


def page_out(t: Tensor) -> None:
    """Give this process's pages of ``t`` back (``madvise(MADV_PAGEOUT)``, whole pages inside
    it only). Values are kept: a clean file page is read from the file again if touched, and a
    written one stays (without swap) or is swapped. Nothing happens where madvise is missing."""
    import ctypes
    import mmap

    global _madvise
    if _madvise is None:
        try:
            _madvise = ctypes.CDLL(None, use_errno=True).madvise
            _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return
    a, b = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    a, b = -(-a // mmap.PAGESIZE) * mmap.PAGESIZE, b // mmap.PAGESIZE * mmap.PAGESIZE
    if b > a and _madvise(a, b - a, _MADV_PAGEOUT) != 0:
        log.debug("madvise(MADV_PAGEOUT) failed (errno %d): pages kept", ctypes.get_errno())


_madvise: Any = None


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 where there is
    none): what the memory estimate adds for the program and modules a run has built before
    it estimates."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError, ImportError):
        return 0


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


# ============================================================================ the schedule


@dataclass
class Schedule:
    """Which nodes run, in what order, where the barriers are and when values die."""

    order: list[fx.Node]  # nodes that run, in graph order (no placeholders, no output)
    position: dict[fx.Node, int]
    last_use: dict[fx.Node, int]  # position of the last reader (-1: none); placeholders too
    barriers: list[tuple[int, fx.Node]]  # (position, input): compress before that node
    groups: dict[fx.Node, list[Site]]  # input -> the sites reading it
    # input -> values held for all chunks at its barrier (see :func:`schedule`)
    pinned: dict[fx.Node, set[fx.Node]] = field(default_factory=dict)

    def groups_of(self, module: str, index: int) -> list[Site]:
        """The scheduled sites of one expert of one experts module."""
        return [s for g in self.groups.values() for s in g
                if s.index == index and s.module_name == module]

    def segments(self) -> list[tuple[int, int, fx.Node | None]]:
        """``(start, end, input compressed at end)``; the last segment ends with no barrier."""
        out, start = [], 0
        for pos, x in self.barriers:
            out.append((start, pos, x))
            start = pos
        out.append((start, len(self.order), None))
        return out


def _ancestors(targets: set[fx.Node]) -> set[fx.Node]:
    seen, stack = set(), list(targets)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def schedule(gm: fx.GraphModule, sites: Sequence[Site], plan: Mapping[str, Method]) -> Schedule:
    """The interpretation schedule of ``gm`` for the sites named in ``plan``.

    The nodes that read an expert parameter on its way to the matmul (a transpose, an index by
    expert id) are moved to just before the matmul, so that they run after the experts are
    compressed and read the compressed weights.

    A group with experts is *pinned*: its input, its routing and (for a second projection)
    the first projection's input are held for all chunks at its barrier, and its statistics
    are made there from them (:meth:`_Run.statistics`) rather than chunk by chunk as the
    segment runs. Per-expert Hessians could stream, but the all-token rule of an expert
    routed too few rows is only known to apply once every chunk is seen, and it reads these
    values again (the second projection's through the compressed first one)."""
    nodes = list(gm.graph.nodes)
    groups: dict[fx.Node, list[Site]] = {}
    late: dict[fx.Node, fx.Node] = {}  # weight-path node -> the matmul it feeds
    for s in sites:
        if s.fqn in plan:
            groups.setdefault(s.input, []).append(s)
            late.update({n: s.matmul for n in weight_path(s)})
    routing = {s.routing for g in groups.values() for s in g if s.routing is not None}
    feeders = {(s.module_name, s.index): s.input for g in groups.values() for s in g
               if s.index is not None and s.attr == FIRST}
    needed = _ancestors(set(groups) | routing)
    base = [n for n in nodes if n in needed and n.op not in ("placeholder", "output")]
    pending: dict[fx.Node, list[fx.Node]] = {}
    for n in base:
        if n in late:
            pending.setdefault(late[n], []).append(n)
    order = []
    for n in base:
        if n not in late:
            order += pending.pop(n, []) + [n]
    order += [n for ns in pending.values() for n in ns]
    position = {n: i for i, n in enumerate(order)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    last_use = {n: max((position.get(u, -1) for u in n.users), default=-1)
                for n in placeholders + order}
    barriers: list[tuple[int, fx.Node]] = []
    pinned: dict[fx.Node, set[fx.Node]] = {}
    for x, group in groups.items():
        runs = [position[s.node] for s in group if s.node in position]
        pos = min(runs, default=position.get(x, -1) + 1)
        barriers.append((pos, x))
        if runs:  # read again by its compressed sites (unless nothing needs their outputs)
            last_use[x] = max(last_use[x], pos)
        if all(s.index is None for s in group):
            continue
        pins = pinned[x] = {x} | {s.routing for s in group if s.routing is not None}
        for s in group:  # the all-token rows of a second projection start from the first's
            first = feeders.get((s.module_name, s.index)) if s.attr == SECOND else None
            if first is not None:
                pins.add(first)
        for v in pins:
            last_use[v] = max(last_use[v], pos)
    barriers.sort(key=lambda b: b[0])
    return Schedule(order, position, last_use, barriers, groups, pinned)


# ============================================================================ values


def _to(value: Any, device: torch.device | str) -> Any:
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

    def put(self, node: fx.Node, chunk: int, value: Any) -> None:
        slots = self.values.setdefault(node, [None] * self.chunks)
        if self.offload == "cpu":
            value = _to(value, "cpu")
        elif self.offload == "disk" and _has_tensor(value):
            path = Path(self._tmp.name) / f"{node.name}.{chunk}.pt"
            torch.save(_to(value, "cpu"), path)
            value = path
        slots[chunk] = value

    def get(self, node: fx.Node, chunk: int) -> Any:
        value = self.values[node][chunk]
        if isinstance(value, Path):
            value = torch.load(value, mmap=True, weights_only=True)
        return value if self.device is None else _to(value, self.device)

    def release(self, node: fx.Node, chunk: int) -> None:
        """Forget chunk ``chunk``'s value of ``node`` (read for the last time)."""
        value, self.values[node][chunk] = self.values[node][chunk], None
        if isinstance(value, Path):
            value.unlink(missing_ok=True)

    def drop(self, node: fx.Node) -> None:
        for value in self.values.pop(node):
            if isinstance(value, Path):
                value.unlink(missing_ok=True)

    def close(self) -> None:
        for node in list(self.values):
            self.drop(node)
        if self._tmp is not None:
            shutil.rmtree(self._tmp.name, ignore_errors=True)


class Snapshots:
    """The frontier of a run saved now and then, so that an interrupted run continues from the
    last snapshot instead of replaying the forward of every layer it completed (at 7B, two
    minutes of CPU a layer).

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

    def save(self, k: int, run: _Run, frontiers: Sequence[Frontier]) -> None:
        """Snapshot the frontier after segment ``k``."""
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
                        torch.save(_to(value, "cpu"), dest)
            paths.append({"nodes": [n.name for n in f],
                          "keep": [n.name for n in run.plans[i].segments[k].keep]})
        state = {"segment": k, "chunks": frontiers[0].chunks, "paths": paths}
        (tmp / self.STATE).write_text(json.dumps(state))
        shutil.rmtree(old, ignore_errors=True)
        if self.folder.exists():
            self.folder.rename(old)
        tmp.rename(self.folder)
        shutil.rmtree(old, ignore_errors=True)
        self.last = time.monotonic()
        log.debug("frontier snapshot after segment %d in %s", k, self.folder)

    def restore(self, run: _Run, frontiers: Sequence[Frontier]) -> int:
        """Load the last snapshot into the (empty) ``frontiers`` and make ``run`` compute with
        the stored weights of the sites before it; the segment to continue with (0: none
        usable, the frontiers left empty)."""
        live, sched, plans = run.live, run.sched, run.plans
        try:
            inside_folder(self.folder.parent, self.folder.name, OSError, "the snapshot folder")
            state = json.loads((self.folder / self.STATE).read_text())
            k = state["segment"]
            same = k < len(live.segments) and state["chunks"] == frontiers[0].chunks \
                and len(state["paths"]) == len(frontiers) \
                and all(p["keep"] == [n.name for n in plan.segments[k].keep]
                        for p, plan in zip(state["paths"], plans, strict=True))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("fxcompress: frontier snapshot in %s unreadable (%s); replaying the "
                        "completed layers", self.folder, e)
            return 0
        before = [s for seg in live.segments[:k + 1] if seg.barrier is not None
                  for s in sched.groups[seg.barrier]]
        why = "it was made for another plan of the run" if not same else \
            "layers it follows are not among the completed ones" \
            if any(s.fqn not in run.done for s in before) else None
        if why is not None:
            log.warning("fxcompress: frontier snapshot in %s not used: %s; replaying the "
                        "completed layers", self.folder, why)
            return 0
        try:
            for i, (p, f) in enumerate(zip(state["paths"], frontiers, strict=True)):
                nodes = {n.name: n for n in plans[i].segments[k].keep}
                for name in p["nodes"]:
                    if name not in nodes:  # before its name makes a path
                        raise KeyError(f"{name!r} is not a value the run keeps there")
                    slots = []
                    for c in range(f.chunks):
                        src = inside_folder(self.folder, f"{i}.{name}.{c}.pt", OSError,
                                            f"{self.folder / self.STATE}: node {name!r}")
                        if f.offload == "disk":  # a copy, checked as far as mmap reads it
                            slots.append(Path(f._tmp.name) / src.name)
                            shutil.copyfile(src, slots[-1])
                            torch.load(slots[-1], mmap=True, weights_only=True)
                        else:
                            slots.append(torch.load(src, weights_only=True,
                                                    map_location=f.device or "cpu"))
                    f.values[nodes[name]] = slots
        except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
            for f in frontiers:
                for n in f:
                    f.drop(n)
            log.warning("fxcompress: frontier snapshot in %s damaged (%s); replaying the "
                        "completed layers", self.folder, e)
            return 0
        run.segment = k
        for s in before:
            run.replace(s, run.done[s.fqn])
        run.firsts.clear()  # a snapshot is taken with no first projection pending
        log.info("fxcompress: continuing after segment %d of %d from the frontier snapshot",
                 k + 1, len(live.segments))
        return k + 1

    def remove(self) -> None:
        for folder in (self.folder, self.folder.with_name(self.folder.name + ".tmp")):
            shutil.rmtree(folder, ignore_errors=True)


class Params:
    """The program's non-input placeholders: real ones as they are, meta ones (a program
    captured from a model on the meta device) loaded from ``source`` while needed."""

    def __init__(self, ep: ExportedProgram, static: dict[fx.Node, Any],
                 source: WeightSource | None):
        self.static = {n: v for n, v in static.items()
                       if not (isinstance(v, Tensor) and v.is_meta)}
        lazy = [n for n in static if n not in self.static]
        if lazy and source is not None:  # buffers the checkpoint lacks join the weights
            self.static = {n: _to(v, source.device) for n, v in self.static.items()}
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


class _ChunkEnv(dict):
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


_aten = torch.ops.aten
# elementwise op -> its in-place variant, and the argument positions that may take the result
_IN_PLACE = {
    _aten.add.Tensor: (_aten.add_.Tensor, (0, 1)),
    _aten.mul.Tensor: (_aten.mul_.Tensor, (0, 1)),
    _aten.sub.Tensor: (_aten.sub_.Tensor, (0,)),
    _aten.div.Tensor: (_aten.div_.Tensor, (0,)),
    _aten.add.Scalar: (_aten.add_.Scalar, (0,)),
    _aten.mul.Scalar: (_aten.mul_.Scalar, (0,)),
    _aten.pow.Tensor_Scalar: (_aten.pow_.Scalar, (0,)),
    _aten.silu.default: (_aten.silu_.default, (0,)),
    _aten.neg.default: (_aten.neg_.default, (0,)),
    _aten.rsqrt.default: (_aten.rsqrt_.default, (0,)),
}
# references to a value that only the chunk's env holds, as `_Interpreter._reusable` counts
# them: the env, the args tuple, its local name and getrefcount's own argument
_SOLE_REFS = 4
_ATTENTION = torch.ops.aten.scaled_dot_product_attention.default


class _Interpreter(fx.Interpreter):
    """Runs single nodes; linears being compressed compute with their compressed weight.

    An elementwise op whose tensor input dies with it (``dying``: read for the last time in
    the chunk) writes its result into that input. Each chunk's temporaries are otherwise fresh
    allocations, and once the heap is trimmed (:func:`release_freed_memory`) each one is faulted in
    again: on
    SmolLM2 w4 (32 samples) elementwise results took 9 of the run's 15 M page faults. The
    values are the same: the same kernel computes them.

    With ``bf16`` (the run's precision, :func:`matmul_precision`) attention on CPU float32
    inputs computes in bf16, its two products being what oneDNN's setting leaves out; the
    result comes back as float32."""

    def __init__(self, gm: fx.GraphModule, bf16: bool = False):
        super().__init__(gm, garbage_collect_values=False)
        self.replaced: dict[fx.Node, tuple[int, Tensor]] = {}
        self.dying: Sequence[fx.Node] = ()
        self.bf16 = bf16

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if self.bf16 and target is _ATTENTION and args[0].dtype == torch.float32 \
                and args[0].device.type == "cpu":
            def half(a: Any) -> Any:
                return a.bfloat16() if isinstance(a, Tensor) and a.is_floating_point() else a

            args, kwargs = tuple(map(half, args)), {k: half(v) for k, v in kwargs.items()}
            return super().call_function(target, args, kwargs).float()
        return super().call_function(target, args, kwargs)

    def run_node(self, n: fx.Node):
        if n not in self.replaced:
            if n.target in _IN_PLACE and self.dying:
                with self._set_current_node(n):
                    args, kwargs = self.fetch_args_kwargs_from_env(n)
                    in_place, positions = _IN_PLACE[n.target]
                    for i in positions:
                        if self._reusable(n, i, args):
                            if i:  # add and mul commute exactly
                                args = (args[1], args[0], *args[2:])
                            return in_place(*args, **kwargs)
                    return self.call_function(n.target, args, kwargs)
            return super().run_node(n)
        position, weight = self.replaced[n]
        with self._set_current_node(n):
            args = n.args[:position] + (weight,) + n.args[position + 1:]
            args, kwargs = fx.node.map_arg((args, n.kwargs), lambda a: self.env[a])
            return self.call_function(n.target, args, kwargs)

    def _reusable(self, n: fx.Node, i: int, args: tuple) -> bool:
        """Whether ``args[i]`` may take ``n``'s result: a contiguous float tensor of the chunk
        that nothing else holds, read for the last time here, with the result's shape and
        dtype."""
        a, env = n.args[i] if i < len(n.args) else None, self.env
        if not isinstance(a, fx.Node) or a not in self.dying or not dict.__contains__(env, a) \
                or a in env.kept or a in env.params:
            return False
        t, other = args[i], args[1 - i] if len(args) > 1 else None
        if i and n.kwargs.get("alpha", 1) != 1:  # a + alpha * b: only a may take it
            return False
        # floats only: int / int and rsqrt(int) make floats
        if not isinstance(t, Tensor) or not t.is_floating_point() or not t.is_contiguous() \
                or t.requires_grad:
            return False
        if isinstance(other, Tensor):
            if torch.broadcast_shapes(t.shape, other.shape) != t.shape or \
                    torch.result_type(t, other) != t.dtype or other.device != t.device:
                return False
        elif other is not None and torch.result_type(t, other) != t.dtype:
            return False
        return sys.getrefcount(t) == _SOLE_REFS and \
            torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2  # no view of it


def _flat_inputs(ep: ExportedProgram, chunks: Sequence[tuple[tuple, dict]]) -> list[list]:
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    flat = []
    for i, (args, kwargs) in enumerate(chunks):
        try:
            values = ep._graph_module_flat_inputs(args, kwargs)
        except Exception as e:
            raise ValueError(f"calibration batch {i} does not have the structure of the "
                             f"captured inputs {user}: {e}") from e
        for node, value in zip(placeholders, values, strict=True):
            _check_input(node, value, i)
        flat.append(values)
    return flat


def _check_input(node: fx.Node, value: object, index: int) -> None:
    expected = node.meta.get("val")
    if not isinstance(expected, torch.Tensor) or not isinstance(value, torch.Tensor):
        return
    static = [d if isinstance(d, int) else None for d in expected.shape]
    shape_ok = value.dim() == len(static) and all(
        s is None or s == v for s, v in zip(static, value.shape, strict=True))
    if not shape_ok or value.dtype != expected.dtype:
        want = tuple("*" if s is None else s for s in static)
        raise ValueError(f"calibration batch {index}: input {node.name!r} has shape "
                         f"{tuple(value.shape)} and dtype {value.dtype}, the captured graph "
                         f"expects shape {want} (* = any) and dtype {expected.dtype}")


# ============================================================================ the pass


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


@dataclass
class _Run:
    """State of one calibration run."""

    sched: Schedule
    plan: Mapping[str, Method]
    params: Params
    kept: Frontier
    dense: Frontier | None  # the dense model's frontier, for dense-output calibration
    interp: _Interpreter
    team: Team
    done: Mapping[str, Compressed]
    sink: Callable[[Site, Compressed, LayerReport], None] | None
    on_statistics: Callable[[str, Statistics], None] | None
    bar: Any
    live: Liveness
    dense_live: Liveness | None = None  # the dense path's plan (None: ``live``)
    results: dict[str, Compressed] = field(default_factory=dict)
    sums: dict[str, Hessian] = field(default_factory=dict)  # statistics of the next barrier
    segment: int = 0  # the segment running or just run
    routed: dict[tuple[fx.Node, int], int] = field(default_factory=dict)  # rows per expert
    firsts: dict[str, Tensor] = field(default_factory=dict)  # compressed gate_up per block
    reports: list[LayerReport] = field(default_factory=list)
    data_free: bool = False  # no site needs activations: nothing is run, nothing replaced
    unfolded: list[tuple[Site, Compressed]] = field(default_factory=list)  # see fold()
    # weights mapped from a file -> their sites still to finish (see page_out())
    mapped: dict[fx.Node, set[str]] = field(default_factory=dict)
    precision: str = "fp32"  # of the passes' matmuls, not the solves' (matmul_precision())
    trim_slack: int = 0  # heap growth allowed between trims (release_freed_memory())

    @property
    def plans(self) -> list[Liveness]:
        """The plan of each path: the compressed one, and the dense one's with dense-output."""
        return [self.live] + ([self.dense_live or self.live] if self.dense is not None else [])

    @functools.cached_property
    def last_read(self) -> dict[fx.Node, int]:
        """The last segment that reads each value or parameter, on either path."""
        last: dict[fx.Node, int] = {}
        for plan in self.plans:
            for n, k in plan.last_segment.items():
                last[n] = max(last.get(n, -1), k)
        return last

    def run_segment(self, k: int) -> None:
        """Segment ``k`` of the liveness plan, chunk by chunk: run its nodes (recomputed ones
        included), accumulate the statistics of its barrier input as each chunk produces it,
        and hand on its frontier. With a dense frontier, each chunk runs a second time with
        the original weights, through the dense path's own segment ``k`` (which may run on
        past the barrier: :func:`~fxcompress.passes.liveness.dense_segments`), and the cross
        moment takes both."""
        interp, replaced = self.interp, self.interp.replaced
        # the dense path computes with the originals
        paths = list(zip([self.kept, self.dense], [replaced, {}], self.plans, strict=False))
        x = self.live.segments[k].barrier
        needs = self._needs(x)
        self.params.fetch({a for _, weights_of, live in paths for n in live.segments[k].run
                           for a in n.all_input_nodes if self.params.lazy(a)
                           and not (weights_of and self._replaced_weight(n, a))})
        steps = []
        for kept, weights_of, live in paths:
            seg, before = live.segments[k], set(live.frontier_before(k))
            steps.append((kept, weights_of, seg, [n for n in seg.keep if n not in before],
                          [n for n in before - set(seg.keep) if n in kept]))
        chunks = self.kept.chunks if any(seg.run for *_, seg, _, _ in steps) or needs else 0
        with matmul_precision(self.precision):
            for c in range(chunks):
                xs = []
                for kept, weights_of, seg, handed, _ in steps:
                    interp.replaced = weights_of
                    interp.env = env = _ChunkEnv(c, kept, self.params)
                    for n, free in zip(seg.run, seg.free, strict=True):
                        interp.dying = free
                        env[n] = interp.run_node(n)
                        for a in free:
                            env.pop(a, None)
                    if needs:
                        xs.append(env[x])
                    for n in handed:
                        kept.put(n, c, env[n])
                    interp.env = env = None
                for kept, _, _, _, spent in steps:
                    for n in spent:  # the frontier shrinks as it grows: chunk by chunk
                        kept.release(n, c)
                if needs:
                    self._accumulate(x, needs, *xs)
                del xs
                release_freed_memory(self.trim_slack)
        interp.env, interp.replaced, interp.dying = {}, replaced, ()
        for kept, _, seg, _, _ in steps:
            for n in [n for n in kept if n not in seg.keep]:
                kept.drop(n)
        for n in [n for n in replaced if self.live.last_segment.get(n, -1) <= k]:
            del replaced[n]
        self.params.release(self.last_read, k)
        self.fold()

    def _replaced_weight(self, node: fx.Node, arg: fx.Node) -> bool:
        return node in self.interp.replaced and \
            node.args[self.interp.replaced[node][0]] is arg

    def _needs(self, x: fx.Node | None) -> frozenset[str]:
        """The statistics of ``x`` that its sites still to solve need, accumulated as the
        chunks run (none for a pinned group: :meth:`statistics` makes them at the barrier)."""
        if x is None or x in self.sched.pinned:
            return frozenset()
        todo = [s for s in self.sched.groups[x] if s.fqn not in self.done]
        return frozenset().union(*(self.plan[s.fqn].needs() for s in todo))

    def _accumulate(self, x: fx.Node, needs: frozenset[str], x_tilde: Tensor,
                    x_dense: Tensor | None = None) -> None:
        """Add one chunk of ``x`` to this process's partial sums (made on the values' device):
        the cross moment as ``C``, or as each site's ``W C`` (:func:`output_cross`)."""
        if not self.sums:
            features, device = x_tilde.shape[-1], x_tilde.device
            self.sums[HESSIAN] = Hessian.zeros(features, device)
            if CROSS in needs:
                todo = [s for s in self.sched.groups[x]
                        if s.fqn not in self.done and CROSS in self.plan[s.fqn].needs()]
                if output_cross(todo):
                    for s in todo:
                        self.sums[f"{CROSS}:{s.fqn}"] = OutputCross(self.weight(s).to(device))
                else:
                    self.sums[CROSS] = Cross.zeros(features, device)
        for key, sums in self.sums.items():
            if key == HESSIAN:
                sums.add(x_tilde)
            else:
                sums.add(x_tilde, x_dense)

    def statistics(self, x: fx.Node, todo: list[Site]) -> dict[int | None, dict[str, Hessian]]:
        """This process's partial sums of what the sites still to solve need of ``x``: one set
        for the linears reading it (key None), one per expert of an experts matmul (key: the
        expert), from the rows routed to that expert. Made at the barrier from the frontier,
        for pinned groups (see :func:`schedule`); the others were accumulated as the chunks
        ran (:meth:`_accumulate`)."""
        if x not in self.sched.pinned:
            sums, self.sums = self.sums, {}
            return {None: sums} if sums else {}
        todo = [s for s in todo if self.plan[s.fqn].needs()]
        if not todo:
            return {}
        needs = frozenset().union(*(self.plan[s.fqn].needs() for s in todo))
        device = self.kept.device or self.kept.get(x, 0).device
        keys = {s.index: s for s in todo}
        sums = {k: {HESSIAN: Hessian.zeros(s.shape[1], device)} for k, s in keys.items()}
        # experts keep the plain objective even with dense_output: the dense model routes
        # tokens to other experts, so an expert has no dense output on the same rows to fit
        if CROSS in needs and None in keys:
            sums[None][CROSS] = Cross.zeros(keys[None].shape[1], device)
        for c in range(self.kept.chunks):
            x_tilde = self.kept.get(x, c)
            for k, s in keys.items():
                routing = None if s.routing is None else self.kept.get(s.routing, c)
                sums[k][HESSIAN].add(s.rows(x_tilde, routing))
                if CROSS in sums[k]:
                    sums[k][CROSS].add(x_tilde, self.dense.get(x, c))
        return sums

    def device(self, s: Site) -> torch.device:
        """Where ``s``'s weight (and so its compressed replacement) lives."""
        w = s.param
        return self.params.source.device if w.is_meta else w.device

    def weight(self, s: Site) -> Tensor:
        """``s``'s weight as ``(out, in)`` float32."""
        if not s.param.is_meta:
            return s.matrix(s.param.detach()).float()
        # an expert reads only its own slice of the bank, not the whole bank once per expert
        w = self.params.load(s.weight, s.index)
        return (w.t() if s.transposed else w).float()

    def all_tokens(self, x: fx.Node, s: Site, names: str) -> Hessian:
        """The Hessian of expert ``s`` over *every* token of its block: the rule for an expert
        routed fewer rows than it has input features, whose routed Hessian is rank-deficient
        (measured better than the routed rows alone: benchmarks/RESULTS.md). The first
        projection reads all rows of its input; the second, the gated activation of the
        compressed first projection of the same expert on all of them."""
        h = Hessian.zeros(s.shape[1], self.kept.device or self.kept.get(x, 0).device)
        for c in range(self.kept.chunks):
            if s.attr == FIRST:
                h.add(self.kept.get(x, c).reshape(-1, s.shape[1]))
                continue
            first = next(f for f in self.sched.groups_of(s.module_name, s.index) if
                         f.attr == FIRST)
            rows = self.kept.get(first.input, c).reshape(-1, first.shape[1])
            w = first.matrix(self.firsts[first.module_name])
            gate, up = torch.nn.functional.linear(rows, w.to(rows.dtype)).chunk(2, dim=-1)
            h.add(activation(experts_activation(s.module), gate) * up)
        self.team.reduce(h, names)
        log.info("%s: %d routed rows < %d input features, Hessian from all %d rows of the "
                 "block", s.fqn, self.routed[(x, s.index)], s.shape[1], h.count)
        return h

    def solve(self, s: Site, stats: Statistics | None) -> tuple[Compressed, LayerReport]:
        t = time.perf_counter()
        method = self.plan[s.fqn]
        if stats is not None and stats.cross is not None and CROSS not in method.needs():
            stats = dataclasses.replace(stats, cross=None)  # a group's sites may differ
        c = method.solve(self.weight(s), stats, s.fqn)
        seconds = time.perf_counter() - t
        count = stats.count if stats is not None else 0
        routed = self.routed.get((s.input, s.index), count) if s.index is not None else None
        report = LayerReport(s.fqn, type(method).__name__, s.shape, c.loss, seconds, count,
                             self.team.rank, routed, pruned_fraction(method))
        log.debug("compressed %s with %s: loss %.4g in %.2fs", s.fqn, method, c.loss, seconds)
        return c, report

    def compress_group(self, x: fx.Node) -> None:
        """Complete H of ``x``, compress its sites (spread over the team), and make the
        interpreter compute with the compressed weights from now on."""
        group = self.sched.groups[x]
        todo = [s for s in group if s.fqn not in self.done]
        names = ", ".join(s.fqn for s in group)
        with self.team.guard(names), matmul_precision(self.precision):
            sums = self.statistics(x, todo)
        stats: dict[int | str | None, Statistics] = {}  # by expert, or a site's own
        for key, parts in sums.items():
            for partial in parts.values():
                self.team.reduce(partial, names)
            h = parts[HESSIAN]
            if key is not None:
                check_routed(h, f"{names} (expert {key})")
                self.routed[(x, key)] = h.count
                if h.count < h.sum.shape[0]:
                    with matmul_precision(self.precision):
                        h = self.all_tokens(x, next(s for s in todo if s.index == key), names)
            stats[key] = Statistics(h.take(), h.count,
                                    parts[CROSS].take() if CROSS in parts else None)
            for s in todo:
                if f"{CROSS}:{s.fqn}" in parts:  # gathered as W C: this site's own statistics
                    wc = WeightedCross(parts[f"{CROSS}:{s.fqn}"].take())
                    stats[s.fqn] = dataclasses.replace(stats[key], cross=wc)
            del h
        del sums
        if self.on_statistics is not None:
            for s in group:
                if s.fqn in stats or s.index in stats:
                    self.on_statistics(s.fqn, stats.get(s.fqn, stats.get(s.index)))
        owners = self.team.owners([self.plan[s.fqn].cost(s.shape) for s in todo])
        mine: dict[str, tuple[Compressed, LayerReport]] = {}
        with self.team.guard(names) as step:
            for s, owner in zip(todo, owners, strict=True):
                if owner == self.team.rank:
                    step.layer = s.fqn
                    mine[s.fqn] = self.solve(s, stats.get(s.fqn, stats.get(s.index)))
        del stats
        shared = [(s, *self.team.share(owner, mine.pop(s.fqn, None), s.fqn))
                  for s, owner in zip(todo, owners, strict=True)]
        with self.team.guard(names) as step:
            for s, c, report in shared:
                step.layer = s.fqn
                self.finish(s, c, report)
            for s in group:
                if s.fqn in self.done and not self.data_free:
                    step.layer = s.fqn
                    self.replace(s, self.done[s.fqn])
        for s in group:
            if s.attr == SECOND:
                self.firsts.pop(s.module_name, None)

    def finish(self, s: Site, c: Compressed, report: LayerReport) -> None:
        if not self.data_free:
            self.replace(s, c)
        self.reports.append(report)
        if self.sink is not None:
            self.sink(s, c, report)
        else:
            self.results[s.fqn] = c
            if folds(s, c):
                self.unfolded.append((s, c))
                self.fold()
            elif s.index is None:  # an experts module is made of its experts' plain results
                c.compact()
        if s.weight in self.mapped:
            if self.sink is None and folds(s, c):
                del self.mapped[s.weight]  # the weight will hold the result
            else:
                self.mapped[s.weight].discard(s.fqn)
        self.bar.set_postfix_str(f"{s.fqn} loss={c.loss:.3g} {report.seconds:.2f}s")
        self.bar.update()

    def page_out(self) -> None:
        """Give back the pages of compressed weights mapped from the checkpoint file once
        every site of the weight is finished and neither path reads it any more: the run
        never reads them again and the rewrite drops them, yet the user's model loses
        nothing, as they are the file's clean pages (read again if anything touches them).
        Pages a run would otherwise keep to its end: on SmolLM2 the 30 layers' fp32 weights,
        ~440 MiB. A weight that will hold its result (:meth:`fold`) is never paged out."""
        for node in [n for n, todo in self.mapped.items()
                     if not todo and self.last_read.get(n, -1) <= self.segment]:
            del self.mapped[node]
            page_out(self.params[node])

    def replace(self, s: Site, c: Compressed) -> None:
        """Compute ``s`` with ``c``'s weight from now on, if it runs again at all (an expert:
        its slice of the parameter, the others keeping theirs until they are replaced in
        turn; a first projection always runs again when its second projection is scheduled,
        so the all-token rule finds it in ``firsts``)."""
        if self.live.last_segment.get(s.node, -1) <= self.segment:
            return
        param = s.param
        w_hat = s.stored(c.dense().to(self.device(s), param.dtype))
        if s.index is None:
            self.interp.replaced[s.node] = (s.operand, w_hat)
            return
        if s.node not in self.interp.replaced:
            value = (self.params.load(s.weight) if param.is_meta else param).detach().clone()
            self.interp.replaced[s.node] = (s.operand, value)
            if s.attr == FIRST:  # the all-token rule of the second projection reads it
                self.firsts[s.module_name] = value
        self.interp.replaced[s.node][1][s.index] = w_hat

    def fold(self) -> None:
        """Write held pruned values into their layers' own parameters once neither path reads
        the originals any more (the dense path can, after the compressed one has switched to
        the result), and let the result point at that storage: a run then holds no second
        fp32 weight per pruned layer (nor its keep-mask, when that is the weight's support),
        and the rewrite makes its ``SparseLinear`` of the same storage. The user's model
        changes in place, as ``fxcompress.compile`` says it does. (Other held results are
        compacted as they are made: :meth:`Compressed.compact`.)"""
        waiting = []
        for s, c in self.unfolded:
            if not self.data_free and self.last_read.get(s.weight, -1) > self.segment:
                waiting.append((s, c))
                continue
            param = s.param.detach()
            param.copy_(c.values)  # zero where pruned (Compressed.values)
            c.values = param
            if torch.equal(param != 0, c.mask):  # no kept weight is zero (in its dtype)
                c.mask = None  # the support is the mask: made again by the rewrite
            c.compact()
        self.unfolded = waiting


def pruned_fraction(method: Method) -> float | None:
    """The fraction of weights a pruning method removes (N:M: 1 - N/M), else None."""
    n_m = getattr(method, "n_m", None)
    if n_m is not None:
        return 1 - n_m[0] / n_m[1]
    return getattr(method, "sparsity", None)


def folds(s: Site, c: Compressed | Method) -> bool:
    """Whether a held result of ``s`` (or of its method, for the estimate) is folded into the
    site's parameter (:meth:`_Run.fold`): pruned, unquantized values of a linear owning an
    unshared, resident ``(out, in)`` weight."""
    pruned = c.values is not None if isinstance(c, Compressed) else c.prunes_in_place
    return (pruned and s.index is None and not s.transposed and not s.tied
            and not s.param.is_meta)


def held_bytes(s: Site, method: Method, in_memory: bool) -> int:
    """Bytes a run holds of ``s``'s result until its module is made: an in-memory run
    (``calibrate`` returning its results) compacts or folds them (:meth:`_Run.finish`)."""
    return method.held(s.shape, in_memory and s.index is None,
                       in_memory and folds(s, method))


def check_routed(h: Hessian, name: str) -> None:
    """An expert that no calibration token was routed to has no Hessian: that is an error
    naming it (use more or more varied calibration data, or leave its block dense), never a
    silent fallback to rounding."""
    if h.count == 0:
        raise ValueError(f"{name}: no calibration token was routed to this expert, so it has "
                         f"no Hessian. Calibrate with more (or more varied) samples, or leave "
                         f"its experts dense with a None rule")


def calibrate(
    ep: ExportedProgram,
    sites: Sequence[Site],
    plan: dict[str, Method],
    chunks: Sequence[tuple[tuple, dict]],
    *,
    progress: bool = True,
    on_statistics: Callable[[str, Statistics], None] | None = None,
    weights: WeightSource | None = None,
    team: Team | None = None,
    offload: str | None = None,
    done: Mapping[str, Compressed] | None = None,
    sink: Callable[[Site, Compressed, LayerReport], None] | None = None,
    recompute: float | None = PRICE,
    snapshots: Snapshots | None = None,
    precision: str = "fp32",
    trim_slack: int = 0,
) -> tuple[dict[str, Compressed], list[LayerReport]]:
    """Compress every site named in ``plan``; ``chunks`` are batched calls of the model
    (with a :class:`Team` of several processes: this process's share of them).

    ``recompute`` is what one byte of frontier is worth in flop-equivalents of recomputation
    (see :mod:`~fxcompress.passes.liveness`); ``None`` keeps every value later segments read.

    ``weights`` supplies the parameters a meta-device program lacks, on its ``device``;
    ``offload`` keeps the frontier on CPU or disk (see :class:`Frontier`); ``done`` holds
    results of an interrupted run to reuse, and ``snapshots`` (see :class:`Snapshots`) where
    the run saves its frontier now and then and, with ``done``, continues from the last one;
    ``sink(site, compressed, report)`` takes each result as it is made, and results given to
    it are not returned. ``precision`` is that of the matmuls of the forward passes and the
    statistics, ``"fp32"`` or ``"bf16"`` (:func:`resolve_precision`); the solves always
    compute in the statistics' float32. ``trim_slack`` is how far the resident set may grow
    past the last return of freed memory to the OS before the next (:func:`trim_slack`; 0
    trims after every chunk and solve).
    """
    if not chunks:
        raise ValueError("calibration data is empty")
    team = team or Local()
    gm = ep.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    flat = _flat_inputs(ep, chunks)
    params = Params(ep, {p: flat[0][i] for i, p in enumerate(placeholders)
                         if p.name not in user}, weights)
    _spread_sparsity(gm, sites, plan, flat[0], params, team, precision)
    device = weights.device if weights is not None else None
    if offload is not None and device is None:  # bring values back where the weights are
        device = next((v.device for v in params.static.values() if isinstance(v, Tensor)),
                      None)
    needs = frozenset().union(*(m.needs() for m in plan.values()))
    kept = Frontier(len(chunks), offload, device)
    dense = Frontier(len(chunks), offload, device) if CROSS in needs else None
    frontiers = [f for f in (kept, dense) if f is not None]
    sched = schedule(gm, sites, plan)
    live, dense_live = _plans(ep, sched, chunks[0], recompute, dense is not None)
    todo = sum(len(g) for g in sched.groups.values())
    bar = tqdm(total=todo, disable=not progress, desc="fxcompress", unit="layer")
    run = _Run(sched, plan, params, kept, dense, _Interpreter(gm, precision == "bf16"), team,
               done or {}, sink, on_statistics, bar, live, dense_live, precision=precision,
               trim_slack=trim_slack)
    bar.update(sum(1 for g in sched.groups.values() for s in g if s.fqn in run.done))
    readers: dict[fx.Node, list[Site]] = {}
    for s in sites:
        readers.setdefault(s.weight, []).append(s)
    owned = [n for n, ss in readers.items() if n in params.static
             and all(s.fqn in plan and not s.tied for s in ss)]
    run.mapped = {n: {s.fqn for s in readers[n] if s.fqn not in run.done}
                  for n, f in zip(owned, file_mapped([params.static[n] for n in owned]),
                                  strict=True) if f}
    # RTN and magnitude pruning look at the weights only: no forward pass is needed
    data_free = run.data_free = not needs
    start = snapshots.restore(run, frontiers) if snapshots and done and not data_free else 0
    if start == 0:
        used = {p for p in placeholders if p.name in user and p.users}
        for i, p in enumerate(placeholders):
            if p in used:
                for c, f in enumerate(flat):
                    for frontier in frontiers:
                        frontier.put(p, c, f[i])
    del flat
    try:
        with torch.no_grad():
            for k, seg in enumerate(live.segments[start:], start):
                x, run.segment = seg.barrier, k
                names = ", ".join(s.fqn for s in sched.groups[x]) if x is not None else "output"
                if not data_free:
                    with team.guard(f"the input of {names}"):
                        run.run_segment(k)
                    run.page_out()
                    release_freed_memory(run.trim_slack)
                if x is not None:
                    run.compress_group(x)
                    run.page_out()
                    release_freed_memory(run.trim_slack)
                    if snapshots is not None and not data_free and not run.firsts \
                            and snapshots.due():
                        snapshots.save(k, run, frontiers)
    finally:
        bar.close()
        kept.close()
        if dense is not None:
            dense.close()
    return run.results, run.reports


def _spread_sparsity(gm: fx.GraphModule, sites: Sequence[Site], plan: dict[str, Method],
                     inputs: Sequence[Any], params: Params, team: Team, precision: str) -> None:
    """OWL (:mod:`~fxcompress.passes.owl`): give each unstructured SparseGPT site its block's
    sparsity in ``plan`` (in place), from a dense run over the first chunk. Rank 0 measures
    and shares, so a team prunes as one process would on the same first chunk."""
    if not any(owl.eligible(s, plan.get(s.fqn)) for s in sites):
        return

    def norms(targets: set[fx.Node]) -> dict[fx.Node, Tensor]:
        with torch.no_grad(), matmul_precision(precision):
            return owl.column_norms(gm, inputs, params, _Interpreter(gm, precision == "bf16"),
                                    targets)

    def weight(s: Site) -> Tensor:
        w = s.param.detach() if not s.param.is_meta else params.load(s.weight)
        return s.matrix(w).float()

    moved = owl.apply(plan, sites, norms, weight) if team.rank == 0 else None
    plan.update(team.share(0, moved, "the OWL layer sparsities"))


def _plans(ep: ExportedProgram, sched: Schedule, chunk: tuple[tuple, dict],
           recompute: float | None, dense: bool) -> tuple[Liveness, Liveness | None]:
    """The liveness plan of the compressed path and, with dense-output, the dense path's (its
    segments run on past the barriers: :func:`~fxcompress.passes.liveness.dense_segments`)."""
    live = plan_of_schedule(ep, sched, chunk, recompute)
    return live, plan_of_schedule(ep, sched, chunk, recompute, dense=True) if dense else None


def output_cross(group: Sequence[Site]) -> bool:
    """Whether the cross moment of ``group``'s input is gathered as ``W C`` per weight
    (:class:`~fxcompress.algorithms.OutputCross`) instead of ``C``: when the weights have
    fewer than half as many rows in all as columns, so that ``2 · out · in`` multiply-adds a
    token cost less than ``in²`` (an MLP's down projection: 0.75x on SmolLM2, 0.74x on
    Llama-2-7B's shapes)."""
    return bool(group) and all(s.kind == "linear" and s.index is None for s in group) and \
        2 * sum(s.shape[0] for s in group) < group[0].shape[1]


# ============================================================================ the estimate


def estimate_memory(ep: ExportedProgram, sites: Sequence[Site], plan: dict[str, Method],
                    chunks: Sequence[tuple[tuple, dict]], *, offload: str | None = None,
                    weights: WeightSource | None = None, keep_results: bool = True,
                    recompute: float | None = PRICE) -> list[SegmentMemory]:
    """Peak bytes :func:`calibrate` will hold in each segment with the same arguments, from
    the same liveness plan it runs: frontier, one chunk's values, statistics, the solves,
    parameters streamed from ``weights`` and the results it holds (``keep_results``: they
    are returned rather than handed to a sink)."""
    _flat_inputs(ep, chunks)  # a malformed batch: calibrate's error naming it, before any work
    sched = schedule(ep.graph_module, sites, plan)
    needs = frozenset().union(*(m.needs() for m in plan.values()))
    live, dense_live = _plans(ep, sched, chunks[0], recompute, CROSS in needs)
    binds = [liveness.symbols(ep, c) for c in chunks]
    specs = {s.arg.name: s.target for s in ep.graph_signature.input_specs}
    site_weights = {s.weight for s in sites}

    @functools.cache
    def chunk_bytes(n: fx.Node, c: int) -> int:
        return liveness.value_bytes(n, binds[c])

    def loaded(p: fx.Node) -> int:
        if weights is None or p.op != "placeholder" or specs.get(p.name) is None:
            return 0
        meta = p.meta.get("val")
        if not (isinstance(meta, Tensor) and meta.is_meta) or p in site_weights \
                and CROSS not in needs:
            return 0
        return weights.nbytes(specs[p.name])

    def solve(s: Site) -> int:  # a meta parameter is read to solve (an expert: its slice)
        w, param = s.shape[0] * s.shape[1], s.param
        stored = w * param.dtype.itemsize if param.is_meta else 0
        as_fp32 = 4 * w if param.dtype != torch.float32 else 0
        return stored + as_fp32 + plan[s.fqn].workspace(s.shape)

    def statistics(x: fx.Node) -> int:  # one set of sums per expert of an experts group
        keys = {s.index: s for s in sched.groups[x] if s.fqn in plan and plan[s.fqn].needs()}
        stats = frozenset().union(*(plan[s.fqn].needs() for s in sched.groups[x]))
        cross = [s for s in sched.groups[x] if s.fqn in plan and CROSS in plan[s.fqn].needs()]
        if x not in sched.pinned and output_cross(cross):  # H, W C and W in float32
            return 4 * cross[0].shape[1] * (cross[0].shape[1] + 2 * sum(s.shape[0] for s in cross))
        return sum(4 * s.shape[1] ** 2 for s in keys.values()) * len(stats)

    costs = Costs(
        chunk_bytes, len(chunks), offload, CROSS in needs, loaded, solve,
        result=lambda s: held_bytes(s, plan[s.fqn], keep_results), keep_results=keep_results,
        replaced=lambda s: s.shape[0] * s.shape[1] * s.param.dtype.itemsize,
        statistics=statistics, op_workspace=lambda n, c: liveness.op_workspace(n, binds[c]))
    return liveness.estimate(live, sched.groups, costs, dense_live)

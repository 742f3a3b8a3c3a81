"""estimate: the peak bytes a calibration run will hold in each segment, from the same
liveness plan it runs — frontier, one chunk's values, statistics, the solves, parameters
streamed from a weight source and the results it holds — and the check against a budget.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx
from torch.export import ExportedProgram

from ..methods import Method
from ..passes.sites import Site
from ..sizes import human
from . import liveness
from .interpreter import flat_inputs
from .liveness import PRICE, Liveness, Segment, root
from .run import held_bytes
from .schedule import Schedule, schedule
from .seams import WeightSource
from .statistics import Needs


class MemoryBudgetError(MemoryError):
    """One layer (weights, activations and solver workspace) does not fit ``max_memory``."""


@dataclass
class SegmentMemory:
    """Estimated peak bytes of one segment: its run over the chunks, then the solves at its
    barrier, whichever is larger (the parts are those of the larger)."""

    layer: str  # the sites compressed at its end
    weights: int  # parameters loaded, compressed weights in use, results held
    activations: int  # the frontier in memory, one chunk's values
    solver: int  # statistics, the largest solve's workspace

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.solver


@dataclass
class Costs:
    """What the estimate needs to know besides the liveness plan (all in bytes)."""

    chunk_bytes: Callable[[fx.Node, int], int]  # value of a node for chunk c
    chunks: int
    offload: str | None  # where the frontier lives ("disk": not in memory)
    dense: bool  # a second, dense frontier (dense-output calibration)
    loaded: Callable[[fx.Node], int]  # a parameter streamed in while needed (0: resident)
    solve: Callable[[Any], int]  # peak of one site's solve, its weight loaded (a Site)
    result: Callable[[Any], int]  # a site's result (codes, masks...) while it is held
    keep_results: bool  # results stay until the end (False: handed to a writer as made;
    # an expert's wait there until every expert of its block has one, as the block is
    # written whole)
    replaced: Callable[[Any], int]  # the dense weight a compressed site computes with
    statistics: Callable[[fx.Node], int]  # the statistics of a barrier input (sums, values)
    op_workspace: Callable[[fx.Node, int], int] = lambda n, c: 0  # scratch inside one op


def segment_peaks(live: Liveness, groups: Mapping[fx.Node, Sequence[Any]],
             costs: Costs, dense_live: Liveness | None = None) -> list[SegmentMemory]:
    """Peak bytes of every segment of a run planned by ``live``: what the run holds, from the
    same plan it runs (see the module docstring). ``groups`` maps each barrier input to the
    sites compressed there; ``dense_live`` is the dense path's own plan (default: ``live``)."""
    barrier_of = {s.fqn: k for k, seg in enumerate(live.segments)
                  if seg.barrier is not None for s in groups[seg.barrier]}
    sites = {s.fqn: s for g in groups.values() for s in g}
    # the plan of each path; a parameter is resident from the first segment that reads it
    # on either path to the last
    paths = [live] + ([dense_live or live] if costs.dense else [])
    first: dict[fx.Node, int] = {}
    last: dict[fx.Node, int] = {}
    for plan_ in paths:
        for k, seg in enumerate(plan_.segments):
            for n in seg.run:
                for a in n.all_input_nodes:
                    first[a] = min(first.get(a, k), k)
        for a, k in plan_.last_segment.items():
            last[a] = max(last.get(a, -1), k)
    block_end: dict[str, int] = {}  # experts module -> the barrier its last expert is made
    for f, s in sites.items():
        if s.index is not None:
            block_end[s.module_name] = max(block_end.get(s.module_name, -1), barrier_of[f])
    out = []
    for k, seg in enumerate(live.segments):
        frontier_run = sum(_frontier_peak(p.frontier_before(k), p.segments[k].keep, costs)
                           for p in paths)
        frontier_solve = sum(_held(p.segments[k].keep, costs) for p in paths)
        chunk = max(_chunk_peak(p.segments[k], set(p.frontier_before(k)), c, costs)
                    for p in paths for c in range(costs.chunks))
        loaded = sum(costs.loaded(p) for p, f in first.items() if f <= k <= last.get(p, -1))
        in_use = sum(costs.replaced(s) for f, s in sites.items()
                     if barrier_of[f] < k <= live.last_segment.get(s.node, -1))
        held = sum(costs.result(s) for f, s in sites.items() if barrier_of[f] < k and (
            costs.keep_results or s.index is not None and k <= block_end[s.module_name]))
        stats = costs.statistics(seg.barrier) if seg.barrier is not None else 0
        x = len(paths) * costs.chunk_bytes(seg.barrier, 0) if stats else 0
        run = SegmentMemory("", loaded + in_use + held, frontier_run + chunk + x, stats)
        layer, solve = "the output", SegmentMemory("", 0, 0, 0)
        if seg.barrier is not None:
            group = list(groups[seg.barrier])
            layer = ", ".join(s.fqn for s in group)
            staying = sum(costs.replaced(s) for f, s in sites.items()
                          if barrier_of[f] < k < live.last_segment.get(s.node, -1))
            made = sum(costs.replaced(s) + costs.result(s) for s in group)
            solve = SegmentMemory("", loaded + staying + held + made, frontier_solve,
                                  stats + max(costs.solve(s) for s in group))
        peak = max(run, solve, key=lambda m: m.total)
        out.append(SegmentMemory(layer, peak.weights, peak.activations, peak.solver))
    return out


def _held(values: Sequence[fx.Node], costs: Costs) -> int:
    """Frontier bytes in memory: every chunk's value of each storage once."""
    if costs.offload == "disk":
        return 0
    roots = {root(v) for v in values}
    return sum(costs.chunk_bytes(r, c) for r in roots for c in range(costs.chunks))


def _frontier_peak(before: Sequence[fx.Node], keep: Sequence[fx.Node], costs: Costs) -> int:
    """Frontier bytes in memory while a segment runs: chunk by chunk, the values it reads for
    the last time are released as the values it hands on are added (``Run.run_segment``);
    the peak is after the chunk where their sum is largest."""
    if costs.offload == "disk":
        return 0
    old, new = {root(v) for v in before}, {root(v) for v in keep}
    size = costs.chunk_bytes
    staying = sum(size(r, c) for r in old & new for c in range(costs.chunks))
    going = [sum(size(r, c) for r in old - new) for c in range(costs.chunks)]
    coming = [sum(size(r, c) for r in new - old) for c in range(costs.chunks)]
    return staying + max((sum(going[c:]) + sum(coming[:c + 1]) for c in range(costs.chunks)),
                         default=0)


def _chunk_peak(seg: Segment, before: set[fx.Node], c: int, costs: Costs) -> int:
    """Peak bytes of chunk ``c``'s own values while the segment runs it: each storage from
    the step that makes it to the step after which nothing of it is needed (values read back
    from a disk frontier count too), plus the scratch of the op running."""
    refs: dict[fx.Node, int] = {}  # storage -> live values on it
    live_bytes = peak = 0

    def hold(v: fx.Node) -> None:
        nonlocal live_bytes
        r = root(v)
        if refs.get(r, 0) == 0:
            live_bytes += costs.chunk_bytes(r, c)
        refs[r] = refs.get(r, 0) + 1

    def drop(v: fx.Node) -> None:
        nonlocal live_bytes
        r = root(v)
        refs[r] -= 1
        if refs[r] == 0:
            live_bytes -= costs.chunk_bytes(r, c)

    read: set[fx.Node] = set()
    for i, n in enumerate(seg.run):
        for a in n.all_input_nodes:
            if a in before and a not in read and costs.offload == "disk":
                read.add(a)
                hold(a)
        if root(n) not in before or costs.offload == "disk":
            hold(n)
        peak = max(peak, live_bytes + costs.op_workspace(n, c))
        for v in seg.free[i]:
            if (v in seg.run and (root(v) not in before or costs.offload == "disk")) \
                    or v in read:
                drop(v)
    return peak


def over_budget(segments: list[SegmentMemory], budget: int) -> SegmentMemory | None:
    """The first segment that does not fit ``budget``, if any."""
    return next((seg for seg in segments if seg.total > budget), None)


def check_memory(segments: list[SegmentMemory], budget: int) -> None:
    """Raise :class:`MemoryBudgetError` for the first segment over ``budget``."""
    seg = over_budget(segments, budget)
    if seg is not None:
        peak = max(s.total for s in segments)
        raise MemoryBudgetError(
            f"max_memory={human(budget)} cannot hold the compression of {seg.layer}: it "
            f"needs about {human(seg.total)} ({human(seg.weights)} weights, "
            f"{human(seg.activations)} activations of the calibration batches, "
            f"{human(seg.solver)} Hessian and solver workspace); the whole run needs about "
            f"{human(peak)}. Raise max_memory, use fewer or shorter calibration samples, a "
            f"smaller batch_size (the values of one batch are held while it runs), or "
            f"offload='disk' to keep the activations between layers on disk.")


def estimate_memory(ep: ExportedProgram, sites: Sequence[Site], plan: Mapping[str, Method],
                    chunks: Sequence[tuple[tuple, dict]], *, offload: str | None = None,
                    weights: WeightSource | None = None, keep_results: bool = True,
                    recompute: float | None = PRICE) -> list[SegmentMemory]:
    """Peak bytes ``calibrate`` will hold in each segment with the same arguments, from the
    same liveness plan it runs: frontier, one chunk's values, statistics, the solves,
    parameters streamed from ``weights`` and the results it holds (``keep_results``: they
    are returned rather than handed to a sink)."""
    flat_inputs(ep, chunks)  # a malformed batch: calibrate's error naming it, before any work
    sched = schedule(ep.graph_module, sites, plan)
    needs = Needs(plan)
    live, dense_live = liveness.plan_paths(ep, sched, chunks[0], recompute, needs.dense)
    costs = _costs(ep, sites, plan, chunks, sched, needs, weights, offload, keep_results)
    return segment_peaks(live, sched.groups, costs, dense_live)


def _costs(ep: ExportedProgram, sites: Sequence[Site], plan: Mapping[str, Method],
           chunks: Sequence[tuple[tuple, dict]], sched: Schedule, needs: Needs,
           weights: WeightSource | None, offload: str | None, keep_results: bool) -> Costs:
    """What :func:`segment_peaks` needs to know of a run besides its liveness plan."""
    binds = [liveness.symbols(ep, c) for c in chunks]
    specs = {s.arg.name: s.target for s in ep.graph_signature.input_specs}
    site_weights = {s.weight for s in sites}

    @functools.cache
    def chunk_bytes(n: fx.Node, c: int) -> int:
        return liveness.value_bytes(n, binds[c])

    def loaded(p: fx.Node) -> int:  # a site's weight is read to solve, on the dense path too
        if weights is None or p.op != "placeholder" or specs.get(p.name) is None:
            return 0
        meta = p.meta.get("val")
        if not (isinstance(meta, Tensor) and meta.is_meta) or p in site_weights \
                and not needs.dense:
            return 0
        return weights.nbytes(specs[p.name])

    def solve(s: Site) -> int:  # a meta parameter is read to solve (an expert: its slice)
        w, param = s.shape[0] * s.shape[1], s.param
        stored = w * param.dtype.itemsize if param.is_meta else 0
        as_fp32 = 4 * w if param.dtype != torch.float32 else 0
        return stored + as_fp32 + plan[s.fqn].workspace(s.shape)

    return Costs(
        chunk_bytes, len(chunks), offload, needs.dense, loaded, solve,
        result=lambda s: held_bytes(s, plan[s.fqn], keep_results), keep_results=keep_results,
        replaced=lambda s: s.shape[0] * s.shape[1] * s.param.dtype.itemsize,
        statistics=lambda x: needs.nbytes(sched.groups[x], x in sched.pinned),
        op_workspace=lambda n, c: liveness.op_workspace(n, binds[c]))

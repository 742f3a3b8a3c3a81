"""liveness: what each segment of a calibration run computes, keeps and frees — one model for
the run (:mod:`~.run`) and for its memory estimate (:mod:`~.estimate`).

Calibration runs the graph segment by segment: a segment ends at a *barrier*, where the input
``x`` of a group of linears is complete for every calibration chunk, their statistics (the
Hessian, ...) are final and they are compressed. Everything the later segments need from the
earlier ones must cross the barrier, held for all chunks at once — the *frontier*. Which values
cross is a choice, as in activation checkpointing: instead of the 1536-wide MLP intermediate
``act(gate) * up`` (the input of ``down_proj``), the frontier after ``down_proj``'s barrier may
hold the 576-wide hidden state it came from, and the next segment recomputes ``gate``/``up``
→ ``act`` → ``mul`` chunk by chunk before running ``down_proj``.

The choice is a minimum cut per barrier, the idea of AOTAutograd's
``min_cut_rematerialization_partition``: in the graph of the values computable at the barrier,
each value ``v`` is a pair of vertices ``v_in → v_out`` whose edge costs the bytes of keeping
``v``; values the later segments read flow to the sink; values already in the frontier (and
values that must not be recomputed) hang from the source. A value that must run before the
barrier anyway (an ancestor of ``x``) costs its recomputation to move to the far side, its
flop-equivalents divided by ``price`` — how much compute one byte saved is worth. The cut's
``v_in → v_out`` edges are the new frontier; the values beyond it are recomputed where needed.
``price=None`` keeps exactly what the plain schedule keeps (everything later segments read).

Statistics of ``x`` are accumulated chunk by chunk while the segment runs, so ``x`` itself
crosses the barrier only when that is the cheapest choice — except for *pinned* values, which
cross it whatever they cost: a group of experts keeps its input and routing (and a second
projection the first one's input) for its per-expert statistics, made at the barrier
(:func:`~.schedule.schedule` says why). Recomputed values run with the same
(possibly already compressed) weights as the first time, so results are identical.

The same :class:`Liveness` drives the run (what to execute, when to free, what to hand on) and
the memory estimate (:func:`~.estimate.segment_peaks`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import Tensor, fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from .schedule import Schedule

# default: flop-equivalents of recomputation one byte of frontier is worth. At 1024 the MLP
# intermediate of a narrow model is recomputed from the normed hidden state (its flops per
# byte saved are about the hidden size) and a wide one's is kept (benchmarks/RESULTS.md)
PRICE = 1024.0
EAGER = 1e12  # when memory is short: recompute whatever saves a byte
ELEMENT_COST = 64  # flop-equivalents of reading/writing one element (memory-bound ops)
MATMULS = {"linear", "mm", "bmm", "matmul", "addmm", "baddbmm", "addbmm", "einsum"}
ATTENTION = "scaled_dot_product"  # in every SDPA variant's name


# ============================================================================ sizes


def symbols(ep: ExportedProgram, chunk: tuple[tuple, dict]) -> dict[sympy.Symbol, int]:
    """Values of the program's symbolic sizes (batch, sequence...) for one batch."""
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    values = dict(zip(user, ep._graph_module_flat_inputs(*chunk)[-len(user):], strict=True))
    bind = {}
    for node in ep.graph.nodes:
        val, real = node.meta.get("val"), values.get(node.name)
        if node.op == "placeholder" and isinstance(val, Tensor) and isinstance(real, Tensor):
            for d, n in zip(val.shape, real.shape, strict=True):
                if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                    bind[d.node.expr] = n
    return bind


def _dim(d: Any, bind: dict) -> int:
    if not isinstance(d, torch.SymInt):
        return int(d)
    try:
        return int(sympy.sympify(d.node.expr).xreplace(bind))
    except TypeError:  # a size no input determines (data-dependent): take the traced one
        return int(d.node.hint or 1)


def _tensors(node: fx.Node) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(node.meta.get("val")) if isinstance(t, Tensor)]


def _numel(t: Tensor, bind: dict) -> int:
    return math.prod(_dim(d, bind) for d in t.shape)


def value_bytes(node: fx.Node, bind: dict) -> int:
    """Bytes of ``node``'s value (all its tensors) for the sizes in ``bind``."""
    return sum(_numel(t, bind) * t.dtype.itemsize for t in _tensors(node))


def alias_of(node: fx.Node) -> fx.Node | None:
    """The input whose storage ``node``'s value shares (a view, ``getitem`` of a split), if
    any: keeping a view keeps its base."""
    if node.op != "call_function":
        return None
    if node.target.__name__ == "getitem" and isinstance(node.args[0], fx.Node):
        base = node.args[0]
        return base if alias_of(base) is not None or _returns_alias(base) else None
    if _returns_alias(node):
        return next((a for a in node.args if isinstance(a, fx.Node)), None)
    return None


def _returns_alias(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None
                and not schema.returns[0].alias_info.is_write)


def root(node: fx.Node) -> fx.Node:
    """The node that owns the storage of ``node``'s value."""
    while (base := alias_of(node)) is not None:
        node = base
    return node


def recompute_cost(node: fx.Node, bind: dict) -> float:
    """Flop-equivalents of running ``node`` again for one chunk (``inf``: must not run
    twice — random or mutating ops). Matrix products count their flops, views nothing,
    everything else :data:`ELEMENT_COST` per element read or written."""
    if node.op != "call_function":
        return math.inf
    schema = getattr(node.target, "_schema", None)
    tags = getattr(node.target, "tags", ())
    if (schema is not None and schema.is_mutable) or torch.Tag.nondeterministic_seeded in tags:
        return math.inf
    if alias_of(node) is not None:
        return 0.0
    out = sum(_numel(t, bind) for t in _tensors(node))
    inputs = [t for a in node.all_input_nodes for t in _tensors(a)]
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    if name in MATMULS and inputs:
        return 2.0 * out * _dim(inputs[0].shape[-1], bind) if inputs[0].dim() else float(out)
    if ATTENTION in name and len(inputs) >= 3:
        q, k = inputs[0], inputs[1]
        return 4.0 * _numel(q, bind) * _dim(k.shape[-2], bind)
    if "conv" in name and len(inputs) >= 2:
        w = inputs[1]
        return 2.0 * out * _numel(w, bind) / max(_dim(w.shape[0], bind), 1)
    return ELEMENT_COST * max([out, *(_numel(t, bind) for t in inputs)])


def op_workspace(node: fx.Node, bind: dict) -> int:
    """Scratch memory an op allocates besides its output: attention's score matrix."""
    name = getattr(node.target, "__name__", "")
    inputs = [t for a in node.all_input_nodes for t in _tensors(a)]
    if ATTENTION in name and len(inputs) >= 2 and inputs[0].dim() == 4:
        q, k = inputs[0], inputs[1]
        return _numel(q, bind) // _dim(q.shape[-1], bind) * _dim(k.shape[-2], bind) \
            * q.dtype.itemsize
    return 0


# ============================================================================ the plan


@dataclass
class Segment:
    """One segment: what runs per chunk, what it frees when, what it hands on."""

    start: int  # its own nodes are ``Schedule.order[start:end]``
    end: int
    barrier: fx.Node | None  # the input whose statistics complete at its end
    run: list[fx.Node]  # in graph order, recomputed values included
    free: list[list[fx.Node]]  # free[i]: values of the chunk no longer needed after run[i]
    keep: list[fx.Node]  # the frontier after it: values later segments read, for all chunks
    recomputed: frozenset[fx.Node] = frozenset()  # values of earlier segments run again


@dataclass
class Liveness:
    """The whole run: the frontier it starts with (user inputs), its segments, and the last
    segment that reads each value or parameter (for releasing weights)."""

    inputs: list[fx.Node]
    segments: list[Segment]
    last_segment: dict[fx.Node, int] = field(default_factory=dict)

    def frontier_before(self, k: int) -> list[fx.Node]:
        return self.inputs if k == 0 else self.segments[k - 1].keep


def plan(order: Sequence[fx.Node], position: Mapping[fx.Node, int],
         last_use: Mapping[fx.Node, int], segments: Sequence[tuple[int, int, fx.Node | None]],
         inputs: Sequence[fx.Node], nbytes: Callable[[fx.Node], int],
         cost: Callable[[fx.Node], float], price: float | None,
         pinned: Mapping[fx.Node, set[fx.Node]] | None = None,
         later: Sequence[Sequence[int]] | None = None) -> Liveness:
    """The liveness of a schedule (``order``/``position``/``last_use`` of a
    :class:`~.schedule.Schedule`, its ``segments()``), starting from the user ``inputs``.

    ``nbytes(v)``: bytes of ``v``'s value for one chunk; ``cost(v)``: flop-equivalents of
    recomputing it; ``price``: flop-equivalents one byte of frontier is worth (``None``: never
    recompute); ``pinned[x]``: values that must be held for all chunks at ``x``'s barrier
    (the statistics of ``x`` are made there from them, not as the chunks run);
    ``later[k]``: positions past its barrier where segment ``k`` may end instead (the dense
    path's, :func:`dense_segments`) — it ends where its frontier has the fewest bytes."""
    pinned = pinned or {}
    frontier = [n for n in inputs if last_use.get(n, -1) >= 0]
    out = Liveness(list(frontier), [])
    crossing = set(frontier)  # values computed before the barrier and read after it
    start = 0
    for k, (_, barrier_end, x) in enumerate(segments):
        before = set(frontier)
        pins = pinned.get(x, set()) if x is not None else set()
        best = None
        for end in (barrier_end, *(later[k] if later else ())):
            cross = {n for n in crossing | set(order[start:end]) if last_use[n] >= end}
            read_after = {x} if x is not None and last_use[x] >= end else set()
            keep = cross | pins if price is None else \
                _cut(cross | pins | read_after, before, x, nbytes, cost, price, pins)
            size = sum(nbytes(r) for r in {root(v) for v in keep})
            if best is None or size < best[0]:
                best = (size, end, cross, keep)
        _, end, crossing, keep = best
        targets = ({x} if x is not None else set()) | (keep - before)
        run = sorted(_needed(targets, before), key=position.__getitem__)
        own = set(order[start:end])
        seg = Segment(start, end, x, run, _frees(run, keep, x),
                      sorted(keep, key=lambda n: position.get(n, -1)),
                      frozenset(n for n in run if n not in own))
        for n in run:
            for a in (n, *n.all_input_nodes):
                out.last_segment[a] = len(out.segments)
        out.segments.append(seg)
        frontier, start = seg.keep, end
    return out


def plan_of_schedule(ep: ExportedProgram, schedule: Schedule, chunk: tuple[tuple, dict],
                     price: float | None, dense: bool = False) -> Liveness:
    """:func:`plan` for a :class:`~.schedule.Schedule` of ``ep``, sizes taken from ``chunk``; with
    ``dense``, the plan of dense-output's dense path (:func:`dense_segments`)."""
    bind = symbols(ep, chunk)
    user = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    inputs = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user and n.users]
    nbytes = functools.cache(lambda n: value_bytes(n, bind))
    cost = functools.cache(lambda n: recompute_cost(n, bind))
    segments = schedule.segments()
    later = dense_segments(schedule.order, schedule.last_use, segments, inputs,
                           schedule.pinned, nbytes) if dense else None
    return plan(schedule.order, schedule.position, schedule.last_use, segments,
                inputs, nbytes, cost, price, schedule.pinned, later)


def plan_paths(ep: ExportedProgram, sched: Schedule, chunk: tuple[tuple, dict],
               recompute: float | None, dense: bool) -> tuple[Liveness, Liveness | None]:
    """The liveness plan of the compressed path and, with a dense path (``dense``: a
    statistic reads the dense model's values), the dense path's (its segments run on past
    the barriers: :func:`dense_segments`)."""
    live = plan_of_schedule(ep, sched, chunk, recompute)
    return live, plan_of_schedule(ep, sched, chunk, recompute, dense=True) if dense else None


def dense_segments(order: Sequence[fx.Node], last_use: Mapping[fx.Node, int],
                   segments: Sequence[tuple[int, int, fx.Node | None]],
                   inputs: Sequence[fx.Node], pinned: Mapping[fx.Node, set[fx.Node]],
                   nbytes: Callable[[fx.Node], int]) -> list[list[int]]:
    """Where else the dense path's segments may end. That path computes with the original
    weights: it must reach each barrier input ``x`` chunk by chunk along with the compressed
    path (the cross moment takes both), but nothing it computes waits for a compression, so
    a segment may run on past its barrier — through the linears compressed there, with their
    original weights — up to the next barrier's input. The candidate is the position in that
    range where the fewest bytes cross (before recomputation, which :func:`plan` weighs for
    it and for the barrier). After ``down_proj``'s barrier the compressed path holds the MLP
    intermediate (or recomputes it); the dense path can hand on the layer's output instead.
    A barrier whose values are pinned (experts) is not moved: its statistics read them."""
    position = {n: i for i, n in enumerate(order)}
    out = []
    crossing, at = {n for n in inputs if last_use.get(n, -1) >= 0}, 0  # crossing ``at``
    for k, (_, end, x) in enumerate(segments):
        crossing = {v for v in crossing | set(order[at:end]) if last_use[v] >= end}
        at = end
        nxt = segments[k + 1][2] if k + 1 < len(segments) else None
        if x in pinned or nxt not in position or position[nxt] <= end:
            out.append([])
            continue
        best, fewest, scan = None, None, crossing
        for p in range(end + 1, position[nxt] + 1):
            scan = {v for v in scan | {order[p - 1]} if last_use[v] >= p}
            size = sum(nbytes(r) for r in {root(v) for v in scan})
            if fewest is None or size < fewest:
                best, fewest = p, size
        out.append([best])
    return out


def _needed(targets: set[fx.Node], available: set[fx.Node]) -> set[fx.Node]:
    """Nodes to run to get ``targets`` from ``available`` values and the parameters."""
    seen, stack = set(), [t for t in targets if t not in available]
    while stack:
        n = stack.pop()
        if n in seen or n in available or n.op != "call_function":
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _frees(run: list[fx.Node], keep: set[fx.Node], x: fx.Node | None) -> list[list[fx.Node]]:
    """After which step each value of a chunk can go: its last reader in ``run`` (kept values
    and the barrier input stay to the chunk's end, where they are handed on)."""
    last: dict[fx.Node, int] = {}
    for i, n in enumerate(run):
        for a in (n, *n.all_input_nodes):
            last[a] = i
    free: list[list[fx.Node]] = [[] for _ in run]
    for v, i in last.items():
        if v not in keep and v is not x:
            free[i].append(v)
    return free


def _cut(needed: set[fx.Node], before: set[fx.Node], x: fx.Node | None,
         nbytes: Callable[[fx.Node], int], cost: Callable[[fx.Node], float],
         price: float, pins: set[fx.Node] = frozenset()) -> set[fx.Node]:
    """The cheapest set of values to keep so that ``needed`` can be computed after the
    barrier (see the module docstring); ``pins`` are kept whatever they cost."""
    import networkx as nx

    cands, stack = set(), list(needed)
    while stack:
        n = stack.pop()
        if n in cands or (n.op == "placeholder" and n not in before) or n.op == "get_attr":
            continue
        cands.add(n)
        if n not in before:
            stack.extend(n.all_input_nodes)
    forced = _needed({x}, before) if x is not None else set()
    g = nx.DiGraph()
    g.add_nodes_from(["source", "sink"])
    for v in cands:
        storage = root(v)
        g.add_edge((v, "in"), (v, "out"), capacity=max(nbytes(storage), 1))
        if v in before or v in pins or v.op != "call_function":
            g.add_edge("source", (v, "in"))  # no capacity: infinite
        elif v in forced or math.isinf(cost(v)):
            c = cost(v)
            if math.isinf(c):
                g.add_edge("source", (v, "in"))
            else:
                g.add_edge("source", (v, "in"), capacity=c / price)
        if v not in before:
            for a in v.all_input_nodes:
                if a in cands:
                    g.add_edge((a, "out"), (v, "in"))
        if v in needed:
            g.add_edge((v, "out"), "sink")
    _, (reach, _) = nx.minimum_cut(g, "source", "sink")
    return {v for v in cands if (v, "in") in reach and (v, "out") not in reach}

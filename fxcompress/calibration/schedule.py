"""schedule: which nodes of the captured graph a calibration run executes, in what order,
where its barriers are (a group of sites reading one input is compressed there) and when
each value is read for the last time.

Only the nodes that lead to some site's input (or an experts block's routing) run at all:
the language-model head of a decoder whose head is not compressed never runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import fx

from ..methods import Method
from ..modules import EXPERT_BANKS
from ..passes.sites import Site, weight_path

FIRST, SECOND = EXPERT_BANKS  # an experts block's projections: gate_up, then down


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
    are made there from them (:func:`~fxcompress.calibration.statistics.pinned_sums`) rather
    than chunk by chunk as the segment runs. Per-expert Hessians could stream, but the
    all-token rule of an expert routed too few rows is only known to apply once every chunk
    is seen, and it reads these values again (the second projection's through the
    compressed first one)."""
    nodes = list(gm.graph.nodes)
    groups: dict[fx.Node, list[Site]] = {}
    late: dict[fx.Node, fx.Node] = {}  # weight-path node -> the matmul it feeds
    for s in sites:
        if s.fqn in plan:
            groups.setdefault(s.input, []).append(s)
            late.update({n: s.matmul for n in weight_path(s)})
    routing = {s.routing for g in groups.values() for s in g if s.routing is not None}
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
    barriers, pinned = _barriers(groups, position, last_use)
    return Schedule(order, position, last_use, barriers, groups, pinned)


def _barriers(groups: Mapping[fx.Node, list[Site]], position: Mapping[fx.Node, int],
              last_use: dict[fx.Node, int]
              ) -> tuple[list[tuple[int, fx.Node]], dict[fx.Node, set[fx.Node]]]:
    """Where each group is compressed (before its first site runs), in order, and the values
    pinned there (see :func:`schedule`); ``last_use`` is extended to the barriers that read
    their values again."""
    feeders = {(s.module_name, s.index): s.input for g in groups.values() for s in g
               if s.index is not None and s.attr == FIRST}
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
    return barriers, pinned

"""statistics: what calibration measures at a layer input for the methods that ask for it.

A method names the statistics it needs (``Method.needs``); each name is registered here in
:data:`STATISTICS` with how its partial sums start, grow chunk by chunk and how many bytes
they hold. Partial sums keep ``Hessian``'s sum-and-count bookkeeping, so a :class:`~.seams.
Team` reduces them alike. Two are registered: :data:`~fxcompress.recipe.HESSIAN`,
``H = 2 X̃ᵀX̃ / n`` over the compressed model's inputs, and :data:`~fxcompress.recipe.CROSS`,
the cross moment ``2 (X - X̃)ᵀX̃ / n`` of dense-output calibration, which reads the dense
model's inputs X too. A statistic that reads them (:attr:`Statistic.dense`) is what makes a
run keep a second, dense path — its frontier, its liveness plan, its share of the memory
estimate; the run, the plan and the estimate ask :attr:`Needs.dense` and nothing else. A new
statistic is one :class:`Statistic` and one line in :data:`STATISTICS`.

Where the weights reading X have fewer than half as many outputs as inputs (an MLP's down
projection), the cross moment is gathered as ``W C = 2 ((X − X̃)Wᵀ)ᵀX̃ / n`` per weight,
the form the solve uses (:func:`output_cross`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, fx

from ..algorithms import Cross, Hessian, OutputCross, Statistics, WeightedCross
from ..kernels.dense import activation
from ..methods import CROSS, HESSIAN, Method
from ..modules import experts_activation
from ..passes.sites import Site
from .frontier import Frontier
from .schedule import FIRST, Schedule
from .seams import Team

log = logging.getLogger(__name__)
Sums = dict[str, Hessian]  # partial sums by statistic (``"cross:<fqn>"``: one site's W C)


class Statistic:
    """One statistic of a layer input, as partial sums that add up over chunks and
    processes; ``dense``: it reads the dense model's value of the input too."""

    dense = False

    def zeros(self, features: int, device: torch.device | str) -> Hessian:
        """Empty sums for inputs of ``features``."""
        return Hessian.zeros(features, device)

    def start(self, name: str, todo: Sequence[Site], features: int, device: torch.device,
              weight: Callable[[Site], Tensor]) -> Sums:
        """Empty sums of an input read by ``todo`` (the sites that need this statistic),
        accumulated as the chunks run."""
        return {name: self.zeros(features, device)}

    def add(self, partial: Hessian, x_tilde: Tensor, x_dense: Tensor | None) -> None:
        """One chunk's rows of the compressed model's input (and the dense model's)."""
        partial.add(x_tilde)

    def nbytes(self, keys: Sequence[Site], todo: Sequence[Site], pinned: bool) -> int:
        """Bytes of its sums at a barrier: one set per key (an expert, or the linears) of
        ``keys``; ``todo`` are the sites that need it, ``pinned`` an experts group."""
        return sum(4 * s.shape[1] ** 2 for s in keys)


class _Cross(Statistic):
    """The cross moment of dense-output calibration: ``C``, or each weight's ``W C``."""

    dense = True

    def zeros(self, features: int, device: torch.device | str) -> Hessian:
        return Cross.zeros(features, device)

    def start(self, name: str, todo: Sequence[Site], features: int, device: torch.device,
              weight: Callable[[Site], Tensor]) -> Sums:
        if output_cross(todo):
            return {f"{name}:{s.fqn}": OutputCross(weight(s).to(device)) for s in todo}
        return {name: self.zeros(features, device)}

    def add(self, partial: Hessian, x_tilde: Tensor, x_dense: Tensor | None) -> None:
        partial.add(x_tilde, x_dense)

    def nbytes(self, keys: Sequence[Site], todo: Sequence[Site], pinned: bool) -> int:
        if not pinned and output_cross(todo):  # W C and W in float32
            return 8 * todo[0].shape[1] * sum(s.shape[0] for s in todo)
        return super().nbytes(keys, todo, pinned)


STATISTICS: dict[str, Statistic] = {HESSIAN: Statistic(), CROSS: _Cross()}  # in this order


def output_cross(group: Sequence[Site]) -> bool:
    """Whether the cross moment of ``group``'s input is gathered as ``W C`` per weight
    (:class:`~fxcompress.algorithms.OutputCross`) instead of ``C``: when the weights have
    fewer than half as many rows in all as columns, so that ``2 · out · in`` multiply-adds a
    token cost less than ``in²`` (an MLP's down projection)."""
    return bool(group) and all(s.kind == "linear" and s.index is None for s in group) and \
        2 * sum(s.shape[0] for s in group) < group[0].shape[1]


@dataclass(eq=False)
class Needs:
    """What the methods of a plan ask calibration for, asked in one place."""

    plan: Mapping[str, Method]

    @cached_property
    def of_site(self) -> dict[str, frozenset[str]]:
        return {f: m.needs() for f, m in self.plan.items()}

    @cached_property
    def all(self) -> frozenset[str]:
        return frozenset().union(*self.of_site.values())

    @property
    def data_free(self) -> bool:
        """No site needs activations (RTN, magnitude pruning): no forward pass is run."""
        return not self.all

    @property
    def dense(self) -> bool:
        """Some statistic reads the dense model's values: the run keeps a dense path."""
        return any(STATISTICS[n].dense for n in self.all)

    def union(self, sites: Sequence[Site]) -> frozenset[str]:
        return frozenset().union(*(self.of_site[s.fqn] for s in sites))

    def ordered(self, names: frozenset[str]) -> list[str]:
        """``names`` in registry order: every process starts, adds and reduces its sums in
        the same order (a frozenset's order depends on the process's hash seed)."""
        return [n for n in STATISTICS if n in names]

    def for_site(self, s: Site, stats: Statistics | None) -> Statistics | None:
        """A group's statistics as ``s``'s method takes them (a group's sites may differ)."""
        if stats is not None and stats.cross is not None and CROSS not in self.of_site[s.fqn]:
            return dataclasses.replace(stats, cross=None)
        return stats

    def nbytes(self, group: Sequence[Site], pinned: bool) -> int:
        """Bytes of the statistics of a barrier input read by ``group`` (one set per expert
        of an experts group), for the memory estimate."""
        keys = list({s.index: s for s in group if self.of_site[s.fqn]}.values())
        return sum(STATISTICS[n].nbytes(keys, [s for s in group if n in self.of_site[s.fqn]],
                                        pinned)
                   for n in self.ordered(self.union(group)))


def start(needs: Needs, names: frozenset[str], todo: Sequence[Site], x_tilde: Tensor,
          weight: Callable[[Site], Tensor]) -> Sums:
    """Empty streamed sums of ``names`` for the input ``x_tilde`` of the sites ``todo``."""
    sums: Sums = {}
    for n in needs.ordered(names):
        wanting = [s for s in todo if n in needs.of_site[s.fqn]]
        sums.update(STATISTICS[n].start(n, wanting, x_tilde.shape[-1], x_tilde.device, weight))
    return sums


def accumulate(sums: Sums, x_tilde: Tensor, x_dense: Tensor | None = None) -> None:
    """Add one chunk of an input to its partial sums (made on the values' device)."""
    for key, partial in sums.items():
        STATISTICS[key.partition(":")[0]].add(partial, x_tilde, x_dense)


def pinned_sums(x: fx.Node, todo: Sequence[Site], needs: Needs, kept: Frontier,
                dense: Frontier | None) -> dict[int | None, Sums]:
    """The partial sums of a pinned group's input, made at its barrier from the frontier:
    one set for the linears reading it (key None), one per expert of an experts matmul (key:
    the expert), from the rows routed to that expert."""
    todo = [s for s in todo if needs.of_site[s.fqn]]
    if not todo:
        return {}
    names = needs.ordered(needs.union(todo))
    device = kept.device or kept.get(x, 0).device
    keys = {s.index: s for s in todo}
    # experts keep the plain objective even with dense_output: the dense model routes
    # tokens to other experts, so an expert has no dense output on the same rows to fit
    sums = {k: {n: STATISTICS[n].zeros(s.shape[1], device) for n in names
                if k is None or not STATISTICS[n].dense} for k, s in keys.items()}
    for c in range(kept.chunks):
        x_tilde = kept.get(x, c)
        for k, s in keys.items():
            routing = None if s.routing is None else kept.get(s.routing, c)
            rows = s.rows(x_tilde, routing)
            for n, partial in sums[k].items():
                STATISTICS[n].add(partial, rows, dense.get(x, c) if STATISTICS[n].dense
                                  else None)
    return sums


def assemble(key: int | None, h: Hessian, parts: Sums, todo: Sequence[Site]
             ) -> dict[int | str | None, Statistics]:
    """The statistics the solves take from a key's reduced sums (``h``: its Hessian, which
    the all-token rule may have replaced): under ``key``, and under a site's name where its
    cross moment was gathered as its own ``W C``."""
    out: dict[int | str | None, Statistics] = {
        key: Statistics(h.take(), h.count, parts[CROSS].take() if CROSS in parts else None)}
    for s in todo:
        if f"{CROSS}:{s.fqn}" in parts:
            wc = WeightedCross(parts[f"{CROSS}:{s.fqn}"].take())
            out[s.fqn] = dataclasses.replace(out[key], cross=wc)
    return out


def check_routed(h: Hessian, name: str) -> None:
    """An expert that no calibration token was routed to has no Hessian: that is an error
    naming it (use more or more varied calibration data, or leave its block dense), never a
    silent fallback to rounding."""
    if h.count == 0:
        raise ValueError(f"{name}: no calibration token was routed to this expert, so it has "
                         f"no Hessian. Calibrate with more (or more varied) samples, or leave "
                         f"its experts dense with a None rule")


def all_tokens(x: fx.Node, s: Site, kept: Frontier, sched: Schedule,
               firsts: Mapping[str, Tensor], team: Team, names: str, routed: int) -> Hessian:
    """The Hessian of expert ``s`` over *every* token of its block: the rule for an expert
    routed fewer rows than it has input features, whose routed Hessian is rank-deficient
    (measured better than the routed rows alone: benchmarks/RESULTS.md). The first
    projection reads all rows of its input; the second, the gated activation of the
    compressed first projection (``firsts``) of the same expert on all of them."""
    h = Hessian.zeros(s.shape[1], kept.device or kept.get(x, 0).device)
    for c in range(kept.chunks):
        if s.attr == FIRST:
            h.add(kept.get(x, c).reshape(-1, s.shape[1]))
            continue
        first = next(f for f in sched.groups_of(s.module_name, s.index) if f.attr == FIRST)
        rows = kept.get(first.input, c).reshape(-1, first.shape[1])
        w = first.matrix(firsts[first.module_name])
        gate, up = torch.nn.functional.linear(rows, w.to(rows.dtype)).chunk(2, dim=-1)
        h.add(activation(experts_activation(s.module), gate) * up)
    team.reduce(h, names)
    log.info("%s: %d routed rows < %d input features, Hessian from all %d rows of the "
             "block", s.fqn, routed, s.shape[1], h.count)
    return h

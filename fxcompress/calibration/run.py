"""run: the state of one calibration run (:class:`Run`) and what it does per segment (the
loop over the segments and the entry point are :mod:`~.entry`'s).

Each segment runs chunk by chunk (:meth:`Run.run_segment`); at its barrier the group of sites
reading its input is compressed (:meth:`Run.compress_group`): the statistics their methods
ask for are reduced across the team, the solves are shared out by cost, and the interpreter
computes with the results from then on. With a dense path (a statistic reading the dense
model's values: :attr:`~.statistics.Needs.dense`) each chunk runs a second time with the
original weights, through the dense path's own plan.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from .. import osmem
from ..algorithms import Compressed, Statistics
from ..methods import HESSIAN, Method
from ..passes.sites import Site
from . import statistics
from .frontier import ChunkEnv, Frontier, Params
from .interpreter import Interpreter
from .liveness import Liveness
from .precision import matmul_precision
from .schedule import FIRST, SECOND, Schedule
from .seams import LayerReport, Team
from .snapshots import Restored

log = logging.getLogger(__name__)


@dataclass
class _Path:
    """One path's share of a segment: its frontier, the weights it computes with, its
    segment of the plan, the values it hands on and those it reads for the last time."""

    kept: Frontier
    weights: dict[fx.Node, tuple[int, Tensor]]
    seg: Any  # liveness.Segment
    handed: list[fx.Node]
    spent: list[fx.Node]


@dataclass
class Run:
    """State of one calibration run."""

    sched: Schedule
    plan: Mapping[str, Method]
    needs: statistics.Needs
    params: Params
    kept: Frontier
    dense: Frontier | None  # the dense model's frontier, for a dense path (Needs.dense)
    interp: Interpreter
    team: Team
    done: Mapping[str, Compressed]
    sink: Callable[[Site, Compressed, LayerReport], None] | None
    on_statistics: Callable[[str, Statistics], None] | None
    bar: Any
    live: Liveness
    dense_live: Liveness | None = None  # the dense path's plan (None: ``live``)
    results: dict[str, Compressed] = field(default_factory=dict)
    sums: statistics.Sums = field(default_factory=dict)  # statistics of the next barrier
    segment: int = 0  # the segment running or just run
    routed: dict[tuple[fx.Node, int], int] = field(default_factory=dict)  # rows per expert
    firsts: dict[str, Tensor] = field(default_factory=dict)  # compressed gate_up per block
    reports: list[LayerReport] = field(default_factory=list)
    unfolded: list[tuple[Site, Compressed]] = field(default_factory=list)  # see fold()
    # weights mapped from a file -> their sites still to finish (see page_out())
    mapped: dict[fx.Node, set[str]] = field(default_factory=dict)
    precision: str = "fp32"  # of the passes' matmuls, not the solves' (matmul_precision())
    trim_slack: int = 0  # heap growth allowed between trims (osmem.release_freed_memory())

    @property
    def data_free(self) -> bool:
        """No site needs activations: nothing is run, nothing replaced."""
        return self.needs.data_free

    @property
    def frontiers(self) -> list[Frontier]:
        return [self.kept] + ([self.dense] if self.dense is not None else [])

    @property
    def plans(self) -> list[Liveness]:
        """The plan of each path: the compressed one, and the dense one's with a dense path."""
        return [self.live] + ([self.dense_live or self.live] if self.dense is not None else [])

    @functools.cached_property
    def last_read(self) -> dict[fx.Node, int]:
        """The last segment that reads each value or parameter, on either path."""
        last: dict[fx.Node, int] = {}
        for plan in self.plans:
            for n, k in plan.last_segment.items():
                last[n] = max(last.get(n, -1), k)
        return last

    def resume(self, restored: Restored) -> int:
        """Continue after a snapshot's segment, computing with the stored results of the
        sites before it; the segment to run next."""
        self.segment = restored.segment
        for s in restored.sites:
            self.replace(s, self.done[s.fqn])
        self.firsts.clear()  # a snapshot is taken with no first projection pending
        return restored.segment + 1

    # ------------------------------------------------------------------ the forward pass

    def run_segment(self, k: int) -> None:
        """Segment ``k`` of the liveness plan, chunk by chunk: run its nodes (recomputed ones
        included), accumulate the statistics of its barrier input as each chunk produces it,
        and hand on its frontier. With a dense frontier, each chunk runs a second time with
        the original weights, through the dense path's own segment ``k`` (which may run on
        past the barrier: :func:`~.liveness.dense_segments`), and the statistics take both."""
        replaced = self.interp.replaced
        x = self.live.segments[k].barrier
        needs = self._streamed(x)
        paths = self._paths(k)
        chunks = self.kept.chunks if any(p.seg.run for p in paths) or needs else 0
        with matmul_precision(self.precision):
            for c in range(chunks):
                self._run_chunk(c, paths, x, needs)
        self.interp.env, self.interp.replaced, self.interp.dying = {}, replaced, ()
        for p in paths:
            for n in [n for n in p.kept if n not in p.seg.keep]:
                p.kept.drop(n)
        for n in [n for n in replaced if self.live.last_segment.get(n, -1) <= k]:
            del replaced[n]
        self.params.release(self.last_read, k)
        self.fold()

    def _paths(self, k: int) -> list[_Path]:
        """Each path's share of segment ``k`` (the dense path computes with the originals),
        with the lazy parameters they read loaded."""
        replaced = self.interp.replaced
        paths = []
        for kept, weights, live in zip([self.kept, self.dense], [replaced, {}], self.plans,
                                       strict=False):
            seg, before = live.segments[k], set(live.frontier_before(k))
            paths.append(_Path(kept, weights, seg, [n for n in seg.keep if n not in before],
                               [n for n in before - set(seg.keep) if n in kept]))
        self.params.fetch({a for p in paths for n in p.seg.run for a in n.all_input_nodes
                           if self.params.lazy(a)
                           and not (p.weights and self._replaced_weight(n, a))})
        return paths

    def _run_chunk(self, c: int, paths: Sequence[_Path], x: fx.Node | None,
                   needs: frozenset[str]) -> None:
        """Chunk ``c`` through each path's segment; its barrier input into the sums."""
        interp, xs = self.interp, []
        for p in paths:
            interp.replaced = p.weights
            interp.env = env = ChunkEnv(c, p.kept, self.params)
            for n, free in zip(p.seg.run, p.seg.free, strict=True):
                interp.dying = free
                env[n] = interp.run_node(n)
                for a in free:
                    env.pop(a, None)
            if needs:
                xs.append(env[x])
            for n in p.handed:
                p.kept.put(n, c, env[n])
            interp.env = env = None
        for p in paths:
            for n in p.spent:  # the frontier shrinks as it grows: chunk by chunk
                p.kept.release(n, c)
        if needs:
            if not self.sums:
                todo = [s for s in self.sched.groups[x] if s.fqn not in self.done]
                self.sums = statistics.start(self.needs, needs, todo, xs[0], self.weight)
            statistics.accumulate(self.sums, *xs)
        del xs
        osmem.release_freed_memory(self.trim_slack)

    def _replaced_weight(self, node: fx.Node, arg: fx.Node) -> bool:
        return node in self.interp.replaced and \
            node.args[self.interp.replaced[node][0]] is arg

    def _streamed(self, x: fx.Node | None) -> frozenset[str]:
        """The statistics of ``x`` that its sites still to solve need, accumulated as the
        chunks run (none for a pinned group: :func:`~.statistics.pinned_sums` makes them at
        the barrier)."""
        if x is None or x in self.sched.pinned:
            return frozenset()
        return self.needs.union([s for s in self.sched.groups[x] if s.fqn not in self.done])

    # ------------------------------------------------------------------ the barrier

    def compress_group(self, x: fx.Node) -> None:
        """Complete the statistics of ``x``, compress its sites (spread over the team), and
        make the interpreter compute with the compressed weights from now on."""
        group = self.sched.groups[x]
        todo = [s for s in group if s.fqn not in self.done]
        names = ", ".join(s.fqn for s in group)
        stats = self._statistics(x, todo, names)
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

    def _statistics(self, x: fx.Node, todo: list[Site], names: str
                    ) -> dict[int | str | None, Statistics]:
        """The team's statistics of ``x`` for the sites still to solve: by expert (None: the
        linears), or under a site's name where it has its own (see
        :func:`~.statistics.assemble`)."""
        with self.team.guard(names), matmul_precision(self.precision):
            if x in self.sched.pinned:
                sums = statistics.pinned_sums(x, todo, self.needs, self.kept, self.dense)
            else:
                sums, self.sums = ({None: self.sums} if self.sums else {}), {}
        stats: dict[int | str | None, Statistics] = {}
        for key, parts in sums.items():
            for partial in parts.values():
                self.team.reduce(partial, names)
            h = parts[HESSIAN]
            if key is not None:
                statistics.check_routed(h, f"{names} (expert {key})")
                self.routed[(x, key)] = h.count
                if h.count < h.sum.shape[0]:
                    with matmul_precision(self.precision):
                        h = statistics.all_tokens(
                            x, next(s for s in todo if s.index == key), self.kept, self.sched,
                            self.firsts, self.team, names, h.count)
            stats.update(statistics.assemble(key, h, parts, todo))
            del h
        return stats

    def solve(self, s: Site, stats: Statistics | None) -> tuple[Compressed, LayerReport]:
        t = time.perf_counter()
        method = self.plan[s.fqn]
        stats = self.needs.for_site(s, stats)
        c = method.solve(self.weight(s), stats, s.fqn)
        seconds = time.perf_counter() - t
        count = stats.count if stats is not None else 0
        routed = self.routed.get((s.input, s.index), count) if s.index is not None else None
        report = LayerReport(s.fqn, type(method).__name__, s.shape, c.loss, seconds, count,
                             self.team.rank, routed, pruned_fraction(method))
        log.debug("compressed %s with %s: loss %.4g in %.2fs", s.fqn, method, c.loss, seconds)
        return c, report

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

    # ------------------------------------------------------------------ the results

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
        Pages a run would otherwise keep to its end: every compressed layer's weight. A
        weight that will hold its result (:meth:`fold`) is never paged out."""
        for node in [n for n, todo in self.mapped.items()
                     if not todo and self.last_read.get(n, -1) <= self.segment]:
            del self.mapped[node]
            osmem.page_out(self.params[node])

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
    site's parameter (:meth:`Run.fold`): pruned, unquantized values of a linear owning an
    unshared, resident ``(out, in)`` weight."""
    pruned = c.values is not None if isinstance(c, Compressed) else c.prunes_in_place
    return (pruned and s.index is None and not s.transposed and not s.tied
            and not s.param.is_meta)


def held_bytes(s: Site, method: Method, in_memory: bool) -> int:
    """Bytes a run holds of ``s``'s result until its module is made: an in-memory run
    (``calibrate`` returning its results) compacts or folds them (:meth:`Run.finish`)."""
    return method.held(s.shape, in_memory and s.index is None,
                       in_memory and folds(s, method))

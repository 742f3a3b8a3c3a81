"""entry: :func:`calibrate`, the calibration pass — set up a :class:`~.run.Run` (OWL's
sparsities, the schedule, the liveness plan of each path, the frontiers), start it from the
inputs or a frontier snapshot, and loop over its segments.

The graph is interpreted *node by node over all calibration chunks*, not sample by sample
through the whole model: when the interpreter reaches the first linear that reads some
activation X, every chunk's X is available, so the layer's statistics are complete; all
linears reading X (q/k/v, gate/up) are compressed with them, and the interpreter continues
with their compressed weights. Every later layer therefore sees the errors of the layers
before it (true-sequential, at the granularity of single linears), and each node runs
exactly once per chunk (see :mod:`fxcompress.calibration` for the rooms).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from tqdm.auto import tqdm

from .. import osmem
from ..algorithms import Compressed, Statistics
from ..methods import PLANNERS, Method, Planner
from ..passes.sites import Site
from . import statistics
from .frontier import Frontier, Params
from .interpreter import Interpreter, flat_inputs
from .liveness import PRICE, plan_paths
from .precision import matmul_precision
from .run import Run
from .schedule import schedule
from .seams import LayerReport, Local, Team, WeightSource
from .snapshots import Snapshots


def calibrate(
    ep: ExportedProgram,
    sites: Sequence[Site],
    plan: Mapping[str, Method],
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
    """Compress every site named in ``plan`` (left as it is: OWL's sparsities go into the
    run's copy); ``chunks`` are batched calls of the model (with a :class:`~.seams.Team` of
    several processes: this process's share of them).

    ``weights`` supplies the parameters a meta-device program lacks, on its ``device``;
    ``offload`` keeps the frontier on CPU or disk (:class:`~.frontier.Frontier`); ``done``
    holds results of an interrupted run to reuse, and ``snapshots`` where the run saves its
    frontier now and then and, with ``done``, continues from the last one; ``sink(site,
    compressed, report)`` takes each result as it is made, and results given to it are not
    returned. ``recompute``: what one byte of frontier is worth in flop-equivalents of
    recomputation (:mod:`~.liveness`; ``None`` keeps every value later segments read).
    ``precision``: of the forward passes' matmuls and the statistics, ``"fp32"`` or
    ``"bf16"`` (the solves compute in float32). ``trim_slack``: how far the resident set may
    grow before freed memory goes back to the OS (:func:`~fxcompress.osmem.trim_slack`).
    """
    if not chunks:
        raise ValueError("calibration data is empty")
    team = team or Local()
    flat = flat_inputs(ep, chunks)
    params = _params(ep, flat[0], weights)
    plan = {**plan, **_spread_sparsity(ep.graph_module, sites, plan, flat[0], params, team,
                                       precision)}
    needs = statistics.Needs(plan)
    kept, dense = _frontiers(len(chunks), offload, weights, params, needs.dense)
    sched = schedule(ep.graph_module, sites, plan)
    live, dense_live = plan_paths(ep, sched, chunks[0], recompute, needs.dense)
    bar = tqdm(total=sum(len(g) for g in sched.groups.values()), disable=not progress,
               desc="fxcompress", unit="layer")
    run = Run(sched, plan, needs, params, kept, dense,
              Interpreter(ep.graph_module, precision == "bf16"), team, done or {}, sink,
              on_statistics, bar, live, dense_live, precision=precision, trim_slack=trim_slack)
    bar.update(sum(1 for g in sched.groups.values() for s in g if s.fqn in run.done))
    run.mapped = _mapped(sites, plan, params, run.done)
    try:
        start = _begin(run, ep, flat, snapshots)
        del flat
        _loop(run, start, snapshots)
    finally:
        bar.close()
        for f in run.frontiers:
            f.close()
    return run.results, run.reports


def _frontiers(chunks: int, offload: str | None, weights: WeightSource | None,
               params: Params, dense: bool) -> tuple[Frontier, Frontier | None]:
    """The compressed path's frontier and, for a dense path, the dense one's; an offloaded
    frontier brings its values back where the weights are."""
    device = weights.device if weights is not None else None
    if offload is not None and device is None:
        device = next((v.device for v in params.static.values() if isinstance(v, Tensor)),
                      None)
    return Frontier(chunks, offload, device), \
        Frontier(chunks, offload, device) if dense else None


def _params(ep: ExportedProgram, first: Sequence[Any], weights: WeightSource | None) -> Params:
    """The program's parameters and buffers (the non-user placeholders of the first call)."""
    placeholders = [n for n in ep.graph_module.graph.nodes if n.op == "placeholder"]
    user = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    return Params(ep, {p: first[i] for i, p in enumerate(placeholders) if p.name not in user},
                  weights)


def _mapped(sites: Sequence[Site], plan: Mapping[str, Method], params: Params,
            done: Mapping[str, Compressed]) -> dict[fx.Node, set[str]]:
    """The weights mapped from a file that only planned sites read, with their sites still
    to finish: what :meth:`Run.page_out` gives back once they are."""
    readers: dict[fx.Node, list[Site]] = {}
    for s in sites:
        readers.setdefault(s.weight, []).append(s)
    owned = [n for n, ss in readers.items() if n in params.static
             and all(s.fqn in plan and not s.tied for s in ss)]
    return {n: {s.fqn for s in readers[n] if s.fqn not in done}
            for n, f in zip(owned, osmem.file_mapped([params.static[n] for n in owned]),
                            strict=True) if f}


def _begin(run: Run, ep: ExportedProgram, flat: Sequence[Sequence[Any]],
           snapshots: Snapshots | None) -> int:
    """The segment the run starts with: after a usable frontier snapshot of an interrupted
    run, else the first, with every path's frontier holding the user inputs."""
    if snapshots is not None and run.done and not run.data_free:
        restored = snapshots.restore(run.plans, run.sched.groups, run.done, run.frontiers)
        if restored is not None:
            return run.resume(restored)
    placeholders = [n for n in ep.graph_module.graph.nodes if n.op == "placeholder"]
    user = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    for i, p in enumerate(placeholders):
        if p.name in user and p.users:
            for c, f in enumerate(flat):
                for frontier in run.frontiers:
                    frontier.put(p, c, f[i])
    return 0


def _loop(run: Run, start: int, snapshots: Snapshots | None) -> None:
    """Every segment from ``start``: its forward over the chunks, then its barrier's group
    (RTN and magnitude pruning look at the weights only: no forward pass is run for them)."""
    team = run.team
    with torch.no_grad():
        for k, seg in enumerate(run.live.segments[start:], start):
            x, run.segment = seg.barrier, k
            names = ", ".join(s.fqn for s in run.sched.groups[x]) if x is not None else "output"
            if not run.data_free:
                with team.guard(f"the input of {names}"):
                    run.run_segment(k)
                run.page_out()
                osmem.release_freed_memory(run.trim_slack)
            if x is not None:
                run.compress_group(x)
                run.page_out()
                osmem.release_freed_memory(run.trim_slack)
                if snapshots is not None and not run.data_free and not run.firsts \
                        and snapshots.due():
                    snapshots.save(k, run.plans, run.frontiers)


def _spread_sparsity(gm: fx.GraphModule, sites: Sequence[Site], plan: Mapping[str, Method],
                     inputs: Sequence[Any], params: Params, team: Team, precision: str
                     ) -> dict[str, Method]:
    """The methods that the planners of :data:`~fxcompress.methods.PLANNERS` (OWL) move, from
    the statistic each measures on a dense run over the first chunk, measured only if some
    site is one of its own. Rank 0 measures and shares, so a team plans as one process would
    on the same first chunk."""
    def weight(s: Site) -> Tensor:
        w = s.param.detach() if not s.param.is_meta else params.load(s.weight)
        return s.matrix(w).float()

    moved: dict[str, Method] = {}
    for planner in PLANNERS:
        if not any(planner.eligible(s, plan.get(s.fqn)) for s in sites):
            continue

        def norms(targets: set[fx.Node], planner: Planner = planner) -> dict[fx.Node, Tensor]:
            with torch.no_grad(), matmul_precision(precision):
                return planner.column_norms(gm, inputs, params,
                                            Interpreter(gm, precision == "bf16"), targets)

        mine = planner.apply(plan, sites, norms, weight) if team.rank == 0 else None
        moved.update(team.share(0, mine, f"the plan of {planner.__name__.rsplit('.', 1)[-1]}"))
    return moved

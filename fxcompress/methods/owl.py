"""Outlier-weighted layerwise sparsity (OWL, Yin et al. 2024) for unstructured SparseGPT.

Uniform sparsity prunes every decoder block by the same fraction; OWL prunes blocks that hold
more *outlier* weights less and the others more, the model's overall sparsity staying the one
requested. A weight's score is Wanda's ``|W_ij| · ‖x_j‖`` (``‖x_j‖``: the norm of input
feature j over calibration tokens of the dense model); a block's outlier ratio is the fraction
of its scores above ``owl_m`` times the block's mean score. The ratios are mapped linearly onto
``[0, 2·owl_lmbda]`` (least to most outliers), less their mean weighted by each block's weight
count, and subtracted from the requested sparsity: the blocks' sparsities span a range
``2·owl_lmbda`` wide whose weighted mean is the requested one.

OWL is the example of a statistic and a planner going through the methods' one door: the
statistic (:data:`INPUT_NORMS`, the dense model's input norms) is declared here, a method asks
for it through :meth:`~fxcompress.methods.base.Method.model_needs` (SparseGPT with a spread),
and calibration, knowing no method, gathers it with :func:`column_norms` and lets
:func:`apply` re-plan the sites that asked. Adding another such step is one file like this one
and one line in ``methods/__init__.py`` (``PLANNERS``).

The norms come from one dense forward pass over the first calibration chunk (measured close
enough to all samples' on SmolLM2: benchmarks/RESULTS.md, OWL). With a team of processes rank
0 computes them and shares the result, so every rank — and a run with one process on the same
data — prunes alike.

A block is a site's name up to its first numeric component (``model.layers.3``); experts keep
the requested sparsity (their inputs are routed, not one activation per block). Measurements
of the spread: benchmarks/RESULTS.md, OWL.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, fx

from .base import Method

if TYPE_CHECKING:
    from ..passes.sites import Site  # read for its fqn, index, shape and input only

log = logging.getLogger(__name__)

INPUT_NORMS = "input_norms"  # ‖x_j‖ per input feature of a layer, over the dense model's tokens
STATISTIC = INPUT_NORMS  # what this planner measures (methods.base.Planner)
OWL_LMBDA = 0.04  # the default spread of unstructured SparseGPT (see SparseGPT.owl)


def block_of(fqn: str) -> str:
    """The repeated block a layer belongs to: its name up to the first numeric component
    (``model.layers.3.mlp.up_proj`` → ``model.layers.3``), or the name itself."""
    m = re.match(r"(.*?(?:^|\.)\d+)(?:\.|$)", fqn)
    return m.group(1) if m else fqn


def eligible(s: Site, method: Method | None) -> bool:
    """Whether OWL moves this site's sparsity: its method asks for the input norms (and so
    has ``sparsity``, ``owl`` and ``owl_m``), and it is not an expert."""
    return method is not None and INPUT_NORMS in method.model_needs() and s.index is None


def spread(ratios: Mapping[str, float], sizes: Mapping[str, int], sparsity: float,
           lmbda: float) -> dict[str, float]:
    """Each block's sparsity from its outlier ratio: ``sparsity - (a_b - ā)`` with ``a_b`` the
    ratio mapped linearly onto ``[0, 2·lmbda]`` and ``ā`` its mean weighted by ``sizes``, so
    the weight-weighted mean sparsity is ``sparsity`` exactly. Equal ratios: uniform."""
    lo, hi = min(ratios.values()), max(ratios.values())
    if hi == lo:
        return dict.fromkeys(ratios, sparsity)
    a = {b: (r - lo) / (hi - lo) * 2 * lmbda for b, r in ratios.items()}
    centre = sum(a[b] * sizes[b] for b in a) / sum(sizes[b] for b in a)
    return {b: sparsity - (a[b] - centre) for b in a}


def outlier_ratios(blocks: Mapping[str, Sequence[Site]], norms: Mapping[fx.Node, Tensor],
                   weight: Callable[[Site], Tensor], m: float) -> dict[str, float]:
    """Per block, the fraction of Wanda scores ``|W_ij|·‖x_j‖`` above ``m`` × their mean
    (two passes over the block's weights, one site at a time: no block-sized copy)."""
    ratios = {}
    for b, sites in blocks.items():
        total = count = 0.0
        for s in sites:
            total += float((weight(s).abs() * norms[s.input]).sum())
            count += s.shape[0] * s.shape[1]
        threshold, above = m * total / count, 0
        for s in sites:
            above += int(((weight(s).abs() * norms[s.input]) > threshold).sum())
        ratios[b] = above / count
    return ratios


def column_norms(gm: fx.GraphModule, inputs: Sequence[Any], params: Any, interp: Any,
                 targets: set[fx.Node]) -> dict[fx.Node, Tensor]:
    """``‖x_j‖`` over the rows of each activation in ``targets``, from one dense run of ``gm``
    on the flat ``inputs`` (placeholders that ``params`` holds or loads are its values; each
    lazily loaded weight is read when used and not kept). Values are dropped after their last
    use and the run stops at the last target."""
    nodes = list(gm.graph.nodes)
    env = _Env(params)
    for i, p in enumerate(n for n in nodes if n.op == "placeholder"):
        if p not in params and not params.lazy(p):
            env[p] = inputs[i]
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    last: dict[fx.Node, int] = {}
    for i, n in enumerate(body):
        for a in n.all_input_nodes:
            last[a] = i
    end = max((i for i, n in enumerate(body) if n in targets), default=-1)
    out: dict[fx.Node, Tensor] = {}

    def measure(n: fx.Node) -> None:
        x = env[n]
        out[n] = x.detach().reshape(-1, x.shape[-1]).float().square().sum(0).sqrt()

    interp.env, interp.dying = env, ()
    try:
        for n in [p for p in targets if p.op == "placeholder"]:
            measure(n)
        for i, n in enumerate(body[:end + 1]):
            env[n] = interp.run_node(n)
            if n in targets:
                measure(n)
            for a in n.all_input_nodes:
                if last[a] == i:
                    env.pop(a, None)
    finally:
        interp.env = {}
    return out


class _Env(dict):
    """Values of one run, falling back to the parameters (loaded, not kept, when lazy)."""

    def __init__(self, params: Any):
        super().__init__()
        self.params = params

    def __contains__(self, node: object) -> bool:
        return dict.__contains__(self, node) or node in self.params or self.params.lazy(node)

    def __missing__(self, node: fx.Node) -> Any:
        return self.params.load(node)


def apply(plan: Mapping[str, Method], sites: Sequence[Site], norms: Callable[[set[fx.Node]],
          dict[fx.Node, Tensor]], weight: Callable[[Site], Tensor]) -> dict[str, Method]:
    """The new method of each eligible site of ``plan``: the same method at its block's OWL
    sparsity (``owl_lmbda=0``: it is spread already). ``norms(targets)`` measures the input
    norms; it is called only when a site is eligible."""
    groups: dict[Method, dict[str, list[Site]]] = {}
    for s in sites:
        method = plan.get(s.fqn)
        if eligible(s, method):
            groups.setdefault(method, {}).setdefault(block_of(s.fqn), []).append(s)
    if not groups:
        return {}
    measured = norms({s.input for blocks in groups.values() for ss in blocks.values()
                      for s in ss})
    moved: dict[str, Method] = {}
    for method, blocks in groups.items():
        sizes = {b: sum(s.shape[0] * s.shape[1] for s in ss) for b, ss in blocks.items()}
        ratios = outlier_ratios(blocks, measured, weight, method.owl_m)
        sparsity = spread(ratios, sizes, method.sparsity, method.owl)
        for b, ss in blocks.items():
            per_block = dataclasses.replace(method, sparsity=round(sparsity[b], 6), owl_lmbda=0.0)
            moved.update({s.fqn: per_block for s in ss})
        log.info("OWL (m=%g, lambda=%g): %d blocks at sparsity %.3f-%.3f (outlier ratios "
                 "%.4f-%.4f), %g overall", method.owl_m, method.owl, len(blocks),
                 min(sparsity.values()), max(sparsity.values()), min(ratios.values()),
                 max(ratios.values()), method.sparsity)
    return moved

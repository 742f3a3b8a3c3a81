"""calibrate: run the captured graph over the calibration data and compress each site in turn.

The graph is interpreted *node by node over all calibration chunks*, not sample by sample
through the whole model: when the interpreter reaches the first linear that reads some
activation X, every chunk's X is available, so the layer Hessian ``H = 2XᵀX/n`` is complete;
all linears reading X (q/k/v, gate/up) are compressed with that one H, and the interpreter
continues with their compressed weights. Every later layer therefore sees the errors of the
layers before it (true-sequential, at the granularity of single linears), and each node runs
exactly once per chunk: one forward pass in all, where layer-wise calibrate-then-propagate
schemes run two per layer.

Between two such barriers the nodes run chunk-major (chunk by chunk through the whole
segment), so only values that cross a barrier are held for all chunks at once; everything is
freed after its last use, and only the nodes that lead to some site's input run at all (the
language-model head of a decoder whose head is not compressed never runs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from tqdm.auto import tqdm

from ..algorithms import Compressed, Hessian, gptq, magnitude, rtn, sparsegpt
from ..recipe import GPTQ, RTN, Magnitude, Method, SparseGPT
from .sites import Site

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    """One compressed linear: what was done, the loss the algorithm measured, how long."""

    fqn: str
    method: str
    shape: tuple[int, int]
    loss: float
    seconds: float
    samples: int  # rows of X (tokens) in its Hessian, 0 without one


def needs_hessian(method: Method) -> bool:
    return isinstance(method, (GPTQ, SparseGPT))


def compress(w: Tensor, h: Tensor | None, method: Method, name: str) -> Compressed:
    """Dispatch one weight ``(out, in)`` to its algorithm."""
    if isinstance(method, GPTQ):
        return gptq(w, h, method, name)
    if isinstance(method, SparseGPT):
        return sparsegpt(w, h, method, name)
    if isinstance(method, RTN):
        return rtn(w, method)
    if isinstance(method, Magnitude):
        return magnitude(w, method)
    raise TypeError(f"{name}: unknown method {method!r}")


class _ChunkEnv(dict):
    """Interpreter environment of one chunk: values computed in the current segment, falling
    back to values kept across segments and to the (chunk-independent) parameters."""

    def __init__(self, chunk: int, kept: dict[fx.Node, list], consts: dict[fx.Node, object]):
        super().__init__()
        self.chunk, self.kept, self.consts = chunk, kept, consts

    def __contains__(self, node: object) -> bool:
        return dict.__contains__(self, node) or node in self.consts or node in self.kept

    def __missing__(self, node: fx.Node):
        if node in self.consts:
            return self.consts[node]
        return self.kept[node][self.chunk]


class _Interpreter(fx.Interpreter):
    """Runs single nodes; linears being compressed compute with their compressed weight."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.replaced: dict[fx.Node, tuple[int, Tensor]] = {}

    def run_node(self, n: fx.Node):
        if n not in self.replaced:
            return super().run_node(n)
        position, weight = self.replaced[n]
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args = args[:position] + (weight,) + args[position + 1:]
            return self.call_function(n.target, args, kwargs)


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
        for node, value in zip(placeholders, values):
            _check_input(node, value, i)
        flat.append(values)
    return flat


def _check_input(node: fx.Node, value: object, index: int) -> None:
    expected = node.meta.get("val")
    if not isinstance(expected, torch.Tensor) or not isinstance(value, torch.Tensor):
        return
    static = [d if isinstance(d, int) else None for d in expected.shape]
    shape_ok = value.dim() == len(static) and all(
        s is None or s == v for s, v in zip(static, value.shape))
    if not shape_ok or value.dtype != expected.dtype:
        want = tuple("*" if s is None else s for s in static)
        raise ValueError(f"calibration batch {index}: input {node.name!r} has shape "
                         f"{tuple(value.shape)} and dtype {value.dtype}, the captured graph "
                         f"expects shape {want} (* = any) and dtype {expected.dtype}")


def _ancestors(targets: set[fx.Node]) -> set[fx.Node]:
    seen, stack = set(), list(targets)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def calibrate(
    ep: ExportedProgram,
    sites: Sequence[Site],
    plan: dict[str, Method],
    chunks: Sequence[tuple[tuple, dict]],
    *,
    progress: bool = True,
    on_hessian: Callable[[str, Tensor], None] | None = None,
) -> tuple[dict[str, Compressed], list[LayerReport]]:
    """Compress every site named in ``plan``; ``chunks`` are batched calls of the model."""
    if not chunks:
        raise ValueError("calibration data is empty")
    gm = ep.graph_module
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    user = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    flat = _flat_inputs(ep, chunks)
    consts = {p: flat[0][i] for i, p in enumerate(placeholders) if p.name not in user}
    kept: dict[fx.Node, list] = {p: [f[i] for f in flat] for i, p in enumerate(placeholders)
                                 if p.name in user}

    todo = [s for s in sites if s.fqn in plan]
    groups: dict[fx.Node, list[Site]] = {}
    for s in todo:
        groups.setdefault(s.input, []).append(s)
    needed = _ancestors(set(groups))
    order = [n for n in nodes if n in needed and n.op not in ("placeholder", "output")]
    position = {n: i for i, n in enumerate(order)}
    last_use = {n: max((position.get(u, -1) for u in n.users), default=-1)
                for n in list(kept) + order}
    barriers: list[tuple[int, fx.Node]] = []  # (position, input): compress before that node
    for x, group in groups.items():
        pos = min((position[s.node] for s in group if s.node in position),
                  default=position.get(x, -1) + 1)
        barriers.append((pos, x))
        last_use[x] = max(last_use[x], pos)
    barriers.sort(key=lambda b: b[0])

    interp = _Interpreter(gm)
    results: dict[str, Compressed] = {}
    reports: list[LayerReport] = []
    bar = tqdm(total=len(todo), disable=not progress, desc="fxcompress", unit="layer")

    def run_segment(start: int, end: int) -> None:
        seg = order[start:end]
        if not seg:
            return
        for c in range(len(chunks)):
            interp.env = _ChunkEnv(c, kept, consts)
            for n in seg:
                interp.env[n] = interp.run_node(n)
            for n in seg:
                if last_use[n] >= end:
                    kept.setdefault(n, [None] * len(chunks))[c] = interp.env[n]
        interp.env = {}
        for n in [n for n in kept if last_use[n] < end]:
            del kept[n]
        for n in [n for n in interp.replaced if position.get(n, len(order)) < end]:
            del interp.replaced[n]

    def compress_group(x: fx.Node) -> None:
        group = groups[x]
        h, hv = None, None
        if any(needs_hessian(plan[s.fqn]) for s in group):
            h = Hessian.zeros(group[0].shape[1], device=kept[x][0].device)
            for value in kept[x]:
                h.add(value)
            hv = h.value()
            if on_hessian is not None:
                for s in group:
                    on_hessian(s.fqn, hv)
        for s in group:
            t = time.perf_counter()
            weight = s.module.weight.detach()
            w = (weight.t() if s.transposed else weight).float()
            method = plan[s.fqn]
            c = compress(w, hv, method, s.fqn)
            w_hat = c.dense().to(weight.dtype)
            interp.replaced[s.node] = (2 if s.transposed else 1,
                                       w_hat.t().contiguous() if s.transposed else w_hat)
            results[s.fqn] = c
            seconds = time.perf_counter() - t
            reports.append(LayerReport(s.fqn, type(method).__name__, s.shape, c.loss, seconds,
                                       0 if h is None else h.count))
            log.debug("compressed %s with %s: loss %.4g in %.2fs", s.fqn, method, c.loss, seconds)
            bar.set_postfix_str(f"{s.fqn} loss={c.loss:.3g} {seconds:.2f}s")
            bar.update()

    with torch.no_grad():
        start = 0
        for pos, x in barriers:
            run_segment(start, pos)
            compress_group(x)
            start = pos
        run_segment(start, len(order))
    bar.close()
    return results, reports

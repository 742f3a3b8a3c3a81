"""find_sites: the weights of a captured graph that fxcompress can compress, by name.

A site is one ``(out, in)`` weight matrix and the activation it multiplies: a parameter, an
index into it (an expert), the node that reads the parameter and the operand it is read as.
Three kinds of call are recognised, each with what its parameter is:

* ``aten.linear(x, W)`` — an ``nn.Linear`` weight ``(out, in)``; ``aten.addmm(b, x, W)`` — a
  Hugging Face ``Conv1D`` weight stored transposed, ``(in, out)``. The name is the module's.
* ``aten._grouped_mm(x, Wᵀ, offs)`` / ``transformers.grouped_mm_fallback(x, Wᵀ, offs)`` — the
  experts of a mixture-of-experts block (``experts_implementation="grouped_mm"``, the
  transformers default): a 3-D parameter ``(E, out, in)`` (read through a transpose) or
  ``(E, in, out)``, rows of ``x`` sorted by expert, expert ``e`` owning rows
  ``offs[e-1]:offs[e]``.
* ``aten.bmm(W[ids], x[..., None])`` / ``aten.bmm(x[:, None], W[ids])`` — the same experts under
  ``experts_implementation="batched_mm"``: row ``r`` of ``x`` belongs to expert ``ids[r]``.

Each expert slice ``W[e]`` is its own site named ``<parameter>.<e>`` (e.g.
``model.layers.0.mlp.experts.gate_up_proj.3``), so recipes, reports and Hessians are per
expert. The eager experts implementation (a Python loop over the experts hit) does not export
(data-dependent control flow) and so never reaches this pass.

Module names come from a node's ``nn_module_stack`` and are checked against the parameter's
owner, so a call that borrows another module's weight is not mistaken for it. Weights tied to
another parameter (a head tied to the embedding) are marked so the recipe can skip them.
Everything else that multiplies by a parameter — a router's bare weight, a 3-D parameter read
in a way none of the kinds above recognises — is returned with the reason it is left dense.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.export import ExportedProgram

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass
class Site:
    """One compressible ``(out, in)`` weight in the graph."""

    fqn: str  # the name recipes match: module name, or "<parameter>.<expert>"
    node: fx.Node  # the node that reads the parameter (a compressed value replaces it there)
    operand: int  # position of the parameter in ``node.args``
    input: fx.Node  # the activation whose rows are X (H is built from it)
    weight: fx.Node  # the parameter placeholder
    module: nn.Module  # the module owning the parameter
    attr: str  # the parameter's name in ``module`` ("weight", "gate_up_proj", ...)
    transposed: bool  # the parameter is stored (in, out) (per expert for a 3-D one)
    tied: bool  # the parameter is shared with another module
    index: int | None = None  # expert e: the site's weight is parameter[e]
    kind: str = "linear"  # "linear", "grouped" (rows by offsets) or "batched" (rows by ids)
    matmul: fx.Node | None = None  # the call that multiplies (== node for a linear)
    routing: fx.Node | None = None  # "grouped": cumulative offsets; "batched": row expert ids

    @property
    def param(self) -> Tensor:
        """The whole parameter (3-D for experts)."""
        return getattr(self.module, self.attr)

    @property
    def module_name(self) -> str:
        """The owning module's name (the fqn less the parameter and expert, for experts)."""
        return self.fqn if self.index is None else self.fqn.rsplit(".", 2)[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        w = self.param.shape[-2:]
        return (w[1], w[0]) if self.transposed else (w[0], w[1])

    def matrix(self, param: Tensor) -> Tensor:
        """This site's ``(out, in)`` weight inside ``param`` (a view)."""
        w = param if self.index is None else param[self.index]
        return w.t() if self.transposed else w

    def stored(self, w: Tensor) -> Tensor:
        """An ``(out, in)`` weight in this site's storage orientation (one expert's slice)."""
        return w.t().contiguous() if self.transposed else w

    def rows(self, x: Tensor, routing: Tensor | None) -> Tensor:
        """The rows of activation ``x`` this site multiplies (an expert's routed tokens)."""
        if self.kind == "linear":
            return x
        x = x.reshape(-1, self.shape[1])
        if self.kind == "grouped":
            offs = routing.long()
            start = 0 if self.index == 0 else int(offs[self.index - 1])
            return x[start:int(offs[self.index])]
        return x[routing.reshape(-1) == self.index]


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _grouped_targets() -> tuple:
    targets = [aten._grouped_mm.default] if hasattr(aten, "_grouped_mm") else []
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        targets.append(fallback.default)
    return tuple(targets)


def _owner(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


def _shared_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _linear(node: fx.Node, conv1d: type | None) -> tuple | None:
    """``(x, W node, operand, transposed)`` of a linear/Conv1D call, else None."""
    if node.target is aten.linear.default:
        return node.args[0], node.args[1], 1, False
    if node.target is aten.addmm.default and conv1d is not None:
        return node.args[1], node.args[2], 2, True
    return None


def _is_transpose_last(node: object) -> bool:
    return isinstance(node, fx.Node) and node.target is aten.transpose.int \
        and sorted(d % 3 for d in node.args[1:3]) == [1, 2]


def _experts(node: fx.Node, grouped: tuple, params: dict[str, str]) -> tuple | None:
    """``(kind, x, W placeholder, reader, operand, transposed, routing)`` of an experts
    matmul whose weight operand is a 3-D parameter, else None."""
    if node.target in grouped:
        x, w = node.args[0], node.args[1]
        offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
        if _is_transpose_last(w) and w.args[0].name in params:  # (E, out, in) read as Wᵀ
            return "grouped", x, w.args[0], w, 0, False, offs
        if isinstance(w, fx.Node) and w.name in params:  # stored (E, in, out)
            return "grouped", x, w, node, 1, True, offs
        return None
    if node.target is aten.bmm.default:
        a, b = node.args[:2]
        for w, x, transposed in ((a, b, False), (b, a, True)):
            if isinstance(w, fx.Node) and w.target is aten.index.Tensor \
                    and isinstance(w.args[0], fx.Node) and w.args[0].name in params \
                    and len(w.args[1]) == 1 and w.args[1][0] is not None:
                return "batched", x, w.args[0], w, 0, transposed, w.args[1][0]
    return None


def _param_name(node: fx.Node, params: dict[str, str]) -> str | None:
    return params.get(node.name) if isinstance(node, fx.Node) else None


def find_sites(ep: ExportedProgram, model: nn.Module) -> tuple[list[Site], dict[str, str]]:
    """All compressible weights in graph order, and the modules that multiply by a parameter
    but are left dense, each with the reason."""
    params = ep.graph_signature.inputs_to_parameters
    conv1d, grouped = _conv1d_type(), _grouped_targets()
    shared = _shared_names(model)
    sites: list[Site] = []
    others: dict[str, str] = {}
    claimed: set[str] = set()
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        linear = _linear(node, conv1d)
        if linear is not None:
            site = _linear_site(node, linear, params, model, conv1d, shared, others)
            if site is not None:
                sites.append(site)
                claimed.add(params[site.weight.name])
            continue
        found = _experts(node, grouped, params)
        if found is not None:
            new = _expert_sites(node, found, params, model, shared)
            sites += new
            claimed.add(params[found[2].name])
    for node in ep.graph.nodes:  # 3-D parameters read some other way
        name = _param_name(node, params)
        if name is not None and name not in claimed and node.meta["val"].dim() == 3:
            owner = name.rpartition(".")[0]
            reader = ", ".join(str(u.target) for u in node.users)
            others.setdefault(owner, f"its 3-D parameter {name!r} is read by {reader}, not a "
                                     f"recognised experts implementation (supported: "
                                     f"grouped_mm, batched_mm)")
    log.debug("found %d sites", len(sites))
    return sites, others


def _linear_site(node: fx.Node, found: tuple, params: dict[str, str], model: nn.Module,
                 conv1d: type | None, shared: dict, others: dict[str, str]) -> Site | None:
    x, w, operand, transposed = found
    name = _owner(node)
    if name is None:
        return None
    if not isinstance(w, fx.Node) or w.name not in params:
        others.setdefault(name, "its linear call multiplies by a computed tensor, not a "
                                "parameter")
        return None
    module = model.get_submodule(name)
    expected = conv1d if transposed else nn.Linear
    if not isinstance(module, expected) or model.get_parameter(params[w.name]) is not \
            module.weight:
        others.setdefault(name, f"{type(module).__name__} calls a linear op but is not an "
                                f"nn.Linear/Conv1D with its own weight parameter")
        return None
    tied = len(shared.get(id(module.weight), [])) > 1
    return Site(name, node, operand, x, w, module, "weight", transposed, tied, matmul=node)


def _expert_sites(node: fx.Node, found: tuple, params: dict[str, str], model: nn.Module,
                  shared: dict) -> list[Site]:
    kind, x, w, reader, operand, transposed, routing = found
    pname = params[w.name]
    owner, _, attr = pname.rpartition(".")
    module = model.get_submodule(owner)
    tied = len(shared.get(id(getattr(module, attr)), [])) > 1
    experts = w.meta["val"].shape[0]
    return [Site(f"{pname}.{e}", reader, operand, x, w, module, attr, transposed, tied,
                 index=e, kind=kind, matmul=node, routing=routing) for e in range(experts)]


def weight_path(site: Site) -> list[fx.Node]:
    """The nodes from the parameter's reader up to (not including) the matmul, in order:
    they must run after the site is compressed, so the schedule keeps them next to it."""
    if site.node is site.matmul:
        return []
    path, n = [], site.node
    while n is not site.matmul:
        path.append(n)
        users = [u for u in n.users if u.target is not operator.getitem]
        if len(users) != 1:
            break
        n = users[0]
    return path

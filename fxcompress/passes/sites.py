"""find_sites: the linear layers of a captured graph, by fully qualified module name.

A site is an ``aten.linear`` node whose weight is a lifted parameter, or an ``aten.addmm``
whose third operand is one (Hugging Face ``Conv1D`` stores its weight transposed, (in, out)).
The module name comes from the node's ``nn_module_stack`` (the innermost module that made the
call) and is checked against the parameter's owner, so a linear that borrows another module's
weight is not mistaken for it. Weights tied to another parameter (a language-model head tied
to the embedding) are marked so the recipe can skip them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.export import ExportedProgram

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass
class Site:
    """One compressible linear in the graph."""

    fqn: str  # module name in the user's model
    node: fx.Node  # the aten.linear / aten.addmm call
    input: fx.Node  # its activation input (H is built from it)
    weight: fx.Node  # the parameter placeholder
    module: nn.Module
    transposed: bool  # Conv1D: the parameter is (in, out)
    tied: bool  # the parameter is shared with another module

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


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


def find_sites(ep: ExportedProgram, model: nn.Module) -> tuple[list[Site], list[str]]:
    """All compressible linears in graph order, and the names of linear-looking calls that are
    not (their weight is not a parameter of an ``nn.Linear``/``Conv1D`` of that name)."""
    params = ep.graph_signature.inputs_to_parameters
    conv1d = _conv1d_type()
    shared = _shared_names(model)
    sites, others = [], []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.linear.default:
            x, w = node.args[0], node.args[1]
            transposed = False
        elif node.target is aten.addmm.default and conv1d is not None:
            x, w = node.args[1], node.args[2]
            transposed = True
        else:
            continue
        name = _owner(node)
        if not isinstance(w, fx.Node) or w.name not in params or name is None:
            if name is not None:
                others.append(name)
            continue
        module = model.get_submodule(name)
        expected = conv1d if transposed else nn.Linear
        if expected is None or not isinstance(module, expected) \
                or model.get_parameter(params[w.name]) is not module.weight:
            others.append(name)
            continue
        tied = len(shared.get(id(module.weight), [])) > 1
        sites.append(Site(name, node, x, w, module, transposed, tied))
    log.debug("found %d linear sites", len(sites))
    return sites, others

"""rewrite: put the compressed modules into the user's own model object.

Each compressed ``nn.Linear`` / ``Conv1D`` is replaced, by name, with the module that computes
with its compressed weight (``QuantLinear`` or ``SparseLinear``), on the same device, with the
same bias and dtype. The experts of a mixture-of-experts block are replaced together: their
experts module becomes one ``QuantExperts`` / ``SparseExperts`` holding every expert. The model
stays the user's object: its ``forward``, ``generate``, ``train()``/``eval()`` and
``state_dict()`` keep working; the captured graph is discarded.
"""

from __future__ import annotations

import logging

from torch import nn

from ..algorithms import Compressed
from ..modules import compressed_experts, compressed_module, set_module
from .sites import Site

log = logging.getLogger(__name__)


def expert_results(sites: list[Site], results: dict[str, Compressed]
                   ) -> dict[str, tuple[nn.Module, dict[str, list[Compressed]]]]:
    """The results of expert sites, per experts module and bank, experts in order; only for
    modules all of whose experts have a result."""
    banks: dict[str, tuple[nn.Module, dict[str, list]]] = {}
    for s in sites:
        if s.index is not None:
            module, by_bank = banks.setdefault(s.module_name, (s.module, {}))
            by_bank.setdefault(s.attr, []).append(results.get(s.fqn))
    return {name: (m, b) for name, (m, b) in banks.items()
            if all(c is not None for cs in b.values() for c in cs)}


def rewrite(model: nn.Module, sites: list[Site], results: dict[str, Compressed]) -> int:
    """Swap in a compressed module for every site in ``results``; return how many sites.
    Results are consumed as their modules are made (taken out of ``results``), so that the
    two are held together for one layer (or one experts module) at a time, not for the whole
    model."""
    count = 0
    for site in sites:
        if site.index is not None:  # experts: one module per block, below
            continue
        c = results.pop(site.fqn, None)
        if c is None:
            continue
        old = site.module
        new = compressed_module(c, old.bias, old.weight.dtype).to(old.weight.device)
        new.train(old.training)
        set_module(model, site.fqn, new)
        count += 1
        log.debug("rewrote %s: %s -> %s", site.fqn, type(old).__name__, new)
    banks = expert_results(sites, results)
    for name in list(banks):  # popped as made: one module's results held at a time
        old, by_bank = banks.pop(name)
        device = old.gate_up_proj.device
        new = compressed_experts(old, by_bank).to(device)
        new.train(old.training)
        set_module(model, name, new)
        count += sum(len(cs) for cs in by_bank.values())
        for s in sites:
            if s.module_name == name:
                results.pop(s.fqn, None)
        del by_bank
        log.debug("rewrote %s: %s -> %s", name, type(old).__name__, new)
    return count

"""rewrite: put the compressed modules into the user's own model object.

Each compressed ``nn.Linear`` / ``Conv1D`` is replaced, by name, with the module that computes
with its compressed weight (``QuantLinear`` or ``SparseLinear``), on the same device, with the
same bias and dtype. The model stays the user's object: its ``forward``, ``generate``,
``train()``/``eval()`` and ``state_dict()`` keep working; the captured graph is discarded.
"""

from __future__ import annotations

import logging

from torch import nn

from ..algorithms import Compressed
from ..modules import compressed_module
from .sites import Site

log = logging.getLogger(__name__)


def rewrite(model: nn.Module, sites: list[Site], results: dict[str, Compressed]) -> int:
    """Swap in a compressed module for every site in ``results``; return how many. Results
    are consumed as their modules are made (taken out of ``results``), so that the two are
    held together for one layer at a time, not for the whole model."""
    count = 0
    for site in sites:
        c = results.pop(site.fqn, None)
        if c is None:
            continue
        old = site.module
        new = compressed_module(c, old.bias, old.weight.dtype).to(old.weight.device)
        new.train(old.training)
        parent_name, _, child = site.fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        count += 1
        log.debug("rewrote %s: %s -> %s", site.fqn, type(old).__name__, new)
    return count

"""What a rewrite puts in the model: the compressed module for one linear's or one experts
block's compression results, and the one way modules are swapped in by name.

- :mod:`.linear`: ``QuantLinear``, ``SparseLinear`` (replacements for ``nn.Linear`` and
  Hugging Face ``Conv1D``) and :func:`set_precision`;
- :mod:`.experts`: ``QuantExperts``, ``SparseExperts`` (replacements for a mixture-of-experts
  block's experts) and the helpers that say which experts modules are supported.

Their public names are this package's public surface: ``from fxcompress.modules import X``.
Pickles of whole models written while this was one module (``torch.save(model)``) name the
classes and the ``load_state_dict`` hook ``_prepare_after_load`` as attributes of
``fxcompress.modules``: all of them are found here, so such pickles still load.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..algorithms import Compressed
from .experts import (
    EXPERT_BANKS,
    QuantExperts,
    SparseExperts,
    checkpoint_expert_names,
    expert_orientation,
    experts_activation,
    experts_unsupported,
)
from .linear import (
    CPU_INT4_GROUPS,
    PRECISIONS,
    QuantLinear,
    SparseLinear,
    _prepare_after_load,  # noqa: F401  (named here by torch.save(model) pickles, see below)
    int4pack,
    set_precision,
)

__all__ = ["CPU_INT4_GROUPS", "EXPERT_BANKS", "PRECISIONS", "QuantExperts", "QuantLinear",
           "SparseExperts", "SparseLinear", "checkpoint_expert_names", "compressed_experts",
           "compressed_module", "expert_orientation", "experts_activation",
           "experts_unsupported", "int4pack", "set_module", "set_precision"]


def compressed_experts(module: nn.Module, results: dict[str, list[Compressed]],
                       dtype: torch.dtype | None = None) -> nn.Module:
    """The module that computes ``module``'s experts with their compressed weights (pruned
    weights kept in ``dtype``, by default ``module``'s)."""
    if results["gate_up_proj"][0].quantized:
        return QuantExperts.from_compressed(module, results)
    return SparseExperts.from_compressed(module, results, dtype)


def compressed_module(c: Compressed, bias: Tensor | None, dtype: torch.dtype,
                      prepare: bool = True) -> nn.Module:
    """The module that computes with ``c`` (``prepare``: see :meth:`QuantLinear.
    from_compressed`)."""
    if c.blocks is not None:
        from ..gguf.linear import GGMLLinear

        return GGMLLinear.from_compressed(c, bias, dtype, prepare)
    if c.quantized:
        return QuantLinear.from_compressed(c, bias, dtype, prepare)
    return SparseLinear.from_compressed(c, bias, dtype)



def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in ``model`` under the dotted ``name``, replacing what was there: how
    compressed, decompressed and LoRA modules are swapped in by name."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

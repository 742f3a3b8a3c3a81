"""The model side of a checkpoint: which modules a codec stores, which tensors are stored as
they are (tied ones once), and putting tensors and modules back into a model by name."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..modules import set_module
from .codecs import codec_for


def compressed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` a codec stores (not looking inside those), by name."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if not inside(name, found) and codec_for(m) is not None:
            found[name] = m
    return found


def inside(name: str, layers: dict[str, Any] | set[str]) -> bool:
    """Whether the dotted ``name`` (a module or tensor) lies within one of ``layers``."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in layers for i in range(1, len(parts) + 1))




def dense_tensors(model: nn.Module, layers: dict[str, Any] | set[str]
                  ) -> tuple[list[str], dict[str, str]]:
    """The ``state_dict`` names stored as they are — all but those inside the compressed
    ``layers`` and the second and later names of tied tensors — and the tied aliases
    ``{alias: stored name}``."""
    names, tied, seen = [], {}, {}
    for name, value in model.state_dict(keep_vars=True).items():
        if value is None or inside(name, layers):
            continue
        if id(value) in seen:
            tied[name] = seen[id(value)]
            continue
        seen[id(value)] = name
        names.append(name)
    return names, tied


def get_tensor(model: nn.Module, name: str) -> Tensor:
    """The parameter or buffer ``name`` of ``model``."""
    owner, _, local = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, local)


def set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    """Assign a stored tensor to the parameter or buffer ``name`` (a parameter keeps its
    ``requires_grad``)."""
    owner, _, local = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if local in module._parameters:
        old = module._parameters[local]
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old is None or old.requires_grad)
        module._parameters[local] = value
    else:
        module._buffers[local] = value


# ============================================================================ linear kinds


def decompress(model: nn.Module) -> nn.Module:
    """Replace every compressed layer of ``model`` (in place) with an ``nn.Linear`` holding its
    dequantized/masked weight in float32: the same function evaluated without the integer
    kernels (e.g. to compare quality with tools that simulate quantization in float). Layers
    that are not one linear (experts) stay as they are."""
    for name, m in list(model.named_modules()):
        codec = codec_for(m)
        w = codec.dense_weight(m) if codec is not None else None
        if w is None:
            continue
        dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                          device=w.device)
        dense.weight.data = w
        if m.bias is not None:
            dense.bias.data = m.bias.detach().float()
        set_module(model, name, dense)
    return model

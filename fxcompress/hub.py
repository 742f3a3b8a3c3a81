"""Tensor names as Hugging Face checkpoints store them.

transformers 5 builds some models under other names than their checkpoints use: Mixtral's
``block_sparse_moe`` is the model's ``mlp``, and every mixture-of-experts family fuses its
per-expert linears (``experts.{e}.w1``/``w3``/``w2``, or ``gate_proj``/``up_proj``/
``down_proj``) into 3-D ``gate_up_proj``/``down_proj`` parameters. Readers of
compressed-tensors checkpoints (vLLM's model loaders, transformers itself) expect the
checkpoint names, so a checkpoint of ours stores them too: the renamings and per-expert names
come from transformers' own conversion mapping for the model, the one ``save_pretrained``
reverses, so they agree with what transformers writes for the dense model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

Rename = Callable[[str], str]
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


def _conversions(model: nn.Module) -> list[Any]:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return []
    from transformers.conversion_mapping import get_model_conversion_mapping

    return get_model_conversion_mapping(model, add_legacy=False)


def renamings(model: nn.Module) -> tuple[Rename, Rename]:
    """``(to_checkpoint, to_model)``: the name a tensor of ``model`` has in its Hugging Face
    checkpoint, and back. Identity for models transformers does not rename (and for models
    that are not transformers models)."""
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    # prefix changes depend on how the model was loaded; save_pretrained drops them for a
    # model built from its config, as fxcompress.load builds it
    forward = [t for t in _conversions(model)
               if isinstance(t, WeightRenaming) and not isinstance(t, PrefixChange)]
    if not forward:
        return _same, _same
    reverse = [t.reverse_transform() for t in forward[::-1]]
    return (lambda name: _apply(name, reverse)), (lambda name: _apply(name, forward))


def _apply(name: str, transforms: list[Any]) -> str:
    for t in transforms:  # every matching renaming fires, in order (as transformers does)
        name, _ = t.rename_source_key(name)
    return name


def _same(name: str) -> str:
    return name


def expert_names(model_type: str | None) -> tuple[str, str, str]:
    """The names (gate, up, down) of one expert's linears in checkpoints of ``model_type``
    (``("w1", "w3", "w2")`` for Mixtral), read from the converters transformers uses to fuse
    them; ``gate_proj``/``up_proj``/``down_proj`` for families it does not convert."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    found: dict[str, list[str]] = {}
    for t in get_checkpoint_conversion_mapping(model_type) or [] if model_type else []:
        if not isinstance(t, WeightConverter) or len(t.target_patterns) != 1:
            continue
        bank = t.target_patterns[0].rpartition(".")[2]
        found[bank] = [p.split("experts.*.")[-1].removesuffix(".weight")
                       for p in t.source_patterns if "experts.*." in p]
    gate_up, down = found.get("gate_up_proj", []), found.get("down_proj", [])
    if len(gate_up) == 2 and len(down) == 1:
        return gate_up[0], gate_up[1], down[0]
    return DEFAULT_EXPERT_NAMES

"""The codec registry: what every kind of compressed layer must say about itself
(:class:`Codec`), the registry, and the lookups by module (:func:`codec_for`) and by
``config.json`` entry (:func:`codec_of`). Nothing here knows a kind: the kinds register
themselves (:mod:`.linear`, :mod:`.ggml`, :mod:`.experts`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from ...algorithms import Compressed

Entry = dict[str, Any]  # one layer's entry in config.json
SPARSE_LAYOUTS = ("dense", "bitmask")  # how pruned kinds are stored; the first is the default
DEFAULT_SPARSE_LAYOUT = SPARSE_LAYOUTS[0]
STRUCTURES = ("2:4", "unstructured")  # the keep-mask's structure, as compressed-tensors names it
Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]  # local tensor name -> (shape, dtype)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded: the message names the file and tensor."""


class Codec(ABC):
    """How one kind of compressed module is stored: see the module docstring. Local tensor
    names (the keys of ``encode``, ``expected`` and ``decode``'s tensors) are relative to the
    layer's module name and may contain dots (e.g. one group of tensors per expert)."""

    kind: str  # the entry's "kind"

    @abstractmethod
    def accepts(self, m: nn.Module) -> bool:
        """Whether this codec stores ``m``."""

    @abstractmethod
    def describe(self, m: nn.Module) -> Entry:
        """The ``config.json`` entry of ``m`` (with ``"kind"``)."""

    @abstractmethod
    def encode(self, m: nn.Module, entry: Entry) -> dict[str, Tensor]:
        """The tensors stored for ``m``, by local name."""

    @abstractmethod
    def entry_problem(self, entry: Entry) -> str | None:
        """What is wrong with an entry read from ``config.json`` (completed as "layer X has
        ..."), or None."""

    @abstractmethod
    def original_problem(self, module: nn.Module, entry: Entry) -> str | None:
        """Why ``module`` of the model built from ``config.json`` is not what this entry
        replaced (completed as "layer X ..."), or None."""

    @abstractmethod
    def expected(self, entry: Entry) -> Shapes:
        """Shape and dtype of every tensor stored for this entry, by local name."""

    @abstractmethod
    def decode(self, entry: Entry, tensors: dict[str, Tensor], where: str) -> nn.Module:
        """The module holding ``tensors`` (shapes and dtypes already checked against
        :meth:`expected`); raises :class:`CheckpointError` prefixed with ``where`` (file and
        layer) for contents that contradict the entry."""

    @abstractmethod
    def to_compressed(self, m: nn.Module, loss: float, part: str = "") -> Compressed:
        """The result ``m`` was made from (same codes, grid, mask and dense weight). ``part``
        names the site within a module that holds several (an experts module:
        ``"gate_up_proj.3"``, the site name relative to the module's); ``""`` for one."""

    def config_group(self, name: str, entry: Entry) -> tuple[dict[str, Any], list[str]] | None:
        """compressed-tensors ``QuantizationArgs`` of the weights and the ``targets`` naming
        this layer (``name`` as the checkpoint names it), when compressed-tensors readers can
        read it; None otherwise."""
        return None

    def describe_as(self, m: nn.Module, layout: str) -> Entry:
        """:meth:`describe` for a checkpoint written in the sparse ``layout`` (one of
        :data:`SPARSE_LAYOUTS`); kinds without a keep-mask have one layout and ignore it."""
        return self.describe(m)

    def plain_linears(self, entry: Entry) -> list[str] | None:
        """Local names of the ordinary linears (a ``weight`` and maybe a ``bias``) this entry
        is stored as — ``[""]`` for the layer itself — which readers load as unquantized
        linears; None when it is not stored so."""
        return None

    def pruning(self, entry: Entry) -> tuple[int, int, str] | None:
        """(weights, kept weights, structure) of a pruned layer; None for one not pruned."""
        return None

    def weights(self, entry: Entry) -> int:
        """Weights of the layer (the product of its linears' shapes): what a checkpoint's
        global sparsity is a share of; 0 for a kind that holds no linear."""
        return 0

    # -- what the code that treats every kind alike asks of the module itself (the CLI's
    # -- summaries, training, decompression and the GGUF writer): the kind answers, so no
    # -- caller dispatches on module classes

    lora_base = False  # adapters train on top of it (fxcompress.training.add_lora)

    def dense_weight(self, m: nn.Module) -> Tensor | None:
        """The float32 ``(out, in)`` weight ``m`` computes with (what ``decompress`` puts in an
        ``nn.Linear``); None for a kind that is not one linear."""
        return None

    def stored_bits(self, m: nn.Module, layout: str) -> tuple[float, int] | None:
        """(bits stored, weights) of ``m`` with pruned layers in the sparse ``layout``, as the
        CLI reports bits per weight; None for a kind it does not count."""
        return None

    def pruned_weights(self, m: nn.Module) -> tuple[int, int] | None:
        """(pruned weights, weights) of ``m``, as the CLI reports sparsity; None for a kind it
        does not count."""
        return None

    def placement(self, m: nn.Module) -> tuple[torch.device, torch.dtype]:
        """Device and compute dtype of ``m`` (where an adapter on it is made)."""
        return m.weight.device, m.weight.dtype


CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Make ``codec`` the one for its kind (for ``save``, the streamed writer and ``load``)."""
    CODECS[codec.kind] = codec
    return codec


def codec_for(m: nn.Module) -> Codec | None:
    """The codec storing module ``m``, or None for a module stored as it is."""
    return next((c for c in CODECS.values() if c.accepts(m)), None)


def codec_of(entry: Any) -> Codec | None:
    """The codec of a ``config.json`` layer entry, or None for an unknown kind."""
    return CODECS.get(entry.get("kind")) if isinstance(entry, dict) else None


def dtype_named(name: Any) -> torch.dtype:
    """``"float16"`` → ``torch.float16``, as entries store dtypes."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"config.json: unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

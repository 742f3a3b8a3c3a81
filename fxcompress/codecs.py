"""Layer codecs: how each kind of layer is stored in a checkpoint, in both directions.

A checkpoint stores a compressed layer as a few tensors under its module name (e.g.
``model.layers.0.mlp.down_proj.weight_packed``) and describes it by one entry of
``config.json["quantization_config"]["fxcompress"]["layers"]`` whose ``"kind"`` names its
codec. A :class:`Codec` is the one place that knows a kind's layout:

* ``describe(m)`` → the entry and ``encode(m, entry)`` → the tensors: what ``fxcompress.save``
  and the streamed ``compress_checkpoint`` write (both through :class:`~fxcompress.format.
  CheckpointWriter`);
* ``entry_problem(entry)``, ``original_problem(module, entry)`` (the module it replaces in the
  model built from ``config.json``) and ``expected(entry)`` (shape and dtype of every tensor):
  what ``fxcompress.load`` checks against the safetensors headers before reading any data;
* ``decode(entry, tensors)`` → the module, validating what the headers cannot show;
* ``to_compressed(m, loss, part)`` → the :class:`~fxcompress.algorithms.Compressed` result the
  module (or its site ``part``, for experts) was made from (what a resumed streamed run
  replays);
* ``config_group(name, entry)`` → its compressed-tensors ``QuantizationArgs`` and ``targets``,
  for the kinds compressed-tensors readers understand.

Tensors outside compressed layers (embeddings, norms, dense linears, buffers) are stored as
they are under their ``state_dict`` names: :func:`dense_tensors` chooses them and
:func:`set_tensor` assigns them back.

Pruned kinds have two **layouts** (:data:`SPARSE_LAYOUTS`), chosen when a checkpoint is
written and recorded in the entry's ``"layout"`` (absent: ``"bitmask"``, the only layout of
earlier checkpoints):

* ``"dense"`` (the default): what serving engines read. A pruned linear is an ordinary
  ``weight`` holding its zeros; a pruned and quantized one is compressed-tensors'
  ``pack-quantized`` with every pruned weight at its group's zero-point code, so it
  dequantizes to exactly 0. The keep-mask is the non-zero pattern (:func:`implied_mask`);
* ``"bitmask"``: fxcompress's compact layout, a keep-mask and the kept values only (smaller
  on disk; read by ``fxcompress.load`` alone).

A new layer kind (the experts of a mixture-of-experts block, say) is one :class:`Codec`
subclass passed to :func:`register`; ``format`` and ``streaming`` need no change.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .algorithms import Compressed
from .hub import DEFAULT_EXPERT_NAMES
from .kernels import pack
from .modules import (
    QuantExperts,
    QuantLinear,
    SparseExperts,
    SparseLinear,
    expert_orientation,
    experts_activation,
    experts_unsupported,
)

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


def dtype_named(name: Any) -> torch.dtype:
    """``"float16"`` → ``torch.float16``, as entries store dtypes."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"config.json: unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ============================================================================ dense tensors


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


def _positive_ints(entry: Entry, *keys: str) -> bool:
    return all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool)
               and entry[k] > 0 for k in keys)


class _LinearCodec(Codec):
    """What the kinds replacing one ``nn.Linear`` (or Hugging Face ``Conv1D``) share: the
    ``(out, in)`` shape, stored as ``weight_shape``, and an optional ``bias``."""

    required = frozenset({"kind", "in_features", "out_features", "bias"})

    def _linear_entry(self, m: nn.Module) -> Entry:
        entry: Entry = {"kind": self.kind, "in_features": m.in_features,
                        "out_features": m.out_features, "bias": m.bias is not None}
        if m.bias is not None:
            entry["dtype"] = dtype_name(m.bias.dtype)
        return entry

    def entry_problem(self, entry: Entry) -> str | None:
        if (not self.required <= set(entry)
                or not _positive_ints(entry, "in_features", "out_features")
                or not isinstance(entry["bias"], bool) or (entry["bias"] and "dtype" not in entry)
                or ("nnz" in self.required and not _nnz_ok(entry))
                or not _layout_ok(entry)):
            return f"an invalid entry {entry!r}"
        return None

    def original_problem(self, module: nn.Module, entry: Entry) -> str | None:
        w = getattr(module, "weight", None)
        shape = None if w is None else tuple(w.shape)
        if type(module).__name__ == "Conv1D" and shape is not None:
            shape = shape[::-1]
        if shape == (entry["out_features"], entry["in_features"]):
            return None
        return (f"is a {type(module).__name__} with weight {shape} in the model built from the "
                f"config, but the checkpoint stores ({entry['out_features']}, "
                f"{entry['in_features']}) (out, in)")

    def _linear_expected(self, entry: Entry) -> Shapes:
        out: Shapes = {"weight_shape": ((2,), torch.int64)}
        if entry["bias"]:
            out["bias"] = ((entry["out_features"],), dtype_named(entry["dtype"]))
        return out

    def _encode_linear(self, m: nn.Module, out: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {"weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64),
               **out}
        if m.bias is not None:
            out["bias"] = m.bias.detach()
        return out

    def _check_shape(self, entry: Entry, t: dict[str, Tensor], where: str) -> None:
        n, k = entry["out_features"], entry["in_features"]
        if t["weight_shape"].tolist() != [n, k]:
            raise CheckpointError(f"{where}weight_shape holds {t['weight_shape'].tolist()}, "
                                  f"config.json says [{n}, {k}]")

    def _bitmask(self, entry: Entry) -> Shapes:
        """The keep-mask of pruned kinds: bit ``k % 8`` of byte ``k // 8`` of each row."""
        return {"weight_bitmask": ((entry["out_features"], math.ceil(entry["in_features"] / 8)),
                                   torch.uint8)}

    def _mask(self, entry: Entry, t: dict[str, Tensor], where: str) -> Tensor:
        mask = pack.unpack_bitmask(t["weight_bitmask"], entry["in_features"])
        if int(mask.sum()) != entry["nnz"]:
            raise CheckpointError(f"{where}weight_bitmask keeps {int(mask.sum())} weights, "
                                  f"config.json says nnz={entry['nnz']}")
        return mask

    def _implied(self, entry: Entry, nonzero: Tensor, tensor: str, where: str) -> Tensor:
        """The keep-mask of a dense-layout layer from its non-zero pattern (stored in
        ``tensor``), checked against the entry's structure and ``nnz``."""
        try:
            mask = implied_mask(nonzero, entry["structure"])
        except ValueError as e:
            raise CheckpointError(f"{where}{tensor}: {e}") from None
        if int(mask.sum()) != entry["nnz"]:
            raise CheckpointError(f"{where}{tensor} keeps {int(mask.sum())} weights, "
                                  f"config.json says nnz={entry['nnz']}")
        return mask

    def pruning(self, entry: Entry) -> tuple[int, int, str] | None:
        if "nnz" not in entry:
            return None
        structure = entry.get("structure") or "unstructured"
        return entry["out_features"] * entry["in_features"], entry["nnz"], structure

    @staticmethod
    def _dense_entry(entry: Entry, mask: Tensor, nonzero: Tensor, structure: str | None
                     ) -> Entry:
        """``entry`` for the dense layout of a layer with keep-``mask`` whose stored non-zero
        pattern is ``nonzero``: its structure (``structure``, or found from the mask) and the
        ``nnz`` of the keep-mask load will rebuild."""
        structure = structure or ("2:4" if is_two_four(mask) else "unstructured")
        nnz = int(implied_mask(nonzero, structure).sum())
        return {**entry, "layout": "dense", "structure": structure, "nnz": nnz}


class QuantizedCodec(_LinearCodec):
    """A :class:`QuantLinear` in compressed-tensors' ``pack-quantized`` layout:
    ``weight_packed``, ``weight_scale``, ``weight_zero_point`` (asymmetric grids only),
    ``weight_g_idx`` (dynamic act-order only), ``weight_shape``, ``bias``."""

    kind = "quantized"
    sparse = False  # codes stored as a keep-mask and the kept codes
    required = _LinearCodec.required | {"bits", "group_size", "symmetric", "g_idx"}

    def accepts(self, m: nn.Module) -> bool:
        return isinstance(m, QuantLinear) and m.weight_bitmask is None

    def describe(self, m: QuantLinear) -> Entry:
        symmetric = m.sym and bool((m.weight_zero_point == 2 ** (m.bits - 1)).all())
        return {**self._linear_entry(m), "bits": m.bits, "group_size": m.group_size,
                "symmetric": symmetric, "g_idx": m.weight_g_idx is not None}

    def encode(self, m: QuantLinear, entry: Entry) -> dict[str, Tensor]:
        out = {"weight_scale": m.weight_scale}
        if not entry["symmetric"]:
            out["weight_zero_point"] = pack.pack_rows(m.weight_zero_point, m.bits)
        if m.weight_g_idx is not None:
            out["weight_g_idx"] = m.weight_g_idx
        return self._encode_linear(m, {**out, **self._encode_codes(m, entry)})

    def _encode_codes(self, m: QuantLinear, entry: Entry) -> dict[str, Tensor]:
        return {"weight_packed": m.weight_packed}

    def entry_problem(self, entry: Entry) -> str | None:
        problem = super().entry_problem(entry)
        if problem is None and (not _positive_ints(entry, "bits", "group_size")
                                or entry["bits"] not in pack.SUPPORTED_BITS
                                or entry["in_features"] % entry["group_size"]):
            problem = (f"an invalid grid (bits={entry['bits']}, "
                       f"group_size={entry['group_size']})")
        return problem

    def expected(self, entry: Entry) -> Shapes:
        n, k, bits = entry["out_features"], entry["in_features"], entry["bits"]
        groups = k // entry["group_size"]
        out: Shapes = {"weight_scale": ((n, groups), torch.float16)}
        if not entry["symmetric"]:
            out["weight_zero_point"] = ((pack.packed_width(n, bits), groups), torch.int32)
        if entry["g_idx"]:
            out["weight_g_idx"] = ((k,), torch.int32)
        return {**self._linear_expected(entry), **out, **self._expected_codes(entry)}

    def _expected_codes(self, entry: Entry) -> Shapes:
        bits, k = entry["bits"], entry["in_features"]
        return {"weight_packed": ((entry["out_features"], pack.packed_width(k, bits)),
                                  torch.int32)}

    def decode(self, entry: Entry, t: dict[str, Tensor], where: str) -> QuantLinear:
        m = self.build(entry, t, where)
        m.prepare()
        return m

    def build(self, entry: Entry, t: dict[str, Tensor], where: str) -> QuantLinear:
        """:meth:`decode` without the kernel layout (the canonical buffers only)."""
        self._check_shape(entry, t, where)
        n, k, bits, gs = (entry["out_features"], entry["in_features"], entry["bits"],
                          entry["group_size"])
        dtype = dtype_named(entry["dtype"]) if entry["bias"] else torch.float32
        m = QuantLinear(k, n, bits, gs, entry["symmetric"], entry["bias"],
                        dynamic_groups=entry["g_idx"], sparse=self.sparse,
                        device="meta", dtype=dtype)
        if entry["bias"]:
            m.bias = nn.Parameter(t["bias"], requires_grad=False)
        m.weight_scale = t["weight_scale"]
        m.weight_zero_point = (torch.full((n, k // gs), 2 ** (bits - 1), dtype=torch.uint8)
                               if entry["symmetric"]
                               else pack.unpack_rows(t["weight_zero_point"], bits, n))
        if entry["g_idx"]:
            g_idx = t["weight_g_idx"]
            if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= k // gs):
                raise CheckpointError(f"{where}weight_g_idx holds groups outside "
                                      f"[0, {k // gs})")
            m.weight_g_idx = g_idx
        self._decode_codes(m, entry, t, where)
        return m

    def _decode_codes(self, m: QuantLinear, entry: Entry, t: dict[str, Tensor],
                      where: str) -> None:
        m.weight_packed = t["weight_packed"]

    def to_compressed(self, m: QuantLinear, loss: float, part: str = "") -> Compressed:
        g_idx = m.weight_g_idx if m.weight_g_idx is not None else (
            torch.arange(m.in_features) // m.group_size).to(torch.int32)
        mask = None if m.weight_bitmask is None else pack.unpack_bitmask(m.weight_bitmask,
                                                                         m.in_features)
        return Compressed((m.out_features, m.in_features), loss, codes=m.codes(),
                          scale=m.weight_scale.float(), zero=m.weight_zero_point.clone(),
                          g_idx=g_idx, bits=m.bits, group_size=m.group_size, sym=m.sym,
                          mask=mask)

    def config_group(self, name: str, entry: Entry) -> tuple[dict[str, Any], list[str]]:
        per_channel = entry["group_size"] == entry["in_features"]
        args = {"num_bits": entry["bits"], "type": "int", "symmetric": entry["symmetric"],
                "strategy": "channel" if per_channel else "group",
                "group_size": None if per_channel else entry["group_size"], "dynamic": False}
        if entry["g_idx"]:
            args["actorder"] = "group"
        return args, [f"re:^{re.escape(name)}$"]


class SparseQuantizedCodec(QuantizedCodec):
    """A pruned :class:`QuantLinear` (``weight_bitmask``). Pruned codes must equal their
    group's zero point. Layout ``"dense"``: exactly the ``quantized`` tensors (compressed-tensors
    ``pack-quantized``, readable by engines), the keep-mask implied by the codes that differ
    from the zero point. Layout ``"bitmask"``: the grid as ``quantized``, the codes as a
    keep-mask plus the kept codes in one bit stream (``weight_kept_packed``); pruned codes are
    rebuilt from the zero point on load."""

    kind = "sparse-quantized"
    sparse = True
    required = QuantizedCodec.required | {"nnz"}

    def accepts(self, m: nn.Module) -> bool:
        return isinstance(m, QuantLinear) and m.weight_bitmask is not None

    def describe(self, m: QuantLinear) -> Entry:
        mask = pack.unpack_bitmask(m.weight_bitmask, m.in_features)
        return {**super().describe(m), "kind": self.kind, "nnz": int(mask.sum())}

    def describe_as(self, m: QuantLinear, layout: str, structure: str | None = None) -> Entry:
        entry = self.describe(m)
        if layout == "bitmask":
            return entry
        self._pruned_codes(m)  # refuse before anything is written
        mask = pack.unpack_bitmask(m.weight_bitmask, m.in_features)
        return self._dense_entry(entry, mask, self._nonzero(m), structure)

    def _nonzero(self, m: QuantLinear) -> Tensor:
        zero = _zero_codes(m.weight_zero_point, m.weight_g_idx, m.group_size, m.in_features)
        return m.codes() != zero

    def _pruned_codes(self, m: QuantLinear) -> Tensor:
        """The codes of ``m``, checked to hold the zero point at every pruned position."""
        mask = pack.unpack_bitmask(m.weight_bitmask, m.in_features)
        codes = m.codes()
        zero = _zero_codes(m.weight_zero_point, m.weight_g_idx, m.group_size, m.in_features)
        if not torch.equal(codes[~mask], zero[~mask]):
            raise ValueError("a pruned QuantLinear holds codes other than its zero point at "
                             "pruned positions; it cannot be stored as a pruned layer")
        return codes

    def _encode_codes(self, m: QuantLinear, entry: Entry) -> dict[str, Tensor]:
        codes = self._pruned_codes(m)
        if self._dense(entry.get("layout")):
            return {"weight_packed": m.weight_packed}
        mask = pack.unpack_bitmask(m.weight_bitmask, m.in_features)
        return {"weight_bitmask": m.weight_bitmask,
                "weight_kept_packed": pack.pack(codes[mask][None], m.bits)[0]}

    @staticmethod
    def _dense(layout: str | None) -> bool:
        return layout == "dense"

    def _expected_codes(self, entry: Entry) -> Shapes:
        if self._dense(entry.get("layout")):
            return super()._expected_codes(entry)
        return {**self._bitmask(entry),
                "weight_kept_packed": ((pack.packed_width(entry["nnz"], entry["bits"]),),
                                       torch.int32)}

    def _decode_codes(self, m: QuantLinear, entry: Entry, t: dict[str, Tensor],
                      where: str) -> None:
        k, bits = entry["in_features"], entry["bits"]
        codes = _zero_codes(m.weight_zero_point, m.weight_g_idx, entry["group_size"], k)
        if self._dense(entry.get("layout")):
            m.weight_packed = t["weight_packed"]
            mask = self._implied(entry, m.codes() != codes, "weight_packed", where)
            m.weight_bitmask = pack.pack_bitmask(mask)
            return
        mask = self._mask(entry, t, where)
        kept = pack.unpack(t["weight_kept_packed"][None], bits, entry["nnz"])[0]
        m.weight_packed = pack.pack(codes.masked_scatter(mask, kept), bits)
        m.weight_bitmask = t["weight_bitmask"]

    def config_group(self, name: str, entry: Entry) -> tuple[dict[str, Any], list[str]] | None:
        return super().config_group(name, entry) if self._dense(entry.get("layout")) else None


class SparseCodec(_LinearCodec):
    """A :class:`SparseLinear` (pruned, not quantized). Layout ``"dense"``: an ordinary
    ``weight`` holding zeros at the pruned positions (what any reader of the original model
    reads), ``bias``; the keep-mask is implied by the non-zero weights. Layout ``"bitmask"``:
    ``weight_bitmask``, the kept weights in row-major order (``weight_values``),
    ``weight_shape``, ``bias``."""

    kind = "sparse"
    required = _LinearCodec.required | {"dtype", "nnz"}

    def accepts(self, m: nn.Module) -> bool:
        return isinstance(m, SparseLinear)

    def describe(self, m: SparseLinear) -> Entry:
        return {**self._linear_entry(m), "dtype": dtype_name(m.weight.dtype),
                "nnz": int(m.mask.sum())}

    def describe_as(self, m: SparseLinear, layout: str, structure: str | None = None) -> Entry:
        entry = self.describe(m)
        if layout == "bitmask":
            return entry
        return self._dense_entry(entry, m.mask, self._pruned_weight(m) != 0, structure)

    @staticmethod
    def _pruned_weight(m: SparseLinear) -> Tensor:
        return torch.where(m.mask, m.weight.detach(), torch.zeros((), dtype=m.weight.dtype))

    def encode(self, m: SparseLinear, entry: Entry) -> dict[str, Tensor]:
        if entry.get("layout") == "dense":
            out = {"weight": self._pruned_weight(m)}
            return {**out, "bias": m.bias.detach()} if m.bias is not None else out
        return self._encode_linear(m, {"weight_bitmask": pack.pack_bitmask(m.mask),
                                       "weight_values": m.weight.detach()[m.mask]})

    def expected(self, entry: Entry) -> Shapes:
        dtype = dtype_named(entry["dtype"])
        if entry.get("layout") == "dense":
            out: Shapes = {"weight": ((entry["out_features"], entry["in_features"]), dtype)}
            if entry["bias"]:
                out["bias"] = ((entry["out_features"],), dtype)
            return out
        return {**self._linear_expected(entry), **self._bitmask(entry),
                "weight_values": ((entry["nnz"],), dtype)}

    def decode(self, entry: Entry, t: dict[str, Tensor], where: str) -> SparseLinear:
        return self.build(entry, t, where)

    def build(self, entry: Entry, t: dict[str, Tensor], where: str) -> SparseLinear:
        n, k = entry["out_features"], entry["in_features"]
        m = SparseLinear(k, n, entry["bias"], device="meta", dtype=dtype_named(entry["dtype"]))
        if entry["bias"]:
            m.bias = nn.Parameter(t["bias"])
        if entry.get("layout") == "dense":
            m.weight = nn.Parameter(t["weight"])
            m.mask = self._implied(entry, t["weight"] != 0, "weight", where)
            return m
        self._check_shape(entry, t, where)
        mask = self._mask(entry, t, where)
        m.weight = nn.Parameter(torch.zeros(n, k, dtype=t["weight_values"].dtype)
                                .masked_scatter_(mask, t["weight_values"]))
        m.mask = mask
        return m

    def plain_linears(self, entry: Entry) -> list[str] | None:
        return [""] if entry.get("layout") == "dense" else None

    def to_compressed(self, m: SparseLinear, loss: float, part: str = "") -> Compressed:
        return Compressed((m.out_features, m.in_features), loss, mask=m.mask.clone(),
                          values=m.weight.detach().float())


def is_two_four(mask: Tensor) -> bool:
    """Whether ``mask`` (``(N, K)`` bool) keeps exactly two of every four consecutive weights
    of a row."""
    k = mask.shape[-1]
    return k % 4 == 0 and bool((mask.reshape(-1, k // 4, 4).sum(-1) == 2).all())


def implied_mask(nonzero: Tensor, structure: str) -> Tensor:
    """The keep-mask a dense-layout layer implies: its non-zero weights (or codes off the zero
    point). A kept weight that is exactly zero cannot be told from a pruned one, which changes
    no output; for a ``"2:4"`` structure each group of four is completed to exactly two kept
    with its first zero positions (a kept exact zero does occur: SparseGPT zeroes the weights
    of dead input columns, and one may be kept where three of four are dead), so the 2:4
    kernels still apply. Raises ValueError for a pattern the structure excludes."""
    if structure != "2:4":
        return nonzero
    n, k = nonzero.shape
    if k % 4:
        raise ValueError(f"a 2:4 layer needs a multiple of 4 input features, not {k}")
    groups = nonzero.reshape(n, k // 4, 4)
    if bool((groups.sum(-1) > 2).any()):
        raise ValueError("holds more than two non-zero weights in a group of four, which a "
                         "2:4 layer cannot")
    missing = 2 - groups.sum(-1, keepdim=True)
    zeros = ~groups
    return (groups | (zeros & (zeros.cumsum(-1) <= missing))).reshape(n, k)


def _layout_ok(entry: Entry) -> bool:
    layout = entry.get("layout", "bitmask")
    if layout not in SPARSE_LAYOUTS or ("layout" in entry and "nnz" not in entry):
        return False
    return layout == "bitmask" or entry.get("structure") in STRUCTURES


class GGMLCodec(_LinearCodec):
    """A :class:`~fxcompress.gguf.linear.GGMLLinear`: its ggml blocks as they are
    (``weight_blocks``, uint8 ``(out, bytes per row)``), ``weight_shape``, ``bias``; the entry
    names the type (``"ggml_type": "Q4_K"``) and the dtype the layer computes in."""

    kind = "ggml"
    required = _LinearCodec.required | {"ggml_type", "weight_dtype"}

    def accepts(self, m: nn.Module) -> bool:
        from .gguf.linear import GGMLLinear

        return isinstance(m, GGMLLinear)

    def describe(self, m: nn.Module) -> Entry:
        return {**self._linear_entry(m), "ggml_type": m.type.name,
                "weight_dtype": dtype_name(m.dtype)}

    def encode(self, m: nn.Module, entry: Entry) -> dict[str, Tensor]:
        return self._encode_linear(m, {"weight_blocks": m.weight_blocks})

    def entry_problem(self, entry: Entry) -> str | None:
        from .gguf.grids import TYPES

        problem = super().entry_problem(entry)
        if problem is None and (entry["ggml_type"] not in TYPES
                                or entry["in_features"] % TYPES[entry["ggml_type"]].block):
            problem = (f"an unsupported ggml type {entry['ggml_type']!r} for "
                       f"{entry['in_features']} input features")
        return problem

    def expected(self, entry: Entry) -> Shapes:
        from .gguf.grids import TYPES

        t = TYPES[entry["ggml_type"]]
        return {**self._linear_expected(entry),
                "weight_blocks": ((entry["out_features"], t.row_bytes(entry["in_features"])),
                                  torch.uint8)}

    def decode(self, entry: Entry, t: dict[str, Tensor], where: str) -> nn.Module:
        from .gguf.grids import TYPES
        from .gguf.linear import GGMLLinear

        self._check_shape(entry, t, where)
        m = GGMLLinear(entry["in_features"], entry["out_features"],
                       TYPES[entry["ggml_type"]].value, entry["bias"], device="meta",
                       dtype=dtype_named(entry["weight_dtype"]))
        m.weight_blocks = t["weight_blocks"]
        if entry["bias"]:
            m.bias = nn.Parameter(t["bias"], requires_grad=False)
        m.prepare()
        return m

    def to_compressed(self, m: nn.Module, loss: float, part: str = "") -> Compressed:
        return Compressed((m.out_features, m.in_features), loss, ggml_type=m.ggml_type,
                          blocks=m.weight_blocks.clone())


def _nnz_ok(entry: Entry) -> bool:
    nnz = entry.get("nnz")
    return (isinstance(nnz, int) and not isinstance(nnz, bool)
            and 0 <= nnz <= entry["out_features"] * entry["in_features"])


def _zero_codes(zero: Tensor, g_idx: Tensor | None, group_size: int, k: int) -> Tensor:
    """The zero-point code of every weight position, ``(N, K)`` uint8."""
    g = torch.arange(k) // group_size if g_idx is None else g_idx.long()
    return zero[:, g]


# registration order is the order codec_for tries them
QUANTIZED = register(QuantizedCodec())
SPARSE_QUANTIZED = register(SparseQuantizedCodec())
SPARSE = register(SparseCodec())
GGML = register(GGMLCodec())
LINEAR_CODECS = {c.kind: c for c in (QUANTIZED, SPARSE_QUANTIZED, SPARSE)}


# ============================================================================ experts


class ExpertsCodec(Codec):
    """A :class:`QuantExperts` or :class:`SparseExperts` (all experts of one
    mixture-of-experts block), stored per expert as the model's own checkpoints name them:
    three linears per expert, ``{e}.{gate}``, ``{e}.{up}`` and ``{e}.{down}`` under the experts
    module (``w1``/``w3``/``w2`` for Mixtral, ``gate_proj``/``up_proj``/``down_proj`` for
    Qwen-MoE; :func:`fxcompress.hub.expert_names`), each in its linear kind's layout —
    ``quantized`` (compressed-tensors ``pack-quantized``: what vLLM's compressed-tensors MoE
    loaders read), ``sparse-quantized`` or ``sparse``.

    The entry holds the block's shape, activation and names, one ``linear`` template (the
    linear kind and grid shared by all experts; ``group_size`` -1 means per channel) and, for
    pruned kinds, ``nnz`` per expert ``[gate, up, down]``."""

    kind = "experts"
    required = frozenset({"kind", "num_experts", "hidden", "intermediate", "act", "names",
                          "linear"})

    def accepts(self, m: nn.Module) -> bool:
        return isinstance(m, (QuantExperts, SparseExperts))

    # -- one linear per expert and name ----------------------------------------------------

    def _parts(self, entry: Entry) -> list[tuple[str, str, slice]]:
        """(local name, bank, rows of the bank) of each linear of one expert."""
        gate, up, down = entry["names"]
        i = entry["intermediate"]
        return [(gate, "gate_up_proj", slice(0, i)), (up, "gate_up_proj", slice(i, 2 * i)),
                (down, "down_proj", slice(None))]

    def _linear_entry(self, entry: Entry, e: int, j: int, bank: str) -> Entry:
        out, inp = ((2 * entry["intermediate"], entry["hidden"]) if bank == "gate_up_proj"
                    else (entry["hidden"], entry["intermediate"]))
        if j < 2:  # gate and up: half of gate_up_proj's rows each
            out //= 2
        sub = {**entry["linear"], "in_features": inp, "out_features": out}
        if sub.get("group_size") == -1:
            sub["group_size"] = inp
        if "nnz" in entry:
            sub["nnz"] = entry["nnz"][e][j]
        return sub

    def _linears(self, entry: Entry) -> Iterator[tuple[str, Entry]]:
        for e in range(entry["num_experts"]):
            for j, (name, bank, _) in enumerate(self._parts(entry)):
                yield f"{e}.{name}", self._linear_entry(entry, e, j, bank)

    def _views(self, m: nn.Module, entry: Entry) -> Iterator[tuple[str, nn.Module]]:
        """Each expert linear of ``m`` as a linear module sharing its stored tensors."""
        for e in range(m.num_experts):
            for name, bank, rows in self._parts(entry):
                if isinstance(m, SparseExperts):
                    w = getattr(m, bank)[e, rows]
                    view = SparseLinear(w.shape[1], w.shape[0], device="meta", dtype=w.dtype)
                    view.weight = nn.Parameter(w.detach(), requires_grad=False)
                    view.mask = getattr(m, f"{bank}_mask")[e, rows]
                else:
                    packed = getattr(m, f"{bank}_packed")[e, rows]
                    inp = m._shapes()[bank][1]
                    view = QuantLinear(inp, packed.shape[0], m.bits, m.bank_group(bank), m.sym,
                                       sparse=m.gate_up_proj_bitmask is not None,
                                       device="meta")
                    view.weight_packed = packed
                    view.weight_scale = getattr(m, f"{bank}_scale")[e, rows]
                    view.weight_zero_point = getattr(m, f"{bank}_zero_point")[e, rows]
                    if view.weight_bitmask is not None:
                        view.weight_bitmask = getattr(m, f"{bank}_bitmask")[e, rows]
                yield f"{e}.{name}", view

    # -- Codec -----------------------------------------------------------------------------

    def describe(self, m: nn.Module) -> Entry:
        return self.describe_as(m, "bitmask")

    def describe_as(self, m: nn.Module, layout: str) -> Entry:
        entry: Entry = {"kind": self.kind, "num_experts": m.num_experts, "hidden": m.hidden,
                        "intermediate": m.intermediate, "act": m.act, "names": list(m.names)}
        views = [v for _, v in self._views(m, {**entry, "linear": {}})]
        codec = codec_for(views[0])
        described = [codec.describe_as(v, layout) for v in views]
        if len({d.get("structure") for d in described}) > 1:  # one structure for all experts
            described = [codec.describe_as(v, layout, "unstructured") for v in views]
        linear = {k: v for k, v in described[0].items()
                  if k not in ("in_features", "out_features", "nnz")}
        if "symmetric" in linear:  # one grid for all: symmetric only if every expert is
            linear["symmetric"] = all(d["symmetric"] for d in described)
            if isinstance(m, QuantExperts) and m.group_size == -1:
                linear["group_size"] = -1
        entry["linear"] = linear
        if "nnz" in described[0]:
            nnz = [d["nnz"] for d in described]
            entry["nnz"] = [nnz[i:i + 3] for i in range(0, len(nnz), 3)]
        return entry

    def encode(self, m: nn.Module, entry: Entry) -> dict[str, Tensor]:
        codec = LINEAR_CODECS[entry["linear"]["kind"]]
        subs = dict(self._linears(entry))
        return {f"{name}.{k}": t for name, view in self._views(m, entry)
                for k, t in codec.encode(view, subs[name]).items()}

    def entry_problem(self, entry: Entry) -> str | None:
        names, linear = entry.get("names"), entry.get("linear")
        codec = LINEAR_CODECS.get(linear.get("kind")) if isinstance(linear, dict) else None
        if (not self.required <= set(entry)
                or not _positive_ints(entry, "num_experts", "hidden", "intermediate")
                or not isinstance(names, list) or len(names) != 3 or len(set(names)) != 3
                or not all(isinstance(n, str) and re.fullmatch(r"\w+", n) for n in names)
                or entry["act"] not in ("silu", "gelu", "gelu_tanh", "relu") or codec is None
                or ("nnz" in codec.required) != ("nnz" in entry)
                or ("nnz" in entry and not (
                    isinstance(entry["nnz"], list) and len(entry["nnz"]) == entry["num_experts"]
                    and all(isinstance(n, list) and len(n) == 3 for n in entry["nnz"])))):
            return f"an invalid entry {_short(entry)}"
        for name, sub in self._linears(entry):
            problem = codec.entry_problem(sub)
            if problem is not None:
                return f"{problem} for expert linear {name}"
        return None

    def original_problem(self, module: nn.Module, entry: Entry) -> str | None:
        why = experts_unsupported(module)
        if why:
            return f"is not an experts module fxcompress compresses ({why})"
        e, i, h = entry["num_experts"], entry["intermediate"], entry["hidden"]
        found = (module.gate_up_proj.shape[0], *expert_orientation(module, "gate_up_proj"),
                 *expert_orientation(module, "down_proj"))
        if found != (e, 2 * i, h, h, i):
            return (f"holds {found[0]} experts of gate_up_proj {found[1:3]} and down_proj "
                    f"{found[3:]} (out, in) in the model built from the config, but the "
                    f"checkpoint stores {e} experts of ({2 * i}, {h}) and ({h}, {i})")
        if experts_activation(module) != entry["act"]:
            return (f"uses activation {experts_activation(module)!r} in the model built from "
                    f"the config, but the checkpoint says {entry['act']!r}")
        return None

    def expected(self, entry: Entry) -> Shapes:
        codec = LINEAR_CODECS[entry["linear"]["kind"]]
        return {f"{name}.{k}": v for name, sub in self._linears(entry)
                for k, v in codec.expected(sub).items()}

    def decode(self, entry: Entry, tensors: dict[str, Tensor], where: str) -> nn.Module:
        codec = LINEAR_CODECS[entry["linear"]["kind"]]
        linears = {}
        for name, sub in self._linears(entry):
            local = {k: tensors[f"{name}.{k}"] for k in codec.expected(sub)}
            linears[name] = codec.build(sub, local, f"{where}{name}.")
        e, h, i = entry["num_experts"], entry["hidden"], entry["intermediate"]
        gate, up, down = entry["names"]
        banks = {"gate_up_proj": lambda x: [torch.cat([getattr(linears[f"{k}.{gate}"], x),
                                                       getattr(linears[f"{k}.{up}"], x)])
                                            for k in range(e)],
                 "down_proj": lambda x: [getattr(linears[f"{k}.{down}"], x) for k in range(e)]}
        if codec is SPARSE:
            m = SparseExperts(e, h, i, entry["act"], device="meta",
                              dtype=dtype_named(entry["linear"]["dtype"]), names=entry["names"])
            for bank, rows in banks.items():
                setattr(m, bank, nn.Parameter(torch.stack(rows("weight")), requires_grad=False))
                setattr(m, f"{bank}_mask", torch.stack(rows("mask")))
            return m
        lin = entry["linear"]
        m = QuantExperts(e, h, i, lin["bits"], lin["group_size"], lin["symmetric"], entry["act"],
                         sparse=codec is SPARSE_QUANTIZED, device="meta", names=entry["names"])
        for bank, rows in banks.items():
            for t in ("packed", "scale", "zero_point") + (("bitmask",) if codec is
                                                          SPARSE_QUANTIZED else ()):
                setattr(m, f"{bank}_{t}", torch.stack(rows(f"weight_{t}")))
        m.prepare()
        return m

    def to_compressed(self, m: nn.Module, loss: float, part: str = "") -> Compressed:
        bank, _, e = part.rpartition(".")
        if bank not in ("gate_up_proj", "down_proj") or not e.isdigit() \
                or int(e) >= m.num_experts:
            raise KeyError(f"an experts module holds sites '<bank>.<expert>', not {part!r}")
        e = int(e)
        if isinstance(m, SparseExperts):
            mask = getattr(m, f"{bank}_mask")[e].clone()
            return Compressed(tuple(mask.shape), loss, mask=mask,
                              values=getattr(m, bank)[e].detach().float())
        codes = m._expert_codes(bank, e)
        bitmask = getattr(m, f"{bank}_bitmask")
        group = m.bank_group(bank)
        return Compressed(tuple(codes.shape), loss, codes=codes,
                          scale=getattr(m, f"{bank}_scale")[e].float(),
                          zero=getattr(m, f"{bank}_zero_point")[e].clone(),
                          g_idx=(torch.arange(codes.shape[1]) // group).to(torch.int32),
                          bits=m.bits, group_size=group, sym=m.sym,
                          mask=None if bitmask is None
                          else pack.unpack_bitmask(bitmask[e], codes.shape[1]))

    def plain_linears(self, entry: Entry) -> list[str] | None:
        if LINEAR_CODECS[entry["linear"]["kind"]].plain_linears(entry["linear"]) is None:
            return None
        return [name for name, _ in self._linears(entry)]

    def pruning(self, entry: Entry) -> tuple[int, int, str] | None:
        if "nnz" not in entry:
            return None
        weights = 3 * entry["num_experts"] * entry["hidden"] * entry["intermediate"]
        kept = sum(sum(n) for n in entry["nnz"])
        return weights, kept, entry["linear"].get("structure") or "unstructured"

    def config_group(self, name: str, entry: Entry) -> tuple[dict[str, Any], list[str]] | None:
        codec = LINEAR_CODECS[entry["linear"]["kind"]]
        found = codec.config_group(name, self._linear_entry(entry, 0, 2, "down_proj"))
        if found is None:
            return None
        gate, up, down = entry["names"]
        args, _ = found
        # the checkpoint's names, and the gate_proj/up_proj/down_proj vLLM matches for
        # every family
        alternatives = "|".join(dict.fromkeys([gate, up, down, *DEFAULT_EXPERT_NAMES]))
        return args, [rf"re:^{re.escape(name)}\.\d+\.({alternatives})$"]


def _short(entry: Entry) -> str:
    text = repr(entry)
    return text if len(text) < 300 else text[:300] + " ...}"


EXPERTS = register(ExpertsCodec())

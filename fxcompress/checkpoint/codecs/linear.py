"""The kinds that replace one linear: ``quantized`` (compressed-tensors ``pack-quantized``),
``sparse-quantized`` and ``sparse``, each pruned kind in both sparse layouts (see
:mod:`fxcompress.checkpoint.codecs`), and the keep-mask a dense-layout layer implies."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from ...algorithms import Compressed
from ...kernels import pack
from ...modules import QuantLinear, SparseLinear
from .base import (
    SPARSE_LAYOUTS,
    STRUCTURES,
    CheckpointError,
    Codec,
    Entry,
    Shapes,
    dtype_name,
    dtype_named,
    register,
)


def positive_ints(entry: Entry, *keys: str) -> bool:
    return all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool)
               and entry[k] > 0 for k in keys)


class LinearCodec(Codec):
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
                or not positive_ints(entry, "in_features", "out_features")
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

    def weights(self, entry: Entry) -> int:
        return entry["out_features"] * entry["in_features"]

    @staticmethod
    def _dense_entry(entry: Entry, mask: Tensor, nonzero: Tensor, structure: str | None
                     ) -> Entry:
        """``entry`` for the dense layout of a layer with keep-``mask`` whose stored non-zero
        pattern is ``nonzero``: its structure (``structure``, or found from the mask) and the
        ``nnz`` of the keep-mask load will rebuild."""
        structure = structure or ("2:4" if is_two_four(mask) else "unstructured")
        nnz = int(implied_mask(nonzero, structure).sum())
        return {**entry, "layout": "dense", "structure": structure, "nnz": nnz}


class QuantizedCodec(LinearCodec):
    """A :class:`QuantLinear` in compressed-tensors' ``pack-quantized`` layout:
    ``weight_packed``, ``weight_scale``, ``weight_zero_point`` (asymmetric grids only),
    ``weight_g_idx`` (dynamic act-order only), ``weight_shape``, ``bias``."""

    kind = "quantized"
    sparse = False  # codes stored as a keep-mask and the kept codes
    required = LinearCodec.required | {"bits", "group_size", "symmetric", "g_idx"}
    lora_base = True  # its ops have a backward with respect to the input

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
        if problem is None and (not positive_ints(entry, "bits", "group_size")
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

    def dense_weight(self, m: QuantLinear) -> Tensor:
        return m.dequantize()

    def stored_bits(self, m: QuantLinear, layout: str) -> tuple[float, int]:
        n = m.in_features * m.out_features
        grid = (16 + (0 if m.sym else m.bits)) * m.weight_scale.numel()  # scales, zero points
        if m.weight_bitmask is None or layout == "dense":
            return m.bits * n + grid, n
        density = pack.unpack_bitmask(m.weight_bitmask, m.in_features).float().mean().item()
        return m.bits * n * density + n + grid, n  # kept codes + bitmask

    def pruned_weights(self, m: QuantLinear) -> tuple[int, int]:
        n = m.in_features * m.out_features
        if m.weight_bitmask is None:
            return 0, n
        return n - int(pack.unpack_bitmask(m.weight_bitmask, m.in_features).sum()), n

    def placement(self, m: QuantLinear) -> tuple[torch.device, torch.dtype]:
        """Its bias's dtype: its float16 scales say nothing about the dtype it computes in."""
        dtype = m.bias.dtype if m.bias is not None else torch.float32
        return m.weight_packed.device, dtype

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


class SparseCodec(LinearCodec):
    """A :class:`SparseLinear` (pruned, not quantized). Layout ``"dense"``: an ordinary
    ``weight`` holding zeros at the pruned positions (what any reader of the original model
    reads), ``bias``; the keep-mask is implied by the non-zero weights. Layout ``"bitmask"``:
    ``weight_bitmask``, the kept weights in row-major order (``weight_values``),
    ``weight_shape``, ``bias``."""

    kind = "sparse"
    required = LinearCodec.required | {"dtype", "nnz"}
    lora_base = True

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

    def dense_weight(self, m: SparseLinear) -> Tensor:
        return torch.where(m.mask, m.weight, 0).detach().float()

    def stored_bits(self, m: SparseLinear, layout: str) -> tuple[float, int]:
        n = m.weight.numel()
        if layout == "dense":
            return 8 * m.weight.element_size() * n, n
        return 16 * n * (1 - m.sparsity()) + n, n  # fp16 kept values + bitmask

    def pruned_weights(self, m: SparseLinear) -> tuple[int, int]:
        return int((~m.mask).sum()), m.mask.numel()


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
LINEAR_CODECS = {c.kind: c for c in (QUANTIZED, SPARSE_QUANTIZED, SPARSE)}

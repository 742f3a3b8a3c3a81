"""The ``experts`` kind: all experts of one mixture-of-experts block, stored per expert in a
linear kind's layout under the names the model's own checkpoints use."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ...algorithms import Compressed
from ...hub import DEFAULT_EXPERT_NAMES
from ...kernels import pack
from ...modules import (
    QuantExperts,
    QuantLinear,
    SparseExperts,
    SparseLinear,
    expert_orientation,
    experts_activation,
    experts_unsupported,
)
from .base import Codec, Entry, Shapes, codec_for, dtype_named, register
from .linear import LINEAR_CODECS, SPARSE, SPARSE_QUANTIZED, positive_ints


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
                or not positive_ints(entry, "num_experts", "hidden", "intermediate")
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
        kept = sum(sum(n) for n in entry["nnz"])
        return self.weights(entry), kept, entry["linear"].get("structure") or "unstructured"

    def weights(self, entry: Entry) -> int:
        return 3 * entry["num_experts"] * entry["hidden"] * entry["intermediate"]

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

"""The ``ggml`` kind: a linear holding llama.cpp's blocks as they are (what the GGUF recipes
make), imported from :mod:`fxcompress.gguf` only when such a layer is met."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...algorithms import Compressed
from .base import Entry, Shapes, dtype_name, dtype_named, register
from .linear import LinearCodec


class GGMLCodec(LinearCodec):
    """A :class:`~fxcompress.gguf.linear.GGMLLinear`: its ggml blocks as they are
    (``weight_blocks``, uint8 ``(out, bytes per row)``), ``weight_shape``, ``bias``; the entry
    names the type (``"ggml_type": "Q4_K"``) and the dtype the layer computes in."""

    kind = "ggml"
    required = LinearCodec.required | {"ggml_type", "weight_dtype"}

    def accepts(self, m: nn.Module) -> bool:
        from ...gguf.linear import GGMLLinear

        return isinstance(m, GGMLLinear)

    def describe(self, m: nn.Module) -> Entry:
        return {**self._linear_entry(m), "ggml_type": m.type.name,
                "weight_dtype": dtype_name(m.dtype)}

    def encode(self, m: nn.Module, entry: Entry) -> dict[str, Tensor]:
        return self._encode_linear(m, {"weight_blocks": m.weight_blocks})

    def entry_problem(self, entry: Entry) -> str | None:
        from ...gguf.grids import TYPES

        problem = super().entry_problem(entry)
        if problem is None and (entry["ggml_type"] not in TYPES
                                or entry["in_features"] % TYPES[entry["ggml_type"]].block):
            problem = (f"an unsupported ggml type {entry['ggml_type']!r} for "
                       f"{entry['in_features']} input features")
        return problem

    def expected(self, entry: Entry) -> Shapes:
        from ...gguf.grids import TYPES

        t = TYPES[entry["ggml_type"]]
        return {**self._linear_expected(entry),
                "weight_blocks": ((entry["out_features"], t.row_bytes(entry["in_features"])),
                                  torch.uint8)}

    def decode(self, entry: Entry, t: dict[str, Tensor], where: str) -> nn.Module:
        from ...gguf.grids import TYPES
        from ...gguf.linear import GGMLLinear

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

    def dense_weight(self, m: nn.Module) -> Tensor:
        return m.dequantize()

    def stored_bits(self, m: nn.Module, layout: str) -> tuple[float, int]:
        return 8 * m.weight_blocks.numel(), m.in_features * m.out_features


GGML = register(GGMLCodec())



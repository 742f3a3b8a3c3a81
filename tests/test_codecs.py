"""Layer codecs: each kind's tensors ↔ module ↔ Compressed, and a new kind registered without
touching the writer or the loader."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fxcompress import GPTQ, RTN, Magnitude, SparseGPT
from fxcompress.algorithms import Compressed, Statistics
from fxcompress.checkpoint import load, save
from fxcompress.checkpoint.codecs import (
    CheckpointError,
    Codec,
    Entry,
    Shapes,
    codec_for,
    codec_of,
    register,
)
from fxcompress.checkpoint.codecs.base import CODECS
from fxcompress.modules import compressed_module

METHODS = {
    "quantized": GPTQ(4, 32),
    "quantized-sym-8bit-channel": GPTQ(8, -1, sym=True),
    "quantized-3bit-act-order": GPTQ(3, 32, act_order=True, static_groups=False),
    "sparse-quantized": SparseGPT(n_m=(2, 4), quant=GPTQ(4, 32)),
    "sparse-quantized-unstructured": Magnitude(0.6, quant=RTN(4, -1)),
    "sparse": SparseGPT(0.5),
}


def _compressed(method, bias: bool, seed: int = 0) -> tuple[Compressed, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    b = torch.randn(48, generator=g) if bias else None
    return method.solve(w, Statistics(2 * x.t() @ x / 256, 256), "layer"), b


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", METHODS)
def test_every_kind_round_trips_through_its_tensors(case, bias):
    c, b = _compressed(METHODS[case], bias)
    m = compressed_module(c, b, torch.float32)
    codec = codec_for(m)
    assert codec.kind == case.split("-sym")[0].split("-3bit")[0].split("-unstr")[0]
    entry = codec.describe(m)
    assert codec_of(entry) is codec and codec.entry_problem(entry) is None
    tensors = codec.encode(m, entry)
    expected = codec.expected(entry)
    assert tensors.keys() == expected.keys()  # exactly what load will look for
    for name, t in tensors.items():
        assert (tuple(t.shape), t.dtype) == expected[name], name
    back = codec.decode(entry, {k: t.clone() for k, t in tensors.items()}, "here: ")
    assert type(back) is type(m)
    for (na, a), (nb, b2) in zip(m.state_dict().items(), back.state_dict().items(), strict=True):
        assert na == nb and a.dtype == b2.dtype and torch.equal(a, b2), na
    x = torch.randn(3, 64)
    assert torch.equal(m(x), back(x))
    again = codec.to_compressed(back, 1.25)  # what a resumed streamed run replays
    assert torch.equal(again.dense(), c.dense()) and again.loss == 1.25
    assert torch.equal(compressed_module(again, b, torch.float32)(x), m(x))


@pytest.mark.parametrize("case", METHODS)
def test_every_kind_answers_for_its_module(case):
    """What the CLI, training, ``decompress`` and the GGUF writer ask a kind instead of testing
    module classes: the weight it computes with, its pruned share, its stored bits."""
    c, b = _compressed(METHODS[case], True, seed=3)
    m = compressed_module(c, b, torch.float32)
    codec = codec_for(m)
    assert codec.lora_base
    reference = c.dense() if c.keep() is None else c.dense() * c.keep()
    w = codec.dense_weight(m)
    assert w.dtype == torch.float32 and w.shape == (48, 64)
    assert ((w - reference).norm() / reference.norm()).item() < 2e-3  # float16 scales
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    y = torch.nn.functional.linear(x, w, b)
    assert ((y - m(x)).norm() / y.norm()).item() < 2e-2  # the layer's own kernel
    zeros, n = codec.pruned_weights(m)
    assert n == 48 * 64 and zeros == (0 if c.keep() is None else int((~c.keep()).sum()))
    dense_bits, weights = codec.stored_bits(m, "dense")
    bitmask_bits, _ = codec.stored_bits(m, "bitmask")
    assert weights == n
    if c.quantized:
        grid = (16 + (0 if c.sym else c.bits)) / c.group_size  # scale (+ zero) per group
        assert dense_bits / n == pytest.approx(c.bits + grid)
    else:
        assert dense_bits / n == 32  # float32 weights, zeros included
    assert (bitmask_bits < dense_bits) if zeros else (bitmask_bits == dense_bits)


def test_decode_names_contents_that_contradict_the_entry():
    c, _ = _compressed(SparseGPT(0.5), False)
    m = compressed_module(c, None, torch.float32)
    codec = codec_for(m)
    entry = codec.describe(m)
    tensors = codec.encode(m, entry)
    with pytest.raises(CheckpointError, match=r"f\.st: layer\.weight_bitmask keeps \d+ weights, "
                                              r"config\.json says nnz=1"):
        codec.decode({**entry, "nnz": 1}, tensors, "f.st: layer.")
    tensors["weight_shape"] = torch.tensor([64, 48])
    with pytest.raises(CheckpointError, match=r"weight_shape holds \[64, 48\], config\.json "
                                              r"says \[48, 64\]"):
        codec.decode(entry, tensors, "f.st: layer.")


@pytest.mark.parametrize("broken", [
    {"bits": 5}, {"group_size": 48}, {"in_features": -1}, {"bias": "yes"}, {"nnz": None},
])
def test_invalid_entries_are_named(broken):
    c, _ = _compressed(SparseGPT(n_m=(2, 4), quant=GPTQ(4, 32)), False)
    m = compressed_module(c, None, torch.float32)
    codec = codec_for(m)
    entry = {**codec.describe(m), **broken}
    assert codec.entry_problem(entry).startswith(("an invalid entry", "an invalid grid"))


# ------------------------------------------------------------------ a kind added from outside


class Banks(nn.Module):
    """A module holding several weight matrices (as an experts block holds one per expert)."""

    def __init__(self, banks: int, out: int, inp: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(banks, out, inp))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bi,koi->bko", x, self.weight).sum(1)


class HalfBanks(nn.Module):
    """A "compressed" Banks: fp16 weights."""

    def __init__(self, w: Tensor):
        super().__init__()
        self.register_buffer("weight_half", w.half())

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bi,koi->bko", x, self.weight_half.float()).sum(1)


class HalfBanksCodec(Codec):
    """Stores one tensor per bank under dotted local names (``<bank>.weight``), like a
    per-expert layout."""

    kind = "test-half-banks"

    def accepts(self, m: nn.Module) -> bool:
        return isinstance(m, HalfBanks)

    def describe(self, m: HalfBanks) -> Entry:
        return {"kind": self.kind, "shape": list(m.weight_half.shape)}

    def encode(self, m: HalfBanks, entry: Entry) -> dict[str, Tensor]:
        return {f"{k}.weight": w for k, w in enumerate(m.weight_half)}

    def entry_problem(self, entry: Entry) -> str | None:
        return None if len(entry.get("shape", ())) == 3 else f"an invalid entry {entry!r}"

    def original_problem(self, module: nn.Module, entry: Entry) -> str | None:
        ok = isinstance(module, Banks) and list(module.weight.shape) == entry["shape"]
        return None if ok else f"is a {type(module).__name__}, not Banks{entry['shape']}"

    def expected(self, entry: Entry) -> Shapes:
        banks, out, inp = entry["shape"]
        return {f"{k}.weight": ((out, inp), torch.float16) for k in range(banks)}

    def decode(self, entry: Entry, tensors: dict[str, Tensor], where: str) -> HalfBanks:
        return HalfBanks(torch.stack([tensors[f"{k}.weight"] for k in range(entry["shape"][0])]))

    def to_compressed(self, m: nn.Module, loss: float) -> Compressed:
        raise NotImplementedError


def test_a_registered_kind_is_saved_and_loaded_without_other_changes(tmp_path, monkeypatch):
    # registered for this test only
    monkeypatch.setattr("fxcompress.checkpoint.codecs.base.CODECS", dict(CODECS))
    register(HalfBanksCodec())

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), Banks(3, 4, 16))

    model = build()
    model[1] = HalfBanks(torch.randn(3, 4, 16))
    save(model, tmp_path / "ckpt", max_shard_size=100)
    loaded = load(tmp_path / "ckpt", build=build)
    assert isinstance(loaded[1], HalfBanks) and isinstance(loaded[0], nn.Linear)
    x = torch.randn(2, 8)
    assert torch.equal(model(x), loaded(x))

    def wrong() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), Banks(2, 4, 16))

    with pytest.raises(CheckpointError, match=r"layer 1 is a Banks, not Banks\[3, 4, 16\]"):
        load(tmp_path / "ckpt", build=wrong)


@pytest.mark.parametrize("case", ["sparse-quantized", "sparse-quantized-unstructured", "sparse"])
def test_pruned_kinds_round_trip_in_the_dense_layout(case):
    """The dense layout stores what an unpruned reader reads (a ``weight``, or the
    ``quantized`` kind's tensors) and rebuilds a module with the same masked weights and
    outputs; the structure and nnz it records are those of the rebuilt keep-mask."""
    c, b = _compressed(METHODS[case], True)
    m = compressed_module(c, b, torch.float32)
    codec = codec_for(m)
    entry = codec.describe_as(m, "dense")
    assert entry["layout"] == "dense" and codec.entry_problem(entry) is None
    assert entry["structure"] == ("2:4" if case == "sparse-quantized" else "unstructured")
    tensors = codec.encode(m, entry)
    plain = {"weight", "bias"} if case == "sparse" else {
        "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "bias"}
    assert set(tensors) == plain == set(codec.expected(entry))
    back = codec.decode(entry, {k: t.clone() for k, t in tensors.items()}, "here: ")
    x = torch.randn(3, 64)
    assert type(back) is type(m) and torch.equal(m(x), back(x))
    again = codec.to_compressed(back, 0.5)
    assert torch.equal(compressed_module(again, b, torch.float32)(x), m(x))

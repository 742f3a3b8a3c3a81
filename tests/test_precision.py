"""``set_precision``: the CPU int4 kernel's bf16 arithmetic ("fast", the default) against the
dequantized float32 model, and "exact" float32 arithmetic — eager, compiled and exported."""

from __future__ import annotations

import copy

import pytest
import torch

import fxcompress
from fxcompress import QuantLinear
from fxcompress.checkpoint.model import decompress

from .models import VOCAB, build, output
from .test_export import RECIPE

FAST_BOUND = 1e-2  # README "CPU arithmetic": 0.4 % on this model, 0.8 % on SmolLM2
EXACT_BOUND = 1e-5


@pytest.fixture(scope="module")
def compressed() -> torch.nn.Module:
    """A two-layer Llama with int4 (with a permutation), int8 and canonical layers (do not
    mutate)."""
    model = build("llama", 128, layers=2)
    calibration = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    return fxcompress.compile(model, calibration, RECIPE, progress=False).eval()


def _inputs(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def _kernels(model: torch.nn.Module) -> set[str]:
    return {m.kernel for m in model.modules() if isinstance(m, QuantLinear)}


def test_fast_is_within_its_bound_and_exact_matches_the_dequantized_model(compressed):
    reference = decompress(copy.deepcopy(compressed))
    model = copy.deepcopy(compressed)
    assert _kernels(model) == {"int4pack", "int8pack", "canonical"}
    with torch.no_grad():
        for seed in (10, 11):
            x = _inputs(seed)
            ref = output(reference, x)
            fast = _rel(output(model, x), ref)
            assert 1e-4 < fast < FAST_BOUND  # bf16: measurably not float32
            fxcompress.set_precision(model, "exact")
            assert _kernels(model) == {"int8pack", "canonical"}
            assert _rel(output(model, x), ref) < EXACT_BOUND
            fxcompress.set_precision(model, "fast")
            assert _kernels(model) == {"int4pack", "int8pack", "canonical"}
            assert _rel(output(model, x), ref) == fast


def test_exact_under_compile_and_export(compressed, tmp_path):
    reference = decompress(copy.deepcopy(compressed))
    model = fxcompress.set_precision(copy.deepcopy(compressed), "exact")
    x = _inputs(12)
    with torch.no_grad():
        ref = output(reference, x)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert _rel(output(compiled, x), ref) < EXACT_BOUND
        assert not torch._dynamo.utils.counters["graph_break"]
    program = torch.export.load(fxcompress.export(model, x, tmp_path / "exact.pt2"))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "fxcompress.quant_linear.default" in ops
    assert "fxcompress.int4pack_linear.default" not in ops
    with torch.no_grad():
        assert _rel(program.module()(_inputs(13)), output(reference, _inputs(13))) < EXACT_BOUND


def test_exact_survives_moving_the_model_and_bad_values_are_errors(compressed):
    model = fxcompress.set_precision(copy.deepcopy(compressed), "exact")
    model.to(torch.float32)  # re-prepares the layouts: the choice stays
    assert _kernels(model) == {"int8pack", "canonical"}
    assert "precision=exact" in repr(model)
    with pytest.raises(ValueError, match="precision must be one of"):
        fxcompress.set_precision(model, "float32")

"""Compressed models pickle like any ``nn.Module``: ``torch.save(model)`` and
``torch.load(..., weights_only=False)`` in a fresh process give identical outputs, and a
loaded model compiles with no graph break."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fxcompress
from fxcompress import LoRALinear, QuantLinear, SparseLinear, add_lora
from fxcompress.modules import set_precision
from fxcompress.modules.linear import _DERIVED

from .models import VOCAB, build, output
from .test_export import OTHER, RECIPE, _run


@pytest.fixture(scope="module")
def compressed() -> torch.nn.Module:
    """A one-layer Llama through ``fxcompress.compile`` with every CPU op (int4pack with a
    permutation, int8pack, canonical, masked), and LoRA adapters on two of its layers (do not
    mutate)."""
    model = build("llama", 64, layers=1)
    calibration = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    fxcompress.compile(model, calibration, RECIPE, progress=False)
    add_lora(model, rank=4, targets=r".*(q_proj|up_proj)")
    with torch.no_grad():  # adapters that change the output
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(generator=torch.Generator().manual_seed(3))
    return model.eval()


def test_torch_save_then_load_in_a_fresh_process(compressed, tmp_path):
    model = compressed
    kinds = {type(m) for m in model.modules()}
    assert {QuantLinear, SparseLinear, LoRALinear} <= kinds
    assert {m.kernel for m in model.modules() if isinstance(m, QuantLinear)} == {
        "int4pack", "int8pack", "canonical"}
    torch.save(model, tmp_path / "model.pt")
    with torch.no_grad():
        torch.save({"x": OTHER, "y": output(model, OTHER)}, tmp_path / "io.pt")
    out = _run(f"""
        import torch
        model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
        io = torch.load({str(tmp_path / "io.pt")!r})
        kernels = sorted({{m.kernel for m in model.modules() if hasattr(m, "kernel")}})
        with torch.no_grad():
            assert torch.equal(model(io["x"]).logits, io["y"]), "eager outputs differ"
        print(kernels, type(model.fxcompress_report).__name__)
        """, tmp_path)
    # the kernel layouts were rebuilt in the loading process
    assert "['canonical', 'int4pack', 'int8pack'] Report" in out


def test_a_loaded_model_compiles_without_graph_breaks(compressed):
    model = compressed
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        expected = output(model, OTHER)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(loaded, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(output(compiled, OTHER), expected)
    assert not torch._dynamo.utils.counters["graph_break"]


def test_pickle_holds_the_canonical_buffers_only(compressed):
    model = compressed
    m = next(m for m in model.modules() if isinstance(m, QuantLinear) and m.kernel == "int4pack")
    pickled = set(m.__getstate__()["_buffers"])
    assert {"weight_packed", "weight_scale", "weight_zero_point"} <= pickled
    assert not pickled & set(_DERIVED) and m._w_int4 is not None
    copied = copy.deepcopy(m)
    assert copied.kernel == "int4pack" and torch.equal(copied._w_int4, m._w_int4)
    x = torch.randn(3, m.in_features)
    assert torch.equal(copied(x), m(x))


def test_precision_survives_pickling(compressed):
    model = set_precision(copy.deepcopy(compressed), "exact")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    quant = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert {m.precision for m in quant} == {"exact"}
    assert "int4pack" not in {m.kernel for m in quant}
    with torch.no_grad():
        assert torch.equal(output(loaded, OTHER), output(model, OTHER))


@pytest.mark.parametrize("name", ["QuantLinear", "SparseLinear", "QuantExperts", "SparseExperts",
                                  "_prepare_after_load"])
def test_pickles_from_before_the_modules_package_still_resolve(name):
    """Whole-model pickles written while ``fxcompress.modules`` was one file name its classes
    and the load hook there; unpickling looks each up by exactly that module and name."""
    import pickle

    from fxcompress.modules import experts, linear

    found = pickle.Unpickler(io.BytesIO()).find_class("fxcompress.modules", name)
    assert found is getattr(linear, name, None) or found is getattr(experts, name, None)

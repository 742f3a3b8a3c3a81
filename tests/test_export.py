"""Programs from compressed models: ``torch.export`` (.pt2), AOTInductor packages that run in a
process without fxcompress, legacy TorchScript, and ``torch.compile(fullgraph=True)`` of a
loaded checkpoint (tiny models; the real-model and HF AOTInductor runs are marked slow)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import GPTQ, QuantLinear, SparseGPT, SparseLinear
from fxcompress.export import export, plain_outputs, trace

from .models import VOCAB, build, output
from .test_format import quick

RECIPE = {  # every CPU op: int4pack (with a permutation), int8pack, canonical, masked
    r".*self_attn\.q_proj": GPTQ(4, 32),
    r".*self_attn\.k_proj": GPTQ(8, -1, sym=True),
    r".*self_attn\.v_proj": GPTQ(8, 32),
    r".*mlp\.up_proj": SparseGPT(0.5),
    ".*": GPTQ(4, 32, act_order=True, static_groups=False),
}
IDS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
OTHER = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> nn.Module:
    """A one-layer Llama using every CPU op, saved and loaded back (do not mutate)."""
    folder = tmp_path_factory.mktemp("llama")
    fxcompress.save(quick(build("llama", 64, layers=1), RECIPE), folder)
    model = fxcompress.load(folder)
    kernels = {m.kernel for m in model.modules() if isinstance(m, QuantLinear)}
    assert kernels == {"int4pack", "int8pack", "canonical"}
    assert any(isinstance(m, SparseLinear) for m in model.modules())
    return model


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    return quick(model, {"0": GPTQ(4, 32), "2": GPTQ(8, -1), "4": GPTQ(8, 32),
                         "6": SparseGPT(n_m=(2, 4))})


def _run(code: str, cwd: Path) -> str:
    """Run ``code`` in a fresh Python process; fail with its output if it fails."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_plain_outputs():
    logits = torch.zeros(2)

    class Out(dict):
        pass

    out = Out(logits=logits, other=torch.ones(1))
    out.logits = logits
    assert plain_outputs(out) is logits
    assert plain_outputs((logits,))[0] is logits
    assert plain_outputs(logits) is logits


def test_export_pt2_with_dynamic_batch_and_sequence(loaded, tmp_path):
    path = export(loaded, IDS, tmp_path / "model.pt2")
    program = torch.export.load(path).module()
    with torch.no_grad():
        for ids in (IDS, OTHER):
            torch.testing.assert_close(program(ids), output(loaded, ids), rtol=1e-5,
                                       atol=1e-5)


def test_export_rejects_other_suffixes(loaded, tmp_path):
    with pytest.raises(ValueError, match=r"\.pt2"):
        export(loaded, IDS, tmp_path / "model.pt")


def test_aot_package_runs_in_a_process_without_fxcompress(tmp_path):
    model = _mlp()
    x, other = torch.randn(4, 64), torch.randn(7, 64)
    path = export(model, x, tmp_path / "mlp.pt2", aot=True)
    with torch.no_grad():
        torch.save({"x": other, "y": model(other)}, tmp_path / "io.pt")
    out = _run(f"""
        import sys
        sys.modules["fxcompress"] = None  # any import of fxcompress now fails
        sys.modules["transformers"] = None
        import torch
        runner = torch._inductor.aoti_load_package({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(runner(io["x"]), io["y"], rtol=1e-4, atol=1e-4)
        print("ok")
        """, tmp_path)
    assert out.strip().endswith("ok")


@pytest.mark.slow
def test_aot_package_of_llama_runs_in_a_process_without_fxcompress(loaded, tmp_path):
    path = export(loaded, IDS, tmp_path / "llama.pt2", aot=True)
    with torch.no_grad():
        torch.save({"x": OTHER, "y": output(loaded, OTHER)}, tmp_path / "io.pt")
    _run(f"""
        import sys
        sys.modules["fxcompress"] = None
        sys.modules["transformers"] = None
        import torch
        runner = torch._inductor.aoti_load_package({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(runner(io["x"]), io["y"], rtol=1e-3, atol=1e-3)
        """, tmp_path)


def test_torchscript_trace_loads_in_a_process_with_fxcompress(loaded, tmp_path):
    path = tmp_path / "llama.ts"
    traced = trace(loaded, IDS, path)
    with torch.no_grad():
        expected = output(loaded, OTHER)
        torch.testing.assert_close(traced(OTHER), expected)
        torch.save({"x": OTHER, "y": expected}, tmp_path / "io.pt")
    _run(f"""
        import torch, fxcompress  # registers torch.ops.fxcompress
        module = torch.jit.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(module(io["x"]), io["y"])
        """, tmp_path)


def _compiled_output(model: nn.Module, ids: torch.Tensor, backend: str) -> torch.Tensor:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        out = output(compiled, ids)
    assert not torch._dynamo.utils.counters["graph_break"]
    return out


def test_compile_fullgraph_of_loaded_checkpoint_has_no_graph_breaks(loaded):
    with torch.no_grad():
        expected = output(loaded, OTHER)
    torch.testing.assert_close(_compiled_output(loaded, OTHER, "aot_eager"), expected)


def test_compile_inductor_of_compressed_ops_matches_eager():
    model = _mlp()
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compile_inductor_of_loaded_llama_matches_eager(loaded):
    with torch.no_grad():
        expected = output(loaded, OTHER)
    torch.testing.assert_close(_compiled_output(loaded, OTHER, "inductor"), expected,
                               rtol=1e-3, atol=1e-3)

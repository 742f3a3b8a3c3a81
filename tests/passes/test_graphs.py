"""Compressed models under torch.compile and torch.export."""

import torch

import fxcompress
from fxcompress import GPTQ, SparseGPT

from ..models import VOCAB, build


def _compressed(method, arch="llama"):
    model = build(arch)
    fxcompress.compile(model, torch.randint(0, VOCAB, (8, 16)), method, progress=False)
    return model


def test_torch_compile_fullgraph_has_no_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    model = _compressed(SparseGPT(n_m=(2, 4), quant=GPTQ(4, 128)))
    ids = torch.randint(0, VOCAB, (2, 10))
    explain = torch._dynamo.explain(model)(input_ids=ids)
    assert explain.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        got = compiled(input_ids=ids).logits
    torch.testing.assert_close(got, eager, rtol=1e-3, atol=1e-3)


def test_export_shows_one_fxcompress_op_per_compressed_linear():
    model = _compressed(fxcompress.Recipe({r".*mlp.*": SparseGPT(0.5), r".*": GPTQ(4, 128)}))
    ids = torch.randint(0, VOCAB, (2, 10))
    ep = torch.export.export(model, (), {"input_ids": ids, "use_cache": False}, strict=False)
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"
           and str(n.target).startswith("fxcompress.")]
    assert sorted(set(ops)) == ["fxcompress.int4pack_linear.default",
                                "fxcompress.masked_linear.default"]
    assert ops.count("fxcompress.masked_linear.default") == 6  # 2 layers x gate/up/down
    assert ops.count("fxcompress.int4pack_linear.default") == 8  # 2 layers x q/k/v/o
    assert not any(n.target == torch.ops.aten.linear.default for n in ep.graph.nodes
                   if "layers" in str(n.meta.get("nn_module_stack", "")))

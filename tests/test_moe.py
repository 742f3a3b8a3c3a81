"""Mixture-of-experts decoders: every expert compressed, per-expert Hessians, compiled."""

from __future__ import annotations

import copy

import pytest
import torch

import fxcompress
from fxcompress import GPTQ, RTN, QuantExperts, Recipe, RecipeError, SparseExperts, SparseGPT
from fxcompress.algorithms import output_error, rtn
from fxcompress.api import plan_sites
from fxcompress.passes import calibrate, capture, find_sites

from .models import EXPERTS, MOE, VOCAB, build, output, substituted

HIDDEN = 64


def _calibration(n=8, seq=16, seed=0):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _ids(seed=1):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _experts_modules(model):
    return [m for n, m in model.named_modules() if n.endswith("mlp.experts")]


def _compress(arch, method, experts="grouped_mm"):
    model = build(arch, hidden=HIDDEN, experts=experts)
    dense = copy.deepcopy(model)
    fxcompress.compile(model, _calibration(), method, progress=False)
    return model, dense


def _check_output(model, dense, quantized):
    ids = _ids()
    with torch.no_grad():
        y, ref = output(model, ids), output(substituted(dense, model), ids)
        changed = (output(dense, ids) - ref).norm() / ref.norm()
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < (2e-2 if quantized else 1e-5), rel  # int4 CPU kernels run bf16 activations
    assert changed > 5 * rel


@pytest.mark.parametrize(("arch", "experts"), [(a, "grouped_mm") for a in MOE]
                         + [("mixtral", "batched_mm")])
def test_every_expert_replaced_and_output_matches_reference(arch, experts):
    model, dense = _compress(arch, GPTQ(4, 32), experts)
    modules = _experts_modules(model)
    assert len(modules) == 2 and all(isinstance(m, QuantExperts) for m in modules)
    assert all(m.kernel == "int4pack" for m in modules)
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    if arch == "qwen2moe":  # the shared expert is ordinary linears, compressed as such
        assert type(model.model.layers[0].mlp.shared_expert.up_proj).__name__ == "QuantLinear"
    _check_output(model, dense, quantized=True)


@pytest.mark.parametrize("method", [SparseGPT(0.5), SparseGPT(n_m=(2, 4)),
                                    SparseGPT(n_m=(2, 4), quant=GPTQ(4, 32))],
                         ids=["50%", "2:4", "2:4+w4"])
def test_sparsegpt_on_experts(method):
    model, dense = _compress("qwen3moe", method)
    module = _experts_modules(model)[0]
    if method.quant is None:
        assert isinstance(module, SparseExperts)
        kept = module.gate_up_proj_mask.float().mean().item()
        assert abs(kept - 0.5) < 1e-6
        if method.n_m:
            assert (module.down_proj_mask.reshape(EXPERTS, HIDDEN, -1, 4).sum(-1) == 2).all()
    else:
        assert isinstance(module, QuantExperts) and module.gate_up_proj_bitmask is not None
    _check_output(model, dense, quantized=method.quant is not None)


def test_per_expert_token_counts_in_report():
    """Routed rows per expert; an expert routed fewer rows than its input features (HIDDEN)
    has a Hessian over all the block's rows (the stated rule), and ``samples`` says so."""
    model, _ = _compress("mixtral", GPTQ(4, 32))
    layers = {r.fqn: r for r in model.fxcompress_report.layers}
    tokens = _calibration().numel()
    few = 0
    for block in range(2):
        prefix = f"model.layers.{block}.mlp.experts"
        routed = [layers[f"{prefix}.gate_up_proj.{e}"].routed for e in range(EXPERTS)]
        assert sum(routed) == 2 * tokens  # two experts per token
        assert routed == [layers[f"{prefix}.down_proj.{e}"].routed for e in range(EXPERTS)]
        for e in range(EXPERTS):
            rows = routed[e] if routed[e] >= HIDDEN else 2 * tokens
            few += routed[e] < HIDDEN
            assert layers[f"{prefix}.gate_up_proj.{e}"].samples == rows
            assert layers[f"{prefix}.down_proj.{e}"].samples == rows
    assert few > 0  # 128 tokens over 4 experts: the rule is exercised
    assert model.fxcompress_report.expert_tokens()[f"{prefix}.gate_up_proj.0"] == routed[0]
    assert layers["model.layers.0.self_attn.q_proj"].routed is None


def test_gptq_beats_rtn_per_expert_on_the_calibration_objective():
    model = build("qwen2moe", hidden=HIDDEN)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    chunks = [((), {"input_ids": _calibration(), "use_cache": False})]
    ep = capture(model, *chunks[0])
    sites, others = find_sites(ep, model)
    plan, _ = plan_sites(Recipe(GPTQ(4, 32)), sites, others, model)
    hessians = {}
    results, _ = calibrate(ep, sites, plan, chunks, progress=False,
                           on_statistics=lambda name, st: hessians.setdefault(name, st.hessian))
    experts = [s for s in sites if s.index is not None]
    assert len(experts) == 2 * 2 * EXPERTS
    for s in experts:
        w = s.matrix(weights[f"{s.module_name}.{s.attr}"]).float()
        h = hessians[s.fqn]
        gptq_loss = output_error(w, results[s.fqn].dense(), h)
        rtn_loss = output_error(w, rtn(w, RTN(4, 32)).dense(), h)
        assert gptq_loss < rtn_loss, s.fqn


@pytest.mark.parametrize("samples", [32, 4], ids=["routed", "few-tokens"])
def test_expert_hessians_are_built_from_routed_rows(samples):
    """An expert's H equals 2·XₑᵀXₑ/nₑ over the rows the router sent it — or, when fewer rows
    than its input features were routed, over every row of the block — whichever experts
    implementation the model runs (grouped_mm and batched_mm give the same Hessians)."""
    got = {}
    for experts in ("grouped_mm", "batched_mm"):
        model = build("mixtral", hidden=HIDDEN, experts=experts)
        chunks = [((), {"input_ids": _calibration(n=samples), "use_cache": False})]
        ep = capture(model, *chunks[0])
        sites, others = find_sites(ep, model)
        plan = {s.fqn: GPTQ(4, 32) for s in sites if "layers.0.mlp.experts." in s.fqn}
        hs = {}
        results, _ = calibrate(ep, sites, plan, chunks, progress=False,
                               on_statistics=lambda name, st, hs=hs: hs.setdefault(name,
                                                                                  st.hessian))
        got[experts] = hs
        x, ids = _block_input(model, chunks[0][1]["input_ids"])
    for e in range(EXPERTS):
        routed = (ids == e).any(-1)
        rows = x[routed] if routed.sum() >= HIDDEN else x
        gate, up = (rows @ results[f"model.layers.0.mlp.experts.gate_up_proj.{e}"].dense().T
                    ).chunk(2, -1)
        h = torch.nn.functional.silu(gate) * up  # the down projection's rows
        for name, r in (("gate_up_proj", rows), ("down_proj", h)):
            ref = 2 * r.T @ r / len(r)
            for experts in got:
                got_h = got[experts][f"model.layers.0.mlp.experts.{name}.{e}"]
                assert torch.allclose(got_h, ref, rtol=1e-3, atol=1e-5), (experts, name, e)


def _block_input(model, ids):
    seen = {}
    block = model.model.layers[0].mlp
    handle = block.register_forward_hook(lambda m, a, y: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    x = seen["x"].reshape(-1, HIDDEN)
    return x, block.gate(x)[2]


def test_router_skipped_with_reason_and_explicit_rule_is_an_error():
    model, _ = _compress("mixtral", GPTQ(4, 32))
    skipped = model.fxcompress_report.skipped
    assert "MixtralTopKRouter" in skipped["model.layers.0.mlp.gate"]
    assert type(model.model.layers[0].mlp.gate).__name__ == "MixtralTopKRouter"
    model = build("mixtral", hidden=HIDDEN)
    with pytest.raises(RecipeError, match="model.layers.0.mlp.gate.*cannot compress"):
        fxcompress.compile(model, _calibration(), Recipe({"model.layers.0.mlp.gate": GPTQ(4, 32),
                                                          ".*": GPTQ(4, 32)}), progress=False)


def test_named_recipes_compress_experts():
    model, _ = _compress("qwen3moe", fxcompress.recipe.resolve("gptq-w4g64"))
    assert all(isinstance(m, QuantExperts) for m in _experts_modules(model))


def test_experts_of_one_block_need_one_method():
    model = build("mixtral", hidden=HIDDEN)
    recipe = Recipe({r".*experts\.gate_up_proj\.0": RTN(4, 32), ".*": GPTQ(4, 32)})
    with pytest.raises(RecipeError, match="one method"):
        fxcompress.compile(model, _calibration(), recipe, progress=False)


def test_experts_module_name_selects_its_experts():
    model = build("mixtral", hidden=HIDDEN)
    recipe = Recipe({"model.layers.0.mlp.experts": GPTQ(4, 32), ".*": None})
    fxcompress.compile(model, _calibration(), recipe, progress=False)
    assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    assert not isinstance(model.model.layers[1].mlp.experts, QuantExperts)


def test_eager_experts_fail_clearly():
    model = build("mixtral", hidden=HIDDEN, experts="eager")
    with pytest.raises(fxcompress.CaptureError, match="experts_implementation"):
        fxcompress.compile(model, _calibration(), GPTQ(4, 32), progress=False)


@pytest.mark.parametrize("method", [GPTQ(4, 32),
                                    pytest.param(SparseGPT(0.5), marks=pytest.mark.slow)],
                         ids=["w4", "50%"])
def test_compile_fullgraph_no_graph_breaks(method):
    model, _ = _compress("mixtral", method)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    ids = _ids()
    with torch.no_grad():
        ref, got = output(model, ids), output(compiled, ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < (1e-2 if isinstance(method, GPTQ) else 1e-5), rel  # bf16 int4 activations


def test_export_compressed_moe(tmp_path):
    """``fxcompress.export`` to .pt2 with dynamic batch and sequence; the program holds the
    experts op and reproduces the model on another shape."""
    model, _ = _compress("qwen2moe", GPTQ(4, 32))
    path = fxcompress.export(model, {"input_ids": _ids()}, tmp_path / "moe.pt2")
    program = torch.export.load(path)
    targets = {str(n.target) for n in program.graph.nodes}
    assert "fxcompress.moe_int4pack.default" in targets
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = output(model, ids), program.module()(ids)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_saving_compressed_experts_is_refused_clearly(tmp_path):
    model, _ = _compress("mixtral", GPTQ(4, 32))
    with pytest.raises(NotImplementedError, match="compressed experts"):
        fxcompress.save(model, tmp_path / "out")


def test_unsupported_experts_are_skipped_with_reason():
    """gpt-oss experts (interleaved gate/up, biases, own gate function) stay dense under a
    catch-all rule, listed with the reason; naming them explicitly is an error."""
    import warnings

    import transformers as T

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = T.GptOssConfig(vocab_size=VOCAB, num_hidden_layers=1, hidden_size=HIDDEN,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             intermediate_size=HIDDEN, num_local_experts=EXPERTS,
                             num_experts_per_tok=2, layer_types=["full_attention"])
        model = T.GptOssForCausalLM(cfg).eval()
    fxcompress.compile(model, _calibration(n=4), GPTQ(4, 32), progress=False)
    skipped = model.fxcompress_report.skipped
    assert "GptOssExperts: gate and up rows are interleaved" in \
        skipped["model.layers.0.mlp.experts"]
    assert type(model.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    with pytest.raises(RecipeError, match="names 'model.layers.0.mlp.experts'"):
        fxcompress.compile(model, _calibration(n=4), Recipe(
            {"model.layers.0.mlp.experts": GPTQ(4, 32), ".*": None}), progress=False)

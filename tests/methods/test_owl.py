"""OWL layerwise sparsity: the spread keeps the model's sparsity, the ratios and norms equal
slow references, every layer is pruned as its report says, experts and N:M are left alone."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

import fxcompress
from fxcompress import SparseGPT
from fxcompress.errors import RecipeError
from fxcompress.methods import owl
from fxcompress.recipe import Recipe
from tests.models import build


def test_block_of():
    assert owl.block_of("model.layers.3.mlp.up_proj") == "model.layers.3"
    assert owl.block_of("transformer.h.11.attn.c_attn") == "transformer.h.11"
    assert owl.block_of("encoder.layer.0.attention.self.query") == "encoder.layer.0"
    assert owl.block_of("layers.12") == "layers.12"
    assert owl.block_of("lm_head") == "lm_head"
    assert owl.block_of("model.layers2.fc") == "model.layers2.fc"  # not a numeric component


@pytest.mark.parametrize("seed", range(5))
def test_spread_keeps_the_overall_sparsity_and_orders_blocks_by_outliers(seed):
    rng = random.Random(seed)
    blocks = [f"b{i}" for i in range(rng.randint(2, 40))]
    ratios = {b: rng.uniform(0, 0.05) for b in blocks}
    sizes = {b: rng.randint(1, 10_000) for b in blocks}
    target, lmbda = rng.uniform(0.2, 0.8), rng.uniform(0.01, 0.1)
    got = owl.spread(ratios, sizes, target, lmbda)
    overall = sum(got[b] * sizes[b] for b in blocks) / sum(sizes.values())
    assert overall == pytest.approx(target, rel=1e-12)
    most, least = max(blocks, key=ratios.get), min(blocks, key=ratios.get)
    assert got[least] - got[most] == pytest.approx(2 * lmbda, rel=1e-12)
    by_ratio = sorted(blocks, key=ratios.get)
    assert all(got[a] >= got[b] for a, b in zip(by_ratio, by_ratio[1:], strict=False))
    assert owl.spread(dict.fromkeys(blocks, 0.01), sizes, target, lmbda) == \
        dict.fromkeys(blocks, target)


def test_outlier_ratios_equal_a_concatenating_reference():
    torch.manual_seed(0)
    sites, norms, weights = {}, {}, {}
    for b in range(3):
        sites[f"b{b}"] = []
        for out, inp in [(48, 32), (16, 32), (32, 80)]:
            x = object()
            s = SimpleNamespace(input=x, shape=(out, inp))
            # heavy tails, so that some scores are outliers
            weights[id(s)] = torch.randn(out, inp) * torch.rand(out, inp).pow(6) * (b + 1)
            norms[x] = torch.rand(inp) * 3
            sites[f"b{b}"].append(s)
    for m in (2.0, 5.0):
        got = owl.outlier_ratios(sites, norms, lambda s: weights[id(s)], m)
        for b, ss in sites.items():
            scores = torch.cat([(weights[id(s)].abs() * norms[s.input]).flatten() for s in ss])
            want = float((scores > m * scores.mean()).double().mean())
            assert got[b] == pytest.approx(want, rel=1e-9), (b, m)
        assert len(set(got.values())) > 1


def _first_chunk_norms(model, ids):
    """‖x_j‖ of every linear's input over ``ids`` by forward hooks on the eager model."""
    norms, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(mod, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                norms[name] = x.square().sum(0).sqrt()
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return norms


def test_input_norms_equal_eager_hooks_and_layers_are_pruned_as_reported(monkeypatch):
    model = build("llama", hidden=96, layers=4)
    dense = _first_chunk_norms(model, ids := torch.randint(0, 128, (8, 48)))
    seen = {}
    real = owl.outlier_ratios

    def spy(blocks, norms, weight, m):
        seen.update({s.fqn: norms[s.input] for ss in blocks.values() for s in ss})
        return real(blocks, norms, weight, m)

    monkeypatch.setattr(owl, "outlier_ratios", spy)
    fxcompress.compile(model, ids, {"lm_head": None, ".*": SparseGPT(0.5)}, progress=False,
                       calibration_precision="fp32")  # bf16 CPUs would round the forward
    assert set(seen) == {n for n in dense if n != "lm_head"}
    for name, norm in seen.items():
        torch.testing.assert_close(norm.double(), dense[name], rtol=1e-4, atol=1e-6)
    layers = model.fxcompress_report.layers
    assert len({r.sparsity for r in layers}) == 4  # one per block, all different
    assert max(r.sparsity for r in layers) - min(r.sparsity for r in layers) > 0.02
    for block in range(4):
        assert len({r.sparsity for r in layers if f".{block}." in r.fqn}) == 1
    zeros = total = 0
    modules = dict(model.named_modules())
    for r in layers:
        w = modules[r.fqn].weight.detach()
        assert float((w == 0).double().mean()) == pytest.approx(r.sparsity, abs=0.01), r.fqn
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    assert zeros / total == pytest.approx(0.5, abs=0.005)
    table = model.fxcompress_report.table()  # what the CLI prints
    assert "| sparsity |" in table.splitlines()[0]
    for r in layers:
        assert f"| {r.fqn} | SparseGPT | {r.shape[0]}x{r.shape[1]} | {r.sparsity:.1%} |" in table


def test_owl_off_and_n_m_prune_uniformly():
    ids = torch.randint(0, 128, (4, 32))
    for method, want in [(SparseGPT(0.5, owl_lmbda=0), 0.5), (SparseGPT(n_m=(2, 4)), 0.5)]:
        model = build("llama", hidden=64, layers=3)
        fxcompress.compile(model, ids, {"lm_head": None, ".*": method}, progress=False)
        assert {r.sparsity for r in model.fxcompress_report.layers} == {want}
    model = build("llama", hidden=64, layers=2)
    fxcompress.compile(model, ids, {"lm_head": None, ".*": fxcompress.GPTQ(4, 32)},
                       progress=False)
    assert {r.sparsity for r in model.fxcompress_report.layers} == {None}
    assert "sparsity" not in model.fxcompress_report.table()


def test_experts_keep_the_requested_sparsity():
    model = build("mixtral", hidden=64, layers=3)
    ids = torch.randint(0, 128, (8, 32))
    fxcompress.compile(model, ids, {"lm_head": None, r".*router.*|.*gate$": None,
                                    ".*": SparseGPT(0.5)}, progress=False)
    layers = model.fxcompress_report.layers
    experts = {r.sparsity for r in layers if r.routed is not None or "experts" in r.fqn}
    others = {r.sparsity for r in layers if "experts" not in r.fqn}
    assert experts == {0.5}
    assert len(others) == 3 and sum(others) / 3 == pytest.approx(0.5, abs=1e-5)


def test_owl_settings_are_checked_and_round_trip():
    assert SparseGPT(0.5).owl == 0.04
    assert SparseGPT(0.1).owl == pytest.approx(0.025)
    assert SparseGPT(n_m=(2, 4)).owl == 0 and SparseGPT(0.5, owl_lmbda=0.1).owl == 0.1
    with pytest.raises(RecipeError, match="N:M pattern"):
        SparseGPT(n_m=(2, 4), owl_lmbda=0.04)
    with pytest.raises(RecipeError, match=r"owl_lmbda must be in \[0, 0.045\]"):
        SparseGPT(0.9, owl_lmbda=0.08)
    with pytest.raises(RecipeError, match="owl_lmbda must be in"):
        SparseGPT(0.5, owl_lmbda=-0.01)
    with pytest.raises(RecipeError, match="owl_m must be positive"):
        SparseGPT(0.5, owl_m=0)
    recipe = Recipe({".*": SparseGPT(0.6, owl_lmbda=0.06, owl_m=3)})
    assert Recipe.from_json(recipe.to_json()).rules == recipe.rules

"""fxcompress.compile end to end on small models of each supported architecture."""

import copy
import sys

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import GPTQ, RTN, Magnitude, QuantLinear, Recipe, SparseGPT, SparseLinear

from ..models import VOCAB, build, output, relative_error, substituted, uneven_features

METHODS = {
    "gptq-w4g128": GPTQ(bits=4, group_size=128),
    "gptq-w3": GPTQ(bits=3, group_size=-1),
    "sparsegpt-50": SparseGPT(0.5),
    "sparsegpt-2:4": SparseGPT(n_m=(2, 4)),
    "sparsegpt-2:4+w4": SparseGPT(n_m=(2, 4), quant=GPTQ(bits=4, group_size=128)),
}
EXPECTED_LINEARS = {"llama": 14, "qwen2": 15, "opt": 12, "gpt2": 8, "bert": 13}


def _calibration(n=8, seq=16, seed=0):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _check(arch, method):
    model = build(arch)
    dense = copy.deepcopy(model)
    fxcompress.compile(model, _calibration(), method, progress=False)
    compressed = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, SparseLinear))]
    assert len(compressed) == EXPECTED_LINEARS[arch]
    assert not any(isinstance(m, nn.Linear) and n.startswith(("model.layers", "transformer.h"))
                   for n, m in model.named_modules())
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        y, ref = output(model, ids), output(substituted(dense, model), ids)
        changed = (output(dense, ids) - ref).norm() / ref.norm()
    rel = ((y - ref).norm() / ref.norm()).item()
    quantized = isinstance(method, GPTQ) or getattr(method, "quant", None) is not None
    # int4 CPU kernels run bf16 activations: ~0.3 % a layer, up to 3.4 % at OPT's output
    # (2:4 + w4, an AMX CPU; exact arithmetic: 0) — bounded, and far below what compression did
    assert rel < (4e-2 if quantized else 1e-5), rel
    assert changed > 5 * rel  # compression changed the output much more than the kernel error
    return model


@pytest.mark.parametrize("name", list(METHODS))
def test_llama_every_method(name):
    _check("llama", METHODS[name])


@pytest.mark.parametrize("arch", ["qwen2", "opt", "gpt2", "bert"])
@pytest.mark.parametrize("name", ["gptq-w4g128", "sparsegpt-2:4+w4"])
def test_other_architectures(arch, name):
    _check(arch, METHODS[name])


# Each method end to end against its data-free baseline on the same grid or pattern.
E2E = {
    # shrink=0: the bounds below measure the published objective. Calibration and held-out
    # inputs here share one synthetic distribution, where shrinking H toward its diagonal (the
    # default's 0.25, chosen for text of other domains) has nothing to transfer and cost fit
    # (bert: 0.0107 -> 0.0148); the default is checked against the baseline on its own below.
    "gptq-w3g32": (GPTQ(3, 32, shrink=0.0), RTN(3, 32)),
    "gptq-w3g32 default": (GPTQ(3, 32), RTN(3, 32)),
    "sparsegpt-50": (SparseGPT(0.5), Magnitude(0.5)),
    "sparsegpt-2:4": (SparseGPT(n_m=(2, 4)), Magnitude(n_m=(2, 4))),
    "sparsegpt-2:4+w4g32": (SparseGPT(n_m=(2, 4), quant=GPTQ(4, 32)),
                            Magnitude(n_m=(2, 4), quant=RTN(4, 32))),
    "gptq-w8g128": (GPTQ(8, 128, shrink=0.0), RTN(8, 128)),
    "gptq-w4-per-channel": (GPTQ(4, -1, shrink=0.0), RTN(4, -1)),
}
# (error vs the dense model, error / the baseline's), measured by e2e_errors (seeded: model,
# norm scales, calibration and held-out ids) on 2026-12-06 at commit cb101e0, AVX-512-BF16 CPU:
# the largest of four runs — 1 thread twice (identical), 2 threads, and float32 calibration
# matmuls (what a CPU without bf16 runs) — which moved them by up to 10 % (16 % for 8-bit,
# whose errors are the smallest). MARGIN above that covers other CPUs' float sums; a GPTQ or
# SparseGPT half as good fails, and so does an error below half the measured one (less was
# compressed than before).
MARGIN = 1.25
MEASURED = {
    ("llama", "gptq-w3g32"):          (0.205, 0.488),
    ("llama", "sparsegpt-50"):        (0.199, 0.313),
    ("llama", "sparsegpt-2:4"):       (0.290, 0.367),
    ("llama", "sparsegpt-2:4+w4g32"): (0.306, 0.385),
    ("llama", "gptq-w8g128"):         (0.00745, 0.426),
    ("llama", "gptq-w4-per-channel"): (0.117, 0.451),
    ("qwen2", "gptq-w3g32"):          (0.192, 0.422),
    ("qwen2", "sparsegpt-50"):        (0.205, 0.259),
    ("qwen2", "sparsegpt-2:4"):       (0.301, 0.335),
    ("qwen2", "sparsegpt-2:4+w4g32"): (0.308, 0.353),
    ("qwen2", "gptq-w8g128"):         (0.00817, 0.441),
    ("qwen2", "gptq-w4-per-channel"): (0.122, 0.399),
    ("opt", "gptq-w3g32"):            (0.133, 0.374),
    ("opt", "sparsegpt-50"):          (0.115, 0.200),
    ("opt", "sparsegpt-2:4"):         (0.186, 0.304),
    ("opt", "sparsegpt-2:4+w4g32"):   (0.202, 0.325),
    ("opt", "gptq-w8g128"):           (0.00491, 0.343),
    ("opt", "gptq-w4-per-channel"):   (0.0738, 0.285),
    ("gpt2", "gptq-w3g32"):           (0.0871, 0.238),
    ("gpt2", "sparsegpt-50"):         (0.0911, 0.169),
    ("gpt2", "sparsegpt-2:4"):        (0.149, 0.249),
    ("gpt2", "sparsegpt-2:4+w4g32"):  (0.155, 0.262),
    ("gpt2", "gptq-w8g128"):          (0.00341, 0.269),
    ("gpt2", "gptq-w4-per-channel"):  (0.0542, 0.270),
    ("bert", "gptq-w3g32"):           (0.0107, 0.182),
    ("bert", "sparsegpt-50"):         (0.0115, 0.143),
    ("bert", "sparsegpt-2:4"):        (0.0188, 0.147),
    ("bert", "sparsegpt-2:4+w4g32"):  (0.0224, 0.170),
    ("bert", "gptq-w8g128"):          (0.000377, 0.201),
    ("bert", "gptq-w4-per-channel"):  (0.00630, 0.181),
}


def e2e_errors(arch: str, case: str) -> tuple[float, float]:
    """Relative output error vs the dense model on held-out ids, of (ours, the baseline);
    the compressed models compute exactly (dequantized float32), so that the kernels' bf16
    activations (bounded in ``_check``) do not move the figure from CPU to CPU."""
    dense = uneven_features(build(arch))
    calib, held_out = _calibration(n=64, seq=32, seed=1), _calibration(n=4, seq=16, seed=2)
    errors = []
    for method in E2E[case]:
        model = copy.deepcopy(dense)
        fxcompress.compile(model, calib, method, progress=False)
        errors.append(relative_error(fxcompress.set_precision(model, "exact"), dense, held_out))
    return errors[0], errors[1]


@pytest.mark.parametrize("arch, case", list(MEASURED))
def test_compressed_model_is_close_to_the_dense_model_and_beats_the_baseline(arch, case):
    """Against the *dense* model on held-out inputs (not the layers' own dequantized
    weights): a wrong Hessian or a transposed Conv1D weight would fail here. The norms'
    weights are uneven (``uneven_features``), as in trained models."""
    ours, baseline = e2e_errors(arch, case)
    error, ratio = MEASURED[arch, case]
    assert error / 2 < ours < MARGIN * error, (ours, baseline)
    assert ours < MARGIN * ratio * baseline, (ours, baseline)


def test_sparse_layers_have_the_requested_pattern():
    model = _check("llama", METHODS["sparsegpt-2:4"])
    for m in model.modules():
        if isinstance(m, SparseLinear):
            assert (m.mask.reshape(m.out_features, -1, 4).sum(-1) == 2).all()


def test_tied_head_is_skipped_unless_named():
    model = build("llama")
    fxcompress.compile(model, _calibration(), GPTQ(4, 128), progress=False)
    assert isinstance(model.lm_head, nn.Linear)
    assert "tied" in model.fxcompress_report.skipped["lm_head"]
    model = build("llama")
    recipe = Recipe({"lm_head": GPTQ(4, 128), r"model\.layers\..*": GPTQ(4, 128)})
    fxcompress.compile(model, _calibration(), recipe, progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)  # the embedding stays dense


def test_recipe_rules_first_match_wins_and_none_skips():
    model = build("llama")
    recipe = Recipe({r".*\.mlp\..*": SparseGPT(0.5), r".*\.k_proj": None, r".*": GPTQ(4, 128)})
    fxcompress.compile(model, _calibration(), recipe, progress=False)
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.up_proj, SparseLinear)
    assert isinstance(layer.self_attn.k_proj, nn.Linear)
    assert isinstance(layer.self_attn.q_proj, QuantLinear)


def test_model_keeps_working_as_the_users_object():
    model = build("llama")
    model.train()
    out = fxcompress.compile(model, _calibration(), GPTQ(4, 128), progress=False)
    assert out is model and model.training  # training mode restored
    model.eval()
    ids = torch.randint(0, VOCAB, (1, 5))
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9)
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight_packed" in sd
    report = model.fxcompress_report
    assert len(report.layers) == 14 and all(r.loss >= 0 for r in report.layers)


def test_calibration_forms_tensors_tuples_and_dicts_agree():
    calib = _calibration()
    results = []
    for data in (calib, [row[None] for row in calib], [(row[None],) for row in calib],
                 [{"input_ids": row[None]} for row in calib]):
        model = build("llama")
        fxcompress.compile(model, data, GPTQ(4, 128), progress=False, batch_size=4)
        results.append(model.model.layers[1].mlp.down_proj.codes())
    assert all(torch.equal(r, results[0]) for r in results)


def test_plain_module_with_a_positional_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()
    dense = copy.deepcopy(model)
    x = torch.randn(256, 64)
    fxcompress.compile(model, [x[i:i + 32] for i in range(0, 256, 32)], GPTQ(8, -1),
                       progress=False)
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    y = model(x)
    ref = dense(x)
    assert ((y - ref).norm() / ref.norm()) < 0.02


def test_data_free_methods_run_no_forward_pass(monkeypatch):
    """RTN and magnitude need only the weights: the graph is not interpreted, and the
    result is the baseline applied to each weight."""
    from fxcompress import RTN, Magnitude
    from fxcompress.algorithms import baselines
    from fxcompress.calibration.run import Run

    def refuse(*args, **kwargs):
        raise AssertionError("a data-free recipe ran the calibration forward pass")

    model = build("llama")
    weight = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    monkeypatch.setattr(Run, "run_segment", refuse)
    fxcompress.compile(model, _calibration(), Recipe({".*mlp.*": Magnitude(0.5),
                                                      ".*": RTN(4, 32)}), progress=False)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, SparseLinear)
    torch.testing.assert_close(up.weight, baselines.magnitude(weight, 0.5).dense())
    with pytest.raises(AssertionError, match="data-free"):  # GPTQ needs the data
        fxcompress.compile(build("llama"), _calibration(), GPTQ(4, 32), progress=False)


@pytest.mark.parametrize("arch, method", [
    ("llama", SparseGPT(0.5)),
    ("qwen2", SparseGPT(n_m=(2, 4))),
    ("llama", SparseGPT(0.5, dense_output=False)),
    ("opt", fxcompress.Magnitude(0.6)),
], ids=["llama-50", "qwen2-2:4", "llama-50-plain", "opt-magnitude"])
def test_pruned_values_are_folded_into_the_original_weights(monkeypatch, arch, method):
    """An in-memory run writes each layer's pruned values into the layer's own weight once
    neither path reads the original any more: the compressed model's ``SparseLinear`` weights
    are the original storage (no second fp32 copy nor a mask is held), and the result is that of
    a run holding the values beside the originals. A fold before the dense path's last read
    of a weight (dense-output calibration) would change every later layer's statistics."""
    calibrate_pass = sys.modules["fxcompress.calibration.run"]  # where the run asks folds()
    model = build(arch, layers=3)
    held = copy.deepcopy(model)
    originals = {n: m.weight.data_ptr() for n, m in model.named_modules()
                 if isinstance(m, nn.Linear)}
    embedding = model.get_input_embeddings().weight
    tied = {n for n, m in model.named_modules() if getattr(m, "weight", None) is embedding}
    embedding = embedding.detach().clone()
    calib = _calibration(n=16, seq=24)
    with monkeypatch.context() as m:
        m.setattr(calibrate_pass, "folds", lambda s, c: False)
        fxcompress.compile(held, calib, method, progress=False)
    seen = {}

    def rewrite(model, sites, results):  # what the run held at its end
        seen.update({n: (c.mask, c.bitmask, c.values.data_ptr()) for n, c in results.items()})
        return api_rewrite(model, sites, results)

    api_rewrite = sys.modules["fxcompress.api"].rewrite
    monkeypatch.setattr(sys.modules["fxcompress.api"], "rewrite", rewrite)
    fxcompress.compile(model, calib, method, progress=False)
    pruned = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    # no second weight held, nor a mask: the folded weight's support is the mask
    assert seen == {n: (None, None, originals[n]) for n in pruned}
    assert set(pruned) == set(originals) - tied
    for name, m in pruned.items():
        ref = held.get_submodule(name)
        assert m.weight.data_ptr() == originals[name], name
        assert torch.equal(m.mask, ref.mask) and torch.equal(m.weight, ref.weight), name
        assert ref.weight.data_ptr() != originals[name]
        assert not m.weight[~m.mask].any()
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # a tied head: not


def test_a_kept_zero_weight_keeps_the_mask():
    """The fold drops a result's mask only when it is the weight's support: a layer whose
    kept weights include exact zeros keeps the algorithm's mask (the requested sparsity)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()
    with torch.no_grad():
        model[0].weight[:, :48] = 0  # 75 % zeros: magnitude pruning at 50 % keeps some
    x = torch.randn(64, 64)
    fxcompress.compile(model, [x[i:i + 16] for i in range(0, 64, 16)], fxcompress.Magnitude(0.5),
                       progress=False)
    first, second = model[0], model[2]
    assert isinstance(first, SparseLinear) and isinstance(second, SparseLinear)
    assert first.sparsity() == second.sparsity() == 0.5
    assert (first.weight == 0).float().mean() == 0.75


@pytest.mark.parametrize("name", ["gptq-w3", "sparsegpt-2:4+w4"])
def test_held_results_are_compacted(monkeypatch, name):
    """Until their modules are made, an in-memory run holds quantized results packed as the
    modules store them (codes ``bits`` to the byte, the mask 8): the modules take those
    buffers as they are, and the model equals a run that held them unpacked."""
    from fxcompress.algorithms import Compressed

    api = sys.modules["fxcompress.api"]
    method, calib = METHODS[name], _calibration(n=16, seq=24)
    model = build("qwen2", layers=2)
    loose = copy.deepcopy(model)
    with monkeypatch.context() as m:
        m.setattr(Compressed, "compact", lambda self: None)
        fxcompress.compile(loose, calib, method, progress=False)
    seen = {}

    def rewrite(model, sites, results):
        seen.update({n: (c.codes, c.mask, c.packed, c.bitmask) for n, c in results.items()})
        return api_rewrite(model, sites, results)

    api_rewrite = api.rewrite
    monkeypatch.setattr(api, "rewrite", rewrite)
    fxcompress.compile(model, calib, method, progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(seen) and len(layers) == 15
    sparse = name.startswith("sparsegpt")
    for n, m in layers.items():
        codes, mask, packed, bitmask = seen[n]
        assert codes is None and mask is None and packed.dtype == torch.int32
        assert m.weight_packed.data_ptr() == packed.data_ptr()
        assert (bitmask is not None) == sparse
        if sparse:
            assert m.weight_bitmask.data_ptr() == bitmask.data_ptr()
            assert torch.equal(m.weight_bitmask, loose.get_submodule(n).weight_bitmask)
        assert torch.equal(m.codes(), loose.get_submodule(n).codes()), n
        assert torch.equal(m.weight_scale, loose.get_submodule(n).weight_scale), n


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2", "bert"])
def test_default_gptq_beats_the_baseline(arch):
    """GPTQ with its default shrink, end to end against round-to-nearest on the same grid."""
    ours, baseline = e2e_errors(arch, "gptq-w3g32 default")
    assert ours < 0.9 * baseline, (ours, baseline)

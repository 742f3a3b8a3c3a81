"""The two layouts of pruned layers: "dense" (the default, what engines read) and "bitmask"
(compact, fxcompress only) — round trips, the tensors on disk, the compressed-tensors
description, and reading the dense layout with transformers + compressed-tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fxcompress import GPTQ, QuantLinear, SparseGPT, SparseLinear
from fxcompress.checkpoint import load, save
from fxcompress.checkpoint.codecs import CheckpointError, implied_mask, is_two_four

from .models import build, output
from .test_format import HIDDEN, IDS, MIXED, _ct_load, assert_same, quick

SPARSE_ONLY = {".*mlp.*": SparseGPT(n_m=(2, 4)), ".*": SparseGPT(0.5)}


@pytest.fixture(scope="module")
def mixed_dense(tmp_path_factory):
    """A tiny Llama compressed with MIXED (sparse, 2:4 + w4, w8, w4), saved by default."""
    folder = tmp_path_factory.mktemp("dense")
    model = quick(build("llama", HIDDEN), MIXED)
    save(model, folder)
    return model, folder


def test_dense_is_the_default_layout_on_disk(mixed_dense):
    model, folder = mixed_dense
    t = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    layers = config["fxcompress"]["layers"]

    up = "model.layers.0.mlp.up_proj"  # SparseGPT 50 %: a plain weight holding its zeros
    assert {n[len(up) + 1:] for n in t if n.startswith(up + ".")} == {"weight"}
    m = model.get_submodule(up)
    assert torch.equal(t[up + ".weight"], torch.where(m.mask, m.weight, 0))
    assert layers[up]["layout"] == "dense" and layers[up]["structure"] == "unstructured"
    assert up in config["ignore"]

    gate = "model.layers.0.mlp.gate_proj"  # 2:4 + w4: plain pack-quantized
    assert {n[len(gate) + 1:] for n in t if n.startswith(gate + ".")} == {
        "weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
    assert layers[gate]["kind"] == "sparse-quantized" and layers[gate]["structure"] == "2:4"
    assert torch.equal(t[gate + ".weight_packed"], model.get_submodule(gate).weight_packed)
    targets = [t for g in config["config_groups"].values() for t in g["targets"]]
    assert r"re:^model\.layers\.0\.mlp\.gate_proj$" in targets

    assert config["quant_method"] == "compressed-tensors"
    sparsity = config["sparsity_config"]
    assert sparsity["format"] == "dense" and sparsity["targets"] is None
    assert sparsity["sparsity_structure"] == "unstructured"  # 2:4 and unstructured mixed
    assert "model.layers.0.self_attn.q_proj" in sparsity["ignore"]
    pruned = sum(int((~m.mask).sum()) for m in model.modules() if isinstance(m, SparseLinear))
    pruned += sum(int(m.weight_packed.shape[0] * m.in_features // 2) for n, m in
                  model.named_modules() if isinstance(m, QuantLinear)
                  and m.weight_bitmask is not None)
    total = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    assert sparsity["global_sparsity"] == pytest.approx(pruned / total)


def test_the_bitmask_layout_is_smaller_and_loads_exactly(mixed_dense, tmp_path):
    model, dense = mixed_dense
    save(model, tmp_path, sparse_layout="bitmask")
    entries = json.loads((tmp_path / "config.json").read_text())["quantization_config"][
        "fxcompress"]["layers"]
    assert not any("layout" in e for e in entries.values())  # as before layouts existed
    assert (tmp_path / "model.safetensors").stat().st_size < \
        (dense / "model.safetensors").stat().st_size
    assert_same(model, load(tmp_path))


def test_dense_layout_loads_with_the_same_outputs(mixed_dense):
    model, folder = mixed_dense
    assert_same(model, load(folder), exact_masks=False)


def test_transformers_reads_the_dense_layout(tmp_path):
    """transformers + compressed-tensors read every layer (asymmetric grids: through
    dequantize=True, which cannot mix them with symmetric ones) and compute what
    fxcompress.load computes."""
    model = quick(build("llama", HIDDEN), {r".*\.0\.mlp\.up_proj": SparseGPT(0.5),
                                           r".*\.0\.mlp\.gate_proj": SparseGPT(
                                               n_m=(2, 4), quant=GPTQ(4, 32)),
                                           ".*": GPTQ(4, 32)})
    save(model, tmp_path)
    ours, theirs = load(tmp_path), _ct_load(tmp_path, dequantize=True)
    with torch.no_grad():
        a, b = output(ours, IDS), output(theirs, IDS)
    torch.testing.assert_close(b, a, atol=0.02 * a.abs().max().item(), rtol=0)
    for name, m in ours.named_modules():
        if isinstance(m, SparseLinear):
            assert torch.equal(theirs.get_submodule(name).weight, m.weight), name
        elif isinstance(m, QuantLinear):
            w = theirs.get_submodule(name).weight.detach().float()
            ref = m.dequantize()
            assert torch.equal(w, ref) or torch.equal(w, ref.half().float()), name


def test_a_pruned_only_checkpoint_is_a_plain_model(tmp_path):
    model = quick(build("llama", HIDDEN), SPARSE_ONLY)
    save(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["config_groups"] == {}
    assert config["format"] == "dense"
    assert config["sparsity_config"]["sparsity_structure"] == "unstructured"
    theirs = _ct_load(tmp_path, dequantize=False)
    ours = load(tmp_path)
    assert_same(model, ours, exact_masks=False)
    with torch.no_grad():
        torch.testing.assert_close(output(theirs, IDS), output(ours, IDS), rtol=1e-5,
                                   atol=1e-5)


def test_two_four_only_checkpoint_says_so(tmp_path):
    model = quick(build("llama", HIDDEN), {".*": SparseGPT(n_m=(2, 4))})
    save(model, tmp_path)
    sparsity = json.loads((tmp_path / "config.json").read_text())["quantization_config"][
        "sparsity_config"]
    assert sparsity["sparsity_structure"] == "2:4"
    loaded = load(tmp_path)
    assert all(is_two_four(m.mask) for m in loaded.modules() if isinstance(m, SparseLinear))


def test_kept_exact_zeros_reload_as_pruned_without_changing_outputs(tmp_path):
    """What the dense layout relies on: a kept weight that is exactly zero cannot be told from
    a pruned one. Unstructured: it reloads pruned (the mask shrinks, outputs do not change);
    2:4: the group is completed to two kept again."""
    model = quick(build("llama", HIDDEN), {".*up_proj": SparseGPT(0.5),
                                           ".*gate_proj": SparseGPT(n_m=(2, 4)), ".*": None})
    up, gate = model.model.layers[0].mlp.up_proj, model.model.layers[0].mlp.gate_proj
    with torch.no_grad():
        up.weight[up.mask.nonzero()[0].tolist()[0], up.mask.nonzero()[0].tolist()[1]] = 0.0
        row, col = gate.mask.nonzero()[0].tolist()
        gate.weight[row, col] = 0.0  # a kept zero in a 2:4 group
    save(model, tmp_path)
    loaded = load(tmp_path)
    up2, gate2 = loaded.model.layers[0].mlp.up_proj, loaded.model.layers[0].mlp.gate_proj
    assert int(up2.mask.sum()) == int(up.mask.sum()) - 1 and bool((up2.mask <= up.mask).all())
    assert is_two_four(gate2.mask) and int(gate2.mask.sum()) == int(gate.mask.sum())
    with torch.no_grad():
        assert torch.equal(output(model, IDS), output(loaded, IDS))


def test_implied_mask_completes_two_four_groups():
    nonzero = torch.tensor([[True, False, False, False, True, True, False, False],
                            [False, False, False, False, False, True, False, True]])
    assert implied_mask(nonzero, "2:4").tolist() == [
        [True, True, False, False, True, True, False, False],
        [True, True, False, False, False, True, False, True]]
    assert torch.equal(implied_mask(nonzero, "unstructured"), nonzero)
    with pytest.raises(ValueError, match="more than two non-zero"):
        implied_mask(torch.ones(1, 4, dtype=torch.bool), "2:4")


def test_a_dense_weight_that_breaks_its_structure_is_named(tmp_path):
    model = quick(build("llama", HIDDEN), {".*gate_proj": SparseGPT(n_m=(2, 4)), ".*": None})
    save(model, tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.0.mlp.gate_proj.weight"
    tensors[name] = torch.randn_like(tensors[name]) + 3  # no zeros left
    save_file(tensors, file, metadata={"format": "pt"})  # rewritten without checksums
    with pytest.raises(CheckpointError, match=rf"{name}: holds more than two non-zero"):
        load(tmp_path, verify=False)


def test_an_unknown_layout_is_an_error(mixed_dense, tmp_path):
    with pytest.raises(ValueError, match="sparse_layout='csr'"):
        save(mixed_dense[0], tmp_path, sparse_layout="csr")
    config = json.loads((mixed_dense[1] / "config.json").read_text())
    config["quantization_config"]["fxcompress"]["layers"]["model.layers.0.mlp.up_proj"][
        "layout"] = "csr"
    import shutil

    shutil.copytree(mixed_dense[1], tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="up_proj' has an invalid entry"):
        load(tmp_path / "bad")


def test_gptq_only_checkpoints_do_not_change(tmp_path):
    """Layouts concern pruned layers only: a quantized checkpoint is the same in both."""
    model = quick(build("llama", HIDDEN), GPTQ(4, 32))
    save(model, tmp_path / "a")
    save(model, tmp_path / "b", sparse_layout="bitmask")
    assert (tmp_path / "a" / "config.json").read_text() == \
        (tmp_path / "b" / "config.json").read_text()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model.safetensors").read_bytes()

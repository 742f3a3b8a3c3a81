"""Checkpoints: exact round trips, the on-disk layout, compressed-tensors compatibility, and
clear errors for every kind of bad folder (tiny random models; fast)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import fxcompress
from fxcompress import GPTQ, RTN, Magnitude, QuantLinear, Recipe, SparseGPT, SparseLinear
from fxcompress.algorithms import Statistics
from fxcompress.checkpoint import CheckpointError, load, read_header, save, swap, writer
from fxcompress.modules import compressed_module

from .models import VOCAB, build, output

HIDDEN = 64
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def quick(model: nn.Module, recipe: Recipe | dict, seed: int = 0) -> nn.Module:
    """Compress ``model``'s linears in place as ``fxcompress.compile`` would, but with a random
    Hessian instead of calibration (no graph capture: fast). The tied head is left dense."""
    from transformers.pytorch_utils import Conv1D

    recipe = recipe if isinstance(recipe, Recipe) else Recipe(recipe)
    g = torch.Generator().manual_seed(seed)
    for name, m in list(model.named_modules()):
        match = recipe.match(name)
        if type(m) not in (nn.Linear, Conv1D) or name == "lm_head" or not match or not match[1]:
            continue
        w = m.weight.detach().t() if isinstance(m, Conv1D) else m.weight.detach()
        x = torch.randn(256, w.shape[1], generator=g)
        c = match[1].solve(w.float().contiguous(), Statistics(2 * x.t() @ x / 256, 256), name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                compressed_module(c, m.bias, w.dtype))
    return model.eval()


def roundtrip(model: nn.Module, folder: Path, **kwargs) -> nn.Module:
    save(model, folder, **kwargs)
    return load(folder)


def assert_same(a: nn.Module, b: nn.Module, exact_masks: bool = True) -> None:
    """Same tensors, modules and outputs. Without ``exact_masks`` (the dense layout, whose
    keep-masks are implied by the weights) a keep-mask may differ where the weight is zero:
    the masked weights and the 2:4 structure must then be the same."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not exact_masks and k.endswith(("weight_bitmask", ".mask")):
            assert sa[k].shape == sb[k].shape, k
            continue
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    if not exact_masks:
        assert_same_masked_weights(a, b)
    for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules(), strict=True):
        assert na == nb and type(ma) is type(mb), na
        if isinstance(ma, QuantLinear):
            assert ma.kernel == mb.kernel
    with torch.no_grad():
        assert torch.equal(output(a, IDS), output(b, IDS))


def assert_same_masked_weights(a: nn.Module, b: nn.Module) -> None:
    from fxcompress.checkpoint.codecs import is_two_four
    from fxcompress.kernels import pack

    for name, ma in a.named_modules():
        mb = b.get_submodule(name)
        if isinstance(ma, SparseLinear):
            assert torch.equal(torch.where(ma.mask, ma.weight, 0),
                               torch.where(mb.mask, mb.weight, 0)), name
            assert is_two_four(ma.mask) == is_two_four(mb.mask), name
        elif isinstance(ma, QuantLinear) and ma.weight_bitmask is not None:
            masks = [pack.unpack_bitmask(m.weight_bitmask, m.in_features) for m in (ma, mb)]
            assert torch.equal(ma.dequantize() * masks[0], mb.dequantize() * masks[1]), name
            assert is_two_four(masks[0]) == is_two_four(masks[1]), name


# ------------------------------------------------------------------------- round trips

EVERY_KIND = {  # one model holding every storage kind, grid and act-order variant
    r".*\.0\.self_attn\.q_proj": GPTQ(4, 32),
    r".*\.0\.self_attn\.k_proj": GPTQ(8, -1, sym=True),
    r".*\.0\.self_attn\.v_proj": GPTQ(3, 32),
    r".*\.0\.self_attn\.o_proj": GPTQ(2, 32, sym=True),
    r".*\.0\.mlp\.gate_proj": SparseGPT(n_m=(2, 4), quant=GPTQ(4, 32)),
    r".*\.0\.mlp\.up_proj": SparseGPT(0.5),
    r".*\.0\.mlp\.down_proj": GPTQ(4, 32, act_order=True, static_groups=False),
    r".*\.1\.self_attn\.v_proj": None,
    r".*\.1\.mlp\..*": Magnitude(0.6, quant=RTN(4, -1)),
    ".*": GPTQ(4, 64, sym=True),
}
CASES = {
    "llama-every-kind": ("llama", EVERY_KIND),
    "gpt2-conv1d": ("gpt2", GPTQ(4, 32)),
    "opt-bias": ("opt", {".*fc1": SparseGPT(n_m=(2, 4)), ".*": GPTQ(4, 32)}),
}


@pytest.fixture(scope="module")
def w4() -> nn.Module:
    """A tiny Llama with every linear but the tied head at GPTQ w4 g32 (do not mutate)."""
    return quick(build("llama", HIDDEN), GPTQ(4, 32))


@pytest.mark.parametrize("layout", ["dense", "bitmask"])
@pytest.mark.parametrize("case", CASES)
def test_round_trip_is_exact(case, layout, tmp_path):
    arch, recipe = CASES[case]
    model = quick(build(arch, HIDDEN), recipe)
    loaded = roundtrip(model, tmp_path, sparse_layout=layout)
    assert_same(model, loaded, exact_masks=layout == "bitmask")
    assert not loaded.training


@pytest.fixture(scope="module")
def compiled() -> tuple[nn.Module, Recipe]:
    """A tiny Llama compressed end to end by ``fxcompress.compile`` (do not mutate)."""
    model = build("llama", HIDDEN)
    recipe = Recipe({"lm_head": None, ".*": GPTQ(4, 32)})
    fxcompress.compile(model, torch.randint(0, VOCAB, (8, 16)), recipe, progress=False)
    return model, recipe


def test_round_trip_of_compiled_model_keeps_recipe_and_ties(compiled, tmp_path):
    model, recipe = compiled
    loaded = roundtrip(model, tmp_path)
    assert_same(model, loaded)
    assert loaded.fxcompress_recipe == recipe
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_sharded_checkpoint(w4, tmp_path):
    model = w4
    save(model, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    assert_same(model, load(tmp_path))
    save(model, tmp_path)  # re-saving unsharded removes the stale shards
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]


def test_side_files_are_copied(w4, tmp_path, monkeypatch):
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_text("{}")
    (source / "tokenizer_config.json").write_text("{}")
    monkeypatch.setattr(w4.config, "_name_or_path", str(source))
    save(w4, tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names


def test_non_hugging_face_model_loads_with_build(tmp_path):
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))

    model = quick(make(), {"0": GPTQ(4, 32), "2": SparseGPT(n_m=(2, 4))})
    save(model, tmp_path)
    with pytest.raises(CheckpointError, match="build="):
        load(tmp_path)
    loaded = load(tmp_path, build=make)
    x = torch.randn(3, 64)
    assert torch.equal(model(x), loaded(x))
    assert isinstance(loaded[0], QuantLinear) and isinstance(loaded[2], SparseLinear)


def test_load_assigns_packed_tensors_without_dense_weights(w4, tmp_path):
    loaded = roundtrip(w4, tmp_path)
    for m in loaded.modules():
        if isinstance(m, QuantLinear):
            dense = [n for n, t in m.named_buffers()
                     if t is not None and t.is_floating_point()
                     and t.numel() >= m.in_features * m.out_features]
            assert not dense and m.kernel == "int4pack"


def test_saving_a_dense_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no compressed layers"):
        save(build("llama", HIDDEN), tmp_path)


# ------------------------------------------------------------------------- saving over a checkpoint


def _leftovers(folder: Path) -> list[str]:
    """What a save left beside ``folder`` (its partial folder, or the old one set aside)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def _files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class Crash(Exception):
    pass


CRASHES = {  # where the second save dies: (owner in fxcompress.checkpoint, function, at which call)
    "writing a tensor": (writer.CheckpointWriter, "add", 10),
    "writing the second shard": (writer, "write_safetensors", 2),
    "writing config.json": (writer, "write_config", 1),
    "keeping the folder's other files": (writer, "carry_over", 1),
    "swapping the folders": (swap, "_exchange", 1),
}


@pytest.mark.parametrize("killed", [False, True], ids=["exception", "killed"])
@pytest.mark.parametrize("crash", CRASHES)
def test_a_save_that_dies_leaves_the_old_checkpoint(w4, crash, killed, tmp_path, monkeypatch):
    out = tmp_path / "out"
    save(w4, out, max_shard_size="20KB")
    (out / "README.md").write_text("not part of the checkpoint")
    before = _files_of(out)
    other = quick(build("llama", HIDDEN, seed=1), SparseGPT(0.5))

    owner, attr, at = CRASHES[crash]
    original, calls = getattr(owner, attr), []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise Crash
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, dies)
    if killed:  # a killed process cleans nothing up
        monkeypatch.setattr(writer.CheckpointWriter, "discard", lambda self: None)
    with pytest.raises(Crash):
        save(other, out, max_shard_size="20KB")
    assert _files_of(out) == before
    assert_same(w4, load(out))
    assert _leftovers(out) == ([".out.partial"] if killed else [])

    monkeypatch.undo()  # the next save succeeds and cleans up after the dead one
    save(other, out)
    assert_same(other, load(out))
    assert _leftovers(out) == []
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors"]


def test_save_swaps_folders_in_one_atomic_exchange(w4, tmp_path, monkeypatch):
    out = tmp_path / "out"
    save(w4, out)
    exchanged, renamed = [], []
    exchange, replace = swap._exchange, os.replace
    monkeypatch.setattr(swap, "_exchange", lambda a, b: exchanged.append(exchange(a, b))
                        or exchanged[-1])
    monkeypatch.setattr(os, "replace", lambda a, b: renamed.append(Path(b).name) or replace(a, b))
    save(w4, out)
    if exchanged != [True]:
        pytest.skip("this file system cannot exchange two folders (renameat2)")
    assert "out" not in renamed and _leftovers(out) == []
    assert_same(w4, load(out))


def test_save_over_a_checkpoint_without_an_atomic_exchange(w4, tmp_path, monkeypatch):
    out = tmp_path / "out"
    save(w4, out)
    monkeypatch.setattr(swap, "_exchange", lambda a, b: False)  # e.g. not Linux
    other = quick(build("llama", HIDDEN, seed=1), GPTQ(8, -1))
    save(other, out)
    assert_same(other, load(out))
    assert _leftovers(out) == []
    os.replace(out, tmp_path / ".out.old")  # what a crash between its two renames leaves
    with pytest.raises(CheckpointError, match=r"out is missing, but .*\.out\.old holds the "
                                              r"checkpoint that was there.*rename \.out\.old"):
        load(out)


def test_save_refuses_to_replace_the_working_directory(w4, tmp_path, monkeypatch):
    save(w4, tmp_path / "out")
    monkeypatch.chdir(tmp_path / "out")
    with pytest.raises(ValueError, match="working directory"):
        save(w4, ".")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        save(w4, tmp_path / "out" / "config.json")


# ------------------------------------------------------------------------- layout on disk


MIXED = {r".*\.0\.mlp\.up_proj": SparseGPT(0.5),
         r".*\.0\.mlp\.gate_proj": SparseGPT(n_m=(2, 4), quant=GPTQ(4, 32)),
         r".*\.0\.mlp\.down_proj": GPTQ(8, -1, sym=True), ".*": GPTQ(4, 32)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[nn.Module, Path]:
    """A tiny Llama compressed with :data:`MIXED`, and its checkpoint (do not mutate)."""
    folder = tmp_path_factory.mktemp("mixed")
    model = quick(build("llama", HIDDEN), MIXED)
    save(model, folder, sparse_layout="bitmask")
    return model, folder


def test_bitmask_layout_on_disk(mixed):
    model, tmp_path = mixed
    t = load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    n, k = 2 * HIDDEN, HIDDEN  # up/gate: (128, 64)

    q = "model.layers.0.self_attn.q_proj."
    assert {name[len(q):] for name in t if name.startswith(q)} == {
        "weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
    assert t[q + "weight_packed"].dtype == torch.int32
    assert t[q + "weight_packed"].shape == (HIDDEN, HIDDEN * 4 // 32)
    assert t[q + "weight_scale"].dtype == torch.float16
    assert t[q + "weight_scale"].shape == (HIDDEN, HIDDEN // 32)
    assert t[q + "weight_zero_point"].shape == (HIDDEN * 4 // 32, HIDDEN // 32)  # packed rows
    assert t[q + "weight_shape"].tolist() == [HIDDEN, HIDDEN]

    d = "model.layers.0.mlp.down_proj."  # symmetric: no zero point, as compressed-tensors
    assert {name[len(d):] for name in t if name.startswith(d)} == {
        "weight_packed", "weight_scale", "weight_shape"}

    up = "model.layers.0.mlp.up_proj."
    mask = model.model.layers[0].mlp.up_proj.mask
    assert {name[len(up):] for name in t if name.startswith(up)} == {
        "weight_bitmask", "weight_values", "weight_shape"}
    assert t[up + "weight_bitmask"].dtype == torch.uint8
    assert t[up + "weight_bitmask"].shape == (n, k // 8)
    assert t[up + "weight_values"].shape == (int(mask.sum()),)

    g = "model.layers.0.mlp.gate_proj."
    assert {name[len(g):] for name in t if name.startswith(g)} == {
        "weight_bitmask", "weight_kept_packed", "weight_scale", "weight_zero_point",
        "weight_shape"}
    assert t[g + "weight_kept_packed"].shape == (n * k // 2 * 4 // 32,)  # 2:4 keeps half

    layers = config["fxcompress"]["layers"]
    assert layers[q[:-1]]["kind"] == "quantized"
    assert layers[up[:-1]]["kind"] == "sparse"
    assert layers[g[:-1]]["kind"] == "sparse-quantized"
    assert config["fxcompress"]["format_version"] == 1
    assert config["fxcompress"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert config["quant_method"] == "fxcompress"  # sparse layers: not compressed-tensors
    targets = [t for g in config["config_groups"].values() for t in g["targets"]]
    assert r"re:^model\.layers\.0\.self_attn\.q_proj$" in targets
    assert not any("up_proj" in t and ".0." in t for t in targets)


# ------------------------------------------------------------------------- compressed-tensors


def _ct_load(folder: Path, dequantize: bool) -> nn.Module:
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} \
        if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def _check_ct_model(ours: nn.Module, theirs: nn.Module) -> None:
    """The logits agree to the int4 kernel's bf16 precision, and each decompressed weight is
    exactly our dequantized weight, computed in the dtype the reader keeps the scales in (the
    stored fp16, or the model's fp32 when it loads them into its own parameters)."""
    with torch.no_grad():  # first: compressed-tensors may decompress on the first forward
        a, b = output(ours, IDS), output(theirs, IDS)
    torch.testing.assert_close(b, a, atol=0.02 * a.abs().max().item(), rtol=0)
    count = 0
    for name, m in ours.named_modules():
        if isinstance(m, QuantLinear):
            w = theirs.get_submodule(name).weight.detach().float()
            ref = m.dequantize()
            assert torch.equal(w, ref) or torch.equal(w, ref.half().float()), name
            count += 1
    assert count


def test_compressed_tensors_reads_asymmetric_checkpoint(compiled, tmp_path):
    save(compiled[0], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized"
    # compressed-tensors 0.20 reads asymmetric zero points only through dequantize=True
    # (its compressed path expects them unpacked: vllm-project/llm-compressor#1618)
    _check_ct_model(load(tmp_path), _ct_load(tmp_path, dequantize=True))


def test_compressed_tensors_reads_symmetric_checkpoint(tmp_path):
    model = quick(build("llama", HIDDEN), {r".*mlp.*": GPTQ(8, -1, sym=True),
                                           ".*": GPTQ(4, 32, sym=True)})
    save(model, tmp_path)
    _check_ct_model(load(tmp_path), _ct_load(tmp_path, dequantize=False))


def test_dynamic_act_order_is_refused_by_compressed_tensors(tmp_path):
    pytest.importorskip("compressed_tensors")
    model = quick(build("llama", HIDDEN), GPTQ(4, 32, act_order=True, static_groups=False))
    save(model, tmp_path)
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"][
        "config_groups"]
    assert all(g["weights"]["actorder"] == "group" for g in groups.values())
    with pytest.raises(Exception, match="actorder"):
        _ct_load(tmp_path, dequantize=True)


# ------------------------------------------------------------------------- bad input


@pytest.fixture
def good(mixed) -> Path:
    return mixed[1]


@pytest.fixture
def bad(good, tmp_path) -> Path:
    folder = tmp_path / "bad"
    shutil.copytree(good, folder)
    return folder


def _offsets(file: Path, name: str) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    begin, end = json.loads(file.read_bytes()[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_truncated_file_names_file_and_tensor(bad):
    file = bad / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: tensor \S+"):
        load(bad)


def test_truncated_header_is_an_error(bad):
    file = bad / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load(bad)


def test_corrupted_header_names_file_and_tensor(bad):
    file = bad / "model.safetensors"
    data = bytearray(file.read_bytes())
    name = b'"model.layers.1.self_attn.k_proj.weight_scale"'
    at = data.index(name) + len(name)
    data[at:at + 2] = b"?!"  # break the JSON right after this tensor's name
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors has a corrupted safetensors "
                                              r"header in the entry of tensor model\.layers\.1"
                                              r"\.self_attn\.k_proj\.weight_scale"):
        load(bad)


def test_corrupted_header_entry_names_tensor(bad):
    file = bad / "model.safetensors"
    data = file.read_bytes()
    name = b'"model.layers.0.self_attn.o_proj.weight_packed":{"dtype":"I32"'
    file.write_bytes(data.replace(name, name.replace(b"I32", b"I33")))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\."
                                              r"self_attn\.o_proj\.weight_packed has a corrupt"):
        load(bad)


def test_corrupted_data_names_file_and_tensor(bad):
    file = bad / "model.safetensors"
    name = "model.layers.0.mlp.gate_proj.weight_kept_packed"
    begin, _ = _offsets(file, name)
    data = bytearray(file.read_bytes())
    data[begin + 3] ^= 0x10
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {name} is corrupted"):
        load(bad)
    assert isinstance(load(bad, verify=False), nn.Module)  # the user may opt out


def test_missing_tensor_is_named_before_any_data_is_read(bad, monkeypatch):
    file = bad / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, str(file), metadata=metadata)
    import safetensors

    def fail(*args, **kwargs):
        raise AssertionError("tensor data read before the checkpoint was validated")

    monkeypatch.setattr(safetensors, "safe_open", fail)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.down_proj"
                                              r"\.weight_scale: not found in .*model\.safetens"):
        load(bad)


def test_unexpected_tensor_is_an_error(bad):
    file = bad / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(file), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.extra\.weight"):
        load(bad)


def test_config_with_other_dense_shapes_names_file_and_tensor(bad):
    _edit_config(bad, lambda c: c.update(vocab_size=VOCAB + 8))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.embed_tokens"
                                              r"\.weight has shape \[128, 64\], the model built "
                                              r"from config\.json expects \[136, 64\]"):
        load(bad)


def test_config_with_other_layer_shapes_names_layer(bad):
    _edit_config(bad, lambda c: c.update(intermediate_size=2 * HIDDEN + 32))
    with pytest.raises(CheckpointError, match=r"config\.json: intermediate_size=160 disagrees "
                                              r"with the tensors: layer model\.layers\.0\.mlp\."
                                              r"down_proj is a Linear with weight \(64, 160\) "
                                              r"in the model built from the config, but the "
                                              r"checkpoint stores \(64, 128\)"):
        load(bad)


def test_layer_entry_disagreeing_with_tensors_names_tensor(bad):
    def edit(c):
        c["quantization_config"]["fxcompress"]["layers"]["model.layers.0.mlp.gate_proj"]["nnz"] -= 8
    _edit_config(bad, edit)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\."
                                              r"weight_kept_packed has shape"):
        load(bad)


def test_unknown_format_version(bad):
    _edit_config(bad, lambda c: c["quantization_config"]["fxcompress"].update(format_version=99))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown fxcompress format version "
                                              r"99"):
        load(bad)


def test_not_a_checkpoint(bad, tmp_path):
    (bad / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load(bad)
    _dense = tmp_path / "dense"
    _dense.mkdir()
    (_dense / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a checkpoint written by fxcompress"):
        load(_dense)


@pytest.mark.parametrize("failing", ["crc", "decode"])
def test_nothing_is_assigned_before_every_tensor_is_checked(w4, failing, tmp_path):
    """A bad tensor in the last shard (a CRC mismatch), or layer contents that contradict
    config.json (found when decoding, after every read): ``load`` raises and the model it was
    given to fill is exactly as it was."""
    save(w4, tmp_path, max_shard_size="20KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    last = max(weight_map.values())
    if failing == "crc":
        name = sorted(n for n, f in weight_map.items() if f == last)[0]
        error = rf"{last}: tensor {re.escape(name)} is corrupted \(CRC-32 mismatch\)"
    else:
        name = sorted(n for n in weight_map if n.endswith(".weight_shape"))[-1]
        error = rf"{re.escape(name)} holds \[(\d+), 65\], config\.json says \[\1, 64\]"
    file = tmp_path / weight_map[name]
    begin, end = _offsets(file, name)
    data = bytearray(file.read_bytes())
    good = data[begin:end]
    data[end - 8:end] = (65).to_bytes(8, "little") if failing == "decode" else bytes(
        b ^ 0xFF for b in data[end - 8:end])
    file.write_bytes(bytes(data))

    target = build("llama", HIDDEN, seed=3)
    state = {k: v.clone() for k, v in target.state_dict().items()}
    modules = [(n, type(m)) for n, m in target.named_modules()]
    with pytest.raises(CheckpointError, match=error):
        load(tmp_path, build=lambda: target, verify=failing == "crc")
    assert [(n, type(m)) for n, m in target.named_modules()] == modules
    assert target.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())

    data[begin:end] = good  # repaired, the same call fills that very model
    file.write_bytes(bytes(data))
    assert load(tmp_path, build=lambda: target) is target
    assert_same(w4, target)


def test_read_header_lists_tensors(good):
    header = read_header(good / "model.safetensors")
    entry = header["model.layers.0.self_attn.q_proj.weight_packed"]
    assert entry.dtype == torch.int32 and entry.shape == (HIDDEN, HIDDEN * 4 // 32)
    assert entry.crc is not None


# ------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_load_memory_stays_near_packed_size(tmp_path):
    """Save SmolLM2-135M with GPTQ w4 g64, then load it in a fresh process: the peak resident
    memory ``load`` adds (VmHWM, reset just before) stays well below the dense fp32 model, near
    the packed checkpoint plus the CPU kernel layout."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from fxcompress import assets

    folder = assets.smollm2(progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    dense = sum(p.numel() * 4 for p in model.parameters())
    quick(model, Recipe({"lm_head": None, ".*": GPTQ(4, 64)}))
    save(model, tmp_path)
    packed = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    code = textwrap.dedent(f"""
        import fxcompress
        from transformers import LlamaForCausalLM  # import cost is not load's

        def kib(key):
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith(key))

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak mark
        before = kib("VmRSS:")
        fxcompress.load({str(tmp_path)!r})
        print((kib("VmHWM:") - before) * 1024)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < 2 * packed < dense, (peak, packed, dense)

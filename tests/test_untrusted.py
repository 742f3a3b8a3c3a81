"""Folders fxcompress reads are untrusted input: a resume folder, a checkpoint's index, its
config and its shards can name paths outside their folder, claim sizes no tensor has, or lack
their checksums. Each is refused with the entry named, before anything is opened or written
(tiny models; fast)."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fxcompress
from fxcompress import GPTQ
from fxcompress.checkpoint import (
    CheckpointError,
    PartialCheckpoint,
    ResumeError,
    load,
    names,
    safetensors_io,
    save,
)
from fxcompress.cli import main
from fxcompress.source import Checkpoint, skeleton
from fxcompress.streaming import MemoryBudgetError, compress_checkpoint, partial_dir

from .models import VOCAB, build
from .test_format import HIDDEN, assert_same, quick
from .test_streaming import RECIPE


def _calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A tiny Qwen2 Hugging Face folder in two safetensors shards (with an index)."""
    folder = tmp_path_factory.mktemp("dense") / "qwen2"
    build("qwen2", hidden=64, layers=2).save_pretrained(folder, max_shard_size="60KB")
    assert (folder / names.INDEX_NAME).is_file()
    return folder


@pytest.fixture(scope="module")
def w4() -> torch.nn.Module:
    return quick(build("llama", HIDDEN), GPTQ(4, 32))


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted_once(dense, tmp_path_factory) -> Path:
    """The partial folder of a streamed run that died at its first layer (the dense tensors
    committed), made once."""
    from fxcompress.streaming import _Writer

    def interrupt(self, site, c, report):
        raise Interrupted

    out = tmp_path_factory.mktemp("interrupted") / "out"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_Writer, "sink", interrupt)
        with pytest.raises(Interrupted):
            compress_checkpoint(dense, _calibration(), RECIPE, out, progress=False)
    assert (partial_dir(out) / names.PROGRESS).is_file()
    return partial_dir(out)


@pytest.fixture
def interrupted(interrupted_once, tmp_path) -> tuple[Path, Path]:
    """(out, its partial folder): a copy of that run's partial output, for ``out``."""
    out = tmp_path / "out"
    shutil.copytree(interrupted_once, partial_dir(out))
    return out, partial_dir(out)


def _edit_progress(folder: Path, edit) -> None:
    state = json.loads((folder / names.PROGRESS).read_text())
    edit(state)
    (folder / names.PROGRESS).write_text(json.dumps(state))


def _victim(tmp_path: Path) -> tuple[Path, bytes]:
    victim = tmp_path / "victim.bin"
    data = os.urandom(1400)
    victim.write_bytes(data)
    return victim, data


# ------------------------------------------------------------ 1. a crafted resume folder


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_resume_refuses_a_part_outside_the_partial_folder(dense, interrupted, tmp_path, how):
    out, folder = interrupted
    victim, data = _victim(tmp_path)
    name = {"absolute": str(victim), "dotdot": "../victim.bin", "symlink": "evil.part"}[how]
    if how == "symlink":
        (folder / name).symlink_to(victim)

    def edit(state):
        state["shards"][0]["part"] = name
        state["shards"][0]["size"] = 3

    _edit_progress(folder, edit)
    with pytest.raises(ResumeError, match=rf"shard 1.*{name}.*outside"):
        compress_checkpoint(dense, _calibration(), RECIPE, out, progress=False, resume=True)
    assert victim.read_bytes() == data  # neither truncated nor deleted
    with pytest.raises(ResumeError, match="outside"):
        PartialCheckpoint(out)  # the reader of the other ranks refuses it too


def test_resume_refuses_a_symlink_among_the_partial_files(dense, interrupted, tmp_path):
    """The writer would write the final shard through it."""
    out, folder = interrupted
    victim, data = _victim(tmp_path)
    (folder / names.WEIGHTS_NAME).symlink_to(victim)
    with pytest.raises(ResumeError, match=r"model\.safetensors.*not a file"):
        compress_checkpoint(dense, _calibration(), RECIPE, out, progress=False, resume=True)
    assert victim.read_bytes() == data


@pytest.mark.parametrize("field", ["size", "offsets", "dtype", "layer"])
def test_resume_refuses_entries_that_disagree_with_the_parts(dense, interrupted, field):
    out, folder = interrupted
    parts = {p.name: p.read_bytes() for p in folder.glob("*.part")}

    def edit(state):
        shard = state["shards"][0]
        first = next(iter(shard["tensors"]))
        if field == "size":  # truncating to it would extend the part with zeros
            shard["size"] += 4096
        elif field == "offsets":
            shard["tensors"][first][3] += 4
        elif field == "dtype":
            shard["tensors"][first][0] = "pickle"
        else:
            state["layers"]["model.layers.0.mlp.up_proj"] = {"kind": "quantized", "bits": -1}

    _edit_progress(folder, edit)
    with pytest.raises(ResumeError, match=str(folder / names.PROGRESS)):
        compress_checkpoint(dense, _calibration(), RECIPE, out, progress=False, resume=True)
    assert {p.name: p.read_bytes() for p in folder.glob("*.part")} == parts


# ---------------------------------------------------- 2. an index pointing outside its folder


def _spy_headers(monkeypatch) -> list[Path]:
    opened: list[Path] = []
    read_header = safetensors_io.read_header

    def spy(file):
        opened.append(Path(file))
        return read_header(file)

    for reader in (safetensors_io, fxcompress.checkpoint):  # load's, and the streamed path's
        monkeypatch.setattr(reader, "read_header", spy)
    return opened


def _point_index_at(folder: Path, target: str, elsewhere: Path) -> str:
    """Make the index's first entry name ``target``, with a copy of its shard put in
    ``elsewhere`` (so that following the entry would find a real file); returns the tensor."""
    index = json.loads((folder / names.INDEX_NAME).read_text())
    name, shard = next(iter(index["weight_map"].items()))
    elsewhere.mkdir()
    shutil.copy(folder / shard, elsewhere / "x.safetensors")
    index["weight_map"][name] = target
    (folder / names.INDEX_NAME).write_text(json.dumps(index))
    return name


@pytest.mark.parametrize("target", ["../elsewhere/x.safetensors", "/etc/passwd"])
def test_load_refuses_an_index_entry_outside_the_folder(w4, tmp_path, monkeypatch, target):
    folder = tmp_path / "ckpt"
    save(w4, folder, max_shard_size="40KB")
    name = _point_index_at(folder, target, tmp_path / "elsewhere")
    opened = _spy_headers(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"{names.INDEX_NAME}.*{name}.*outside"):
        load(folder)
    assert all(f.resolve().parent == folder.resolve() for f in opened), opened


@pytest.mark.parametrize("target", ["../elsewhere/x.safetensors", "/etc/passwd"])
def test_compress_refuses_an_index_entry_outside_the_folder(dense, tmp_path, monkeypatch,
                                                           target):
    folder = tmp_path / "model"
    shutil.copytree(dense, folder)
    name = _point_index_at(folder, target, tmp_path / "elsewhere")
    opened = _spy_headers(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"{name}.*outside"):
        Checkpoint(folder, skeleton(folder), torch.device("cpu"))
    assert all(f.resolve().parent == folder.resolve() for f in opened), opened


def test_hugging_face_cache_links_into_its_blobs_are_followed(dense, tmp_path):
    """The hub cache's snapshot folders hold links to ``../../blobs``: that layout reads."""
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in dense.iterdir():
        shutil.copy(f, blobs / f.name)
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    source = Checkpoint(snapshot, skeleton(snapshot), torch.device("cpu"))
    stored = {k: v for f in dense.glob("*.safetensors") for k, v in load_file(f).items()}
    assert torch.equal(source.load("model.norm.weight"), stored["model.norm.weight"])


def test_side_files_linked_from_outside_the_model_folder_are_refused(w4, tmp_path):
    """A tokenizer file linked from elsewhere would copy that file into the checkpoint."""
    source = tmp_path / "model"
    source.mkdir()
    victim, _ = _victim(tmp_path)
    (source / "tokenizer.json").symlink_to(victim)
    before = w4.config._name_or_path
    w4.config._name_or_path = str(source)
    try:
        with pytest.raises(CheckpointError, match=r"tokenizer\.json.*outside"):
            save(w4, tmp_path / "ckpt")
    finally:
        w4.config._name_or_path = before
    assert not (tmp_path / "ckpt").exists() and not partial_dir(tmp_path / "ckpt").exists()


# ------------------------------------------------------------------------ 3. a config bomb


@pytest.fixture
def checkpoint(w4, tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    save(w4, folder)
    return folder


def _set_config(folder: Path, **fields) -> None:
    config = json.loads((folder / names.CONFIG_NAME).read_text())
    config.update(fields)
    (folder / names.CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize("field, value", [("hidden_size", 10**12),
                                          ("intermediate_size", 10**12),
                                          ("intermediate_size", -5),
                                          ("vocab_size", 10**10),
                                          ("num_hidden_layers", 10**9)])
def test_config_dimensions_are_checked_against_the_headers(checkpoint, field, value):
    _set_config(checkpoint, **{field: value})
    with pytest.raises(CheckpointError, match=rf"config\.json.*{field}"):
        load(checkpoint)


@pytest.mark.parametrize("field, value", [("hidden_size", 10**12), ("intermediate_size", -5),
                                          ("vocab_size", 10**10)])
def test_a_dense_model_config_is_checked_before_it_is_built(dense, tmp_path, field, value):
    """The input of a streamed run too: its skeleton is built after the same checks."""
    folder = tmp_path / "model"
    shutil.copytree(dense, folder)
    _set_config(folder, **{field: value})
    with pytest.raises(CheckpointError, match=rf"config\.json.*{field}"):
        compress_checkpoint(folder, _calibration(), RECIPE, tmp_path / "out", progress=False)


def test_a_checked_config_still_loads_a_working_model(w4, checkpoint):
    """The skeleton is built on the meta device; buffers the checkpoint does not hold (rotary
    frequencies) are computed once the sizes are checked."""
    loaded = load(checkpoint)
    assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert_same(w4, loaded)


# ------------------------------------------------------------- 4. shards without checksums


def _strip_crcs(file: Path, keep: int = 0) -> None:
    """Rewrite ``file`` without its CRC-32 metadata (or with only ``keep`` of them)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    tensors = load_file(file)
    crcs = dict(list(json.loads(meta[safetensors_io.CRC_KEY]).items())[:keep])
    save_file(tensors, file, metadata={"format": "pt", **({safetensors_io.CRC_KEY: json.dumps(crcs)}
                                                          if keep else {})})


def test_an_fxcompress_shard_without_checksums_is_an_error(w4, checkpoint):
    _strip_crcs(checkpoint / names.WEIGHTS_NAME)
    with pytest.raises(CheckpointError,
                       match=rf"{names.WEIGHTS_NAME}.*{safetensors_io.CRC_KEY}.*verify=False"):
        load(checkpoint)
    assert_same(w4, load(checkpoint, verify=False))


def test_an_fxcompress_tensor_without_its_checksum_is_an_error(checkpoint):
    _strip_crcs(checkpoint / names.WEIGHTS_NAME, keep=3)
    with pytest.raises(CheckpointError, match=r"tensor .* has no CRC-32"):
        load(checkpoint)


def test_a_foreign_checkpoint_reads_with_a_warning(dense, caplog):
    with caplog.at_level(logging.WARNING, logger="fxcompress"):
        source = Checkpoint(dense, skeleton(dense), torch.device("cpu"))
    assert "unverified" in caplog.text and str(dense) in caplog.text
    assert source.load("model.norm.weight").shape == (64,)


# --------------------------------------------------------------- 5. a forgotten --resume


def test_a_partial_output_is_not_overwritten_without_being_asked(dense, interrupted):
    out, folder = interrupted
    progress = (folder / names.PROGRESS).read_text()
    for budget in (None, "64KiB"):  # refused before the memory check
        with pytest.raises(ResumeError, match=rf"{folder}.*resume=True.*overwrite=True"):
            compress_checkpoint(dense, _calibration(), RECIPE, out, progress=False,
                                max_memory=budget)
        assert (folder / names.PROGRESS).read_text() == progress
    with pytest.raises(ValueError, match="resume.*overwrite"):
        compress_checkpoint(dense, _calibration(), RECIPE, out, resume=True, overwrite=True)
    compress_checkpoint(dense, _calibration(), RECIPE, out, progress=False, overwrite=True)
    assert (out / names.CONFIG_NAME).is_file() and not folder.exists()


def test_save_does_not_overwrite_a_partial_output_either(w4, interrupted):
    out, folder = interrupted
    with pytest.raises(ResumeError, match=rf"{folder}.*overwrite=True"):
        save(w4, out)
    assert (folder / names.PROGRESS).is_file()
    save(w4, out, overwrite=True)
    assert not folder.exists()


def test_a_refused_run_leaves_no_partial_folder(dense, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MemoryBudgetError):
        compress_checkpoint(dense, _calibration(), RECIPE, out, progress=False,
                            max_memory="64KiB")
    assert not out.exists() and not partial_dir(out).exists()


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    text = "the state of our union is strong and the work will be hard. " * 20
    chars = sorted(set(text))
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=chars[0]))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    build("llama", hidden=64).save_pretrained(root / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(root / "model")
    (root / "calib.txt").write_text(text)
    return root


def test_cli_refuses_a_forgotten_resume(cli_model, tmp_path, capsys):
    out = tmp_path / "out"
    folder = partial_dir(out)
    folder.mkdir()
    (folder / names.PROGRESS).write_text(json.dumps({"fingerprint": "x", "shards": [],
                                                   "layers": {}, "reports": {}}))
    args = ["compress", str(cli_model / "model"), "--recipe", "gptq-w4g64", "--calib",
            str(cli_model / "calib.txt"), "--samples", "4", "--seqlen", "16", "--out", str(out),
            "--quiet", "--stream"]
    for extra in ([], ["--max-memory", "64KiB"]):
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert str(folder) in err and "--resume" in err and "--overwrite" in err, err
        assert (folder / names.PROGRESS).is_file()
    assert main(args + ["--overwrite"]) == 0
    assert (out / names.CONFIG_NAME).is_file() and not folder.exists()


# ------------------------------------------------------------- 6. torch.load of user files


def test_every_torch_load_is_weights_only():
    """Files a user names (token ids, snapshots) are never unpickled as arbitrary objects."""
    root = Path(fxcompress.__file__).parent
    unsafe = []
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                           and k.value.value is True for k in node.keywords):
                    unsafe.append(f"{file.relative_to(root)}:{node.lineno}")
    assert not unsafe, unsafe

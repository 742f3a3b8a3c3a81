"""GGUF files of a compressed SmolLM2 in llama.cpp itself (slow): the metadata its own converter
writes, and llama-perplexity of the Q4_0 file against its dequantized F32 file.

Needs a llama.cpp source tree with a build (``$FXCOMPRESS_LLAMA_CPP``: the source folder, whose
``build/bin`` holds llama-perplexity, or the build folder inside it) and the cached SmolLM2 and
SOTU text (``fxcompress assets fetch``); skipped without them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from fxcompress import RTN, save
from fxcompress.engines import EngineError, engine_perplexity
from fxcompress.engines.llamacpp import ENV, find_binary, perplexity
from fxcompress.gguf.writer import write_gguf
from fxcompress.modules import compressed_module

pytestmark = pytest.mark.slow

# keys llama.cpp's converter derives from the folder's name (e.g. "Smollm2 135m Instruct"), and
# the count of keys, which counts them
NAMING = {"general.name", "general.basename", "general.finetune", "general.size_label",
          "GGUF.kv_count"}


def llama_cpp_source() -> Path:
    root = os.environ.get(ENV)
    if not root:
        pytest.skip(f"${ENV} is not set (a llama.cpp source tree with a build)")
    for folder in (Path(root), Path(root).parent):
        if (folder / "convert_hf_to_gguf.py").is_file():
            return folder
    pytest.skip(f"no convert_hf_to_gguf.py in {root} or its parent")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from fxcompress import assets

    try:
        return assets.smollm2(progress=False)
    except assets.AssetError as e:  # no registry: say so rather than pass silently
        pytest.skip(f"SmolLM2 is not available: {e}")


@pytest.fixture(scope="module")
def q4_0_checkpoint(smollm2, tmp_path_factory) -> Path:
    """SmolLM2 with every linear but the tied head rounded to 4-bit, groups of 32, symmetric
    (RTN: no calibration, the grid is what is tested), saved with its tokenizer files."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            c = RTN(4, 32, sym=True).solve(m.weight.detach().float())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    compressed_module(c, m.bias, m.weight.dtype))
    return save(model, tmp_path_factory.mktemp("smollm2") / "q4_0")


@pytest.fixture(scope="module")
def converted(smollm2, tmp_path_factory) -> gguf.GGUFReader:
    """SmolLM2 as llama.cpp's convert_hf_to_gguf.py writes it in F32."""
    source = llama_cpp_source()
    reference = tmp_path_factory.mktemp("convert") / "convert.gguf"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(source / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(smollm2),
                           "--outtype", "f32", "--outfile", str(reference)],
                          capture_output=True, text=True, env=env, check=False)
    if "No module named 'sentencepiece'" in done.stderr:
        pytest.skip("llama.cpp's converter needs the sentencepiece package")
    assert done.returncode == 0, done.stderr[-2000:]
    return gguf.GGUFReader(reference)


def assert_same_metadata(a: gguf.GGUFReader, b: gguf.GGUFReader) -> None:
    keys = set(a.fields) - NAMING
    assert keys == set(b.fields) - NAMING
    differ = [key for key in sorted(keys) if a.fields[key].types != b.fields[key].types
              or a.fields[key].contents() != b.fields[key].contents()]
    assert not differ
    ta, tb = ({t.name: (t.tensor_type, t.shape.tolist()) for t in r.tensors} for r in (a, b))
    assert ta == tb


def test_dense_model_is_written_as_llama_cpps_converter_writes_it(converted, smollm2, tmp_path):
    ours = gguf.GGUFReader(write_gguf(smollm2, tmp_path / "dense.gguf"))
    assert_same_metadata(converted, ours)
    data = {t.name: t.data for t in ours.tensors}
    assert all(np.array_equal(t.data, data[t.name]) for t in converted.tensors)


def test_checkpoint_metadata_equals_llama_cpp_converters(converted, q4_0_checkpoint, tmp_path):
    assert_same_metadata(converted, gguf.GGUFReader(
        write_gguf(q4_0_checkpoint, tmp_path / "f32.gguf", dtype="f32")))


def test_q4_0_gguf_perplexity_within_1_percent_of_its_f32_gguf(q4_0_checkpoint, tmp_path):
    source = llama_cpp_source()
    try:
        find_binary("llama-perplexity", source)
    except EngineError as e:
        pytest.skip(str(e))
    from fxcompress import assets

    text = assets.sotu(progress=False) / "evaluation.txt"
    q4 = write_gguf(q4_0_checkpoint, tmp_path / "q4_0.gguf")
    assert {t.tensor_type for t in gguf.GGUFReader(q4).tensors if t.name.endswith(
        "attn_q.weight")} == {gguf.GGMLQuantizationType.Q4_0}
    f32 = write_gguf(q4_0_checkpoint, tmp_path / "f32.gguf", dtype="f32")
    # the checkpoint folder itself: the engine writes its GGUF (Q4_0) to a temporary file
    quant = engine_perplexity("llama.cpp", q4_0_checkpoint, text=text, seqlen=512, windows=8,
                              llama_cpp=source)
    dense = perplexity(f32, text=text, seqlen=512, windows=8, llama_cpp=source)
    assert quant.tokens == dense.tokens == 8 * 255
    assert abs(quant.ppl / dense.ppl - 1) < 0.01, (quant.ppl, dense.ppl)


def test_cli_eval_with_llama_cpp_prints_the_gguf_beside_its_f32(q4_0_checkpoint, capsys):
    """``fxcompress eval DIR --engine llama.cpp``: llama-perplexity on the checkpoint's GGUF
    and on its dequantized F32 GGUF, and their ratio, within 1 % for Q4_0."""
    import re

    from fxcompress.cli import main

    source = llama_cpp_source()
    try:
        find_binary("llama-perplexity", source)
    except EngineError as e:
        pytest.skip(str(e))
    assert main(["eval", str(q4_0_checkpoint), "--engine", "llama.cpp", "--llama-cpp",
                 str(source), "--windows", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    ratio = float(re.search(r"llama\.cpp: GGUF / F32: ([0-9.]+)", out).group(1))
    own = float(re.search(r"F32 GGUF, [^)]*\): ([0-9.]+)", out).group(1))
    assert own > 1 and abs(ratio - 1) < 0.01, out

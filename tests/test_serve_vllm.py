"""Serving in vLLM: the engine plumbing (fast: a stand-in interpreter plays vLLM's worker), and
real vLLM scoring fxcompress checkpoints (slow; skipped unless a Python with vLLM is found:
the current one, or ``$FXCOMPRESS_VLLM_PYTHON``)."""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fxcompress import GPTQ, SparseGPT
from fxcompress.checkpoint import save
from fxcompress.cli import parser
from fxcompress.engines import EngineError, engine_perplexity
from fxcompress.engines import vllm as engine

from .models import build
from .test_format import HIDDEN, quick

FAKE = textwrap.dedent('''\
    #!{python}
    """Stands in for a Python with vLLM: answers the import probe, and plays the worker with
    a fixed NLL of {nll} per predicted token."""
    import json, os, sys
    if sys.argv[1] == "-c":
        sys.exit(0)
    if os.environ.get("FAKE_FAIL"):
        print("RuntimeError: the engine broke", flush=True)
        sys.exit(3)
    request = json.load(open(sys.argv[2]))
    tokens = sum(len(w) - 1 for w in request["windows"])
    json.dump({{"nll": {nll} * tokens, "tokens": tokens, "version": "0.0-fake", "cpu": True,
               "amx": True, "w4a8": os.environ.get("VLLM_CPU_INT4_W4A8", "1") != "0",
               "seen": request}}, open(sys.argv[3], "w"))
    ''')


@pytest.fixture
def fake_python(tmp_path) -> Path:
    path = tmp_path / "fake-python"
    path.write_text(FAKE.format(python=sys.executable, nll=2.0))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("w4")
    save(quick(build("llama", HIDDEN), GPTQ(4, 32)), folder)
    return folder


@pytest.fixture(scope="module")
def sparse_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sparse")
    save(quick(build("llama", HIDDEN), SparseGPT(0.5)), folder)
    return folder


IDS = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------- plumbing (fast)


def test_no_vllm_anywhere_says_how_to_install(monkeypatch):
    monkeypatch.delenv(engine.PYTHON_ENV, raising=False)
    monkeypatch.setattr(engine.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EngineError, match=r'pip install -e "\.\[serve\]"'):
        engine.find_python()


def test_a_python_without_vllm_is_named(tmp_path):
    if engine.importlib.util.find_spec("vllm") is not None:
        pytest.skip("this Python has vLLM")
    with pytest.raises(EngineError, match=r"--engine-python .* cannot import vllm"):
        engine.find_python(sys.executable)
    with pytest.raises(EngineError, match="not an executable Python"):
        engine.find_python(tmp_path / "nothing")


def test_engine_python_comes_from_the_environment(fake_python, monkeypatch):
    monkeypatch.setenv(engine.PYTHON_ENV, str(fake_python))
    assert engine.find_python() == str(fake_python)


def test_perplexity_is_computed_from_the_workers_nll(fake_python, sparse_checkpoint):
    report = engine_perplexity("vllm", sparse_checkpoint, ids=IDS, python=fake_python)
    assert report.tokens == 3 * 15 and report.ppl == pytest.approx(math.exp(2.0))
    assert report.engine == "vllm 0.0-fake (cpu)" and "windows=3 seqlen=16" in report.settings
    assert report.warnings == []  # no int4 layers: the W4A8 path does not apply


def test_the_w4a8_path_is_warned_about_and_named(fake_python, int4_checkpoint, monkeypatch):
    monkeypatch.delenv(engine.W4A8_SWITCH, raising=False)
    report = engine.perplexity(int4_checkpoint, ids=IDS, python=fake_python)
    assert len(report.warnings) == 1 and "VLLM_CPU_INT4_W4A8=0" in report.warnings[0]
    off = engine.perplexity(int4_checkpoint, ids=IDS, python=fake_python,
                            env={engine.W4A8_SWITCH: "0"})
    assert off.warnings == [] and "VLLM_CPU_INT4_W4A8=0" in off.settings


def test_an_engine_failure_shows_its_output(fake_python, int4_checkpoint, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "1")
    with pytest.raises(EngineError, match=r"exit 3.*\n.*the engine broke"):
        engine.perplexity(int4_checkpoint, ids=IDS, python=fake_python)


def test_unknown_engine_and_not_a_model_folder(tmp_path, fake_python):
    with pytest.raises(EngineError, match="unknown engine 'tgi'"):
        engine_perplexity("tgi", tmp_path)
    with pytest.raises(EngineError, match="no config.json"):
        engine.perplexity(tmp_path, ids=IDS, python=fake_python)


def test_eval_takes_an_engine():
    args = parser().parse_args(["eval", "ckpt", "--engine", "vllm", "--engine-python", "py"])
    assert args.engine == "vllm" and args.engine_python == "py"
    with pytest.raises(SystemExit):
        parser().parse_args(["eval", "ckpt", "--engine", "tgi"])


# ------------------------------------------------------------------------- real vLLM (slow)


def _vllm_python() -> str:
    try:
        return engine.find_python()
    except EngineError as e:
        pytest.skip(f"no Python with vLLM found: {e}")


def _own_bf16(folder: Path, ids: torch.Tensor) -> float:
    from fxcompress.checkpoint import load
    from fxcompress.evaluate import perplexity
    from fxcompress.modules import set_precision

    model = set_precision(load(folder).to(torch.bfloat16), "exact")
    return perplexity(model, None, ids.flatten(), ids.shape[1], ids.shape[0],
                      progress=False).ppl


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["gptq-w4g64", "sparsegpt-2:4+w4g64"])
def test_vllm_serves_a_compressed_smollm2_at_fxcompress_quality(recipe, tmp_path):
    """A SmolLM2 checkpoint (4 calibration samples) scores within 1 % of fxcompress's own bf16
    perplexity in vLLM (W4A8 off), on the same 4 windows."""
    import fxcompress
    from fxcompress import assets
    from fxcompress.evaluate import calibration_samples
    from fxcompress.inputs import load_model
    from fxcompress.recipe import resolve

    python = _vllm_python()
    model, tokenizer, _ = load_model("smollm2", progress=False, dense=True)
    calib = calibration_samples(tokenizer, assets.load_text(str(
        assets.sotu(progress=False) / "calibration.txt")), 4, 512)
    fxcompress.compile(model, calib, resolve(recipe), progress=False)
    fxcompress.save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    ids = engine.windows_for(tmp_path / "ckpt", None, 512, 4)
    own = _own_bf16(tmp_path / "ckpt", ids)
    served = engine.perplexity(tmp_path / "ckpt", ids=ids, python=python, enforce_eager=True,
                               env={engine.W4A8_SWITCH: "0"})
    assert abs(served.ppl / own - 1) < 0.01, (served.ppl, own)


@pytest.mark.slow
@pytest.mark.parametrize("group_size", [128, -1])
def test_vllm_cpu_serves_other_group_sizes(group_size, tmp_path):
    """Groups of 128 (SmolLM2's 576 features take none) and per channel, on a tiny Llama
    whose features 128 divides: vLLM's perplexity within 1 % of fxcompress's own bf16."""
    python = _vllm_python()
    folder = tmp_path / "ckpt"
    save(quick(build("llama", 128), GPTQ(4, group_size)), folder,
         tokenizer=_tiny_tokenizer(__import__("transformers").PreTrainedTokenizerFast))
    own = _own_bf16(folder, MOE_IDS)
    served = engine.perplexity(folder, ids=MOE_IDS, python=python, enforce_eager=True,
                               env={engine.W4A8_SWITCH: "0"})
    assert abs(served.ppl / own - 1) < 0.01, (served.ppl, own)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 3])
def test_vllm_cpu_has_4_bit_kernels_only(bits, tmp_path):
    """vLLM 0.32's CPU build runs WNA16 layers with one kernel, CPUWNA16, which takes 4-bit
    codes only: 8- and 3-bit checkpoints are refused (its GPU build has 8-bit kernels, and
    2/3-bit ones only through the optional Humming kernels)."""
    python = _vllm_python()
    folder = tmp_path / "ckpt"
    save(quick(build("llama", 128), GPTQ(bits, 32)), folder,
         tokenizer=_tiny_tokenizer(__import__("transformers").PreTrainedTokenizerFast))
    with pytest.raises(EngineError, match="CPUWNA16|kernel|not supported"):
        engine.perplexity(folder, ids=MOE_IDS, python=python, enforce_eager=True)


def _moe_checkpoint(arch: str, recipe: dict, folder: Path) -> Path:
    """A tiny random mixture-of-experts model (head size 32, as vLLM's CPU attention needs),
    compressed with ``recipe`` and saved with a word-level tokenizer."""
    from transformers import PreTrainedTokenizerFast

    import fxcompress

    model = build(arch, 128)
    fxcompress.compile(model, torch.randint(0, 128, (4, 32)), recipe, progress=False)
    save(model, folder, tokenizer=_tiny_tokenizer(PreTrainedTokenizerFast))
    return folder


MOE_IDS = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mixtral", "qwen2moe"])
def test_vllm_cpu_serves_pruned_experts(arch, tmp_path):
    """SparseGPT 50 % on every linear and expert, dense layout: vLLM's CPU build serves it as
    an unquantized MoE model at fxcompress's bf16 perplexity (random weights: the check is
    agreement, not quality)."""
    python = _vllm_python()
    folder = _moe_checkpoint(arch, {"lm_head": None, r".*\.gate$": None,
                                    r".*shared_expert_gate$": None, ".*": SparseGPT(0.5)},
                             tmp_path / "moe")
    own = _own_bf16(folder, MOE_IDS)
    served = engine.perplexity(folder, ids=MOE_IDS, python=python, enforce_eager=True)
    assert abs(served.ppl / own - 1) < 0.02, (served.ppl, own)


@pytest.mark.slow
def test_vllm_cpu_refuses_int4_experts_without_amx(tmp_path):
    """GPTQ w4 experts: vLLM 0.32's CPU build has two WNA16 MoE backends, both int8-activation
    paths — ZenDNN's (symmetric grids only, and only with VLLM_CPU_INT4_W4A8 on) and its own
    int4 experts (x86 with AMX only) — so on a CPU without AMX it refuses the checkpoint."""
    python = _vllm_python()
    folder = _moe_checkpoint("mixtral", {"lm_head": None, r".*\.gate$": None,
                                         ".*": GPTQ(4, 32)}, tmp_path / "moe")
    try:
        served = engine.perplexity(folder, ids=MOE_IDS, python=python, enforce_eager=True,
                                   env={engine.W4A8_SWITCH: "0"})
    except EngineError as e:
        assert "No WNA16 MoE backend supports the deployment configuration" in str(e)
        return
    pytest.skip(f"this CPU serves int4 experts (AMX): perplexity {served.ppl:.3f}, "
                f"not checked against fxcompress here")


def _tiny_tokenizer(cls):
    """A word-level tokenizer over the tiny models' 128 ids (vLLM loads one with every
    model, though it is given token ids)."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(128)}
    return cls(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
               unk_token="t0")


def test_fake_python_sees_the_windows(fake_python, sparse_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    """The worker receives exactly the windows, the checkpoint and bf16."""
    seen = tmp_path / "seen.json"
    real = engine.json.loads

    def spy(text, *a, **k):
        out = real(text, *a, **k)
        if isinstance(out, dict) and "seen" in out:
            seen.write_text(json.dumps(out["seen"]))
        return out

    monkeypatch.setattr(engine.json, "loads", spy)
    engine.perplexity(sparse_checkpoint, ids=IDS, python=fake_python)
    request = json.loads(seen.read_text())
    assert request["windows"] == IDS.tolist() and request["dtype"] == "bfloat16"
    assert Path(request["checkpoint"]) == sparse_checkpoint.resolve()
    assert os.environ.get("VLLM_CPU_KVCACHE_SPACE") is None  # set for vLLM only

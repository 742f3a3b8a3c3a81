"""The peer scripts' rows join domains.py's table on the same terms as fxcompress's rows.

``benchmarks/_peer_domains.py`` and ``benchmarks/peer_autoround.py`` run in ``.venv-peer``
without fxcompress, so nothing but these tests ties their perplexity and row format to
fxcompress's: the score must be fxcompress's arithmetic, a rewritten row must replace (not
duplicate) its old self, and AutoRound's fake-quantized weights must be rebuilt in fp32
exactly. The last test runs the real AutoRound smoke row, only where ``.venv-peer`` exists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxcompress.evaluate import perplexity

from .models import VOCAB, build

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import _peer_domains by name


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peer = _module("_peer_domains")
autoround = _module("peer_autoround")


def test_peer_perplexity_is_fxcompress_perplexity():
    model = build("llama", hidden=64)
    ids = torch.randint(0, VOCAB, (5, 32), generator=torch.Generator().manual_seed(1))
    ours = peer.perplexity(model, ids)
    theirs = perplexity(model, None, ids.flatten(), ids.shape[1], ids.shape[0],
                        progress=False).ppl
    assert ours == theirs  # same windows, batches and float sums: equal, not just close


def _row(name: str, seed: int, ppl: float) -> dict:
    return {"row": name, "recipe": "autoround", "method": {"method": "AutoRound"},
            "calibration": "speeches", "seed": seed, "ppl": {"code": ppl}, "seconds": 1.0,
            "threads": 1, "commit": "x", "dirty": False, "date": "d"}


def test_write_row_replaces_the_same_row_and_seed_only(tmp_path):
    peer.write_row(tmp_path, _row("a", 0, 1.0), {"m": 1})
    peer.write_row(tmp_path, _row("a", 1, 2.0), {"m": 2})
    peer.write_row(tmp_path, _row("a", 0, 3.0), {"m": 3})
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"] == {"m": 3}
    assert sorted((r["seed"], r["ppl"]["code"]) for r in data["rows"]) == [(0, 3.0), (1, 2.0)]
    assert not list(tmp_path.glob("*.tmp*"))


def test_load_ids_names_the_missing_calibration_file(tmp_path):
    torch.save(torch.zeros(2, 8, dtype=torch.long), tmp_path / "eval-code.pt")
    with pytest.raises(SystemExit, match="calib-mix-seed3.pt"):
        peer.load_ids(tmp_path, "mix", 3)


def test_ids_model_reads_the_folder_record(tmp_path):
    assert peer.ids_model(tmp_path) == "smollm2"  # a folder from before the record
    (tmp_path / "model.txt").write_text("gemma3\n")
    assert peer.ids_model(tmp_path) == "gemma3"


def test_smoke_slice_marks_a_cut_row():
    calib, evals = torch.zeros(8, 16, dtype=torch.long), {"code": torch.zeros(4, 16)}
    assert peer.smoke_slice(calib, evals, None, None, None)[2] is False
    small, cut, smoke = peer.smoke_slice(calib, evals, 2, 4, 1)
    assert smoke and small.shape == (2, 4) and cut["code"].shape == (1, 16)


def _tuned_layer(dtype: torch.dtype, sym: bool = False, bits: int = 4,
                 group: int = 8) -> torch.nn.Linear:
    """A Linear as AutoRound leaves it: weight = dtype(fp32(fp16 scale) * (q - zp)); zp a
    float tensor (asymmetric) or the number 2**(bits-1) with signed integers (symmetric)."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(4 * group, 3, bias=False)
    scale = (torch.rand(3, 4, generator=g) * 0.1 + 0.01).half()
    if sym:
        zp, half = 2 ** (bits - 1), 2 ** (bits - 1)
        q = torch.randint(-half, half, (3, 4, group), generator=g).float()
        w = scale.float().unsqueeze(-1) * q
    else:
        zp = torch.randint(0, 2**bits, (3, 4), generator=g).float()
        q = torch.randint(0, 2**bits, (3, 4, group), generator=g).float()
        w = scale.float().unsqueeze(-1) * (q - zp.unsqueeze(-1))
    layer.weight.data = w.reshape(3, -1).to(dtype)
    layer.scale, layer.zp = scale, zp
    return layer


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantized_rebuilds_autoround_weights_in_fp32(dtype, sym):
    layer = _tuned_layer(dtype, sym)
    w32 = autoround.dequantized(layer, 4, 8)
    assert w32.dtype == torch.float32
    assert torch.equal(w32.to(dtype), layer.weight)
    assert peer.max_levels(w32, 8) <= 16


def test_dequantized_refuses_a_layout_it_does_not_know():
    layer = _tuned_layer(torch.float32)
    layer.scale = layer.scale.t().contiguous().reshape(3, 4)  # scales of the wrong groups
    with pytest.raises(RuntimeError, match="does not give AutoRound's weight back|outside"):
        autoround.dequantized(layer, 4, 8)


def test_row_names():
    assert autoround.row_name(4, 64, 200, None, False) == "autoround-w4g64 iters200"
    assert autoround.row_name(4, 64, 50, 5e-3, False) == "autoround-w4g64 iters50 (light)"
    assert autoround.row_name(3, 64, 200, 1e-2, True) == "autoround-w3g64 iters200 lr0.01 (smoke)"


PEER = ROOT / ".venv-peer" / "bin" / "python"
SMOLLM2 = Path("/root/.cache/fxcompress/smollm2-135m-instruct")
IDS = Path("/work/cache/s2/ids")


@pytest.mark.slow
@pytest.mark.skipif(not (PEER.exists() and SMOLLM2.exists() and IDS.exists()),
                    reason="needs .venv-peer (benchmarks/peer_setup.sh), SmolLM2 and the ids")
def test_autoround_smoke_row_joins_the_domain_table(tmp_path):
    """About 2 minutes on one thread: 4 x 128 calibration tokens, 2 iterations."""
    cmd = [str(PEER), str(ROOT / "benchmarks" / "peer_autoround.py"), "--model", str(SMOLLM2),
           "--ids", str(IDS), "--iters", "2", "--samples", "4", "--seqlen", "128",
           "--windows", "2", "--threads", "1", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert row["row"] == "autoround-w4g64 iters2 (smoke)"
    assert row["max_levels_per_group"] <= 16
    assert set(row["ppl"]) == {p.stem.removeprefix("eval-") for p in IDS.glob("eval-*.pt")}
    domains = _module("domains")
    assert "autoround-w4g64 iters2 (smoke)" in domains.table({"rows": [row]})

"""Shared by the peer scripts (peer_autoround.py, peer_llmcompressor.py --ids): the domain
suite's token ids in, rows of ``benchmarks/domains.py``'s format out.

Why a module of its own: the peers run in ``.venv-peer``, which has no fxcompress, yet their
rows must join ``domains.py --include FOLDER`` cell by cell. So this file reads the very
``ids`` folder that ``domains.py`` wrote (``calib-<set>-seed<k>.pt``, ``eval-<domain>.pt``),
scores perplexity the way ``fxcompress.evaluate.perplexity`` does (same windows, same
per-row fp32 cross-entropy sum, same batch of 4), and writes rows with the keys the table
reads (row, recipe, method, calibration, seed, ppl, seconds, threads, commit, dirty, date).
It imports only torch and the standard library.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

EVAL_BATCH = 4  # fxcompress.evaluate.perplexity's batch_size
# domains.py's EVAL_ORDER: out-of-domain first, so a stopped run has the numbers that matter
EVAL_ORDER = ["fiction", "mail", "code", "legal", "drama", "docs", "speeches"]


def load_ids(ids_dir: str | Path, calibration: str, seed: int) -> tuple[torch.Tensor,
                                                                          dict[str, torch.Tensor]]:
    """The calibration windows of ``calibration`` / ``seed`` and every domain's eval windows."""
    ids = Path(ids_dir)
    calib_path = ids / f"calib-{calibration}-seed{seed}.pt"
    if not calib_path.exists():
        have = sorted(p.name for p in ids.glob("calib-*.pt"))
        raise SystemExit(f"--ids {ids}: no {calib_path.name} (have {have}); run "
                         "benchmarks/domains.py with that seed first")
    names = [p.name.removeprefix("eval-").removesuffix(".pt") for p in ids.glob("eval-*.pt")]
    if not names:
        raise SystemExit(f"--ids {ids}: no eval-<domain>.pt files")
    order = [d for d in EVAL_ORDER if d in names] + sorted(set(names) - set(EVAL_ORDER))
    evals = {d: _long2d(ids / f"eval-{d}.pt") for d in order}
    return _long2d(calib_path), evals


def ids_model(ids_dir: str | Path) -> str:
    """The model whose tokenizer made the ids (domains.py's ``ids/model.txt``), for the row's
    ``model``: without it a peer row in a Gemma folder reads as SmolLM2's and the table refuses
    the folder. Folders made before the model was recorded hold SmolLM2's ids."""
    recorded = Path(ids_dir) / "model.txt"
    return recorded.read_text().strip() if recorded.exists() else "smollm2"


def _long2d(path: Path) -> torch.Tensor:
    t = torch.load(path, weights_only=True)
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise SystemExit(f"{path}: expected a 2-D tensor of token ids (windows, seqlen)")
    return t.long().contiguous()  # a view of a bigger storage saved by torch.save: copy


def smoke_slice(calib: torch.Tensor, evals: dict[str, torch.Tensor], samples: int | None,
                seqlen: int | None, windows: int | None) -> tuple[torch.Tensor,
                                                                  dict[str, torch.Tensor], bool]:
    """Cut the inputs down for a quick check; True when anything was cut (a smoke row)."""
    small = calib[:samples, :seqlen].contiguous()
    cut = {d: t[:windows].contiguous() for d, t in evals.items()}
    smoke = small.shape != calib.shape or any(cut[d].shape != evals[d].shape for d in evals)
    return small, cut, smoke


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = EVAL_BATCH) -> float:
    """exp(mean NLL) of ``logits[:, :-1]`` against ``ids[:, 1:]`` over every window.

    The same arithmetic as ``fxcompress.evaluate.perplexity``: per window an fp32
    ``cross_entropy(..., reduction="sum")`` taken as a Python float, summed, divided by
    windows x (seqlen - 1), so the two scripts agree to float rounding on the same model."""
    model.eval()
    total = 0.0
    for chunk in windows.split(batch):
        logits = model(input_ids=chunk, use_cache=False).logits
        for row_logits, row_ids in zip(logits, chunk, strict=True):
            total += F.cross_entropy(row_logits[:-1].float(), row_ids[1:], reduction="sum").item()
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def git_state() -> dict[str, Any]:
    """commit / dirty / date as domains.py records them (dirty: fxcompress or benchmarks)."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "fxcompress", "benchmarks"],
                           capture_output=True, text=True).stdout.strip()
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def write_row(folder: str | Path, row: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Put ``row`` into ``folder/results.json``, replacing one of the same (row, seed).

    Written to a temporary file and renamed, so an interrupted write never leaves a
    half-written table that domains.py --include would refuse."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    data = json.loads(results.read_text()) if results.exists() else {"rows": []}
    data["meta"] = meta  # the latest run's: rows keep their own commit and versions
    data["rows"] = [r for r in data["rows"]
                    if not (r["row"] == row["row"] and r["seed"] == row["seed"])]
    data["rows"].append(row)
    tmp = results.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(results)
    return results


def max_levels(w: torch.Tensor, group_size: int | None) -> int:
    """Largest number of distinct values in one quantization group (row or row-group)."""
    groups = w.reshape(w.shape[0], -1, group_size) if group_size else w.unsqueeze(1)
    s = groups.sort(dim=-1).values
    distinct = 1 + (s[..., 1:] != s[..., :-1]).sum(dim=-1)
    return int(distinct.max())

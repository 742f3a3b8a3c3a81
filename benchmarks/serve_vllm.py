"""Does vLLM serve fxcompress checkpoints at fxcompress's quality?

For every named recipe vLLM can serve (4- and 8-bit GPTQ, with groups and per channel;
SparseGPT 50 %, 60 %, 2:4; 2:4 + int4), SmolLM2-135M-Instruct is compressed (``--samples``
calibration windows: the comparison is engine against fxcompress's own loader on the same
checkpoint, not recipe quality) and its perplexity on the same SOTU evaluation windows is
computed four ways: fxcompress's loader in float32 and in bf16 (``set_precision(model,
"exact")``: bf16 activations throughout, the engine's arithmetic), vLLM's CPU build with
``VLLM_CPU_INT4_W4A8=0`` and with vLLM's default environment (W4A8 on: it only applies on CPUs
with AMX). ``ratio`` is vLLM (W4A8=0) over fxcompress bf16.

vLLM runs in its own environment (``--engine-python``, or ``$FXCOMPRESS_VLLM_PYTHON``); each
row is written to ``OUT/results.json`` as it is measured, so an interrupted run keeps what it
has and a rerun skips the cells it already holds.

    python benchmarks/serve_vllm.py --out /tmp/serve [--recipes a,b] [--samples 16]
        [--windows 32] [--eager] [--default-env-for a,b] [--columns fx_bf16,vllm_w4a8_0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fxcompress import assets  # noqa: E402
from fxcompress.checkpoint import load  # noqa: E402
from fxcompress.engines import EngineError  # noqa: E402
from fxcompress.engines import vllm as engine  # noqa: E402
from fxcompress.evaluate import evaluation_windows, perplexity  # noqa: E402
from fxcompress.modules import set_precision  # noqa: E402

SERVABLE = ["gptq-w4g64", "gptq-w4g128", "gptq-w4", "gptq-w8", "sparsegpt-50", "sparsegpt-60",
            "sparsegpt-2:4", "sparsegpt-2:4+w4g64"]
COLUMNS = ("fx_fp32", "fx_bf16", "vllm_w4a8_0", "vllm_default")


def compress(recipe: str, out: Path, samples: int) -> None:
    if (out / "config.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "fxcompress", "compress", "--recipe", recipe,
                    "--samples", str(samples), "--out", str(out), "--quiet"], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})


def own(folder: Path, ids: torch.Tensor, bf16: bool) -> float:
    model = load(folder)
    if bf16:
        set_precision(model.to(torch.bfloat16), "exact")
    return perplexity(model, None, ids.flatten(), ids.shape[1], ids.shape[0],
                      progress=False).ppl


def served(folder: Path, ids: torch.Tensor, w4a8_off: bool, eager: bool,
           python: str | None) -> tuple[float, str]:
    env = {engine.W4A8_SWITCH: "0"} if w4a8_off else {}
    saved = os.environ.pop(engine.W4A8_SWITCH, None) if not w4a8_off else None
    try:
        report = engine.perplexity(folder, ids=ids, env=env, enforce_eager=eager, python=python)
    finally:
        if saved is not None:
            os.environ[engine.W4A8_SWITCH] = saved
    return report.ppl, report.settings


def _reason(message: str) -> str:
    """The last error line of vLLM's output."""
    lines = [ln for ln in message.splitlines() if "Error" in ln or "error" in ln]
    return (lines[-1] if lines else message.splitlines()[0]).strip()[:300]


def table(results: dict, recipes: list[str]) -> str:
    def cell(v: float | str | None) -> str:
        return "—" if v is None else v if isinstance(v, str) else f"{v:.3f}"

    lines = ["| recipe | fxcompress fp32 | fxcompress bf16 | vLLM (W4A8=0) | vLLM default env "
             "| ratio vLLM / fxcompress bf16 |", "|---|---|---|---|---|---|"]
    for r in recipes:
        row = results.get(r, {})
        ratio = (row["vllm_w4a8_0"] / row["fx_bf16"]
                 if isinstance(row.get("vllm_w4a8_0"), float) and row.get("fx_bf16") else None)
        lines.append(f"| {r} | " + " | ".join(cell(row.get(c)) for c in COLUMNS)
                     + f" | {'—' if ratio is None else f'{ratio:.4f}'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--recipes", default=",".join(SERVABLE))
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    p.add_argument("--default-env-for", default=None,
                   help="recipes that also get the default-environment vLLM run (default: "
                        "all)")
    p.add_argument("--engine-python", default=None)
    p.add_argument("--columns", default=",".join(COLUMNS),
                   help="the cells to measure (default: all); e.g. fx_bf16,vllm_w4a8_0 for "
                        "the comparison alone on a busy machine")
    args = p.parse_args()
    columns = args.columns.split(",")
    if unknown := set(columns) - set(COLUMNS):
        p.error(f"--columns: unknown {', '.join(sorted(unknown))} (choose from "
                f"{', '.join(COLUMNS)})")
    recipes = args.recipes.split(",")
    default_for = recipes if args.default_env_for is None else args.default_env_for.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.fetch(progress=False).model_dir)
    text = assets.load_text(str(assets.sotu(progress=False) / "evaluation.txt"))
    ids = evaluation_windows(tokenizer, text, 512, args.windows)
    for recipe in recipes:
        folder = args.out / recipe.replace(":", "_").replace("+", "_")
        t = time.perf_counter()
        compress(recipe, folder, args.samples)
        row = results.setdefault(recipe, {})
        jobs = {"fx_fp32": lambda f=folder: own(f, ids, False),
                "fx_bf16": lambda f=folder: own(f, ids, True),
                "vllm_w4a8_0": lambda f=folder: served(f, ids, True, args.eager,
                                                        args.engine_python)[0]}
        if recipe in default_for:
            jobs["vllm_default"] = lambda f=folder: served(f, ids, False, args.eager,
                                                           args.engine_python)[0]
        for column, job in jobs.items():
            if column in row or column not in columns:
                continue
            try:
                row[column] = job()
            except EngineError as e:  # vLLM refused the checkpoint: the table says why
                row[column] = f"error: {_reason(str(e))}"
            if isinstance(row[column], float) and not math.isfinite(row[column]):
                raise RuntimeError(f"{recipe} {column}: perplexity {row[column]}")
            store.write_text(json.dumps(results, indent=2))
            print(f"{recipe:<22} {column:<13} {row[column]}", flush=True)
        print(f"{recipe}: {time.perf_counter() - t:.0f} s", flush=True)
    print(table(results, recipes))


if __name__ == "__main__":
    main()

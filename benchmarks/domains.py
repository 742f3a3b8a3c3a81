"""Recipes x domains: perplexity of a compressed model (SmolLM2-135M, or Gemma 3 270M with
``--model gemma3``) on every domain of the suite.

A default chosen on one text may lose elsewhere (issue 34). This benchmark scores each row on
the same 32 x 512-token windows of every domain of :mod:`fxcompress.suite` (the first
non-overlapping windows of each domain's ``evaluation.txt``), so rows are comparable cell by
cell. A row is named by what it runs (``parse_row``): ``dense``, a named recipe as
``fxcompress compress --recipe NAME`` runs it, with ``field=value`` overrides of its settings
(``gptq-w4g64 shrink=0.25``), and its calibration set:

- ``speeches`` (default): 128 x 512 random windows of the SOTU <= 2000 text (the CLI's default);
- ``mix`` (a trailing word): the same number of windows dealt evenly over the suite's
  calibration domains (each domain's ``calibration.txt``, never its evaluation text).

Every row runs in its own process (``_row``); results accumulate in ``OUT/results.json`` with
the commit, CPU flags, date and seed; rows already there are not run again, so an interrupted
run continues where it stopped. Settings are chosen on the validation domains only (a choice
run passes ``--domains`` with them); reporting domains inform no choice. Rows of other tools
made on the same ids (``peer_autoround.py``, ``peer_llmcompressor.py``) join with ``--include``.

Token ids depend on the model's tokenizer, so one OUT folder holds one model: its ids folder
and results.json record the model, and a run for another model there is refused (a folder made
before models were recorded is SmolLM2's):

    OMP_NUM_THREADS=1 python benchmarks/domains.py --out bench/domains [--rows NAME ...] [--seed K]
    OMP_NUM_THREADS=1 python benchmarks/domains.py --model gemma3 --out bench/domains-gemma3
    python benchmarks/domains.py --out bench/domains --table [--include OTHER ...] [--write]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fxcompress import Recipe, suite
from fxcompress.inputs import DEFAULT_MODEL, EMBEDDED_MODELS
from fxcompress.recipe import NAMED

sys.path.insert(0, str(Path(__file__).parent))
from _cpu import cpu_flags  # noqa: E402

SAMPLES, SEQLEN, WINDOWS = 128, 512, 32
MODEL_NAMES = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma 3 270M"}
assert sorted(MODEL_NAMES) == sorted(EMBEDDED_MODELS)
IDS_MODEL = "model.txt"  # in OUT/ids: the model whose tokenizer made the ids
# validation first (what a choice reads), then the rest: a stopped run has those numbers
EVAL_ORDER = ["docs", "fiction", "mail", "speeches", "code", "legal", "drama"]
assert sorted(EVAL_ORDER) == sorted(suite.SUITE)
# the rows run when none are named; any other row may be named (see ``parse_row``)
ROWS = [
    "dense",
    "rtn-w4g64",
    "gptq-w4g64",
    "gptq-w4g64 dense_output=false",
    "gptq-w4g64 mix",
    "gptq-w4g64 dense_output=false mix",
]


def parse_row(name: str) -> tuple[Recipe | None, str, int]:
    """A row name: ``dense``, or a named recipe, then ``field=value`` overrides of its methods'
    settings (JSON values: ``shrink=0.25``, ``dense_output=false``), then ``mix`` to calibrate
    on the mix rather than on speeches, then ``n=K`` to calibrate on the first K of the
    SAMPLES speeches windows only. Returns (recipe or None for dense, calibration set, number
    of calibration windows). Rows are named rather than listed so that a setting can be tried
    without editing this file, and the name alone says what ran."""
    words = name.split()
    calibration, samples = "speeches", SAMPLES
    if words and re.fullmatch(r"n=\d+", words[-1]):
        samples, words = int(words[-1][2:]), words[:-1]
        if not 0 < samples <= SAMPLES:
            raise SystemExit(f"row {name!r}: n must be in 1..{SAMPLES}")
    if words and words[-1] == "mix":
        calibration, words = "mix", words[:-1]
        if samples != SAMPLES:  # the mix's windows are stored domain after domain
            raise SystemExit(f"row {name!r}: n= is for speeches rows only")
    if not words or (words[0] != "dense" and words[0] not in NAMED):
        raise SystemExit(f"row {name!r}: must start with 'dense' or a named recipe "
                         f"({', '.join(NAMED)})")
    if words[0] == "dense":
        if len(words) > 1:
            raise SystemExit(f"row {name!r}: dense takes no settings")
        return None, calibration, samples
    overrides = {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq:
            raise SystemExit(f"row {name!r}: {word!r} is not field=value")
        overrides[key] = json.loads(value)
    recipe = NAMED[words[0]]
    if overrides:
        try:
            recipe = Recipe({p: m if m is None else dataclasses.replace(m, **overrides)
                             for p, m in recipe.rules})
        except (TypeError, ValueError) as e:
            raise SystemExit(f"row {name!r}: {e}") from e
    return recipe, calibration, samples


def calibration_ids(tokenizer, which: str, seed: int, n: int = SAMPLES) -> torch.Tensor:
    """``n`` x SEQLEN calibration windows: from the SOTU text, or the suite's mix of
    calibration domains (``suite.calibration_mix``, what ``fxcompress compress`` calibrates on
    by default), drawn with ``seed``."""
    from fxcompress.assets import load_text
    from fxcompress.evaluate import calibration_samples

    if which == "speeches":
        return calibration_samples(tokenizer, load_text(suite.texts("speeches").calibration), n,
                                   SEQLEN, seed)
    if which == "mix":
        return suite.calibration_mix(tokenizer, n, SEQLEN, seed)
    raise ValueError(f"unknown calibration set {which!r}: 'speeches' or 'mix'")


def _folder_model(out: Path) -> str | None:
    """The model whose ids and rows ``out`` holds; None for a new folder. A folder made before
    the model was recorded holds SmolLM2's (the only model then)."""
    recorded = out / "ids" / IDS_MODEL
    if recorded.exists():
        return recorded.read_text().strip()
    data = _load(out / "results.json")
    models = {r.get("model", DEFAULT_MODEL) for r in data["rows"]}
    models |= {data["meta"].get("model", DEFAULT_MODEL)} if "meta" in data else set()
    if (out / "ids").is_dir() and any((out / "ids").glob("*.pt")):
        models.add(DEFAULT_MODEL)
    if len(models) > 1:
        raise SystemExit(f"{out} mixes rows of models {sorted(models)}")
    return models.pop() if models else None


def check_model(out: Path, model: str) -> None:
    """Refuse to add ``model``'s ids or rows to a folder that holds another model's: their
    token ids come from another tokenizer, their perplexities from another model."""
    if model not in EMBEDDED_MODELS:
        raise SystemExit(f"unknown model {model!r}; expected one of {list(EMBEDDED_MODELS)}")
    found = _folder_model(out)
    if found is not None and found != model:
        raise SystemExit(f"{out} holds ids and rows of {found!r}, not {model!r}: give this "
                         f"model its own --out (e.g. bench/domains-{model})")


def _prepare(out: Path, seed: int, model: str) -> None:
    """The token ids every row shares, made once into ``out/ids`` with ``model``'s tokenizer."""
    ids = out / "ids"
    sets = ("mix", "speeches")
    wanted = [f"eval-{name}.pt" for name in suite.SUITE] + [
        f"calib-{c}-seed{seed}.pt" for c in sets]
    if all((ids / f).exists() for f in wanted):
        return
    from transformers import AutoTokenizer

    from fxcompress import assets
    from fxcompress.evaluate import evaluation_windows

    ids.mkdir(parents=True, exist_ok=True)
    (ids / IDS_MODEL).write_text(model + "\n")
    tok = AutoTokenizer.from_pretrained(getattr(assets, EMBEDDED_MODELS[model])())
    for name in suite.SUITE:
        text = assets.load_text(suite.texts(name).evaluation)
        # evaluation_windows / calibration_samples put a BOS first where the tokenizer does
        torch.save(evaluation_windows(tok, text, SEQLEN, WINDOWS), ids / f"eval-{name}.pt")
    for which in sets:
        torch.save(calibration_ids(tok, which, seed), ids / f"calib-{which}-seed{seed}.pt")


def _meta(seed: int, model: str) -> dict:
    """What a reader needs to reproduce the numbers: commit, machine, data, seeds."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "fxcompress", "benchmarks"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "commit": commit.stdout.strip(), "dirty": bool(dirty),
        "cpu_flags": cpu_flags(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": model, "seed": seed,
        "calibration": f"{SAMPLES} x {SEQLEN} tokens, seed {seed}",
        "evaluation": f"first {WINDOWS} non-overlapping windows of {SEQLEN} tokens per domain",
        "domains": {d.name: {"role": d.role, "source": d.source, "sha256": d.sha256,
                             "description": d.description} for d in suite.domains()},
    }


def _load(results: Path) -> dict:
    return json.loads(results.read_text()) if results.exists() else {"rows": []}


def run(out: Path, names: list[str], seed: int, domains: list[str] | None = None,
        model: str = DEFAULT_MODEL) -> None:
    for name in names:
        parse_row(name)  # a bad name stops the run before anything is computed
    unknown = [d for d in domains or [] if d not in suite.SUITE]
    if unknown:
        raise SystemExit(f"unknown domains {unknown}; domains: {list(suite.SUITE)}")
    check_model(out, model)
    out.mkdir(parents=True, exist_ok=True)
    _prepare(out, seed, model)
    results = out / "results.json"
    for name in names:
        if any(r["row"] == name and r["seed"] == seed for r in _load(results)["rows"]):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "_row", name, "--out", str(out), "--seed",
                   str(seed), "--json", f"{tmp}/row.json", "--model", model]
            cmd += ["--domains", *domains] if domains else []
            subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
            row = json.loads(Path(f"{tmp}/row.json").read_text())
        data = _load(results)
        data["meta"] = _meta(seed, model)  # the latest run's: rows keep their own commit
        data["rows"] = [r for r in data["rows"] if not (r["row"] == name and r["seed"] == seed)]
        data["rows"].append(row)
        results.write_text(json.dumps(data, indent=2) + "\n")
        cells = " ".join(f"{d} {p:.2f}" for d, p in row["ppl"].items())
        print(f"{name}: {cells} (compress {row['seconds']:.0f}s)", flush=True)


def row(name: str, out: Path, seed: int, json_path: Path,
        domains: list[str] | None = None, model: str = DEFAULT_MODEL) -> None:
    """One row in this process: compress, dequantize, perplexity on every domain (or on
    ``domains``: a choice is scored on the validation domains alone).

    Each domain's number is kept in ``out/partial`` as soon as it is known, so a row stopped
    midway still counts; run again, the row takes the domains it already has from there (the
    compression is deterministic for a given recipe, calibration ids and thread count) and
    compresses only when some are missing."""
    import fxcompress
    from fxcompress.checkpoint.model import decompress
    from fxcompress.evaluate import perplexity
    from fxcompress.inputs import load_model

    resolved, calibration, samples = parse_row(name)
    method = None if resolved is None else resolved.to_dict()["rules"][-1]
    check_model(out, model)
    meta = _meta(seed, model)
    partial = out / "partial" / f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}-seed{seed}.json"
    partial.parent.mkdir(exist_ok=True)
    result = {
        "row": name, "model": model, "recipe": None if resolved is None else name.split()[0],
        "method": method, "calibration": None if resolved is None else calibration, "seed": seed,
        "samples": None if resolved is None else samples,
        "ppl": {}, "seconds": 0.0, "threads": torch.get_num_threads(),
        "commit": meta["commit"], "dirty": meta["dirty"], "date": meta["date"]}
    earlier = json.loads(partial.read_text()) if partial.exists() else {}
    if all(earlier.get(k, DEFAULT_MODEL if k == "model" else None) == result[k]
           for k in ("model", "method", "calibration", "threads")):
        result.update(ppl=earlier["ppl"], seconds=earlier["seconds"])
    todo = [d for d in domains or EVAL_ORDER if d not in result["ppl"]]
    if not todo:
        json_path.write_text(json.dumps(result))
        return
    net, _, _ = load_model(model, progress=False)
    if resolved is not None:
        started = time.perf_counter()
        calib = torch.load(out / "ids" / f"calib-{calibration}-seed{seed}.pt",
                           weights_only=True)[:samples]
        fxcompress.compile(net, calib, resolved, progress=False)
        decompress(net)
        result["seconds"] = time.perf_counter() - started
    for domain in todo:
        ids = torch.load(out / "ids" / f"eval-{domain}.pt", weights_only=True)
        result["ppl"][domain] = perplexity(net, None, ids.flatten(), ids.shape[1],
                                           ids.shape[0], progress=False).ppl
        partial.write_text(json.dumps(result))
    json_path.write_text(json.dumps(result))


def family(name: str) -> str:
    """The grid a row belongs to, whoever made it: ``w4g64``, ``w3g64``, ``50%``, ... (from the
    row's name: ``gptq-w4g64 shrink=0.1``, ``rtn-w4g64``, ``autoround-w4g64 iters50``,
    ``llm-compressor sparsegpt-50``); ``dense`` for the dense model."""
    if name == "dense":
        return "dense"
    m = re.search(r"\bw(\d+)(g\d+)?\b", name) or re.search(r"-(\d+)(?:\b|$)", name)
    if m is None:
        return "other"
    return f"w{m[1]}{m[2] or ''}" if m[0].startswith("w") else f"{m[1]}%"


BASELINES = {"w4g64": "rtn-w4g64", "w3g64": "rtn-w3g64", "50%": "magnitude-50"}


def table(data: dict, order: list[str] | None = None) -> str:
    """One table per grid (w4g64, w3g64, 50 %, ...): its rows x domains, grouped by role.

    A row run with several calibration seeds shows each cell's mean over them and ``±`` half
    its range; each cell is also given as its change over dense. A cell worse than the grid's
    baseline (round-to-nearest / magnitude, ``BASELINES``) is bold. The role means are
    geometric means of the cells of that role. ``order``: rows to list first (default ROWS)."""
    order = order or ROWS
    by_name: dict[str, list[dict]] = {}
    for r in data["rows"]:
        by_name.setdefault(r["row"], []).append(r)
    domains = [d.name for d in suite.domains()]
    roles = {d.name: d.role for d in suite.domains()}

    def cells(name: str) -> dict[str, list[float]]:
        runs = by_name.get(name, [])
        return {d: [r["ppl"][d] for r in runs if d in r["ppl"]] for d in domains}

    dense = {d: v[0] for d, v in cells("dense").items() if v}
    head = [f"{d} ({roles[d][:5]}.)" for d in domains]
    out = []
    families = sorted({family(n) for n in by_name} - {"dense"},
                      key=lambda f: (f not in BASELINES, list(BASELINES).index(f)
                                     if f in BASELINES else 0, f))
    for fam in families:
        base = {d: sum(v) / len(v) for d, v in cells(BASELINES.get(fam, "")).items() if v}
        names = sorted((n for n in by_name if family(n) == fam),
                       key=lambda n: (order.index(n) if n in order else len(order), n))
        lines = [f"**{fam}**", "",
                 "| row | seeds | " + " | ".join(head) + " | mean valid. | mean report. |"
                 " compress (s) |", "|---|---|" + "---:|" * (len(domains) + 3)]
        for name in ["dense", *names] if dense else names:
            runs, values = by_name[name], cells(name)
            row = []
            for d in domains:
                v = values[d]
                if not v:
                    row.append("—")
                    continue
                mean = sum(v) / len(v)
                cell = f"{mean:.2f}" + (f" ±{(max(v) - min(v)) / 2:.2f}" if len(v) > 1 else "")
                if name != "dense" and d in dense:
                    cell += f" ({mean / dense[d] - 1:+.0%})"
                if name not in ("dense", BASELINES.get(fam)) and mean > base.get(d, math.inf):
                    cell = f"**{cell}**"
                row.append(cell)
            means = [_geomean([sum(values[d]) / len(values[d]) if values[d] else math.nan
                               for d in domains if roles[d] == role])
                     for role in ("validation", "reporting")]
            uses_data = (runs[0].get("method") or {}).get("method") not in (
                None, "RTN", "Magnitude")
            seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
            calib = f"{runs[0].get('calibration')} {seeds}" if uses_data else "—"
            secs = [r["seconds"] for r in runs if r.get("seconds")]
            lines.append(f"| {name} | {calib} | " + " | ".join(row)
                         + "".join(" | —" if m != m else f" | {m:.2f}" for m in means)
                         + (f" | {sorted(secs)[len(secs) // 2]:.0f} |" if secs else " | — |"))
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _geomean(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).log().mean().exp())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_row":
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("name")
        ap.add_argument("--out", required=True)
        ap.add_argument("--seed", type=int, required=True)
        ap.add_argument("--json", required=True)
        ap.add_argument("--domains", nargs="+")
        ap.add_argument("--model", default=DEFAULT_MODEL)
        a = ap.parse_args()
        row(a.name, Path(a.out), a.seed, Path(a.json), a.domains, a.model)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, choices=list(EMBEDDED_MODELS),
                    help="the model compressed (default smollm2); one --out folder per model")
    ap.add_argument("--out", help="results folder (default bench/domains for smollm2, "
                                  "bench/domains-MODEL for another model)")
    ap.add_argument("--rows", nargs="+", help=f"rows to run (default {ROWS}); see parse_row")
    ap.add_argument("--seed", type=int, default=0, help="of the calibration windows")
    ap.add_argument("--domains", nargs="+", help="evaluate only these (default: every domain)")
    ap.add_argument("--table", action="store_true", help="print the table of what has run")
    ap.add_argument("--include", nargs="+", default=[],
                    help="more OUT folders whose rows join the table (runs made side by side)")
    ap.add_argument("--partial", action="store_true",
                    help="in the table, also rows stopped midway (the domains they reached)")
    ap.add_argument("--write", action="store_true", help="write it into benchmarks/RESULTS.md")
    args = ap.parse_args()
    out = Path(args.out or ("bench/domains" if args.model == DEFAULT_MODEL
                            else f"bench/domains-{args.model}"))
    if not args.table:
        run(out, args.rows or ROWS, args.seed, args.domains, args.model)
    model = _folder_model(out) or args.model
    data = _load(out / "results.json")
    for other in args.include:
        if not (Path(other) / "results.json").exists():
            raise SystemExit(f"--include {other}: no results.json there")
        if (theirs := _folder_model(Path(other))) != model:
            raise SystemExit(f"--include {other}: rows of {theirs!r}, this table is {model!r}'s")
        data["rows"] += _load(Path(other) / "results.json")["rows"]
    if args.partial:  # rows stopped midway, marked as such
        done = {(r["row"], r["seed"]) for r in data["rows"]}
        for folder in [out, *map(Path, args.include)]:
            for f in sorted((folder / "partial").glob("*.json")):
                r = json.loads(f.read_text())
                if (r["row"], r["seed"]) not in done and r["ppl"]:
                    data["rows"].append({**r, "row": r["row"] + " (stopped)"})
    text = table(data)
    print(text)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from _results import write_section

        meta = data.get("meta", {})
        commits = sorted({r["commit"][:10] for r in data["rows"]})
        body = (f"{text}\n\nCommits {', '.join(commits)}, CPU flags "
                f"{' '.join(meta.get('cpu_flags', []))}; calibration {SAMPLES} x {SEQLEN} "
                f"tokens (the first K of them in an n=K row), the seeds each row lists; "
                f"{meta.get('evaluation')}. A cell worse than its grid's baseline "
                f"({', '.join(BASELINES.values())}) is bold; ± is half the range over seeds. "
                f"compress (s) is wall time on a shared 2-core machine, not a timing.")
        flag = "" if model == DEFAULT_MODEL else f" --model {model}"
        write_section(f"Domain suite: recipes x domains ({MODEL_NAMES[model]})",
                      f"OMP_NUM_THREADS=1 python benchmarks/domains.py{flag} --out {out}", body)


if __name__ == "__main__":
    main()

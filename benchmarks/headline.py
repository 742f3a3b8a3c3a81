"""The README's Results table and RESULTS.md's headline table, generated from results files.

Hand-typed tables drift: rows copied from runs of different commits and CPUs, a number that
is in no results file, a peer row that is the oldest of several runs. Here every number of
the two tables comes from ``benchmarks/results/``: one ``fxcompress compare`` run per row
(commit, CPU flags, date and calibration seed recorded beside it) and one recorded
llm-compressor run per row (the latest that has both texts), and the text between the
``<!-- headline:begin -->`` / ``<!-- headline:end -->`` markers (README.md) and
``<!-- headline-results:begin -->`` / ``-end`` (benchmarks/RESULTS.md) is rewritten from
them. ``--check`` (run by ``tests/test_headline.py``) fails when that text differs from what
the files give, so a hand edit of a number fails the test suite.

    # one compare run at a clean commit, recorded with where it ran
    OMP_NUM_THREADS=1 fxcompress compare --recipes ... --seed 0 --out DIR
    python benchmarks/headline.py record DIR --commit COMMIT --seed 0 --command "..."
    python benchmarks/headline.py write     # rewrite the marker blocks
    python benchmarks/headline.py --check   # exit 1 if README/RESULTS differ from the files

A claimed gain needs its spread: the OWL rows (SparseGPT 50 % with and without OWL) are
reported as mean and min-max over every recorded calibration seed, and the text says whether
the gain is outside that spread.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import hashlib
import json
import re
import sys
from pathlib import Path
from statistics import mean
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _cpu import FLAGS, cpu_flags  # noqa: E402
from _results import read_block, replace_block  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OURS = ROOT / "benchmarks" / "results" / "headline_fxcompress.json"
PEER = ROOT / "benchmarks" / "results" / "headline_llmcompressor.json"
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
README_BLOCK, RESULTS_BLOCK = "headline", "headline-results"

# (label, fxcompress recipe, its round-to-nearest / magnitude baseline), in table order
ROWS = [("GPTQ w4 g64", "gptq-w4g64", "rtn-w4g64"),
        ("GPTQ w3 g64", "gptq-w3g64", "rtn-w3g64"),
        ("SparseGPT 50 %", "sparsegpt-50", "magnitude-50"),
        ("SparseGPT 2:4", "sparsegpt-2:4", "magnitude-2:4"),
        ("GPTQ w4 per channel", "gptq-w4", "rtn-w4"),
        ("SparseGPT 2:4 + w4 g64", "sparsegpt-2:4+w4g64", "magnitude-2:4+rtn-w4g64")]
OWL, NO_OWL = "sparsegpt-50", "benchmarks/recipes/sparsegpt-50-no-owl.yaml"
HEADLINE_SEED = 0  # the seed of the ids the peer ran on
MIN_SEEDS = 3  # a gain is stated only with its spread over at least this many seeds
# dense perplexities on the same ids agree to float order (another CPU's kernels); other
# windows of the text would move them by percents
SAME_IDS_REL = 1e-4


class HeadlineError(ValueError):
    """The results files do not give what a table needs."""


# --- results files -------------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise HeadlineError(f"{path} does not exist")
    doc = json.loads(path.read_text())
    if not isinstance(doc.get("runs"), list):
        raise HeadlineError(f"{path}: expected an object with a 'runs' list")
    return doc


def _by_recipe(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["recipe"]: r for r in run["rows"]}


def our_run(runs: list[dict[str, Any]], recipe: str,
            prefer: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The run a row's ``recipe`` comes from: ``prefer`` (the row's own run) if it has it,
    else the latest run at the headline seed that has it; None where no run has it yet (the
    table then says so in that row)."""
    if prefer is not None and recipe in _by_recipe(prefer):
        return prefer
    found = [r for r in runs if r["seed"] == HEADLINE_SEED and recipe in _by_recipe(r)]
    return max(found, key=lambda r: r["date"]) if found else None


def peer_run(runs: list[dict[str, Any]], recipe: str) -> dict[str, Any]:
    """The latest peer run with both texts for ``recipe``: one run gives both numbers."""
    found = [r for r in runs if "ppl_moby" in r["rows"].get(recipe, {})]
    if not found:
        raise HeadlineError(f"no llm-compressor run has {recipe!r} on both texts ({PEER.name})")
    return max(found, key=lambda r: (r["date"], runs.index(r)))


def peer_dense(runs: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
    found = [r for r in runs if "dense" in r["rows"]]
    if not found:
        raise HeadlineError(f"no llm-compressor run has a dense row ({PEER.name})")
    run = max(found, key=lambda r: r["date"])
    return run["rows"]["dense"]["ppl"], run


# --- formatting ----------------------------------------------------------------------------


def ppl(x: float) -> str:
    """Perplexity as the tables print it: 2 decimals, whole numbers from 1000 on."""
    return f"{x:.0f}" if x >= 1000 else f"{x:.2f}"


def _best(ours: float, peer: float) -> tuple[str, str]:
    a, b = ppl(ours), ppl(peer)
    return (f"**{a}**", b) if ours < peer else (a, f"**{b}**") if peer < ours else (a, b)


def _span(values: list[float], fmt: str = ".2f") -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else \
        f"{lo:{fmt}}–{hi:{fmt}}"


class Labels:
    """Short names for runs (a, b, ... for fxcompress; P1, P2, ... for the peer), in order
    of first use, so a row names its runs and a footnote says where each ran."""

    def __init__(self, prefix: str, start: str) -> None:
        self.prefix, self.start, self.seen = prefix, start, []

    def __call__(self, run: dict[str, Any]) -> str:
        if run not in self.seen:
            self.seen.append(run)
        i = self.seen.index(run)
        return self.prefix + (chr(ord(self.start) + i) if self.start.isalpha()
                              else str(int(self.start) + i))


def _ours_note(label: str, run: dict[str, Any]) -> str:
    precision = sorted({r["precision"] for r in run["rows"] if r.get("precision")})
    note = (f"{label}: fxcompress {run['commit'][:7]}, {run['date'][:10]}, CPU "
            f"{' '.join(run['cpu_flags']) or 'without ' + '/'.join(FLAGS)}, "
            f"{run['threads']} thread, calibration seed {run['seed']}"
            + (f", calibration {'/'.join(precision)}" if precision else ""))
    return note + (f" ({run['source']})" if "source" in run else "")


def _peer_note(label: str, run: dict[str, Any]) -> str:
    return (f"{label}: llm-compressor run of {run['id']}, beside fxcompress {run['beside']}, "
            f"CPU {' '.join(run['cpu_flags'])}")


# --- the numbers ---------------------------------------------------------------------------


def headline_rows(ours: dict[str, Any], peer: dict[str, Any]) -> list[dict[str, Any]]:
    """Each table row's numbers and the runs they come from."""
    pdense, pdense_run = peer_dense(peer["runs"])
    out = []
    for label, recipe, baseline in ROWS:
        prun = peer_run(peer["runs"], recipe)
        row = {"label": label, "recipe": recipe, "peer_run": prun, "peer": prun["rows"][recipe],
               "peer_dense": pdense, "peer_dense_run": pdense_run,
               "peer_all": [r["rows"][recipe]["ppl"] for r in peer["runs"]
                            if recipe in r["rows"]]}
        run = our_run(ours["runs"], recipe)
        if run is None:
            out.append({**row, "run": None})
            continue
        base_run = our_run(ours["runs"], baseline, prefer=run)
        dense_run = our_run(ours["runs"], "dense", prefer=run)
        if dense_run is None:
            raise HeadlineError(f"no fxcompress run at seed {HEADLINE_SEED} has a dense row")
        dense = _by_recipe(dense_run)["dense"]
        mine = _by_recipe(run)[recipe]
        out.append({**row, "run": run, "ours": mine, "base_run": base_run,
                    "base": None if base_run is None else _by_recipe(base_run)[baseline],
                    "dense": dense, "dense_run": dense_run,
                    "gap": (mine["ppl"] - dense["ppl"]) / (row["peer"]["ppl"] - pdense)})
    if all(r["run"] is None for r in out):
        raise HeadlineError(f"no fxcompress run at seed {HEADLINE_SEED} has any headline row "
                            f"({OURS.name})")
    return out


def owl_study(ours: dict[str, Any]) -> dict[str, Any]:
    """SparseGPT 50 % with and without OWL at every recorded seed (each arm's latest run per
    seed); the gain is compared on the seeds that have both arms."""
    arms: dict[str, dict[int, dict[str, Any]]] = {OWL: {}, NO_OWL: {}}
    for run in sorted(ours["runs"], key=lambda r: r["date"]):
        rows = _by_recipe(run)
        for recipe, by_seed in arms.items():
            if recipe in rows and "ppl_other" in rows[recipe]:
                by_seed[run["seed"]] = {"run": run, "row": rows[recipe]}
    seeds = sorted(arms[OWL].keys() & arms[NO_OWL].keys())
    study: dict[str, Any] = {"seeds": seeds, "arms": arms,
                             "all_seeds": sorted(arms[OWL].keys() | arms[NO_OWL].keys())}
    for text in ("ppl", "ppl_other"):
        owl = [arms[OWL][s]["row"][text] for s in seeds]
        no = [arms[NO_OWL][s]["row"][text] for s in seeds]
        diffs = [a - b for a, b in zip(owl, no, strict=True)]
        study[text] = {"owl": owl, "no_owl": no, "diffs": diffs,
                       "overlap": bool(seeds) and min(no) <= max(owl) and min(owl) <= max(no)}
    return study


def _arm(study: dict[str, Any], recipe: str, text: str) -> str:
    by_seed = study["arms"][recipe]
    values = [by_seed[s]["row"][text] for s in sorted(by_seed)]
    return (f"{mean(values):.2f} ({_span(values)}) at seed(s) "
            f"{', '.join(map(str, sorted(by_seed)))}" if values else "not run")


def _owl_sentence(study: dict[str, Any]) -> str:
    """What the seeds say of OWL's gain, in words that the numbers decide."""
    seeds = study["seeds"]
    if len(seeds) < MIN_SEEDS:
        return (f"OWL's gain is not stated: both rows ran at {len(seeds)} calibration seed(s), "
                f"{MIN_SEEDS} needed. Recorded so far, SOTU / Moby-Dick, mean (min–max): with "
                f"OWL {_arm(study, OWL, 'ppl')} / {_arm(study, OWL, 'ppl_other')}; without "
                f"{_arm(study, NO_OWL, 'ppl')} / {_arm(study, NO_OWL, 'ppl_other')}")
    parts = []
    for text, name in (("ppl", "SOTU"), ("ppl_other", "Moby-Dick")):
        s = study[text]
        lower = sum(d < 0 for d in s["diffs"])
        verdict = ("inside the seed spread" if s["overlap"]
                   else "outside the seed spread")
        parts.append(f"{name} {mean(s['owl']):.2f} ({_span(s['owl'])}) with OWL against "
                     f"{mean(s['no_owl']):.2f} ({_span(s['no_owl'])}) without, mean (min–max) "
                     f"over calibration seeds {', '.join(map(str, seeds))}: with − without "
                     f"{mean(s['diffs']):+.2f} on average ({_span(s['diffs'], '+.2f')} per "
                     f"seed), {verdict}; OWL lower at {lower} of {len(seeds)} seeds")
    return "; ".join(parts)


def gap_span(rows: list[dict[str, Any]]) -> str:
    return _span([r["gap"] for r in rows if r["run"] is not None])


def _measured(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["run"] is not None]


NOT_RUN = "not run at the current defaults yet"


# --- the two blocks ------------------------------------------------------------------------


def _ids_note(rows: list[dict[str, Any]]) -> str:
    """Whether the peer ran on the same ids as our runs, as far as the files can tell."""
    runs = [r["run"] for r in _measured(rows)] + [r["dense_run"] for r in _measured(rows)]
    ours = {r["ids"]["eval"] for r in runs if "ids" in r}
    peer = {r["peer_run"].get("ids_sha256", {}).get("eval") for r in rows}
    if ours and peer == ours:
        return "the same token ids (sha256 of the ids checked)"
    dense, theirs = _measured(rows)[0]["dense"]["ppl"], rows[0]["peer_dense"]
    rel = abs(dense - theirs) / theirs
    return ("ids made the same way (seed-0 windows of the same pinned texts and tokenizer; the "
            "peer's ids were not kept, so not compared id for id); dense perplexity on SOTU "
            f"{dense:.4f} against the peer's {theirs:.4f}, "
            + (f"a relative difference of {rel:.0e}, float order, where other windows would "
               "differ by percents" if rel < SAME_IDS_REL else
               f"a relative difference of {rel:.1e}: NOT the same evaluation ids"))


def _cell(row: dict[str, Any] | None, key: str, fmt: str) -> str:
    return "—" if row is None or row.get(key) is None else format(row[key], fmt)


def _runs_cell(r: dict[str, Any], fx: Labels, pr: Labels) -> str:
    """The runs a row's numbers come from; the baseline's only where it is another run."""
    cell = fx(r["run"])
    others = [f"{what} {fx(run)}" for what, run in (("baseline", r["base_run"]),
                                                     ("dense", r["dense_run"]))
              if run is not None and run is not r["run"]]
    cell += f" ({', '.join(others)})" if others else ""
    return f"{cell}, {pr(r['peer_run'])}"


def readme_block(ours: dict[str, Any], peer: dict[str, Any]) -> str:
    rows, study = headline_rows(ours, peer), owl_study(ours)
    fx, pr = Labels("", "a"), Labels("P", "1")
    dense = _measured(rows)[0]["dense"]
    lines = [
        f"SmolLM2-135M, 128 × 512 SOTU calibration tokens, perplexity on 32 × 512 held-out SOTU "
        f"tokens (dense {dense['ppl']:.2f}) and on Moby-Dick (another domain; dense "
        f"{dense['ppl_other']:.2f}), fxcompress with its defaults and llm-compressor with its "
        f"defaults, {_ids_note(rows)}. Each row names the runs its numbers come from "
        "(below the table); generated by `benchmarks/headline.py` from `benchmarks/results/`:",
        "",
        "| recipe | fxcompress | llm-compressor | RTN / magnitude | Moby-Dick: fxcompress / "
        "llm-compressor / RTN-magnitude | runs |",
        "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["run"] is None:
            lines.append(f"| {r['label']} | — | {ppl(r['peer']['ppl'])} | — | — / "
                         f"{ppl(r['peer']['ppl_moby'])} / — | {NOT_RUN}; {pr(r['peer_run'])} |")
            continue
        a, b = _best(r["ours"]["ppl"], r["peer"]["ppl"])
        c, d = _best(r["ours"]["ppl_other"], r["peer"]["ppl_moby"])
        mark = " ¹" if r["recipe"] == OWL else ""
        base = r["base"] or {}
        lines.append(f"| {r['label']}{mark} | {a} | {b} | {_cell(base, 'ppl', '.2f')} | "
                     f"{c} / {d} / {_cell(base, 'ppl_other', '.2f')} | {_runs_cell(r, fx, pr)} |")
    lines += ["", "Runs: " + "; ".join([_ours_note(fx(r), r) for r in fx.seen]
                                       + [_peer_note(pr(r), r) for r in pr.seen]) + ".", "",
              f"¹ with OWL layerwise sparsity (the default for unstructured SparseGPT). "
              f"{_owl_sentence(study)}.", "",
              f"The perplexity gap to dense is {gap_span(rows)}× the peer's on SOTU "
              f"(the peer's dense {rows[0]['peer_dense']:.2f}); the peer's recorded runs of one "
              "row differ by up to "
              f"{max(max(r['peer_all']) / min(r['peer_all']) - 1 for r in rows):.0%} "
              "(benchmarks/RESULTS.md, headline)."]
    return "\n".join(lines)


def results_block(ours: dict[str, Any], peer: dict[str, Any]) -> str:
    rows, study = headline_rows(ours, peer), owl_study(ours)
    fx, pr = Labels("", "a"), Labels("P", "1")
    lines = [
        "| recipe | bits/w | sparsity | ppl fxc | ppl peer | gap ratio | baseline | Moby fxc | "
        "Moby peer | Moby baseline | wall s fxc | CPU s fxc | peak RSS fxc (MiB) | runs | "
        "peer's recorded runs of the row (SOTU) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        peer_all = f"{_span(r['peer_all'])} ({len(r['peer_all'])} runs)"
        if r["run"] is None:
            lines.append(f"| {r['recipe']} | | | — | {ppl(r['peer']['ppl'])} | | | | "
                         f"{ppl(r['peer']['ppl_moby'])} | | | | | {NOT_RUN}; "
                         f"{pr(r['peer_run'])} | {peer_all} |")
            continue
        o = r["ours"]
        lines.append(
            f"| {r['recipe']} | {_cell(o, 'bits_per_weight', '.2f')} | "
            f"{_cell(o, 'sparsity', '.0%')} | {ppl(o['ppl'])} | {ppl(r['peer']['ppl'])} | "
            f"{r['gap']:.2f} | {_cell(r['base'], 'ppl', '.2f')} | {ppl(o['ppl_other'])} | "
            f"{ppl(r['peer']['ppl_moby'])} | {_cell(r['base'], 'ppl_other', '.2f')} | "
            f"{_cell(o, 'seconds', '.0f')} | {_cell(o, 'cpu_seconds', '.0f')} | "
            f"{_cell(o, 'peak_rss_mib', '.0f')} | {_runs_cell(r, fx, pr)} | {peer_all} |")
    lines += ["", "Runs:", ""]
    lines += [f"- {_ours_note(fx(r), r)}: `{r['command']}`" for r in fx.seen]
    lines += [f"- {_peer_note(pr(r), r)}; source: {r['source']}" for r in pr.seen]
    lines += ["", f"Gap ratio: (fxc − dense) / (peer − the peer's dense "
              f"{rows[0]['peer_dense']:.4f}, run of {rows[0]['peer_dense_run']['id']}); "
              f"{gap_span(rows)} across the rows. Token ids: {_ids_note(rows)}. The peer's row "
              "is its latest recorded run with both texts; the last column is every recorded "
              "run of that row (benchmarks/results/headline_llmcompressor.json).", "",
              "OWL (SparseGPT 50 %, `sparsegpt-50` against "
              f"`{NO_OWL}`), one compare run per calibration seed:", "",
              "| seed | fxc run | SOTU with OWL | without | Moby-Dick with OWL | without |",
              "|---:|---|---:|---:|---:|---:|"]
    for s in study["all_seeds"]:
        owl, no = study["arms"][OWL].get(s), study["arms"][NO_OWL].get(s)
        runs = [e["run"] for e in (owl, no) if e is not None]
        where = "; ".join(dict.fromkeys(f"{r['commit'][:7]}, {r['date'][:10]}" for r in runs))
        lines.append(f"| {s} | {where} | {_cell(owl and owl['row'], 'ppl', '.2f')} | "
                     f"{_cell(no and no['row'], 'ppl', '.2f')} | "
                     f"{_cell(owl and owl['row'], 'ppl_other', '.2f')} | "
                     f"{_cell(no and no['row'], 'ppl_other', '.2f')} |")
    lines += ["", f"{_owl_sentence(study)}."]
    return "\n".join(lines)


# --- check / write / record ----------------------------------------------------------------


def blocks(ours_path: Path = OURS, peer_path: Path = PEER) -> dict[tuple[Path, str], str]:
    ours, peer = load(ours_path), load(peer_path)
    return {(README, README_BLOCK): readme_block(ours, peer),
            (RESULTS, RESULTS_BLOCK): results_block(ours, peer)}


def check(generated: dict[tuple[Path, str], str], quiet: bool = False) -> list[str]:
    """The blocks whose text differs from the results files (empty when all agree)."""
    stale = []
    for (path, name), body in generated.items():
        have = read_block(path.read_text(), name, str(path))
        if have != body.strip("\n"):
            stale.append(f"{path.name}:{name}")
            if not quiet:
                sys.stderr.writelines(difflib.unified_diff(
                    have.splitlines(True), (body.strip("\n") + "\n").splitlines(True),
                    f"{path.name} (as written)", f"{path.name} (from the results files)"))
    return stale


def write(generated: dict[tuple[Path, str], str]) -> None:
    for (path, name), body in generated.items():
        path.write_text(replace_block(path.read_text(), name, body, str(path)))


def ids_sha256(path: Path) -> str:
    import torch

    ids = torch.load(path, weights_only=True)
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()


def record(folder: Path, commit: str, seed: int, command: str, out: Path = OURS) -> None:
    """Add one finished ``fxcompress compare`` run to the results file, with where it ran."""
    rows = json.loads((folder / "results.json").read_text())
    settings = json.loads((folder / "settings.json").read_text())
    if settings["seed"] != seed:
        raise HeadlineError(f"{folder / 'settings.json'} says seed {settings['seed']}, "
                            f"not {seed}")
    wanted = {"samples": 128, "seqlen": 512, "windows": 32, "eval_seqlen": 512}
    if any(settings[k] != v for k, v in wanted.items()):
        raise HeadlineError(f"{folder} ran with {settings}, the headline needs {wanted}")
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise HeadlineError(f"--commit must be a full 40-digit commit, got {commit!r}")
    when = datetime.datetime.fromtimestamp((folder / "results.json").stat().st_mtime,
                                           datetime.timezone.utc)
    threads = {r["threads"] for r in rows}
    if len(threads) != 1:
        raise HeadlineError(f"rows ran at different thread counts {sorted(threads)}")
    doc = load(out) if out.exists() else {"runs": []}
    doc["runs"].append({
        "commit": commit, "date": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "seed": seed,
        "cpu_flags": cpu_flags(), "threads": threads.pop(), "command": command,
        "settings": settings,
        "ids": {k: ids_sha256(folder / f"{k}_ids.pt") for k in ("calib", "eval", "other")},
        "rows": rows})
    out.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if README.md / RESULTS.md differ from the results files")
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("write", help="rewrite the marker blocks from the results files")
    r = sub.add_parser("record", help="add a compare run to " + OURS.name)
    r.add_argument("folder", type=Path)
    r.add_argument("--commit", required=True, help="the full commit the run's code was at")
    r.add_argument("--seed", type=int, required=True, help="compare's --seed")
    r.add_argument("--command", required=True, help="the command line, for the record")
    args = ap.parse_args(argv)
    if args.cmd == "record":
        record(args.folder, args.commit, args.seed, args.command)
        return 0
    generated = blocks()
    if args.cmd == "write":
        write(generated)
        return 0
    if args.check:
        stale = check(generated)
        if stale:
            print(f"out of date with benchmarks/results/: {', '.join(stale)} (run "
                  "python benchmarks/headline.py write)", file=sys.stderr)
            return 1
        return 0
    for body in generated.values():
        print(body, end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

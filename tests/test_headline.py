"""The README's Results table and RESULTS.md's headline are what the results files give.

``benchmarks/headline.py`` writes both from ``benchmarks/results/``; these tests fail when
a number there is typed by hand (or a results file changes without the text), and check the
script's choices — which run a row takes, the seed spread behind a claimed gain — on
synthetic results.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _headline():
    spec = importlib.util.spec_from_file_location("headline", ROOT / "benchmarks" / "headline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


headline = _headline()


def test_readme_and_results_match_the_results_files():
    """The repository's tables, as committed, are the script's output (``--check``)."""
    assert headline.check(headline.blocks(), quiet=True) == []


def test_a_hand_typed_number_fails_the_check(tmp_path):
    generated = headline.blocks()
    body = generated[(headline.README, headline.README_BLOCK)]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n<!-- headline:begin -->\n{body}\n<!-- headline:end -->\nrest\n")
    assert headline.check({(readme, "headline"): body}, quiet=True) == []
    cell = next(line for line in body.splitlines() if line.startswith("| GPTQ w4 g64 |"))
    number = cell.split("|")[3].strip().strip("*")  # the peer's column
    edited = cell.replace(f"| {number} |", f"| {float(number) - 0.01:.2f} |", 1)
    assert edited != cell
    readme.write_text(readme.read_text().replace(cell, edited))
    assert headline.check({(readme, "headline"): body}, quiet=True) == ["README.md:headline"]


def _synthetic(rng: random.Random) -> tuple[dict, dict]:
    """Results files with fresh random perplexities: three seeds of the OWL pair."""
    recipes = ["dense"] + [r for _, a, b in headline.ROWS for r in (b, a)] + [headline.NO_OWL]

    def row(name: str) -> dict:
        return {"recipe": name, "ppl": 27.77 if name == "dense" else rng.uniform(30, 60),
                "ppl_other": 53.63 if name == "dense" else rng.uniform(60, 200),
                "seconds": 1.0, "cpu_seconds": 1.0, "threads": 1, "peak_rss_mib": 1.0,
                "bits_per_weight": 4.0, "sparsity": 0.0}

    def run(seed: int, date: str, names: list[str]) -> dict:
        return {"commit": "0" * 40, "date": date, "seed": seed, "cpu_flags": ["avx2"],
                "threads": 1, "command": "c", "ids": {"calib": "x", "eval": "y", "other": "z"},
                "rows": [row(n) for n in names]}

    ours = {"runs": [run(0, "2026-01-01T00:00:00Z", recipes),
                     run(1, "2026-01-02T00:00:00Z", ["dense", headline.OWL, headline.NO_OWL]),
                     run(2, "2026-01-03T00:00:00Z", ["dense", headline.OWL, headline.NO_OWL])]}
    peer = copy.deepcopy(headline.load(headline.PEER))
    return ours, peer


def test_the_owl_gain_is_stated_with_its_seed_spread():
    rng = random.Random(7)
    ours, peer = _synthetic(rng)
    study = headline.owl_study(ours)
    assert study["seeds"] == [0, 1, 2]
    owl = [next(r for r in run["rows"] if r["recipe"] == headline.OWL)["ppl"]
           for run in ours["runs"]]
    no = [next(r for r in run["rows"] if r["recipe"] == headline.NO_OWL)["ppl"]
          for run in ours["runs"]]
    assert study["ppl"]["owl"] == owl and study["ppl"]["no_owl"] == no
    sentence = headline._owl_sentence(study)
    assert f"{statistics.mean(owl):.2f} ({min(owl):.2f}–{max(owl):.2f}) with OWL" in sentence
    overlap = max(min(owl), min(no)) <= min(max(owl), max(no))
    assert ("inside the seed spread" in sentence.split(";")[0]) == overlap
    # a gain far outside the spread is called so
    for run in ours["runs"]:
        for r in run["rows"]:
            if r["recipe"] == headline.OWL:
                r["ppl"] = rng.uniform(20, 21)
            elif r["recipe"] == headline.NO_OWL:
                r["ppl"] = rng.uniform(40, 41)
    sentence = headline._owl_sentence(headline.owl_study(ours))
    assert "outside the seed spread; OWL lower at 3 of 3 seeds" in sentence
    # fewer seeds than needed: no gain stated
    ours["runs"] = ours["runs"][:2]
    assert "not stated" in headline._owl_sentence(headline.owl_study(ours))


def test_rows_take_one_run_each_and_the_peers_latest_run_with_both_texts():
    ours, peer = _synthetic(random.Random(3))
    later = copy.deepcopy(ours["runs"][0])
    later["date"], later["commit"] = "2026-02-01T00:00:00Z", "1" * 40
    later["rows"] = [r for r in later["rows"]
                     if r["recipe"] in ("dense", "gptq-w4g64", "rtn-w4g64")]
    ours["runs"].append(later)
    peer["runs"].append({"id": "newest, SOTU only", "date": "2099-01-01", "beside": "x",
                         "cpu_flags": [], "source": "s", "rows": {"gptq-w4g64": {"ppl": 1.0}}})
    rows = {r["recipe"]: r for r in headline.headline_rows(ours, peer)}
    assert rows["gptq-w4g64"]["run"]["commit"] == "1" * 40  # the later run of that row
    assert rows["gptq-w3g64"]["run"]["commit"] == "0" * 40
    assert rows["gptq-w4g64"]["peer"]["ppl"] != 1.0  # that peer run lacks Moby-Dick
    r = rows["sparsegpt-2:4"]
    want = (r["ours"]["ppl"] - r["dense"]["ppl"]) / (r["peer"]["ppl"] - r["peer_dense"])
    assert r["gap"] == pytest.approx(want, rel=1e-12)
    # a row missing from every run is shown as not run, not left out
    for run in ours["runs"]:
        run["rows"] = [x for x in run["rows"] if x["recipe"] != "gptq-w4"]
    text = headline.readme_block(ours, peer)
    assert "| GPTQ w4 per channel | — |" in text and headline.NOT_RUN in text


def test_record_refuses_a_seed_the_run_did_not_use(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps([{"recipe": "dense", "threads": 1}]))
    settings = {"seed": 1, "samples": 128, "seqlen": 512, "windows": 32, "eval_seqlen": 512}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(headline.HeadlineError, match="says seed 1, not 0"):
        headline.record(tmp_path, "0" * 40, 0, "cmd", out=tmp_path / "o.json")
    (tmp_path / "settings.json").write_text(json.dumps({**settings, "samples": 16}))
    with pytest.raises(headline.HeadlineError, match="the headline needs"):
        headline.record(tmp_path, "0" * 40, 1, "cmd", out=tmp_path / "o.json")

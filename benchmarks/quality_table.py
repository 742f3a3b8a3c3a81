"""The quality table: fxcompress's ``compare`` rows side by side with llm-compressor's.

Both sides must have run on the same token ids (``fxcompress compare`` saves them as
``calib_ids.pt`` / ``eval_ids.pt`` / ``other_ids.pt`` in its output folder;
``peer_llmcompressor.py`` takes them):

    OMP_NUM_THREADS=1 fxcompress compare --recipes ... --out DIR
    .venv-peer/bin/python benchmarks/peer_llmcompressor.py --threads 1 --model MODEL_DIR \\
        --calib DIR/calib_ids.pt --eval DIR/eval_ids.pt --extra-eval other=DIR/other_ids.pt \\
        --rows ... --out peer.json
    python benchmarks/quality_table.py --ours DIR/results.json --peer peer.json [--write]

Each side runs with its own defaults (what ``fxcompress compress --recipe NAME`` does; the
peer's modifiers with their defaults). Prints the table and the targets: the perplexity gap to
dense at most 0.75x the peer's on every shared row; on the held-out text of another domain,
every GPTQ/SparseGPT row better than its round-to-nearest/magnitude baseline and no worse
than the peer; never worse than before (``BEFORE``: the table this one replaces); wall time
at most 0.75x the peer's; peak memory at most 1.25x before.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BASELINE = {"gptq-w4g64": "rtn-w4g64", "gptq-w4": "rtn-w4", "gptq-w3g64": "rtn-w3g64",
            "sparsegpt-50": "magnitude-50", "sparsegpt-2:4": "magnitude-2:4",
            "sparsegpt-2:4+w4g64": "magnitude-2:4+rtn-w4g64"}
# perplexity and peak RSS of each row before this change (RESULTS.md, 2026-11-28; gptq-w4g64
# was then without act-order: 33.88, with it 31.03; the row's RSS after the memory fix, 2096)
BEFORE = {"gptq-w4g64": (31.03, 2096), "gptq-w4": (40.63, 2784), "gptq-w3g64": (59.01, 2851),
          "sparsegpt-50": (48.17, 2984), "sparsegpt-2:4": (87.81, 3108),
          "sparsegpt-2:4+w4g64": (98.40, 2744)}


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def table(ours: list[dict], peer: dict[str, dict]) -> tuple[str, list[str]]:
    by = {r["recipe"]: r for r in ours}
    dense, pdense = by["dense"], peer.get("dense")
    lines = ["| recipe | bits/w | sparsity | ppl fxc | ppl peer | gap ratio | other fxc | "
             "other peer | other baseline | time fxc (s) | time peer (s) | time ratio | "
             "peak RSS fxc (MiB) | peak RSS peer (MiB) |", "|---|" + "---:|" * 13]
    checks: dict[str, list[bool]] = {k: [] for k in ("gap", "baseline", "peer_other", "before",
                                                      "time", "memory", "memory_peer")}
    for r in ours:
        p, name = peer.get(r["recipe"]), r["recipe"]
        base = by.get(BASELINE.get(name, ""))
        gap = ratio = None
        if p is not None and name != "dense" and p.get("ppl"):
            gap = (r["ppl"] - dense["ppl"]) / (p["ppl"] - pdense["ppl"])
            ratio = r["seconds"] / p["seconds"] if p.get("seconds") else None
            checks["gap"].append(gap <= 0.75)
            checks["time"].append(ratio is not None and ratio <= 0.75)
            checks["memory_peer"].append(r["peak_rss_mib"] <= p["peak_rss_mib"])
            if "ppl_other" in r and "ppl_other" in p:
                checks["peer_other"].append(r["ppl_other"] <= p["ppl_other"])
        if base is not None and "ppl_other" in r:
            checks["baseline"].append(r["ppl_other"] < base["ppl_other"]
                                      and r["ppl"] < base["ppl"])
        if name in BEFORE:
            checks["before"].append(r["ppl"] <= BEFORE[name][0])
            checks["memory"].append(r["peak_rss_mib"] <= 1.25 * BEFORE[name][1])
        lines.append(
            f"| {name} | {r['bits_per_weight']:.2f} | {r['sparsity']:.0%} | {r['ppl']:.2f} | "
            f"{_cell(p and p.get('ppl'), '.2f')} | {_cell(gap, '.2f')} | "
            f"{_cell(r.get('ppl_other'), '.2f')} | {_cell(p and p.get('ppl_other'), '.2f')} | "
            f"{_cell(base and base.get('ppl_other'), '.2f')} | {r['seconds']:.0f} | "
            f"{_cell(p and p.get('seconds'), '.0f')} | {_cell(ratio, '.2f')} | "
            f"{r['peak_rss_mib']:.0f} | {_cell(p and p.get('peak_rss_mib'), '.0f')} |")

    def count(key: str) -> str:
        done = checks[key]
        return f"{sum(done)}/{len(done)}" + (" (met)" if done and all(done) else " (MISSED)")

    targets = [
        f"- perplexity gap to dense at most 0.75x the peer's on every shared row: "
        f"{count('gap')}",
        f"- other-domain text: GPTQ/SparseGPT better than round-to-nearest/magnitude (and on "
        f"the evaluation text): {count('baseline')}; no worse than the peer: "
        f"{count('peer_other')}",
        f"- never worse than before this change: {count('before')}",
        f"- wall time at most 0.75x the peer's: {count('time')}",
        f"- peak RSS at most 1.25x before: {count('memory')}; at most the peer's: "
        f"{count('memory_peer')}",
    ]
    return "\n".join(lines), targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", required=True, help="results.json of fxcompress compare")
    ap.add_argument("--peer", required=True, help="JSON of peer_llmcompressor.py")
    ap.add_argument("--other-name", default="ppl_moby",
                    help="the peer's key for the other-domain text (ppl_NAME)")
    ap.add_argument("--notes", default="", help="text to add under the table")
    ap.add_argument("--write", action="store_true", help="write benchmarks/RESULTS.md")
    args = ap.parse_args()
    ours = json.loads(Path(args.ours).read_text())
    peer = {p["row"]: p for p in json.loads(Path(args.peer).read_text()) if p.get("ppl")}
    for p in peer.values():  # the peer script records --extra-eval NAME=... as ppl_NAME
        if "ppl_other" not in p and args.other_name in p:
            p["ppl_other"] = p[args.other_name]
    body, targets = table(ours, peer)
    text = body + "\n\nTargets:\n" + "\n".join(targets) + ("\n\n" + args.notes if args.notes
                                                           else "")
    print(text)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from _results import write_section

        write_section("Quality: SmolLM2-135M, fxcompress vs llm-compressor",
                      "see benchmarks/quality_table.py (commands in the text)", text)


if __name__ == "__main__":
    main()

"""The quality table: fxcompress's ``compare`` rows side by side with llm-compressor's.

Both sides must have run on the same token ids (``fxcompress compare`` saves them as
``calib_ids.pt`` / ``eval_ids.pt`` in its output folder; ``peer_llmcompressor.py`` takes them):

    OMP_NUM_THREADS=1 fxcompress compare --recipes ... --out DIR
    .venv-peer/bin/python benchmarks/peer_llmcompressor.py --threads 1 --model MODEL_DIR \\
        --calib DIR/calib_ids.pt --eval DIR/eval_ids.pt --rows ... --out peer.json
    python benchmarks/quality_table.py --ours DIR/results.json --peer peer.json [--write]

Prints the table and the targets (GPTQ < RTN and SparseGPT < magnitude at every setting;
perplexity within 1 % of the peer on every shared row and better on at least half; time at
most half of the peer's with peak memory no higher).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BASELINE = {"gptq-w4g64": "rtn-w4g64", "gptq-w4g64-act": "rtn-w4g64", "gptq-w4": "rtn-w4",
            "gptq-w3g64": "rtn-w3g64", "sparsegpt-50": "magnitude-50",
            "sparsegpt-2:4": "magnitude-2:4"}


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def table(ours: list[dict], peer: dict[str, dict]) -> tuple[str, list[str]]:
    lines = ["| recipe | bits/w | sparsity | ppl fxcompress | ppl llm-compressor | Δ ppl | "
             "time fxc (s) | time llmc (s) | time ratio | CPU fxc (s) | CPU llmc (s) | "
             "peak RSS fxc (MiB) | peak RSS llmc (MiB) |", "|---|" + "---:|" * 12]
    shared, better, within, faster, leaner = 0, 0, 0, 0, 0
    for r in ours:
        p = peer.get(r["recipe"])
        delta = ratio = None
        if p is not None and r["recipe"] != "dense":
            delta = (r["ppl"] - p["ppl"]) / p["ppl"]
            ratio = r["seconds"] / p["seconds"] if p.get("seconds") else None
            shared += 1
            better += delta < 0
            within += delta <= 0.01
            faster += ratio is not None and ratio <= 0.5
            leaner += r["peak_rss_mib"] <= p["peak_rss_mib"]
        lines.append(
            f"| {r['recipe']} | {r['bits_per_weight']:.2f} | {r['sparsity']:.0%} | "
            f"{r['ppl']:.2f} | {_cell(p and p['ppl'], '.2f')} | "
            f"{_cell(delta and 100 * delta, '+.1f')}{'%' if delta is not None else ''} | "
            f"{r['seconds']:.0f} | {_cell(p and p.get('seconds'), '.0f')} | "
            f"{_cell(ratio, '.2f')} | {r.get('cpu_seconds', 0):.0f} | "
            f"{_cell(p and p.get('cpu_seconds'), '.0f')} | {r['peak_rss_mib']:.0f} | "
            f"{_cell(p and p['peak_rss_mib'], '.0f')} |")
    by = {r["recipe"]: r for r in ours}
    gaps = [f"{a} {by[a]['ppl']:.2f} vs {b} {by[b]['ppl']:.2f}"
            for a, b in BASELINE.items() if a in by and b in by]
    beats = all(by[a]["ppl"] < by[b]["ppl"] for a, b in BASELINE.items() if a in by and b in by)
    targets = [
        f"- GPTQ beats RTN and SparseGPT beats magnitude at every setting: "
        f"{'met' if beats else 'MISSED'} ({'; '.join(gaps)})",
        f"- perplexity within 1 % of llm-compressor on every shared row: {within}/{shared}; "
        f"better on at least half: {better}/{shared}",
        f"- time at most half of llm-compressor's: {faster}/{shared} rows; peak memory no "
        f"higher: {leaner}/{shared} rows",
    ]
    return "\n".join(lines), targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", required=True, help="results.json of fxcompress compare")
    ap.add_argument("--peer", required=True, help="JSON of peer_llmcompressor.py")
    ap.add_argument("--notes", default="", help="text to add under the table")
    ap.add_argument("--write", action="store_true", help="write benchmarks/RESULTS.md")
    args = ap.parse_args()
    ours = json.loads(Path(args.ours).read_text())
    peer = {p["row"]: p for p in json.loads(Path(args.peer).read_text()) if "ppl" in p}
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

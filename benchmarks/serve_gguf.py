"""SmolLM2 compressed by fxcompress, served by llama.cpp: perplexity from ``llama-perplexity``.

Two kinds of rows, on the held-out SOTU text and on Moby-Dick:

- each fxcompress recipe (``--recipes``), its checkpoint written as its own GGUF type (Q4_0,
  Q4_1, Q8_0, or the K-quants of a layer kind that registers an encoder for them) and as F32
  (dequantized): the quantized file should score within 1 % of its own F32 file, since it holds
  the same weights (exactly for Q4_0/Q8_0);
- llama.cpp's own pipeline on the dense model, the baseline for recipes on its grids: F32 GGUF,
  ``llama-imatrix`` on the calibration text, ``llama-quantize --imatrix`` to each of
  ``--kquants``.

Every command run is printed, and each number is kept in ``WORK/results.json`` as it is measured,
so an interrupted run continues where it stopped.

    FXCOMPRESS_LLAMA_CPP=path/to/llama.cpp PYTHONPATH=. python benchmarks/serve_gguf.py \\
        --work /tmp/serve_gguf --samples 16 --chunks 8 --imatrix-chunks 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf

from fxcompress import assets
from fxcompress.engines.llamacpp import find_binary, perplexity
from fxcompress.gguf.writer import write_gguf


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def compress(recipe: str, out: Path, samples: int) -> None:
    if (out / "config.json").is_file():
        print(f"# reusing {out}")
        return
    run([sys.executable, "-m", "fxcompress", "compress", "smollm2", "--recipe", recipe,
         "--samples", str(samples), "--out", str(out), "--quiet"])


def export(source: Path, out: Path, dtype: str | None) -> Path:
    if not out.is_file():
        print(f"$ fxcompress export {source} --gguf {out} --dtype {dtype or 'auto'}", flush=True)
        write_gguf(source, out, dtype=dtype)
    return out


def weight_types(file: Path) -> str:
    """The ggml types of the blocks' matrices, most frequent first (e.g. ``Q4_K+Q6_K``)."""
    kinds: dict[str, int] = {}
    for t in gguf.GGUFReader(file).tensors:
        if t.name.startswith("blk.") and not t.name.endswith("norm.weight"):
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return "+".join(sorted(kinds, key=lambda k: -kinds[k]))


class Results:
    """Perplexities measured so far, by file and text (``results.json`` in the work folder)."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.data = json.loads(file.read_text()) if file.is_file() else {}

    def ppl(self, gguf_file: Path, text: str, path: Path, args: argparse.Namespace) -> float:
        key = f"{gguf_file.name}|{text}|{args.seqlen}x{args.chunks}"
        if key not in self.data:
            print(f"$ llama-perplexity -m {gguf_file} -f {path} -c {args.seqlen} --chunks "
                  f"{args.chunks} -t {args.threads}", flush=True)
            start = time.time()
            report = perplexity(gguf_file, text=path, seqlen=args.seqlen, windows=args.chunks,
                                llama_cpp=args.llama_cpp, threads=args.threads)
            # merged into what is on disk: runs for other recipes may share the work folder
            on_disk = json.loads(self.file.read_text()) if self.file.is_file() else {}
            self.data = on_disk | self.data | {key: report.ppl}
            self.file.write_text(json.dumps(self.data, indent=1))
            print(f"#   {report.ppl:.4f} ({time.time() - start:.0f} s)", flush=True)
        return self.data[key]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path, help="folder for checkpoints and GGUFs")
    p.add_argument("--recipes", default="gptq-q4_0,gptq-q4_1,gptq-q8_0")
    p.add_argument("--kquants", default="Q4_K_M,Q3_K_M", help="llama.cpp baselines or 'none'")
    p.add_argument("--samples", type=int, default=16, help="fxcompress calibration windows")
    p.add_argument("--imatrix-chunks", type=int, default=128,
                   help="llama-imatrix chunks of 512 tokens (fxcompress: samples x 512)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--chunks", type=int, default=32, help="llama-perplexity chunks per text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-cpp", default=os.environ.get("FXCOMPRESS_LLAMA_CPP"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = assets.smollm2(progress=False)
    sotu = assets.sotu(progress=False)
    texts = {"sotu": sotu / "evaluation.txt", "moby": assets.moby_dick(progress=False)}
    results = Results(args.work / "results.json")
    rows = []
    for recipe in filter(None, args.recipes.split(",")):
        ckpt = args.work / recipe
        compress(recipe, ckpt, args.samples)
        files = [export(ckpt, args.work / f"{recipe}.gguf", None),
                 export(ckpt, args.work / f"{recipe}.F32.gguf", "f32")]
        rows.append((recipe, *files))
    if args.kquants != "none":
        dense = export(model, args.work / "dense.F32.gguf", None)
        rows.append(("dense", dense, None))
        imatrix = args.work / f"imatrix-{args.imatrix_chunks}.gguf"
        if not imatrix.is_file():
            run([str(find_binary("llama-imatrix", args.llama_cpp)), "-m", str(dense), "-f",
                 str(sotu / "calibration.txt"), "-c", "512", "--chunks",
                 str(args.imatrix_chunks), "-t", str(args.threads), "-o", str(imatrix)])
        for kind in args.kquants.split(","):
            out = args.work / f"dense.{kind}.imatrix{args.imatrix_chunks}.gguf"
            if not out.is_file():
                run([str(find_binary("llama-quantize", args.llama_cpp)), "--imatrix",
                     str(imatrix), str(dense), str(out), kind, str(args.threads)])
            rows.append((f"llama.cpp {kind} (imatrix {args.imatrix_chunks}x512)", out, None))
    print(f"\n| model | GGUF weights | MiB | SOTU ppl | vs own F32 | Moby-Dick ppl | "
          f"vs own F32 |   (llama-perplexity -c {args.seqlen} --chunks {args.chunks})")
    print("|---|---|---|---|---|---|---|")
    for name, file, f32 in rows:
        cells = [name, weight_types(file), f"{file.stat().st_size / 2**20:.1f}"]
        for text, path in texts.items():
            ppl = results.ppl(file, text, path, args)
            ref = results.ppl(f32, text, path, args) if f32 is not None else None
            cells += [f"{ppl:.3f}", f"{ppl / ref - 1:+.2%} ({ref:.3f})" if ref else "-"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

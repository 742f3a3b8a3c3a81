"""Peak memory and wall time of in-memory vs streamed compression.

Each case runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own:

* ``smollm2-in-memory`` — ``from_pretrained`` + ``fxcompress.compile`` + ``fxcompress.save``;
* ``smollm2-streamed`` — ``fxcompress.streaming.compress_checkpoint`` from the HF folder;
* ``synthetic-streamed`` — a random-weight Llama of about 1.2 B parameters (4.9 GB fp32,
  built from a config and saved to disk once) streamed under ``max_memory="4GiB"``.

GPTQ w4: group 64 on SmolLM2 (its hidden size 576 is not a multiple of 128), group 128 on the
synthetic model. Calibration windows come from the SOTU calibration text. "baseline" is the
RSS after imports, before any model is touched.

    python benchmarks/scale.py [--cases smollm2,synthetic] [--samples 128] [--seqlen 512]
                               [--synthetic-samples 16] [--write]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYNTHETIC = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4,
                 tie_word_embeddings=False)


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _peak_mib() -> float:
    """Peak RSS of this process. ``ru_maxrss`` would do on a fresh process, but on Linux a
    child starts with its parent's RSS at fork as its ``ru_maxrss``; ``VmHWM`` is the high-water
    mark of the process's own address space."""
    try:
        return _status_mib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _calibration(samples: int, seqlen: int, vocab: int | None = None):
    from transformers import AutoTokenizer

    from fxcompress import assets
    from fxcompress.evaluate import calibration_samples

    tok = AutoTokenizer.from_pretrained(assets.smollm2(progress=False))
    text = assets.load_text(assets.sotu(progress=False) / "calibration.txt")
    ids = calibration_samples(tok, text, samples, seqlen, 0)
    return ids if vocab is None else ids % vocab


def synthetic_model(folder: Path) -> Path:
    """The random-weight ~1.2 B Llama, built once."""
    if (folder / "config.json").exists():
        return folder
    import torch
    import transformers as T

    torch.manual_seed(0)
    tmp = folder.with_name(folder.name + ".tmp")
    T.LlamaForCausalLM(T.LlamaConfig(**SYNTHETIC)).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def row(case: str, calibration: str, out: str, model_dir: str, threads: int) -> dict:
    import torch

    import fxcompress
    from fxcompress import GPTQ
    from fxcompress.streaming import compress_checkpoint

    if threads:
        torch.set_num_threads(threads)
    calib = torch.load(calibration)  # tokenized by the parent: not part of the peak
    baseline = _peak_mib()
    t = time.perf_counter()
    if case == "synthetic-streamed":
        compress_checkpoint(model_dir, calib, GPTQ(4, 128), out, max_memory="4GiB",
                            progress=False)
    elif case == "smollm2-streamed":
        compress_checkpoint(model_dir, calib, GPTQ(4, 64), out, progress=False)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        fxcompress.compile(model, calib, GPTQ(4, 64), progress=False)
        fxcompress.save(model, out)
    return {"case": case, "seconds": time.perf_counter() - t, "peak_mib": _peak_mib(),
            "baseline_mib": baseline, "threads": torch.get_num_threads()}


def _run(case: str, calibration: Path, out: Path, model_dir: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--row", case, "--calibration", str(calibration),
           "--out", str(out), "--model", str(model_dir), "--threads", str(threads)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{case} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _same(a: Path, b: Path) -> bool:
    import torch

    import fxcompress

    x, y = fxcompress.load(a).state_dict(), fxcompress.load(b).state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="smollm2,synthetic")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--synthetic-samples", type=int, default=16)
    ap.add_argument("--synthetic-dir", default=str(Path.home() / ".cache/fxcompress"
                                                   / "synthetic-llama-1.2b"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--calibration", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        print(json.dumps(row(args.row, args.calibration, args.out, args.model, args.threads)))
        return
    import torch

    from fxcompress import assets

    cases = args.cases.split(",")
    lines = ["| model (fp32 size) | case | calibration | max_memory | wall time (s) | "
             "peak RSS (MiB) | baseline RSS (MiB) | peak − baseline (MiB) |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    notes = []
    work = Path(tempfile.mkdtemp(prefix="fxcompress-scale-"))
    try:
        runs = []
        if "smollm2" in cases:
            folder = assets.smollm2(progress=False)
            calib = work / "calib-smollm2.pt"
            torch.save(_calibration(args.samples, args.seqlen), calib)
            for case, memory in (("smollm2-in-memory", "—"), ("smollm2-streamed", "—")):
                runs.append((f"SmolLM2-135M ({_size_mib(folder):.0f} MiB)", memory,
                             f"{args.samples} x {args.seqlen}",
                             _run(case, calib, work / case, folder, args.threads)))
                print(runs[-1], flush=True)
            same = _same(work / "smollm2-in-memory", work / "smollm2-streamed")
            notes.append(f"SmolLM2 streamed checkpoint identical to in-memory compile + save: "
                         f"{'yes' if same else 'NO'}.")
        if "synthetic" in cases:
            folder = synthetic_model(Path(args.synthetic_dir))
            calib = work / "calib-synthetic.pt"
            torch.save(_calibration(args.synthetic_samples, args.seqlen,
                                    SYNTHETIC["vocab_size"]), calib)
            runs.append((f"synthetic Llama 1.2B ({_size_mib(folder):.0f} MiB)", "4GiB",
                         f"{args.synthetic_samples} x {args.seqlen}",
                         _run("synthetic-streamed", calib, work / "synthetic", folder,
                              args.threads)))
            print(runs[-1], flush=True)
        for model, memory, calib, r in runs:
            lines.append(f"| {model} | {r['case']} | {calib} | {memory} | {r['seconds']:.0f} | "
                         f"{r['peak_mib']:.0f} | {r['baseline_mib']:.0f} | "
                         f"{r['peak_mib'] - r['baseline_mib']:.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = "\n".join(lines)
    print(table)
    print("\n".join(notes))
    if args.write:
        from benchmarks._results import write_section

        body = (f"GPTQ w4 (g64 on SmolLM2, g128 on the synthetic model); {r['threads']} CPU "
                f"thread(s). Wall time includes loading and writing. Peak RSS is the "
                f"subprocess's `ru_maxrss`; baseline is its RSS after imports and loading the "
                f"(pre-tokenized) calibration ids.\n\n"
                + table + "\n\n" + "\n".join(notes))
        write_section("Scale: in-memory vs streamed compression",
                      "python benchmarks/scale.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()

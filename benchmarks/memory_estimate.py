"""The memory estimate against the measured peak, in memory and streamed.

Each case runs in a fresh subprocess: import what every run imports (the model class;
``torch.export``, warmed up on a tiny module), load what the case needs (the model for
``compile``, nothing for the streamed path), hand freed memory back to the OS, reset the
peak-RSS mark (``/proc/self/clear_refs``), run, and read the peak (``VmHWM``) back.
"growth" is the peak above the RSS just before the run; "estimate" is what the run
estimated, before it started, that it would add (``Report.estimate``). The target:
estimate within ±25 % of the growth, and the streamed growth within 2× ``max_memory``.

Cases:

* ``narrow`` — a random Llama of 32 narrow layers (hidden 512, intermediate 1536, vocabulary
  512: ~400 MiB fp32) streamed with GPTQ w4 g128 under ``max_memory="100MiB"``, calibration
  batches of 2 samples (a batch's attention scores are 8 MiB per sample);
* ``smollm2-streamed`` / ``smollm2-in-memory`` — SmolLM2-135M, GPTQ w4 g64 (the defaults),
  SOTU calibration windows; in memory with ``max_memory`` unset, the model's weights paged in
  before the baseline (``from_pretrained`` maps the safetensors file: its pages become
  resident only when first read, which is loading, not compression).

    python benchmarks/memory_estimate.py [--cases narrow,smollm2-streamed,smollm2-in-memory]
                                         [--samples 32] [--threads 2] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NARROW = dict(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=32,
              num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
CHILD = r"""
import json, sys, time, torch
import fxcompress
from fxcompress import GPTQ
from fxcompress.osmem import release_freed_memory
from fxcompress.streaming import compress_checkpoint

case, model_dir, ids_file, out, budget = sys.argv[1:6]
ids = torch.load(ids_file)
method = GPTQ(4, 128) if case == "narrow" else GPTQ(4, 64)
recipe = {"lm_head": None, ".*": method}
# imports are not the run's: warm up what every run imports (the model class, torch.export)
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401
torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
model = None
if case.endswith("in-memory"):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for p in model.parameters():  # page in the weights (from_pretrained maps the file)
        p.detach().sum()

def kib(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key))

release_freed_memory()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = kib("VmRSS:")
t = time.perf_counter()
if model is None:
    report = compress_checkpoint(model_dir, ids, recipe, out, progress=False,
                                 max_memory=budget if budget != "-" else None,
                                 batch_size=2 if case == "narrow" else None)
else:
    report = fxcompress.compile(model, ids, recipe, progress=False).fxcompress_report
print(json.dumps({"growth": (kib("VmHWM:") - before) * 1024, "estimate": report.estimate,
                  "offload": report.offload, "seconds": time.perf_counter() - t}))
"""


def _narrow(folder: Path) -> None:
    import torch
    import transformers as T

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        T.LlamaForCausalLM(T.LlamaConfig(**NARROW)).save_pretrained(folder)


def _ids(case: str, samples: int, seqlen: int, folder: Path) -> Path:
    import torch

    file = folder / f"ids-{case.split('-')[0]}-{samples}x{seqlen}.pt"
    if file.exists():
        return file
    if case == "narrow":
        ids = torch.randint(0, NARROW["vocab_size"], (samples, seqlen),
                            generator=torch.Generator().manual_seed(0))
    else:
        from transformers import AutoTokenizer

        from fxcompress import assets
        from fxcompress.evaluate import calibration_samples

        tok = AutoTokenizer.from_pretrained(assets.smollm2())
        text = assets.load_text(assets.sotu() / "calibration.txt")
        ids = calibration_samples(tok, text, samples, seqlen, 0)
    torch.save(ids, file)
    return file


def run(case: str, samples: int, seqlen: int, threads: int, work: Path) -> dict:
    from fxcompress import assets

    if case == "narrow":
        model_dir, budget = work / "narrow", "100MiB"
        _narrow(model_dir)
    else:
        model_dir, budget = assets.smollm2(), "-"
    ids = _ids(case, samples, seqlen, work)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, case, str(model_dir), str(ids),
                              f"{tmp}/out", budget], capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(f"{case} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {"case": case, "samples": f"{samples} x {seqlen}", "max_memory": budget,
            "threads": threads, "wall": time.perf_counter() - t, **row}


def table(rows: list[dict]) -> str:
    from fxcompress.sizes import human

    lines = ["| case | calibration | max_memory | offload | run (s) | measured growth | "
             "estimate | estimate / measured |", "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['samples']} | {r['max_memory']} | "
                     f"{r['offload'] or 'in place'} | {r['seconds']:.0f} | "
                     f"{human(r['growth'])} | {human(r['estimate'])} | "
                     f"{r['estimate'] / r['growth']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="narrow,smollm2-streamed,smollm2-in-memory")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fxcompress-memory"))
    p.add_argument("--json", help="append each row to this file as it finishes")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        rows.append(run(case, args.samples, args.seqlen, args.threads, work))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    sys.path.insert(0, str(Path(__file__).parent))
    from _cpu import cpu_flags

    print(f"\nCPU flags: {' '.join(cpu_flags())}\n")
    print(table(rows))


if __name__ == "__main__":
    main()

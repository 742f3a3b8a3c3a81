"""CPU inference speed of compressed models, side by side with dense fp32 and bf16.

Two tables, each from one run:

* one linear layer, K = N = 4096, batch 1 / 16 / 128: fxcompress int4 g128 (eager and
  ``torch.compile``) against dense ``F.linear`` in fp32 and bf16;
* SmolLM2-135M greedy decoding of ``--tokens`` tokens, batch 1, KV cache on (a
  ``StaticCache``, so the compiled step has static shapes): tokens/s of dense fp32, dense bf16,
  GPTQ w4 g64 and SparseGPT 2:4 + w4 g64 (compressed models with fp32 and with bf16
  activations), eager and compiled; checkpoint size on disk, resident memory after loading and
  the peak memory of ``fxcompress.load``.

The machine may be shared, so variants are timed round-robin (every variant once per round)
and the tables show medians over rounds. Each model runs in its own process so its memory is
its own. Compressed checkpoints are made once (``fxcompress.compile`` on a small calibration
set: speed does not depend on it) and cached under the fxcompress cache folder.

    python benchmarks/cpu_inference.py [--tokens 128] [--rounds 5] [--write]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Idle OpenMP threads sleep instead of spinning: on a shared, oversubscribed machine spinning
# threads (aten's and those of Inductor's generated kernels) steal the cores the timed kernel
# needs. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CHECKPOINTS = {  # name -> named recipe (fxcompress recipes)
    "GPTQ w4 g64": "gptq-w4g64",
    "SparseGPT 2:4 + w4 g64": "sparsegpt-2:4+w4g64",
}
MODELS = [  # (row label, checkpoint or None for dense, activation dtype)
    ("dense fp32", None, "float32"),
    ("dense bf16", None, "bfloat16"),
    ("GPTQ w4 g64, fp32 activations", "GPTQ w4 g64", "float32"),
    ("GPTQ w4 g64, bf16 activations", "GPTQ w4 g64", "bfloat16"),
    ("SparseGPT 2:4 + w4 g64, fp32 activations", "SparseGPT 2:4 + w4 g64", "float32"),
    ("SparseGPT 2:4 + w4 g64, bf16 activations", "SparseGPT 2:4 + w4 g64", "bfloat16"),
]
PROMPT = "The state of the union is"


# ---------------------------------------------------------------------------- timing


def round_robin(variants: dict[str, Callable[[], object]], rounds: int, min_s: float
                ) -> dict[str, float]:
    """Median seconds per call of each variant, timing every variant once per round."""
    calls = {}
    for name, fn in variants.items():  # warm up, and size each variant's timed batch
        fn()
        t = time.perf_counter()
        fn()
        calls[name] = max(1, int(min_s / max(time.perf_counter() - t, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            times[name].append((time.perf_counter() - t) / calls[name])
    return {name: statistics.median(ts) for name, ts in times.items()}


# ---------------------------------------------------------------------------- one linear


def linear_table(rounds: int) -> str:
    import torch
    import torch.nn.functional as F

    from fxcompress.algorithms import Grid, rtn
    from fxcompress.modules import compressed_module

    torch.manual_seed(0)
    k = n = 4096
    w = torch.randn(n, k) / k**0.5
    wb = w.bfloat16()
    layer = compressed_module(rtn(w, Grid(4, 128)), None, torch.float32).eval()
    compiled = torch.compile(layer, fullgraph=True)
    rows = ["| batch | dense fp32 (ms) | dense bf16 (ms) | int4 g128 eager (ms) | "
            "int4 g128 compiled (ms) | int4 vs fp32 | int4 vs bf16 |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    with torch.no_grad():
        for batch in (1, 16, 128):
            x = torch.randn(batch, k)
            xb = x.bfloat16()
            t = round_robin({
                "fp32": lambda x=x: F.linear(x, w),
                "bf16": lambda xb=xb: F.linear(xb, wb),
                "eager": lambda x=x: layer(x),
                "compiled": lambda x=x: compiled(x),
            }, rounds, 0.2)
            best = min(t["eager"], t["compiled"])
            rows.append(f"| {batch} | {t['fp32'] * 1e3:.3f} | {t['bf16'] * 1e3:.3f} | "
                        f"{t['eager'] * 1e3:.3f} | {t['compiled'] * 1e3:.3f} | "
                        f"{t['fp32'] / best:.1f}x | {t['bf16'] / best:.1f}x |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


# ---------------------------------------------------------------------------- checkpoints


def checkpoint_dir(name: str) -> Path:
    from fxcompress import assets

    return assets.cache_dir() / "bench" / CHECKPOINTS[name]


def make_checkpoint(name: str, samples: int, seqlen: int) -> None:
    """Compress SmolLM2-135M with the named recipe and save it (run in a subprocess)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fxcompress
    from fxcompress import assets
    from fxcompress.evaluate import calibration_samples
    from fxcompress.recipe import resolve

    folder = assets.smollm2(progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = assets.load_text(assets.sotu(progress=False) / "calibration.txt")
    calib = calibration_samples(tokenizer, text, samples, seqlen, 0)
    fxcompress.compile(model, calib, resolve(CHECKPOINTS[name]), progress=False)
    fxcompress.save(model, checkpoint_dir(name), tokenizer=tokenizer)


# ---------------------------------------------------------------------------- decoding


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib() -> float:
    """Peak RSS since the last :func:`reset_peak` (VmHWM), else since the process started."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_model(checkpoint: str | None, dtype: str):
    """The model of one row, and the peak memory its loading added (MiB)."""
    import torch
    from transformers import AutoModelForCausalLM

    import fxcompress
    from fxcompress import assets

    reset_peak()
    before = rss_mib()
    if checkpoint is None:
        model = AutoModelForCausalLM.from_pretrained(assets.smollm2(progress=False),
                                                     dtype=getattr(torch, dtype))
    else:
        model = fxcompress.load(checkpoint_dir(checkpoint))
        load_peak = peak_mib() - before
        model = model.to(getattr(torch, dtype))
        gc.collect()
        return model.eval(), load_peak
    gc.collect()
    return model.eval(), peak_mib() - before


def decoder(model, step: Callable, prompt, tokens: int):
    """Greedy decoding of ``tokens`` tokens after ``prompt`` with a reusable StaticCache
    (reset per call, so a compiled step is never re-specialised)."""
    import torch
    from transformers import StaticCache

    n = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n + tokens)
    prefill_pos = torch.arange(n)
    positions = [torch.tensor([n + i]) for i in range(tokens)]

    def run():
        cache.reset()
        logits = step(prompt, cache, prefill_pos)
        out = [logits[:, -1].argmax(-1, keepdim=True)]
        for pos in positions[:-1]:
            out.append(step(out[-1], cache, pos)[:, -1].argmax(-1, keepdim=True))
        return torch.cat(out, 1)

    return run


def model_row(label: str, checkpoint: str | None, dtype: str, tokens: int, rounds: int
              ) -> dict:
    """One row of the decoding table (run in a subprocess)."""
    import warnings

    import torch
    from transformers import AutoTokenizer

    from fxcompress import assets

    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2(progress=False))
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    base = rss_mib()
    model, load_peak = load_model(checkpoint, dtype)

    def step(ids, cache, pos):
        return model(input_ids=ids, past_key_values=cache, cache_position=pos,
                     use_cache=True, logits_to_keep=1).logits

    compiled_step = torch.compile(step, fullgraph=True, dynamic=False)
    with torch.no_grad():
        eager = decoder(model, step, prompt, tokens)
        reference = eager()
        resident = rss_mib() - base  # weights paged in, cache and activations allocated
        compiled = decoder(model, compiled_step, prompt, tokens)
        same = torch.equal(reference, compiled())
        t = round_robin({"eager": eager, "compiled": compiled}, rounds, 0.0)
    if checkpoint is None:
        disk = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    else:
        disk = sum(f.stat().st_size for f in checkpoint_dir(checkpoint).glob("*.safetensors")
                   ) / 2**20
    return {"label": label, "disk_mib": disk, "resident_mib": resident,
            "load_peak_mib": load_peak, "eager_tok_s": tokens / t["eager"],
            "compiled_tok_s": tokens / t["compiled"], "same_tokens": same,
            "threads": torch.get_num_threads()}


def model_table(tokens: int, rounds: int, samples: int, seqlen: int) -> str:
    for name in CHECKPOINTS:
        if not (checkpoint_dir(name) / "config.json").is_file():
            print(f"making checkpoint {name} ...", flush=True)
            _subprocess(["--make", name, "--samples", str(samples), "--seqlen", str(seqlen)])
    rows = ["| model | size on disk (MiB) | resident, eager (MiB) | peak added by load "
            "(MiB) | eager tok/s | compiled tok/s | same tokens |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for label, checkpoint, dtype in MODELS:
        spec = json.dumps([label, checkpoint, dtype])
        r = json.loads(_subprocess(["--row", spec, "--tokens", str(tokens), "--rounds",
                                    str(rounds)]).strip().splitlines()[-1])
        rows.append(f"| {label} | {r['disk_mib']:.0f} | {r['resident_mib']:.0f} | "
                    f"{r['load_peak_mib']:.0f} | {r['eager_tok_s']:.1f} | "
                    f"{r['compiled_tok_s']:.1f} | {'yes' if r['same_tokens'] else 'no'} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def _subprocess(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


# ---------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=32, help="calibration samples")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration sample length")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--write", action="store_true", help="write benchmarks/RESULTS.md")
    ap.add_argument("--make", help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        make_checkpoint(args.make, args.samples, args.seqlen)
        return
    if args.row:
        print(json.dumps(model_row(*json.loads(args.row), args.tokens, args.rounds)))
        return
    import torch

    load = os.getloadavg()[0]
    parts = [f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
             f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; load "
             f"average {load:.1f} at the start (the machine is shared: numbers are medians of "
             f"{args.rounds} round-robin rounds and still noisy)."]
    if not args.skip_linear:
        parts.append("One linear, K = N = 4096 (median time per call; speed-ups against "
                     "the faster of eager and compiled int4):\n\n" + linear_table(args.rounds))
    if not args.skip_model:
        parts.append(f"SmolLM2-135M greedy decoding, {args.tokens} new tokens after a "
                     f"{len(PROMPT.split())}-word prompt, batch 1, StaticCache; tokens/s "
                     f"include the prefill. Size on disk: the safetensors files ("
                     f"dense rows: parameter bytes). Resident: RSS added by loading the model "
                     f"and decoding once in eager mode. Peak added by load: the peak RSS while "
                     f"loading (VmHWM, reset just before) above the RSS before it; dense rows: "
                     f"transformers from_pretrained of the fp32 folder, which maps the file "
                     f"lazily; compressed rows: fxcompress.load. 'same tokens': "
                     f"eager and compiled decode the same tokens.\n\n"
                     + model_table(args.tokens, args.rounds, args.samples, args.seqlen))
    body = "\n\n".join(parts)
    print("\n" + body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from _results import write_section

        command = "python benchmarks/cpu_inference.py --write" + (
            f" --tokens {args.tokens}" if args.tokens != 128 else "") + (
            f" --rounds {args.rounds}" if args.rounds != 5 else "")
        write_section("CPU inference (int4 linear, SmolLM2-135M decoding)", command, body)


if __name__ == "__main__":
    main()

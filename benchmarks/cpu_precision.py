"""What the CPU int4 kernel's bf16 arithmetic costs in accuracy, and what "exact" costs in time.

SmolLM2-135M-Instruct (fp32), its 210 decoder linears quantized to 4 bits, groups of 64 (RTN:
the kernel's arithmetic does not depend on how the codes were chosen), computed three ways:

* **dequantized** — ``fxcompress.checkpoint.model.decompress``: ``nn.Linear`` with the dequantized
  float32 weights (the reference);
* **fast** (default) — aten's int4 kernel, activations and scales in bf16;
* **exact** — ``fxcompress.set_precision(model, "exact")``: the canonical layout dequantized
  per call, float32 arithmetic.

Printed: the relative difference of the logits from the reference (‖Δ‖/‖ref‖ over all
positions), the perplexity of each on ``--windows`` windows of 512 evaluation tokens, and the
median time of one forward pass (batch 1; a 512-token prefill and a 1-token step, eager),
timed round-robin.

    python benchmarks/cpu_precision.py [--windows 8] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import fxcompress  # noqa: E402
from fxcompress import RTN, Recipe  # noqa: E402
from fxcompress.checkpoint.model import decompress  # noqa: E402
from fxcompress.evaluate import evaluation_windows, perplexity  # noqa: E402
from fxcompress.inputs import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _cpu import cpu_flags  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU flags: {' '.join(cpu_flags())}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    model, tokenizer, _ = load_model("smollm2", progress=False)
    from fxcompress import assets

    text = assets.load_text(assets.sotu(progress=False) / "evaluation.txt")
    ids = evaluation_windows(tokenizer, text, 512, args.windows)
    fxcompress.compile(model, ids[:1, :64], Recipe({"lm_head": None, ".*": RTN(4, 64)}),
                       progress=False)
    models = {"dequantized": decompress(copy.deepcopy(model)), "fast": model,
              "exact": fxcompress.set_precision(copy.deepcopy(model), "exact")}

    rows = {}
    with torch.no_grad():
        ref = [models["dequantized"](ids[i:i + 1]).logits.double() for i in range(len(ids))]
        for name, m in models.items():
            num = den = 0.0
            for i in range(len(ids)):
                d = m(ids[i:i + 1]).logits.double() - ref[i]
                num, den = num + d.square().sum().item(), den + ref[i].square().sum().item()
            ppl = perplexity(m, None, ids.flatten(), ids.shape[1], ids.shape[0],
                             progress=False).ppl
            rows[name] = {"rel": (num / den) ** 0.5, "ppl": ppl}
            print(f"{name}: logits rel. diff {rows[name]['rel']:.2e}, perplexity {ppl:.4f}",
                  flush=True)

        prefill, step = ids[:1], ids[:1, :1]
        times = {(n, s): [] for n in models for s in ("prefill", "step")}
        for _ in range(args.rounds):
            for name, m in models.items():
                for shape, x in (("prefill", prefill), ("step", step)):
                    t = time.perf_counter()
                    m(x)
                    times[name, shape].append(time.perf_counter() - t)

    print(f"\n| computed as | logits rel. diff from dequantized | perplexity "
          f"({args.windows} x 512) | prefill 512 (s) | 1-token step (ms) |")
    print("|---|---:|---:|---:|---:|")
    for name in models:
        r = rows[name]
        print(f"| {name} | {r['rel']:.1e} | {r['ppl']:.3f} | "
              f"{statistics.median(times[name, 'prefill']):.2f} | "
              f"{1e3 * statistics.median(times[name, 'step']):.0f} |")


if __name__ == "__main__":
    main()

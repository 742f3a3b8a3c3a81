"""Synthetic mixture-of-experts benchmark: compress, compare, decode on CPU.

A random Mixtral (8 experts, 2 per token; sizes below, ~450 MB in fp32) is compressed in a
fresh process per method — GPTQ w4g128 and its RTN baseline, SparseGPT 50 % and its magnitude
baseline — on random-token calibration. Each row reports the compression time, the process's
peak resident memory (VmHWM), the relative error of the logits against the dense model on
held-out random tokens, and the time of a one-token forward (decode-sized, batch 1, no cache)
of the compressed model against the dense one (median of repeats). Random weights and tokens:
the errors compare methods on the same objective, they say nothing about language quality.

Run: OMP_NUM_THREADS=1 python benchmarks/moe.py [--methods dense,gptq-w4g128,...]
(or at a quiet moment with all threads)
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

SIZES = dict(hidden_size=768, intermediate_size=1536, num_hidden_layers=4, vocab_size=1024,
             num_attention_heads=12, num_key_value_heads=4, num_local_experts=8,
             num_experts_per_tok=2)
METHODS = ["dense", "rtn-w4g128", "gptq-w4g128", "magnitude-50", "sparsegpt-50"]


def recipe(name: str):
    """Every linear and expert but the head (routers stay dense by themselves)."""
    from fxcompress import GPTQ, RTN, Magnitude, Recipe, SparseGPT

    method = {"rtn-w4g128": RTN(4, 128), "gptq-w4g128": GPTQ(4, 128),
              "magnitude-50": Magnitude(0.5), "sparsegpt-50": SparseGPT(0.5)}[name]
    return Recipe({"lm_head": None, ".*": method})


def build():
    import transformers as T

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.MixtralForCausalLM(T.MixtralConfig(**SIZES)).eval()


def _hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def _decode_ms(model, repeats: int = 15) -> float:
    ids = torch.randint(0, SIZES["vocab_size"], (1, 1))
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[3:])


def _block_ms(dense, compressed, tokens: int, repeats: int = 30) -> tuple[float, float]:
    """One experts block alone (layer 0), dense vs compressed, timed interleaved (so that
    load from other jobs hits both alike): median ms per call."""
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, SIZES["hidden_size"], generator=gen)
    ids = torch.stack([torch.randperm(SIZES["num_local_experts"], generator=gen)[:2]
                       for _ in range(tokens)])
    w = torch.softmax(torch.randn(tokens, 2, generator=gen), -1)
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.no_grad():
        for r in range(repeats + 3):
            for i, m in enumerate((dense, compressed)):
                t = time.perf_counter()
                m(x, ids, w)
                if r >= 3:
                    times[i].append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


def child(name: str) -> dict:
    import fxcompress

    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, SIZES["vocab_size"], (32, 128), generator=gen)
    held = torch.randint(0, SIZES["vocab_size"], (4, 128), generator=gen)
    model = build()
    dense_experts = copy.deepcopy(model.model.layers[0].mlp.experts)
    with torch.no_grad():
        ref = model(input_ids=held, use_cache=False).logits
    dense_ms = _decode_ms(model)
    row = {"method": name, "dense_decode_ms": dense_ms}
    if name != "dense":
        t = time.perf_counter()
        fxcompress.compile(model, calib, recipe(name), progress=False)
        row["seconds"] = time.perf_counter() - t
        with torch.no_grad():
            y = model(input_ids=held, use_cache=False).logits
        row["rel_err"] = ((y - ref).norm() / ref.norm()).item()
        row["decode_ms"] = _decode_ms(model)
        experts = model.model.layers[0].mlp.experts
        row["block"] = {t: _block_ms(dense_experts, experts, t) for t in (1, 32)}
    row["peak_rss"] = _hwm()
    return row


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _cpu import cpu_flags

    flags = cpu_flags()
    params = sum(p.numel() for p in build().parameters())
    print(f"# synthetic Mixtral {SIZES}: {params / 1e6:.0f}M parameters, "
          f"{4 * params / 2**20:.0f} MiB fp32; torch {torch.__version__}; threads "
          f"{torch.get_num_threads()}; CPU flags {' '.join(flags)}; load average "
          f"{os.getloadavg()[0]:.2f}")
    print("| method | compress s | peak RSS MiB | logits rel. err vs dense | decode ms "
          "(1 token) | dense decode ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    blocks = []
    chosen = sys.argv[sys.argv.index("--methods") + 1].split(",") \
        if "--methods" in sys.argv else METHODS
    for name in chosen:
        out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if name == "dense":
            print(f"| dense | - | {r['peak_rss'] / 2**20:.0f} | - | - | "
                  f"{r['dense_decode_ms']:.1f} | 1.00 |", flush=True)
            continue
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_rss'] / 2**20:.0f} | "
              f"{r['rel_err']:.4f} | {r['decode_ms']:.1f} | {r['dense_decode_ms']:.1f} | "
              f"{r['dense_decode_ms'] / r['decode_ms']:.2f} |", flush=True)
        blocks.append((name, r["block"]))
    print("\nOne experts block alone (layer 0: 8 experts, 2 per token), dense (transformers "
          "grouped_mm, fp32) vs compressed, timed interleaved, median ms:\n")
    print("| method | tokens | dense ms | compressed ms | speed-up |")
    print("|---|---|---|---|---|")
    for name, block in blocks:
        for tokens, (d, c) in block.items():
            print(f"| {name} | {tokens} | {d:.2f} | {c:.2f} | {d / c:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2])))
    else:
        main()

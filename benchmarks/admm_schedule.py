"""ADMM pruning's schedule on real layers: the layer loss and the held-out error of other
iteration counts, mask re-selection lengths and penalties than ``admm_prune``'s defaults.

The inputs of a few Gemma 3 270M layers are captured on 24 calibration windows of 512 SOTU
tokens; H comes from the first 16, the error is also measured on the other 8 (same domain,
unseen windows). Each setting prunes the same layer to 50 % with ``shrink=0.05`` (the
default's), without the dense-output target; both numbers are relative to the defaults'
(20 iterations, mask re-selected over the first 15, ``rho`` 1). A lower layer loss is what
ADMM optimizes; whether it carries to perplexity on other domains is measured by
``benchmarks/domains.py`` (benchmarks/RESULTS.md, "SparseGPT's ADMM schedule and shrink on
both models").

    OMP_NUM_THREADS=1 python benchmarks/admm_schedule.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from _cpu import cpu_flags  # noqa: E402

from fxcompress import suite  # noqa: E402
from fxcompress.algorithms.admm import admm_prune  # noqa: E402
from fxcompress.assets import load_text  # noqa: E402
from fxcompress.evaluate import calibration_samples  # noqa: E402
from fxcompress.inputs import load_model  # noqa: E402

LAYERS = ["model.layers.5.self_attn.q_proj", "model.layers.5.self_attn.o_proj",
          "model.layers.5.mlp.up_proj", "model.layers.5.mlp.down_proj",
          "model.layers.12.mlp.down_proj"]
# (iterations, re-selection iterations, rho); the first is admm_prune's default
SETTINGS = [(20, 15, 1.0), (40, 15, 1.0), (40, 30, 1.0), (100, 80, 1.0),
            (20, 15, 0.5), (40, 30, 0.5), (40, 30, 0.7), (60, 50, 0.7)]


def main() -> None:
    torch.set_num_threads(1)
    model, tok, _ = load_model("gemma3")
    ids = calibration_samples(tok, load_text(suite.texts("speeches").calibration), 24, 512, 0)
    inputs: dict[str, list[torch.Tensor]] = {}
    mods = dict(model.named_modules())
    for n in LAYERS:
        mods[n].register_forward_hook(
            lambda m, i, o, n=n: inputs.setdefault(n, []).append(
                i[0].detach().reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    print(f"CPU flags: {' '.join(cpu_flags())}; one thread\n")
    print("| layer | iterations | re-selection | rho | layer loss | held-out error | time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in LAYERS:
        x = torch.cat(inputs[n])
        fit, held = x[:16 * 512], x[16 * 512:]
        h = 2 * fit.T @ fit / fit.shape[0]
        w = mods[n].weight.detach().float()
        base = None
        for iters, reselect, rho in SETTINGS:
            t = time.perf_counter()
            c = admm_prune(w, h, 0.5, rho=rho, iters=iters, reselect=reselect, shrink=0.05)
            dt = time.perf_counter() - t
            err = ((held @ (w - c.values).T) ** 2).mean().item()
            base = base or (c.loss, err)
            print(f"| {n.removeprefix('model.')} | {iters} | {reselect} | {rho} | "
                  f"{c.loss / base[0]:.4f} | {err / base[1]:.4f} | {dt:.1f} |", flush=True)


if __name__ == "__main__":
    main()

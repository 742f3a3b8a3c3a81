"""Gradual pruning inside your own training loop: 25 %, train, 50 %, train.

``fxcompress.compile`` is an ordinary function call, so it can run at any step of a loop, on
the live model, calibrating on the next few batches of the training stream. After it the
pruned linears are ``SparseLinear`` modules (new parameters: build the optimizer again), and
training just continues — the backward masks the weight gradient, so AdamW keeps the pattern.
To prune further, ``fxcompress.training.densify`` turns them back into ``nn.Linear`` holding
the pruned weights (zeros included), and ``compile`` runs again at the higher sparsity.

    python examples/gradual_pruning.py            # SmolLM2-135M
    python examples/gradual_pruning.py --steps 5 --calibration-batches 4 --eval-windows 4
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import fxcompress
from fxcompress import SparseGPT, SparseLinear
from fxcompress.assets import smollm2, sotu
from fxcompress.evaluate import calibration_samples, perplexity
from fxcompress.training import densify


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", type=float, nargs="+", default=[0.25, 0.5],
                   help="sparsities to prune to, one per phase")
    p.add_argument("--steps", type=int, default=20, help="training steps after each pruning")
    p.add_argument("--calibration-batches", type=int, default=16,
                   help="batches of the training stream each pruning calibrates on")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-windows", type=int, default=16, help="windows of 512 tokens")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args()


def batches(tokenizer, text: str, batch: int, seqlen: int) -> Iterator[torch.Tensor]:
    """An endless stream of random training batches ``(batch, seqlen)`` from ``text``."""
    seed = 1
    while True:
        yield from calibration_samples(tokenizer, text, 64 * batch, seqlen, seed).split(batch)
        seed += 1


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    embedding = model.get_input_embeddings().weight
    params = [p for p in model.parameters() if p is not embedding]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def sparsity(model: nn.Module) -> float:
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    if not layers:
        return 0.0
    return sum((~m.mask).sum().item() for m in layers) / sum(m.mask.numel() for m in layers)


def main() -> None:
    args = arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir, text_dir = smollm2(), sotu()
    train_text = (text_dir / "calibration.txt").read_text()
    eval_text = (text_dir / "evaluation.txt").read_text()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stream = batches(tokenizer, train_text, args.batch, args.seqlen)
    rows: list[tuple[str, float, float]] = []

    def record(stage: str) -> None:
        ppl = perplexity(model, tokenizer, eval_text, 512, args.eval_windows, progress=False)
        rows.append((stage, sparsity(model), ppl.ppl))
        print(f"{stage:<32} sparsity {sparsity(model):6.1%}  perplexity {ppl.ppl:8.2f}",
              flush=True)

    record("dense")
    model.train()
    previous: dict[str, torch.Tensor] = {}
    for target in args.schedule:
        # --- prune, calibrating on the next batches of the training stream -------------
        t = time.perf_counter()
        densify(model)  # SparseLinear -> nn.Linear (no-op the first time)
        calibration = [next(stream) for _ in range(args.calibration_batches)]
        fxcompress.compile(model, calibration, SparseGPT(target), progress=False)
        masks = {n: m.mask for n, m in model.named_modules() if isinstance(m, SparseLinear)}
        if previous:
            still = sum((~previous[n] & ~masks[n]).sum().item() for n in masks)
            before = sum((~previous[n]).sum().item() for n in masks)
            print(f"  {still / before:.1%} of the weights pruned before are still pruned")
        previous = {n: m.clone() for n, m in masks.items()}
        record(f"pruned to {target:.0%} ({time.perf_counter() - t:.0f}s)")

        # --- an ordinary training loop, with a new optimizer for the new parameters ---
        opt = make_optimizer(model, args.lr)
        for step in range(args.steps):
            ids = next(stream)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 10 == 0:
                print(f"  step {step:3d} loss {loss.item():.3f}", flush=True)
        record(f"trained {args.steps} steps at {target:.0%}")

    print("\n| stage | sparsity | perplexity |\n|---|---|---|")
    for stage, s, ppl in rows:
        print(f"| {stage} | {s:.1%} | {ppl:.2f} |")


if __name__ == "__main__":
    main()

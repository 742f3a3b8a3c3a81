"""Recover the accuracy lost to one-shot pruning with a short fine-tune, in a plain loop, on CPU.

SmolLM2-135M-Instruct is pruned to 50 % unstructured sparsity with SparseGPT, then fine-tuned
with AdamW on windows of the calibration text (State of the Union addresses up to 2000).
``SparseLinear`` keeps the pattern by itself: its backward masks the weight gradient, and
AdamW never moves a zero weight whose gradient and moments are zero — checked at the end.
Perplexity is measured on the held-out text (addresses from 2001 on) before pruning, after
pruning and after fine-tuning.

    python examples/recover_after_pruning.py
    python examples/recover_after_pruning.py --threads 1  # on a CPU shared with other jobs
    python examples/recover_after_pruning.py --steps 10 --eval-windows 8 --no-results  # a look

The defaults (40 steps of 4 × 128 tokens, lr 2e-4) were chosen to fit a CPU budget: on a busy
2-core machine with ``--threads 1`` pruning took 14 min, fine-tuning 18 min and each
perplexity about 4 min. More steps recover more.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import fxcompress
from fxcompress import SparseGPT, SparseLinear
from fxcompress.assets import smollm2, sotu
from fxcompress.evaluate import calibration_samples, perplexity

ROOT = Path(__file__).resolve().parents[1]


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--calibration-samples", type=int, default=64,
                   help="windows of 512 tokens SparseGPT calibrates on")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of fine-tuning")
    p.add_argument("--batch", type=int, default=4, help="windows per step")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per training window")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eval-windows", type=int, default=32, help="windows of 512 tokens")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-results", action="store_true",
                   help="do not write the section of benchmarks/RESULTS.md")
    return p.parse_args()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the (tied) embedding: the pruned linears' weights and the norms.

    The 49152-row embedding is a fifth of the model; leaving it frozen saves its gradient and
    optimizer state and keeps a small fine-tuning set from overfitting the vocabulary.
    """
    embedding = model.get_input_embeddings().weight
    return [p for p in model.parameters() if p is not embedding]


def schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def fine_tune(model: nn.Module, windows: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """An ordinary PyTorch training loop; nothing fxcompress-specific in it."""
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, args.steps, warmup))
    model.train()
    losses, t0 = [], time.perf_counter()
    for step, batch in enumerate(windows.split(args.batch)):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            rate = (step + 1) / (time.perf_counter() - t0)
            print(f"  step {step:4d}  loss {loss.item():.3f}  lr {sched.get_last_lr()[0]:.2e}"
                  f"  {rate * 60:.1f} steps/min", flush=True)
    model.eval()
    return losses


def pattern_kept(model: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    """True when every layer has the mask it was pruned with and zeros wherever it is False."""
    return all(torch.equal(m.mask, masks[name]) and not m.weight[~m.mask].any()
               for name, m in model.named_modules() if isinstance(m, SparseLinear))


def main() -> None:
    args = arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir, text_dir = smollm2(), sotu()
    calibration = (text_dir / "calibration.txt").read_text()
    evaluation = (text_dir / "evaluation.txt").read_text()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def ppl() -> float:
        return perplexity(model, tokenizer, evaluation, seqlen=512,
                          windows=args.eval_windows).ppl

    times: dict[str, float] = {}
    dense = ppl()
    print(f"dense perplexity {dense:.2f}", flush=True)

    t = time.perf_counter()
    calib = calibration_samples(tokenizer, calibration, args.calibration_samples, 512, seed=0)
    fxcompress.compile(model, calib, SparseGPT(args.sparsity))
    times["prune"] = time.perf_counter() - t
    masks = {n: m.mask.clone() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    pruned = ppl()
    print(f"pruned perplexity {pruned:.2f} ({len(masks)} layers, {times['prune']:.0f}s)",
          flush=True)

    # fresh windows of the calibration text (another seed than the pruning samples)
    windows = calibration_samples(tokenizer, calibration, args.steps * args.batch,
                                  args.seqlen, seed=1)
    t = time.perf_counter()
    losses = fine_tune(model, windows, args)
    times["fine-tune"] = time.perf_counter() - t
    tuned = ppl()
    kept = pattern_kept(model, masks)
    recovered = (pruned - tuned) / (pruned - dense)
    sparsity = sum((~m).sum().item() for m in masks.values()) / sum(
        m.numel() for m in masks.values())

    rows = [
        "| model | perplexity | recovered |",
        "|---|---|---|",
        f"| dense | {dense:.2f} | |",
        f"| SparseGPT {args.sparsity:.0%} (one-shot) | {pruned:.2f} | 0% |",
        f"| + fine-tuned {args.steps} steps | {tuned:.2f} | {recovered:.0%} |",
    ]
    table = "\n".join(rows)
    tokens = args.steps * args.batch * args.seqlen
    notes = (
        f"SmolLM2-135M-Instruct, fp32, CPU, {torch.get_num_threads()} torch thread(s). Pruning: "
        f"SparseGPT {args.sparsity:.0%} unstructured on all {len(masks)} decoder linears "
        f"(tied head dense; {sparsity:.1%} of their weights zero), "
        f"{args.calibration_samples} × 512-token calibration windows, {times['prune']:.0f} s. "
        f"Fine-tuning: AdamW (lr {args.lr:g}, weight decay {args.weight_decay:g}, warm-up + "
        f"cosine, grad-norm clip 1), {args.steps} steps × {args.batch} windows × "
        f"{args.seqlen} tokens = {tokens} tokens of the calibration text (seed 1, not the "
        f"pruning windows), embedding frozen, {times['fine-tune'] / 60:.1f} min; training "
        f"loss {losses[0]:.2f} → {sum(losses[-10:]) / min(10, len(losses)):.2f} (last 10). "
        f"Perplexity: evaluation text, {args.eval_windows} non-overlapping windows of 512 "
        f"tokens. Sparsity pattern after fine-tuning: "
        f"{'identical, pruned weights exactly 0' if kept else 'CHANGED'}. "
        f"Target (fine-tuning recovers at least half of the perplexity lost to pruning): "
        f"{'met' if recovered >= 0.5 else 'not met'} ({recovered:.0%})."
    )
    print()
    print(table)
    print()
    print(notes)
    if not args.no_results:
        sys.path.insert(0, str(ROOT))
        from benchmarks._results import write_section

        command = "python " + " ".join(["examples/recover_after_pruning.py", *sys.argv[1:]])
        write_section("Recovering accuracy after pruning (fine-tuning)", command,
                      f"{table}\n\n{notes}")


if __name__ == "__main__":
    main()

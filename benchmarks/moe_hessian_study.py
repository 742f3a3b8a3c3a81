"""Which tokens should an expert's Hessian come from? A measurement on real weights.

On SmolLM2-135M MoEfied into 8 experts, top-2 (``benchmarks/moefy.py``), for a few MoE blocks:
the block inputs of calibration text (State of the Union, years <= 2000) and of held-out text
(2001-2021) are recorded from the dense MoE model; every expert of a block is quantized with
GPTQ using one of the Hessians below, gate_up first and down on the outputs of the quantized
gate_up (sequential within the block, as fxcompress runs it), and the block's output on the
held-out tokens is compared with the dense block's: relative error ‖y_q − y‖ / ‖y‖.

Hessians of expert e:
  routed      rows routed to e                                   Σ x xᵀ over e's tokens
  weighted    rows routed to e, weighted by the router's p        Σ p² x xᵀ (the block-output
              (the block output is Σ_j p_j · expert_j(x))         objective of a linear expert)
  all         every token, e's intermediate computed on all       (llm-compressor's default)
  hybrid      routed, but all tokens for an expert that was routed fewer rows than its
              input features (a rank-deficient routed Hessian)
  RTN         no Hessian (the baseline)

Run: OMP_NUM_THREADS=1 python benchmarks/moe_hessian_study.py [--samples 64 --seqlen 128]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fxcompress import GPTQ
from fxcompress.algorithms import Hessian, Statistics, rtn

VARIANTS = ("routed", "weighted", "all", "hybrid", "rtn")


def _tokens(text: str, tok, samples: int, seqlen: int, offset: int = 0) -> torch.Tensor:
    ids = tok(text, return_tensors="pt").input_ids[0]
    need = samples * seqlen
    return ids[offset: offset + need].reshape(samples, seqlen)


def _block_inputs(model, ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    out: dict[int, list] = {i: [] for i in layers}
    hooks = [model.model.layers[i].mlp.register_forward_hook(
        lambda m, a, y, i=i: out[i].append(a[0].reshape(-1, a[0].shape[-1]).detach()))
        for i in layers]
    with torch.no_grad():
        for row in ids.split(8):
            model(input_ids=row, use_cache=False)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in out.items()}


def _route(moe, x):
    _, w, idx = moe.gate(x)
    return idx, w


def _forward(gate_up, down, x, idx, w):
    """The block's output with per-expert weights gate_up (E, 2I, H), down (E, H, I)."""
    y = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if len(tok):
            g, u = F.linear(x[tok], gate_up[e]).chunk(2, -1)
            y.index_add_(0, tok, F.linear(F.silu(g) * u, down[e]) * w[tok, slot, None])
    return y


def _hessian(rows: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    h = Hessian.zeros(rows.shape[1])
    h.add(rows if weight is None else rows * weight[:, None])
    return h.value(), h.count


def compress_block(moe, x, variant: str, method: GPTQ) -> tuple[torch.Tensor, torch.Tensor]:
    gu, dn = moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach()
    idx, w = _route(moe, x)
    new_gu, new_dn = gu.clone(), dn.clone()
    for e in range(gu.shape[0]):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if variant == "rtn":
            new_gu[e] = rtn(gu[e], method.grid).dense()
            new_dn[e] = rtn(dn[e], method.grid).dense()
            continue
        few = variant == "hybrid" and len(tok) < gu.shape[2]
        rows = x if variant == "all" or few else x[tok]
        p = w[tok, slot] if variant == "weighted" else None
        new_gu[e] = method.solve(gu[e], Statistics(_hessian(rows, p)[0], 1)).dense()
        g, u = F.linear(rows, new_gu[e]).chunk(2, -1)
        new_dn[e] = method.solve(dn[e], Statistics(_hessian(F.silu(g) * u, p)[0], 1)).dense()
    return new_gu, new_dn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--layers", default="0,7,15,23,29")
    ap.add_argument("--bits", default="4,3")
    args = ap.parse_args()
    import transformers as T
    from moefy import moefy

    from fxcompress import assets

    t0 = time.time()
    tok = T.AutoTokenizer.from_pretrained(assets.smollm2(progress=False))
    dense = T.AutoModelForCausalLM.from_pretrained(assets.smollm2(progress=False),
                                                   dtype=torch.float32)
    model = moefy(dense)
    folder = assets.sotu(progress=False)
    cal = _tokens((folder / "calibration.txt").read_text(), tok, args.samples, args.seqlen)
    ev = _tokens((folder / "evaluation.txt").read_text(), tok, 16, args.seqlen)
    layers = [int(v) for v in args.layers.split(",")]
    xc, xe = _block_inputs(model, cal, layers), _block_inputs(model, ev, layers)
    print(f"# {args.samples} x {args.seqlen} calibration tokens, 16 x {args.seqlen} held out; "
          f"set-up {time.time() - t0:.0f}s")
    print("| bits | layer | tokens/expert (min..max) | " + " | ".join(VARIANTS) + " |")
    print("|---|---|---|" + "---|" * len(VARIANTS))
    for bits in [int(b) for b in args.bits.split(",")]:
        method = GPTQ(bits, 64)
        means = {v: [] for v in VARIANTS}
        for i in layers:
            moe = model.model.layers[i].mlp
            idx, w = _route(moe, xc[i])
            counts = torch.bincount(idx.flatten(), minlength=moe.experts.num_experts)
            ref = _forward(moe.experts.gate_up_proj, moe.experts.down_proj, xe[i],
                           *_route(moe, xe[i]))
            errs = {}
            for v in VARIANTS:
                gu, dn = compress_block(moe, xc[i], v, method)
                y = _forward(gu, dn, xe[i], *_route(moe, xe[i]))
                errs[v] = ((y - ref).norm() / ref.norm()).item()
                means[v].append(errs[v])
            print(f"| {bits} | {i} | {counts.min().item()}..{counts.max().item()} | "
                  + " | ".join(f"{errs[v]:.4f}" for v in VARIANTS) + " |", flush=True)
        print(f"| {bits} | mean | | " + " | ".join(
            f"{sum(means[v]) / len(means[v]):.4f}" for v in VARIANTS) + " |", flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()

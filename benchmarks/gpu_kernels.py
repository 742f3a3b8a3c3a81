"""GPU check and speed table for the fxcompress Triton kernels, side by side with torch's own.

Run from the source tree on a CUDA machine (torch >= 2.11, triton >= 3.6):

    PYTHONPATH=. python benchmarks/gpu_kernels.py

1. correctness: every kernel (2/3/4/8-bit, groups and per-channel, sym/asym, act-order, bias,
   decode and prefill launch shapes, 2:4 float and 2:4 + int4) against the fp64 reference;
2. speed: median latency for M in {1, 16, 64, 256} and (K, N) in {(4096, 4096),
   (4096, 11008), (8192, 8192)} of fp16 cuBLAS ``F.linear``, torch's int4 tinygemm
   (``torch._weight_int4pack_mm``, bf16 activations), torch's 2:4 semi-structured fp16, and
   fxcompress int4 / int3 (group 128, asymmetric), 2:4 fp16 and 2:4 + int4 (group 128).
   Timed twice: ``triton.testing.do_bench`` (eager calls, launch overhead included) and
   ``do_bench_cudagraph`` (GPU time, as under CUDA graphs / torch.compile reduce-overhead).

Prints Markdown tables (speedup vs fp16 in parentheses) and the GPU name; exits with a message
when CUDA is unavailable. Whole run: a few minutes on an H100 (most of it Triton compilation
and autotuning).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (4096, 11008), (8192, 8192)]  # (K, N)
BATCHES = [1, 16, 64, 256]
GROUP = 128
DEADLINE_S = 7 * 60  # stop timing (and say so) past this, to stay inside the 8-minute budget
_START = time.time()


# ---------------------------------------------------------------------------------------------
# weights


def _random_quant(n: int, k: int, bits: int, group: int, sym: bool, device: str,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random codes (N, K) int64, scales (N, G) fp16 and zero points (N, G) uint8."""
    g = math.ceil(k / group)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    scale = (torch.rand(n, g, generator=gen) * 0.02 + 0.005).half()
    zero = (torch.full((n, g), 2 ** (bits - 1)) if sym
            else torch.randint(0, 2**bits, (n, g), generator=gen)).to(torch.uint8)
    return codes.to(device), scale.to(device), zero.to(device)


def _dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             col_groups: torch.Tensor) -> torch.Tensor:
    return (codes.double() - zero.double()[:, col_groups]) * scale.double()[:, col_groups]


def _mask_24(n: int, k: int, device: str, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(n, k).to(device)


# ---------------------------------------------------------------------------------------------
# 1. correctness


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def _check_quant(tk, pack, bits: int, group: int | None, sym: bool, m: int, n: int, k: int,
                 dtype: torch.dtype, bias: bool, act_order: bool, gen: torch.Generator) -> float:
    gs = group or k
    codes, scale, zero = _random_quant(n, k, bits, gs, sym, "cuda", gen)
    if dtype == torch.float32:
        scale = scale.float()
    col_groups = torch.arange(k, device="cuda") // gs
    g_idx = None
    if act_order:
        col_groups = col_groups[torch.randperm(k, generator=gen).to("cuda")]
        g_idx = col_groups.to(torch.int32)
    prep = tk.prepare_quant_weight(pack.pack(codes, bits), scale, zero, bits, k, gs, g_idx)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    b = torch.randn(n, generator=gen).to("cuda", dtype) if bias else None
    y = tk.quant_matmul(x, prep.weight, prep.scale, prep.zero, bits, prep.group_size, b,
                        prep.perm)
    ref = x.double() @ _dequant(codes, scale, zero, col_groups).T
    return _rel_err(y, ref if b is None else ref + b.double())


def _check_sparse(tk, pack, bits: int | None, m: int, n: int, k: int, dtype: torch.dtype,
                  bias: bool, gen: torch.Generator) -> float:
    mask = _mask_24(n, k, "cuda", gen)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    b = torch.randn(n, generator=gen).to("cuda", dtype) if bias else None
    if bits is None:
        w = (torch.randn(n, k, generator=gen).to("cuda", dtype) * mask).double()
        values, meta = pack.pack_24(w.to(dtype), mask)
        y = tk.sparse24_matmul(x, values, meta, b)
    else:
        codes, scale, zero = _random_quant(n, k, bits, GROUP, False, "cuda", gen)
        if dtype == torch.float32:
            scale = scale.float()
        w = _dequant(codes, scale, zero, torch.arange(k, device="cuda") // GROUP) * mask
        values, meta = pack.pack_24(codes, mask, bits=bits)
        y = tk.sparse24_quant_matmul(x, values, meta, scale, zero, bits, GROUP, b)
    ref = x.double() @ w.T
    return _rel_err(y, ref if b is None else ref + b.double())


def check_correctness() -> bool:
    """Run every kernel variant once against the fp64 reference; print a table."""
    from fxcompress.kernels import pack
    from fxcompress.kernels import triton_kernels as tk

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    gen = torch.Generator().manual_seed(0)
    n, k = 520, 1024  # ragged N
    cases: list[tuple[str, Callable[[], float], float]] = []
    for i, bits in enumerate((2, 3, 4, 8)):
        for j, m in enumerate((1, 7, 16, 100)):
            group = (32, 64, 128, None)[(i + j) % 4]
            sym, bias = (i + j) % 2 == 0, j % 2 == 1
            name = f"int{bits} g{group or 'K'} {'sym' if sym else 'asym'} M={m}"
            cases.append((name + (" +bias" if bias else ""), lambda b=bits, g=group, s=sym, m=m,
                          bb=bias: _check_quant(tk, pack, b, g, s, m, n, k, f16, bb, False, gen),
                          1e-2))
    for bits, m, dtype in [(4, 1, bf16), (4, 16, bf16), (3, 100, bf16), (4, 100, f16),
                           (3, 1, f16), (8, 40, bf16)]:
        cases.append((f"int{bits} g128 act-order M={m} {str(dtype)[6:]}",
                      lambda b=bits, m=m, d=dtype: _check_quant(tk, pack, b, 128, False, m, n, k,
                                                                d, True, True, gen), 1e-2))
    for bits, m in [(4, 1), (4, 100), (2, 16), (3, 1)]:  # fp32 activations: fp32 accumulation
        cases.append((f"int{bits} g64 M={m} fp32", lambda b=bits, m=m: _check_quant(
            tk, pack, b, 64, False, m, n, k, f32, True, False, gen), 1e-5))
    for bits, m, dtype, tol in [(None, 1, f16, 1e-2), (None, 16, bf16, 1e-2),
                                (None, 100, f16, 1e-2), (None, 5, f32, 1e-5), (4, 1, f16, 1e-2),
                                (4, 16, bf16, 1e-2), (4, 100, f16, 1e-2), (4, 3, f32, 1e-5),
                                (8, 1, f16, 1e-2), (2, 64, bf16, 1e-2)]:
        kind = "2:4 float" if bits is None else f"2:4+int{bits}"
        cases.append((f"{kind} M={m} {str(dtype)[6:]}", lambda b=bits, m=m, d=dtype:
                      _check_sparse(tk, pack, b, m, n, k, d, True, gen), tol))

    print("## Correctness (relative Frobenius error vs fp64 reference)\n")
    print("| case | rel. error | tolerance | ok |\n| --- | --- | --- | --- |")
    all_ok = True
    for name, run, tol in cases:
        try:
            err = run()
            ok = err < tol
            print(f"| {name} | {err:.2e} | {tol:.0e} | {'yes' if ok else '**NO**'} |")
        except Exception as e:  # report and go on: one broken variant must not hide the rest
            ok = False
            print(f"| {name} | {type(e).__name__}: {str(e)[:120]} | {tol:.0e} | **NO** |")
        all_ok &= ok
    print()
    return all_ok


# ---------------------------------------------------------------------------------------------
# 2. speed


def _methods(k: int, n: int, gen: torch.Generator) -> dict[str, Callable[[torch.Tensor], object]]:
    """Name -> function of an fp16 activation (M, K), for one weight shape."""
    from fxcompress.kernels import pack
    from fxcompress.kernels import triton_kernels as tk

    dev = "cuda"
    w16 = (torch.randn(n, k, generator=gen) * 0.02).to(dev, torch.float16)
    mask = _mask_24(n, k, dev, gen)
    codes, scale, zero = _random_quant(n, k, 4, GROUP, False, dev, gen)
    codes3, scale3, zero3 = _random_quant(n, k, 3, GROUP, False, dev, gen)
    w4 = tk.prepare_quant_weight(pack.pack(codes, 4), scale, zero, 4, k, GROUP)
    w3 = tk.prepare_quant_weight(pack.pack(codes3, 3), scale3, zero3, 3, k, GROUP)
    sp_values, sp_meta = pack.pack_24(w16 * mask, mask)
    sq_values, sq_meta = pack.pack_24(codes, mask, bits=4)
    methods: dict[str, Callable[[torch.Tensor], object]] = {
        "fp16 cuBLAS": lambda x: F.linear(x, w16),
    }
    try:  # tinygemm: uint8 (N, K/2) nibble pairs -> int4pack; bf16 activations only
        nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        w_tiny = torch._convert_weight_to_int4pack(nibbles, 8)
        sz = torch.stack([scale.float(), torch.zeros_like(scale.float())], -1)
        sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)
        methods["torch int4 tinygemm"] = lambda x: torch._weight_int4pack_mm(
            x.to(torch.bfloat16), w_tiny, GROUP, sz)
    except Exception as e:
        print(f"(tinygemm unavailable: {type(e).__name__}: {str(e)[:100]})")
    try:
        from torch.sparse import to_sparse_semi_structured

        w_semi = to_sparse_semi_structured(w16 * mask)
        methods["torch 2:4 fp16"] = lambda x: F.linear(x, w_semi)
    except Exception as e:
        print(f"(semi-structured 2:4 unavailable: {type(e).__name__}: {str(e)[:100]})")
    methods.update({
        "fx int4": lambda x: tk.quant_matmul(x, w4.weight, w4.scale, w4.zero, 4, w4.group_size),
        "fx int3": lambda x: tk.quant_matmul(x, w3.weight, w3.scale, w3.zero, 3, w3.group_size),
        "fx 2:4": lambda x: tk.sparse24_matmul(x, sp_values, sp_meta),
        "fx 2:4+int4": lambda x: tk.sparse24_quant_matmul(x, sq_values, sq_meta, scale, zero, 4,
                                                          GROUP),
    })
    return methods


def _time_us(fn: Callable[[], object], graph: bool) -> float:
    import triton.testing

    if graph:
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_speed() -> dict[tuple[str, int, int, int, str], float]:
    """Latency in µs, keyed by (mode, M, K, N, method)."""
    gen = torch.Generator().manual_seed(1)
    times: dict[tuple[str, int, int, int, str], float] = {}
    for k, n in SHAPES:
        methods = _methods(k, n, gen)
        for m in BATCHES:
            x = torch.randn(m, k, generator=gen).to("cuda", torch.float16)
            for name, fn in methods.items():
                if time.time() - _START > DEADLINE_S:
                    print(f"(deadline reached: skipped the rest from M={m}, K={k}, N={n})")
                    return times
                for mode in ("eager", "graph"):
                    try:
                        fn(x)  # compile / autotune outside the timed region
                        torch.cuda.synchronize()
                        times[(mode, m, k, n, name)] = _time_us(lambda f=fn, x=x: f(x),
                                                                mode == "graph")
                    except Exception as e:
                        print(f"({name} {mode} M={m} K={k} N={n} failed: "
                              f"{type(e).__name__}: {str(e)[:100]})")
        del methods
        torch.cuda.empty_cache()
    return times


def _speed_table(times: dict, mode: str) -> str:
    names = list(dict.fromkeys(key[4] for key in times if key[0] == mode))
    lines = ["| M | K | N | " + " | ".join(names) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for k, n in SHAPES:
        for m in BATCHES:
            base = times.get((mode, m, k, n, "fp16 cuBLAS"))
            cells = []
            for name in names:
                t = times.get((mode, m, k, n, name))
                if t is None:
                    cells.append("n/a")
                elif base is None or name == "fp16 cuBLAS":
                    cells.append(f"{t:.1f} µs")
                else:
                    cells.append(f"{t:.1f} µs ({base / t:.2f}×)")
            lines.append(f"| {m} | {k} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _targets(times: dict, mode: str) -> list[str]:
    """The speed goals of the kernels, met or missed."""
    def speedup(m: int, k: int, n: int, name: str) -> float | None:
        base, t = times.get((mode, m, k, n, "fp16 cuBLAS")), times.get((mode, m, k, n, name))
        return None if base is None or t is None else base / t

    goals = [("int4 M=1 (8192²) >= 3×", speedup(1, 8192, 8192, "fx int4"), 3.0),
             ("int4 M=16 (8192²) >= 2×", speedup(16, 8192, 8192, "fx int4"), 2.0),
             ("2:4+int4 M=1 (8192²) >= 4×", speedup(1, 8192, 8192, "fx 2:4+int4"), 4.0)]
    for k, n in SHAPES:
        for name in ("fx int4", "fx int3", "fx 2:4", "fx 2:4+int4"):
            goals.append((f"{name} M=256 ({k}×{n}) >= 0.8×", speedup(256, k, n, name), 0.8))
    def verdict(s: float | None, goal: float) -> str:
        return "n/a" if s is None else f"{s:.2f}× {'met' if s >= goal else 'MISSED'}"

    return [f"- {label}: {verdict(s, goal)}" for label, s, goal in goals]


def bench_compiled_decoder(device: str = "cuda", hidden: int = 2048, layers: int = 4,
                           dtype: torch.dtype = torch.float16) -> str:
    """``torch.compile(fullgraph=True)`` of a small Llama decoder whose linears are
    fxcompress int4 (RTN, group 128: speed does not depend on how codes were chosen): graph
    breaks (must be 0), agreement with eager, and forward latency at 1 and 256 tokens against
    the same decoder dense in fp16, eager and compiled."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    import fxcompress

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden,
                         intermediate_size=128 * round(hidden * 11 / 512),
                         num_hidden_layers=layers, num_attention_heads=hidden // 128,
                         num_key_value_heads=hidden // 128, use_cache=False)
    dense = LlamaForCausalLM(config).eval()
    model = copy.deepcopy(dense)
    calib = torch.randint(0, config.vocab_size, (2, 16))
    fxcompress.compile(model, calib, fxcompress.Recipe({"lm_head": None,
                                                        ".*": fxcompress.RTN(4, GROUP)}),
                       progress=False)
    dense, model = dense.to(device, dtype), model.to(device, dtype)
    explain = torch._dynamo.explain(model)(torch.zeros(1, 8, dtype=torch.long, device=device))
    compiled = torch.compile(model, fullgraph=True)
    compiled_dense = torch.compile(dense, fullgraph=True)
    rows, worst = [], 0.0
    with torch.no_grad():
        for tokens in (1, 256):
            ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)
            ref = model(ids).logits.float()
            out = compiled(ids).logits.float()
            worst = max(worst, ((out - ref).norm() / ref.norm()).item())
            times = {name: _time(lambda f=f, ids=ids: f(ids), device) for name, f in (
                ("dense eager", dense), ("dense compiled", compiled_dense),
                ("int4 eager", model), ("int4 compiled", compiled))}
            base = times["dense compiled"]
            rows.append(f"| {tokens} | " + " | ".join(
                f"{t:.3f} ({base / t:.2f}×)" for t in times.values()) + " |")
    return "\n".join([
        f"## torch.compile(fullgraph=True) of a {layers}-layer Llama (hidden {hidden}), "
        f"int4 g{GROUP} linears, {dtype}\n",
        f"graph breaks: {explain.graph_break_count}; compiled vs eager logits: relative "
        f"error {worst:.2e}\n",
        "| tokens | dense eager (ms) | dense compiled (ms) | int4 eager (ms) | "
        "int4 compiled (ms) |", "|---:|---:|---:|---:|---:|", *rows,
        "\n(speed-up against dense compiled in parentheses)\n"])


def _time(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds of ``fn``: do_bench on CUDA, a few wall-clock runs elsewhere."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    import statistics

    fn()
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        runs.append(1e3 * (time.perf_counter() - t))
    return statistics.median(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-check", action="store_true", help="timings only")
    parser.add_argument("--skip-speed", action="store_true", help="correctness only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: the Triton kernels need an NVIDIA GPU. Nothing to do.")
        return 0
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"# fxcompress Triton kernels on {props.name}\n")
    print(f"torch {torch.__version__}, triton {triton.__version__}, "
          f"{props.multi_processor_count} SMs, CUDA {torch.version.cuda}\n")
    ok = True
    if not args.skip_check:
        ok = check_correctness()
    if not args.skip_speed:
        times = bench_speed()
        for mode, title in (("eager", "eager calls, triton.testing.do_bench"),
                            ("graph", "CUDA graph replay, triton.testing.do_bench_cudagraph")):
            print(f"## Latency, median ({title}); fp16 activations, speedup vs fp16 cuBLAS\n")
            print(_speed_table(times, mode) + "\n")
            print("Targets:\n" + "\n".join(_targets(times, mode)) + "\n")
    if time.time() - _START < DEADLINE_S:
        print(bench_compiled_decoder())
    else:
        print("(compiled decoder skipped: past the time budget)")
    print(f"total {time.time() - _START:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

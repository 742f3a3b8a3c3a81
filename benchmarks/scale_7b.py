"""A 7B-parameter checkpoint on this machine: generate it, compress it streamed, time it.

1. **Generate** a synthetic checkpoint with the shapes of Llama-2-7B — hidden 4096,
   intermediate 11008, 32 layers of 32 heads, vocabulary 32000, untied head, bf16 safetensors,
   about 13.5 GB — one shard per decoder layer (plus one for the embedding and one for the head),
   each written aside and renamed when complete, so the model is never held and an interrupted
   generation continues where it stopped. Weights are seeded random normals with the scales of
   a trained Llama (linears std 0.02, embedding std 0.02, RMSNorm gains around 1). The folder
   gets SmolLM2's tokenizer cut to its first 32000 tokens (byte-level BPE ids are assigned in
   merge order, so the first 32000 tokens and the merges among them are a valid tokenizer).
2. **Compress** it with exactly the command line a user runs::

       fxcompress compress DIR --recipe gptq-w4g128 --max-memory 8GiB --samples 32 \\
           --seqlen 512 --out OUT [--resume]

   in a child process that times the phases of the run (forward through the segments,
   Hessian accumulation, solves, writing the checkpoint) and the completion of every layer,
   and reports its peak RSS (``VmHWM``).

Develop at reduced depth (``--layers 2``: full widths, 1.3 GB) and extrapolate; the full run
takes hours on a 2-core machine. ``--resume`` continues both steps.

    python benchmarks/scale_7b.py [--layers 32] [--dir DIR] [--out OUT] [--resume] [--write]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
CACHE = Path.home() / ".cache" / "fxcompress"


# ============================================================================ generation


def _tensors(layer: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, kind) of one shard: -1 the embedding, L the head and final norm."""
    h, i, v = LLAMA2_7B["hidden_size"], LLAMA2_7B["intermediate_size"], LLAMA2_7B["vocab_size"]
    if layer == -1:
        return {"model.embed_tokens.weight": ((v, h), "embed")}
    if layer == -2:
        return {"model.norm.weight": ((h,), "norm"), "lm_head.weight": ((v, h), "linear")}
    p = f"model.layers.{layer}."
    return {
        p + "input_layernorm.weight": ((h,), "norm"),
        p + "post_attention_layernorm.weight": ((h,), "norm"),
        **{p + f"self_attn.{n}_proj.weight": ((h, h), "linear") for n in "qkvo"},
        p + "mlp.gate_proj.weight": ((i, h), "linear"),
        p + "mlp.up_proj.weight": ((i, h), "linear"),
        p + "mlp.down_proj.weight": ((h, i), "linear"),
    }


def _random(shape: tuple[int, ...], kind: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "norm":
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    return (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)


def _tokenizer(folder: Path, vocab: int) -> None:
    """SmolLM2's tokenizer, cut to its first ``vocab`` tokens and the merges among them."""
    from fxcompress import assets

    src = assets.smollm2(progress=False)
    tok = json.loads((src / "tokenizer.json").read_text())
    model = tok["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < vocab}
    model["merges"] = [m for m in model["merges"]
                       if "".join(m if isinstance(m, list) else m.split(" ")) in model["vocab"]]
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < vocab]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text((src / "tokenizer_config.json").read_text())


def generate(folder: Path, layers: int, seed: int = 0) -> Path:
    """Write (or complete) the synthetic checkpoint in ``folder``; see the module docstring."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    spec = {"layers": layers, "seed": seed, "config": LLAMA2_7B}
    marker = folder / "synthetic.json"
    if marker.exists() and json.loads(marker.read_text()) != spec:
        raise SystemExit(f"{folder} holds another synthetic model ({marker.read_text()}); "
                         f"remove it or choose another --dir")
    marker.write_text(json.dumps(spec))
    shards = [-1, *range(layers), -2]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map, total = {}, 0
    for k, (layer, name) in enumerate(zip(shards, names, strict=True)):
        tensors = _tensors(layer)
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(math.prod(shape) * 2 for shape, _ in tensors.values())
        if (folder / name).exists():
            continue
        t = time.perf_counter()
        data = {n: _random(shape, kind, seed * 100_003 + k * 101 + j)
                for j, (n, (shape, kind)) in enumerate(tensors.items())}
        save_file(data, str(folder / (name + ".tmp")), metadata={"format": "pt"})
        os.replace(folder / (name + ".tmp"), folder / name)
        del data
        print(f"generated {name} ({time.perf_counter() - t:.1f}s)", flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = {**LLAMA2_7B, "num_hidden_layers": layers, "architectures": ["LlamaForCausalLM"],
              "model_type": "llama", "torch_dtype": "bfloat16", "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    _tokenizer(folder, LLAMA2_7B["vocab_size"])
    return folder


# ============================================================================ the timed run

# Where the phases of a streamed run happen: (module, attribute path, phase).
PHASES = [
    ("fxcompress.calibration.run", "Run.run_segment", "forward"),
    ("fxcompress.calibration.statistics", "accumulate", "hessian"),
    ("fxcompress.calibration.statistics", "pinned_sums", "hessian"),
    ("fxcompress.algorithms.hessian", "Hessian.value", "hessian"),
    ("fxcompress.calibration.run", "Run.solve", "solve"),
    ("fxcompress.streaming", "_Writer.write_dense", "write"),
    ("fxcompress.streaming", "_Writer.sink", "write"),
    ("fxcompress.streaming", "_Writer.finish", "write"),
]


class _Timers:
    """Wraps the functions of :data:`PHASES` to add up their wall time per phase (a call
    inside another counts for its own phase only: Hessians accumulate inside the forward
    pass), and records when each compressed layer reaches the writer, calling ``on_layer``."""

    def __init__(self, on_layer) -> None:
        self.seconds: dict[str, float] = {}
        self.done: list[tuple[str, float]] = []
        self.missing: list[str] = []
        self.inner: list[float] = []  # time spent in nested timed calls, per open call
        self.on_layer = on_layer
        for module, path, phase in PHASES:
            owner = importlib.import_module(module)
            *outer, attr = path.split(".")
            for part in outer:
                owner = getattr(owner, part, None)
            if owner is None or not hasattr(owner, attr):
                self.missing.append(f"{module}.{path}")
                continue
            setattr(owner, attr, self._wrap(getattr(owner, attr), phase, attr == "sink"))

    def _wrap(self, fn, phase: str, sink: bool):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            self.inner.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t
                own = elapsed - self.inner.pop()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + own
                if self.inner:
                    self.inner[-1] += elapsed
                if sink:
                    self.done.append((args[1].fqn, time.perf_counter()))
                    self.on_layer()
        return timed


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def child(argv: list[str], report: Path) -> None:
    """Run ``fxcompress`` with ``argv`` in this process, timed. The numbers of this run are
    appended to the list in ``report`` (one entry per run of a resumed job) and rewritten
    after every compressed layer, so a killed run still leaves what it did."""
    from fxcompress import cli

    runs = json.loads(report.read_text()) if report.exists() and "--resume" in argv else []
    baseline, t0 = _vm("VmRSS"), time.perf_counter()

    def write(rc: int | None = None) -> None:
        entry = {"rc": rc, "seconds": time.perf_counter() - t0, "phases": timers.seconds,
                 "done": timers.done, "start": t0, "peak_rss_mib": _vm("VmHWM"),
                 "baseline_rss_mib": baseline, "missing_timers": timers.missing,
                 "argv": argv}
        tmp = report.with_name(report.name + ".tmp")
        tmp.write_text(json.dumps([*runs, entry]))
        os.replace(tmp, report)

    timers = _Timers(write)
    write(cli.main(argv))


def _layer_times(done: list[tuple[str, float]], start: float) -> list[tuple[int, float]]:
    """Seconds from one decoder layer's last compressed linear to the next one's."""
    last: dict[int, float] = {}
    for fqn, t in done:
        parts = fqn.split(".")
        if "layers" in parts:
            layer = int(parts[parts.index("layers") + 1])
            last[layer] = max(last.get(layer, 0.0), t)
    out, prev = [], start
    for layer in sorted(last):
        out.append((layer, last[layer] - prev))
        prev = last[layer]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-2-7B)")
    ap.add_argument("--dir", help="checkpoint folder (default: ~/.cache/fxcompress/"
                                  "synthetic-llama2-7b-L<layers>)")
    ap.add_argument("--out", help="compressed output (default: DIR-gptq-w4g128)")
    ap.add_argument("--max-memory", default="8GiB")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--write", action="store_true", help="add the numbers to RESULTS.md")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[1:], Path(args.child[0]))
        return
    folder = Path(args.dir or CACHE / f"synthetic-llama2-7b-L{args.layers}")
    out = Path(args.out or f"{folder}-gptq-w4g128")
    t = time.perf_counter()
    generate(folder, args.layers)
    gen_seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"checkpoint {folder}: {size / 1e9:.2f} GB, {args.layers} layers "
          f"(generation/check {gen_seconds:.0f}s)", flush=True)
    if args.generate_only:
        return
    argv = ["compress", str(folder), "--recipe", "gptq-w4g128", "--max-memory",
            args.max_memory, "--samples", str(args.samples), "--seqlen", str(args.seqlen),
            "--out", str(out), *(["--resume"] if args.resume else [])]
    report = out.with_name(out.name + ".timing.json")
    print("fxcompress " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, __file__, "--child", str(report), *argv], check=True)
    body = summary(json.loads(report.read_text()), args.layers, size)
    print("\n" + body)
    if args.write:
        from _results import write_section

        write_section(f"7B-shaped checkpoint, streamed ({args.layers} layers)",
                      "python benchmarks/scale_7b.py " + " ".join(sys.argv[1:]), body)


def summary(runs: list[dict], layers: int, size: int) -> str:
    """The numbers of a job (its runs, if it was resumed, added up) as Markdown, with the
    extrapolation to 32 layers."""
    import torch

    phases: dict[str, float] = {}
    for r in runs:
        for name, s in r["phases"].items():
            phases[name] = phases.get(name, 0.0) + s
    seconds = sum(r["seconds"] for r in runs)
    other = seconds - sum(phases.values())
    per_layer = [t for r in runs for t in _layer_times([tuple(d) for d in r["done"]],
                                                       r["start"])]
    complete = runs[-1]["rc"] == 0
    lines = [f"Checkpoint: {size / 1e9:.2f} GB bf16, {layers} layers of Llama-2-7B shape; "
             f"command `fxcompress {' '.join(runs[0]['argv'])}`"
             + (f" ({len(runs)} runs, resumed with `--resume`)" if len(runs) > 1 else "")
             + f"; torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
             f"{os.getloadavg()[0]:.1f} at the end."
             + ("" if complete else " **Not complete**: the last run was stopped."), "",
             "| phase | seconds | share |", "|---|---:|---:|"]
    for name in ("forward", "hessian", "solve", "write"):
        s = phases.get(name, 0.0)
        lines.append(f"| {name} | {s:.0f} | {s / seconds:.0%} |")
    lines.append(f"| other (load, capture, estimate) | {other:.0f} | {other / seconds:.0%} |")
    lines.append(f"| **total** | {seconds:.0f} | |")
    lines += ["", "| layer | seconds |", "|---:|---:|"]
    lines += [f"| {layer} | {s:.0f} |" for layer, s in per_layer]
    steady = [s for layer, s in per_layer if layer > 0] or [s for _, s in per_layer]
    peak = max(r["peak_rss_mib"] for r in runs)
    lines += ["", f"Peak RSS {peak:.0f} MiB (baseline after imports "
                  f"{runs[0]['baseline_rss_mib']:.0f} MiB)."]
    if steady:
        mean = sum(steady) / len(steady)
        fixed = seconds - sum(s for _, s in per_layer)
        lines[-1] += (f" Extrapolated 32-layer run: {fixed:.0f} s + 32 x {mean:.0f} s = "
                      f"{(fixed + 32 * mean) / 3600:.1f} h.")
    missing = sorted({m for r in runs for m in r["missing_timers"]})
    if missing:
        lines.append(f"Not timed (not found): {', '.join(missing)}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

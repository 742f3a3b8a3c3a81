"""Checkpoints pinned bit for bit: a refactor of the pipeline must write the same bytes.

Each case compresses a fixed model on fixed calibration data and saves it; its digest is
the SHA-256 of every stored tensor (name, dtype, shape, bytes) and of the config's
compression fields. ``tests/pinned.json`` holds the digests taken before a refactor;
``test_pinned.py`` recomputes them.

Float results depend on the CPU's instruction set (MKL and oneDNN pick kernels by it), so the
cases run in a child process held to AVX2 code paths and one thread, which every x86-64
machine that runs the suite offers: the digests then agree across CPUs. Write them with

    python -m tests.pinned --write            # on the commit before the change
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

PINNED = Path(__file__).with_name("pinned.json")
# kernels chosen by the CPU held to one instruction set (read at library load: set before
# torch is imported, hence the child process)
ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2",
       "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "TORCH_DISABLE_AMX": "1"}
CONFIG_FIELDS = ("quantization_config", "sparsity_config", "compression_config")


def digest(folder: Path) -> str:
    """SHA-256 over the stored tensors and the config's compression fields (not versions)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.view(-1).view(dtype=_byte_view(t)).numpy().tobytes())
    config = json.loads((folder / "config.json").read_text())
    h.update(json.dumps({k: config.get(k) for k in CONFIG_FIELDS}, sort_keys=True).encode())
    return h.hexdigest()


def _byte_view(t):  # bfloat16 has no numpy dtype: hash its raw bytes
    import torch

    return torch.uint8 if t.dtype == torch.bfloat16 or t.dtype == torch.bool else t.dtype


def _tiny(arch: str, hidden: int = 128):
    from .models import build

    return build(arch, hidden=hidden, layers=2)


def _ids(n: int = 8, seqlen: int = 32, seed: int = 1):
    import torch

    from .models import VOCAB

    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _compiled(model_fn: Callable, recipe: object, calibration: object) -> Callable[[Path], Path]:
    def case(out: Path) -> Path:
        import fxcompress
        from fxcompress.recipe import resolve

        model = model_fn()
        r = resolve(recipe) if isinstance(recipe, str) else recipe
        fxcompress.compile(model, calibration() if callable(calibration) else calibration, r,
                           progress=False, batch_size=2)
        fxcompress.save(model, out)
        return out
    return case


def _smollm2_two_layers():
    import torch
    from transformers import AutoModelForCausalLM

    from fxcompress import assets

    model = AutoModelForCausalLM.from_pretrained(assets.smollm2(progress=False),
                                                 dtype=torch.float32, num_hidden_layers=2)
    return model.eval()


def _sotu_ids():
    from transformers import AutoTokenizer

    from fxcompress import assets
    from fxcompress.evaluate import calibration_samples

    tok = AutoTokenizer.from_pretrained(assets.smollm2(progress=False))
    text = assets.load_text(assets.sotu(progress=False) / "calibration.txt")[:200_000]
    return calibration_samples(tok, text, n=4, seqlen=128, seed=0)


def _streamed(out: Path) -> Path:
    from fxcompress import GPTQ, SparseGPT
    from fxcompress.streaming import compress_checkpoint

    dense = out.parent / "streamed-dense"
    _tiny("qwen2", 64).save_pretrained(dense)
    compress_checkpoint(dense, _ids(6, 16), {r".*\.mlp\..*": GPTQ(4, 32), r".*": SparseGPT(0.5)},
                        out, progress=False, batch_size=2)
    return out


def _two_ranks(out: Path) -> Path:
    from .test_distributed import _launch

    dense = out.parent / "ranks-dense"
    _tiny("llama", 64).save_pretrained(dense)
    ranks = _launch(out.parent, dense, "ok")
    if any("error" in r for r in ranks):
        raise RuntimeError(f"two-rank run failed: {ranks}")
    return out.parent / "out-ok"


CASES: dict[str, Callable[[Path], Path]] = {
    "llama-gptq-w4g64": _compiled(lambda: _tiny("llama"), "gptq-w4g64", _ids),
    "llama-gptq-w4": _compiled(lambda: _tiny("llama"), "gptq-w4", _ids),
    "qwen2-sparsegpt-50": _compiled(lambda: _tiny("qwen2"), "sparsegpt-50", _ids),
    "opt-sparsegpt-2:4+w4g64": _compiled(lambda: _tiny("opt"), "sparsegpt-2:4+w4g64", _ids),
    "mixtral-gptq-w4g64": _compiled(lambda: _tiny("mixtral", 64), "gptq-w4g64", _ids),
    "qwen2moe-sparsegpt-50": _compiled(lambda: _tiny("qwen2moe", 64), "sparsegpt-50", _ids),
    "streamed-qwen2": _streamed,
    "two-ranks-llama": _two_ranks,
    "smollm2-2-layers-gptq-w4g64": _compiled(_smollm2_two_layers, "gptq-w4g64", _sotu_ids),
    "smollm2-2-layers-sparsegpt-2:4+w4g64": _compiled(_smollm2_two_layers,
                                                      "sparsegpt-2:4+w4g64", _sotu_ids),
}


def compute(names: list[str]) -> dict[str, str]:
    """The digests of the named cases, computed in this process (set ENV first)."""
    import torch

    torch.set_num_threads(1)
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            work = Path(tmp, name.replace(":", "_").replace("+", "_"))
            work.mkdir()
            out[name] = digest(CASES[name](work / "out"))
    return out


def run_child(names: list[str]) -> dict[str, str]:
    """The digests computed in a child process held to the pinned instruction set."""
    env = {**os.environ, **ENV}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "tests.pinned", "--json", *names], cwd=root,
                          env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"pinned cases failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="cases (default: all)")
    p.add_argument("--json", action="store_true", help="compute here, print the digests")
    p.add_argument("--write", action="store_true", help=f"compute in a child, write {PINNED}")
    args = p.parse_args()
    names = args.names or list(CASES)
    if args.json:
        print(json.dumps(compute(names)))
        return
    digests = run_child(names)
    if args.write:
        PINNED.write_text(json.dumps({"cpu": cpu(), "digests": digests}, indent=1) + "\n")
    print(json.dumps(digests, indent=1))


def cpu() -> str:
    """The CPU the digests were taken on (vendor and model), named when they differ."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"{fields.get('vendor_id', '?')} {fields.get('model name', '?')}"


if __name__ == "__main__":
    main()

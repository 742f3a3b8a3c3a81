"""Ship a compressed model as a program: ``torch.export`` (``.pt2``), AOTInductor, TorchScript.

``fxcompress.export(model, example_inputs, path)`` writes an ``ExportedProgram`` with dynamic
batch and sequence dimensions; with ``aot=True`` it compiles that program ahead of time into an
AOTInductor package, a shared library plus weights that runs from a fresh Python process (or
C++) that imports neither fxcompress nor transformers: each ``torch.ops.fxcompress`` op is a
``triton_op`` whose CPU body is plain aten, which Inductor inlines into the package.

Programs take the example's tensor inputs positionally, in the order of the model's
``forward`` parameters; non-tensor inputs (``use_cache=False`` for Hugging Face models, added
automatically) are fixed at export time. Outputs are plain tensors (a Hugging Face output
becomes its ``logits``), so loading a program needs no model library to rebuild output classes.

TorchScript (:func:`trace`) is kept for legacy deployments only: it is deprecated upstream
and ``.pt2`` is the recommended path. A traced file calls the fxcompress ops by name, so it
loads in a process that has imported fxcompress.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import kernels  # noqa: F401  (registers torch.ops.fxcompress)
from .passes.capture import as_call, call_kwargs, dynamic_shapes, evaluating

log = logging.getLogger(__name__)


class Program(nn.Module):
    """``model(**inputs)`` as a function of its tensor inputs only, with plain tensor outputs:
    the form a program is exported and traced in."""

    def __init__(self, model: nn.Module, names: list[str], constants: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.names, self.constants = model, names, constants

    def forward(self, *tensors: Tensor) -> Any:
        inputs = dict(zip(self.names, tensors, strict=True))
        return plain_outputs(self.model(**inputs, **self.constants))


def plain_outputs(out: Any) -> Any:
    """A Hugging Face ``ModelOutput`` as its ``logits`` (or the tuple of its tensors); tensors
    and tuples of tensors unchanged."""
    if isinstance(out, (Tensor, tuple, list)):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, dict):
        return tuple(v for v in out.values() if isinstance(v, Tensor))
    return out


def program(model: nn.Module, example_inputs: Any) -> tuple[Program, tuple[Tensor, ...]]:
    """The :class:`Program` wrapping ``model`` and its positional example tensors.

    ``example_inputs`` is what a calibration sample may be: a tensor, a tuple of positional
    inputs or a dict of keyword inputs.
    """
    args, kwargs = as_call(example_inputs)
    inputs = call_kwargs(model, args, kwargs)
    names = [k for k, v in inputs.items() if isinstance(v, Tensor)]
    constants = {k: v for k, v in inputs.items() if not isinstance(v, Tensor)}
    if not names:
        raise ValueError("example_inputs hold no tensor: nothing to export")
    return Program(model, names, constants), tuple(inputs[k] for k in names)


def export(model: nn.Module, example_inputs: Any, path: str | Path, *, aot: bool = False,
           dynamic: bool = True) -> Path:
    """Export ``model`` to ``path`` (a ``.pt2`` file) and return the path.

    ``aot=False`` writes ``torch.export.save`` of the program: load it with
    ``torch.export.load(path).module()`` after ``import fxcompress``. ``aot=True`` writes an
    AOTInductor package: load it with ``torch._inductor.aoti_load_package(path)``, no
    fxcompress needed. With ``dynamic`` the first two dimensions of every input tensor (batch
    and sequence) are dynamic; give examples with both at least 2, since size-1 dimensions
    are specialised by ``torch.export``.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"export writes a .pt2 file, got {path}")
    wrapped, tensors = program(model, example_inputs)
    if dynamic and any(d == 1 for t in tensors for d in t.shape[:2]):
        log.warning("fxcompress.export: an example dimension of size 1 will be specialised "
                    "(static) by torch.export; use batch and sequence >= 2 to keep them dynamic")
    shapes = (tuple(dynamic_shapes(t) for t in tensors),) if dynamic else None
    with evaluating(model), torch.no_grad():
        ep = torch.export.export(wrapped, tensors, dynamic_shapes=shapes, strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    if aot:
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    else:
        torch.export.save(ep, str(path))
    log.info("fxcompress: exported %s to %s (%s)", type(model).__name__, path,
             "AOTInductor package" if aot else "ExportedProgram")
    return path


def trace(model: nn.Module, example_inputs: Any, path: str | Path | None = None
          ) -> torch.jit.ScriptModule:
    """TorchScript (legacy): ``torch.jit.trace`` of ``model`` on ``example_inputs``, saved to
    ``path`` when given. The traced module takes the tensor inputs positionally, like
    :func:`export`'s programs. Deprecated upstream; prefer :func:`export`."""
    wrapped, tensors = program(model, example_inputs)
    with evaluating(model), torch.no_grad():
        traced = torch.jit.trace(wrapped, tensors, strict=False, check_trace=False)
    if path is not None:
        traced.save(str(path))
    return traced

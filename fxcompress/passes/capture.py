"""Capture: the user's model as an aten-level graph, via ``torch.export`` (non-strict).

``torch.export`` rather than ``fx.symbolic_trace``: it captures current Hugging Face decoders
whole (their decorated forwards defeat symbolic tracing), lifts parameters to placeholders
with their fully qualified names, and keeps ``aten.linear`` intact (we stop before
``run_decompositions``). Batch and sequence dimensions are exported dynamic so that every
calibration batch runs through one graph.

Calibration samples may be a tensor (the positional input), a tuple/list of positional inputs,
or a dict of keyword inputs; :func:`as_call` normalises them to ``(args, kwargs)``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """``torch.export`` could not capture the model."""


def as_call(sample: Any) -> tuple[tuple, dict]:
    """A calibration sample as positional and keyword arguments."""
    if isinstance(sample, torch.Tensor):
        return (sample,), {}
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    if isinstance(sample, dict):
        return (), dict(sample)
    raise TypeError(f"a calibration sample must be a tensor, a tuple of tensors or a dict of "
                    f"keyword inputs, got {type(sample).__name__}")


def _accepts(model: nn.Module, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def call_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """All inputs by parameter name; Hugging Face models get ``use_cache=False``."""
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    if getattr(getattr(model, "config", None), "use_cache", None) is not None \
            and _accepts(model, "use_cache") and "use_cache" not in kwargs:
        bound = {**bound, "use_cache": False}
    return dict(bound)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block (dropout off while it is captured, calibrated,
    exported or evaluated), then back in the mode the user left it in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def dynamic_shapes(value: Any) -> Any:
    """``torch.export`` dynamic shapes for ``value`` (tensors, nested in dicts, tuples and
    lists): the first two dimensions of every tensor — batch and sequence — are dynamic."""
    if isinstance(value, torch.Tensor):
        return {d: Dim.AUTO for d in range(min(value.dim(), 2))} or None
    if isinstance(value, dict):
        return {k: dynamic_shapes(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(dynamic_shapes(v) for v in value)
    return None


def _failing_module(model: nn.Module, tb) -> str | None:
    """The innermost module of ``model`` whose forward was running when export failed."""
    names = {id(m): name for name, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(tb):
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and id(obj) in names:
            found = names[id(obj)] or type(model).__name__
    return found


def capture(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> ExportedProgram:
    """Export ``model(*args, **kwargs)`` with dynamic batch and sequence dimensions; all inputs
    become keyword inputs of the exported program (see :func:`call_kwargs`)."""
    inputs = call_kwargs(model, args, kwargs or {})
    try:
        with torch.no_grad():
            return torch.export.export(model, (), inputs, dynamic_shapes=dynamic_shapes(inputs),
                                       strict=False)
    except Exception as e:  # torch.export raises many types; report them all the same way
        where = _failing_module(model, sys.exc_info()[2])
        place = f" in module {where!r}" if where else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}{place}: "
            f"{type(e).__name__}: {first}. fxcompress compresses models that "
            f"torch.export.export(model, args, kwargs, strict=False) can capture."
            + _experts_hint(model, where)
        ) from e


def _experts_hint(model: nn.Module, where: str | None) -> str:
    """What to do when the failing module is a transformers experts module whose
    implementation cannot be exported (the eager loop over the experts hit)."""
    module = model.get_submodule(where) if where and where != type(model).__name__ else None
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    if impl is None or not hasattr(module, "gate_up_proj"):
        return ""
    return (f" Its experts run with experts_implementation={impl!r}, which torch.export cannot "
            f"capture when it loops over the experts hit: load the model with "
            f"experts_implementation='grouped_mm' (the default) or 'batched_mm', or call "
            f"model.set_experts_implementation('grouped_mm').")

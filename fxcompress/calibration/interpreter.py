"""interpreter: runs the captured graph one node at a time for one chunk, with the weights of
the sites compressed so far, and checks the calibration batches against the captured inputs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

_aten = torch.ops.aten
# elementwise op -> its in-place variant, and the argument positions that may take the result
_IN_PLACE = {
    _aten.add.Tensor: (_aten.add_.Tensor, (0, 1)),
    _aten.mul.Tensor: (_aten.mul_.Tensor, (0, 1)),
    _aten.sub.Tensor: (_aten.sub_.Tensor, (0,)),
    _aten.div.Tensor: (_aten.div_.Tensor, (0,)),
    _aten.add.Scalar: (_aten.add_.Scalar, (0,)),
    _aten.mul.Scalar: (_aten.mul_.Scalar, (0,)),
    _aten.pow.Tensor_Scalar: (_aten.pow_.Scalar, (0,)),
    _aten.silu.default: (_aten.silu_.default, (0,)),
    _aten.neg.default: (_aten.neg_.default, (0,)),
    _aten.rsqrt.default: (_aten.rsqrt_.default, (0,)),
}
# references to a value that only the chunk's env holds, as `Interpreter._reusable` counts
# them: the env, the args tuple, its local name and getrefcount's own argument
_SOLE_REFS = 4
_ATTENTION = torch.ops.aten.scaled_dot_product_attention.default


class Interpreter(fx.Interpreter):
    """Runs single nodes; linears being compressed compute with their compressed weight.

    An elementwise op whose tensor input dies with it (``dying``: read for the last time in
    the chunk) writes its result into that input. Each chunk's temporaries are otherwise fresh
    allocations, and once the heap is trimmed (:func:`~fxcompress.osmem.release_freed_memory`)
    each one is faulted in again, page by page (benchmarks/RESULTS.md). The values are the
    same: the same kernel computes them.

    With ``bf16`` (the run's precision, :func:`~.precision.matmul_precision`) attention on
    CPU float32 inputs computes in bf16, its two products being what oneDNN's setting leaves
    out; the result comes back as float32."""

    def __init__(self, gm: fx.GraphModule, bf16: bool = False):
        super().__init__(gm, garbage_collect_values=False)
        self.replaced: dict[fx.Node, tuple[int, Tensor]] = {}
        self.dying: Sequence[fx.Node] = ()
        self.bf16 = bf16

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if self.bf16 and target is _ATTENTION and args[0].dtype == torch.float32 \
                and args[0].device.type == "cpu":
            def half(a: Any) -> Any:
                return a.bfloat16() if isinstance(a, Tensor) and a.is_floating_point() else a

            args, kwargs = tuple(map(half, args)), {k: half(v) for k, v in kwargs.items()}
            return super().call_function(target, args, kwargs).float()
        return super().call_function(target, args, kwargs)

    def run_node(self, n: fx.Node):
        if n not in self.replaced:
            if n.target in _IN_PLACE and self.dying:
                with self._set_current_node(n):
                    args, kwargs = self.fetch_args_kwargs_from_env(n)
                    in_place, positions = _IN_PLACE[n.target]
                    for i in positions:
                        if self._reusable(n, i, args):
                            if i:  # add and mul commute exactly
                                args = (args[1], args[0], *args[2:])
                            return in_place(*args, **kwargs)
                    return self.call_function(n.target, args, kwargs)
            return super().run_node(n)
        position, weight = self.replaced[n]
        with self._set_current_node(n):
            args = n.args[:position] + (weight,) + n.args[position + 1:]
            args, kwargs = fx.node.map_arg((args, n.kwargs), lambda a: self.env[a])
            return self.call_function(n.target, args, kwargs)

    def _reusable(self, n: fx.Node, i: int, args: tuple) -> bool:
        """Whether ``args[i]`` may take ``n``'s result: a contiguous float tensor of the chunk
        that nothing else holds, read for the last time here, with the result's shape and
        dtype."""
        a, env = n.args[i] if i < len(n.args) else None, self.env
        if not isinstance(a, fx.Node) or a not in self.dying or not dict.__contains__(env, a) \
                or a in env.kept or a in env.params:
            return False
        t, other = args[i], args[1 - i] if len(args) > 1 else None
        if i and n.kwargs.get("alpha", 1) != 1:  # a + alpha * b: only a may take it
            return False
        # floats only: int / int and rsqrt(int) make floats
        if not isinstance(t, Tensor) or not t.is_floating_point() or not t.is_contiguous() \
                or t.requires_grad:
            return False
        if isinstance(other, Tensor):
            if torch.broadcast_shapes(t.shape, other.shape) != t.shape or \
                    torch.result_type(t, other) != t.dtype or other.device != t.device:
                return False
        elif other is not None and torch.result_type(t, other) != t.dtype:
            return False
        return sys.getrefcount(t) == _SOLE_REFS and \
            torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2  # no view of it


def flat_inputs(ep: ExportedProgram, chunks: Sequence[tuple[tuple, dict]]) -> list[list]:
    """Each batched call's values of the program's placeholders, checked against the captured
    inputs, so that a malformed batch is an error naming it before any work."""
    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    flat = []
    for i, (args, kwargs) in enumerate(chunks):
        try:
            values = ep._graph_module_flat_inputs(args, kwargs)
        except Exception as e:
            raise ValueError(f"calibration batch {i} does not have the structure of the "
                             f"captured inputs {user}: {e}") from e
        for node, value in zip(placeholders, values, strict=True):
            _check_input(node, value, i)
        flat.append(values)
    return flat


def _check_input(node: fx.Node, value: object, index: int) -> None:
    expected = node.meta.get("val")
    if not isinstance(expected, torch.Tensor) or not isinstance(value, torch.Tensor):
        return
    static = [d if isinstance(d, int) else None for d in expected.shape]
    shape_ok = value.dim() == len(static) and all(
        s is None or s == v for s, v in zip(static, value.shape, strict=True))
    if not shape_ok or value.dtype != expected.dtype:
        want = tuple("*" if s is None else s for s in static)
        raise ValueError(f"calibration batch {index}: input {node.name!r} has shape "
                         f"{tuple(value.shape)} and dtype {value.dtype}, the captured graph "
                         f"expects shape {want} (* = any) and dtype {expected.dtype}")

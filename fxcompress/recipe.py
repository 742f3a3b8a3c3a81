"""Recipes: what to do to which linear layer.

A method is a frozen dataclass (``GPTQ``, ``SparseGPT``, ``RTN``, ``Magnitude``) validated on
construction, so a bad setting fails where it is written and not halfway through a long
calibration. Each method is also its own registration (:class:`Method`): it declares which
statistics calibration must gather for it, solves one weight from them, and states its cost,
so that adding a method or a statistic touches this file and ``algorithms`` only.

A :class:`Recipe` maps module-name patterns to methods; the first pattern that matches a
linear's fully qualified name wins and ``None`` leaves the layer dense. Recipes round-trip
through JSON and YAML with a format version.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from .algorithms import Compressed, Statistics

BITS = (2, 3, 4, 8)
RECIPE_VERSION = 1

_SMALL = 8 << 20  # small buffers of a solve (group grids, block caches, allocator slack)
SOLVERS = ("sweep", "admm")  # SparseGPT's mask selection and weight update
HESSIAN = "hessian"  # H = 2 X̃ᵀX̃ / n over the compressed model's inputs X̃
CROSS = "cross"  # C = 2 (X - X̃)ᵀ X̃ / n, X the dense model's inputs (dense-output calibration)


class RecipeError(ValueError):
    """A recipe or method setting that cannot work."""


def _check_grid(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise RecipeError(f"bits must be one of {BITS}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise RecipeError(f"group_size must be a positive divisor of in_features or -1, "
                          f"got {group_size}")


class Method:
    """What calibration needs to know of a method, in one place.

    * :meth:`needs`: the statistics of a layer's inputs to gather (:data:`HESSIAN`,
      :data:`CROSS`); a method needing none is data-free (no forward pass is run for it);
    * :meth:`solve`: one ``(out, in)`` weight and those statistics to a ``Compressed``;
    * :meth:`cost` and :meth:`workspace`: relative time (to share solves between processes)
      and peak extra bytes of a solve (for the memory estimate of streamed runs).
    """

    def needs(self) -> frozenset[str]:
        return frozenset()

    def solve(self, w: torch.Tensor, stats: Statistics | None, name: str | None = None
              ) -> Compressed:
        raise NotImplementedError

    def cost(self, shape: tuple[int, int]) -> float:
        """Relative time of one solve: ``out·in`` for data-free methods."""
        return float(shape[0]) * shape[1]

    def for_layer(self, name: str, shape: tuple[int, int], layers: int) -> Method:
        """The method as it applies to the linear ``name`` of ``shape`` (out, in) in a model of
        ``layers`` blocks: itself, unless the method chooses per layer (a llama.cpp mix)."""
        return self

    def workspace(self, shape: tuple[int, int]) -> int:
        """Peak bytes a solve allocates besides the statistics, its result included
        (measured on the algorithms: ``benchmarks/solver_memory.py``): about 17 bytes a
        weight for rounding (26 for magnitude pruning's scores and top-k), and 8 MiB of
        small buffers."""
        return 17 * shape[0] * shape[1] + _SMALL

    @property
    def prunes_in_place(self) -> bool:
        """Whether results hold kept fp32 values (pruning without quantization), which an
        in-memory run writes into the layer's own weight rather than hold beside it."""
        return False

    def held(self, shape: tuple[int, int], compact: bool = False, folded: bool = False) -> int:
        """Bytes of a solve's result while it is held (until it is written or swapped in):
        one byte a weight for integer codes or a keep-mask, four for kept fp32 values; packed
        codes and mask when ``compact`` (an in-memory run's results but experts'); nothing
        for pruned values ``folded`` into the layer's own weight."""
        return _codes(shape, getattr(self, "bits", 8), compact)


def _codes(shape: tuple[int, int], bits: int, packed: bool) -> int:
    """Bytes of ``bits``-bit codes (a mask: 1 bit), one a byte or packed."""
    return shape[0] * (math.ceil(shape[1] * bits / 32) * 4 if packed else shape[1])


class _Pruning:
    """What SparseGPT and magnitude pruning hold of a result: a keep-mask, and the codes of
    ``quant`` or the kept fp32 values."""

    quant: Method | None

    @property
    def prunes_in_place(self) -> bool:
        return self.quant is None

    def held(self, shape: tuple[int, int], compact: bool = False, folded: bool = False) -> int:
        """The keep-mask, and codes or the kept fp32 values (nothing when folded: the values
        are in the layer's weight, and the mask is their support)."""
        if self.quant is None and folded:
            return 0
        mask = _codes(shape, 1, compact)
        return mask + (self.quant.held(shape, compact) if self.quant else 4 * shape[0] * shape[1])


class _HessianMethod(Method):
    """GPTQ and SparseGPT: a sweep over the columns with the layer Hessian."""

    dense_output: bool

    def needs(self) -> frozenset[str]:
        return frozenset({HESSIAN, CROSS} if self.dense_output else {HESSIAN})

    def cost(self, shape: tuple[int, int]) -> float:
        return float(shape[0]) * shape[1] * shape[1]

    def workspace(self, shape: tuple[int, int]) -> int:
        """One fp32 copy of H, factored in place, and about 13 bytes a weight for the sweep's
        buffers and the result (8 more for the dense-output target, 5 more for SparseGPT's
        kept fp32 values); measured, with ~15 % to spare. ADMM holds three more d×d matrices
        and four weight-sized iterates."""
        out, inp = shape
        per_weight = 13 + (8 if self.dense_output else 0) + self._extra_per_weight()
        admm = getattr(self, "solver", "sweep") == "admm"
        return (4 * inp * inp + per_weight * out * inp + _SMALL
                + (4 * (3 * inp * inp + 4 * out * inp) if admm else 0))

    def _extra_per_weight(self) -> int:
        return 0


@dataclass(frozen=True)
class RTN(Method):
    """Round-to-nearest quantization: the baseline every GPTQ row is compared to."""

    bits: int = 4
    group_size: int = 128  # -1: one scale per output channel
    sym: bool = False
    mse: bool = False  # grid search over shrunken ranges (the GPTQ reference's `mse` option)

    def __post_init__(self) -> None:
        _check_grid(self.bits, self.group_size)

    def solve(self, w: torch.Tensor, stats: Statistics | None = None, name: str | None = None
              ) -> Compressed:
        from .algorithms import rtn

        return rtn(w, self)


@dataclass(frozen=True)
class GPTQ(_HessianMethod):
    """OPTQ/GPTQ quantization (Frantar et al., 2023).

    ``act_order`` (default) processes columns by decreasing Hessian diagonal. With
    ``static_groups`` (default) the group parameters are fitted on the original column order
    before the sweep, so the checkpoint needs no group index and act-order costs nothing at
    inference; without it groups are fitted as the sweep reaches them in permuted order (the
    reference's dynamic variant, which stores an unsorted ``g_idx``). Act-order is the default
    because it is free at inference and better on every measured row (benchmarks/RESULTS.md,
    ablation); ``act_order=False`` is the paper's plain column order.

    ``dense_output`` (default) fits each layer to the dense model's output on the dense model's
    inputs instead of to the layer's own output on the compressed model's inputs (the errors of
    the layers before are compensated too; see ``algorithms/hessian.py``). It runs the dense
    model alongside (about twice the calibration time) and is the default because it narrows
    the perplexity gap of 3-bit GPTQ on SmolLM2 by 40 %, on the calibration domain and on
    another one (benchmarks/RESULTS.md, ablation); ``dense_output=False`` is the paper's
    objective. ``mse`` (a search of the clipping range per group) stays off: its solve is
    about 5x slower for a gain smaller than dense-output's.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = True
    static_groups: bool = True
    mse: bool = False
    damp: float = 0.01
    block_size: int = 128
    dense_output: bool = True

    def __post_init__(self) -> None:
        _check_grid(self.bits, self.group_size)
        if not 0 <= self.damp < 1:
            raise RecipeError(f"damp must be in [0, 1), got {self.damp}")
        if self.block_size < 1:
            raise RecipeError(f"block_size must be positive, got {self.block_size}")

    @property
    def grid(self) -> RTN:
        return RTN(self.bits, self.group_size, self.sym, self.mse)

    def solve(self, w: torch.Tensor, stats: Statistics | None, name: str | None = None
              ) -> Compressed:
        from .algorithms import gptq

        return gptq(w, stats.hessian, self, name, stats.cross)


@dataclass(frozen=True)
class GGUFQuant(_HessianMethod):
    """GPTQ on llama.cpp's own grids, so that the GGUF file holds GPTQ's weights.

    ``ftype`` names a llama-quantize mix (``"q4_k_m"``, ``"q3_k_m"``): each linear gets the
    ggml type llama-quantize would give it, from its name, shape and the model's block count
    (:mod:`fxcompress.gguf.mix`), resolved into ``type`` when the recipe is planned; ``type``
    (``"Q4_K"``, ``"Q6_K"``, ``"Q5_0"``, ...) may also be set directly. The grid is fitted as
    llama-quantize fits it with an importance matrix (``imatrix``: weighted by ``diag H``,
    the statistic llama-imatrix collects), then GPTQ rounds onto it
    (:func:`fxcompress.gguf.gptq.gptq_ggml`); ``act_order``, ``damp``, ``block_size`` and
    ``dense_output`` are GPTQ's.
    """

    ftype: str = "q4_k_m"
    type: str | None = None
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    dense_output: bool = True
    imatrix: bool = True

    def __post_init__(self) -> None:
        from .gguf.grids import TYPES
        from .gguf.mix import FTYPES

        if self.ftype not in FTYPES:
            raise RecipeError(f"ftype must be one of {FTYPES}, got {self.ftype!r}")
        if self.type is not None and self.type not in TYPES:
            raise RecipeError(f"type must be one of {sorted(TYPES)} or None, got {self.type!r}")
        if not 0 <= self.damp < 1:
            raise RecipeError(f"damp must be in [0, 1), got {self.damp}")
        if self.block_size < 1:
            raise RecipeError(f"block_size must be positive, got {self.block_size}")

    def for_layer(self, name: str, shape: tuple[int, int], layers: int) -> GGUFQuant:
        from .gguf.mix import tensor_type

        return dataclasses.replace(self, type=tensor_type(self.ftype, name, shape[1], layers))

    def held(self, shape: tuple[int, int], compact: bool = False, folded: bool = False) -> int:
        return shape[0] * -(-shape[1] // 32) * 34  # the largest blocks: Q8_0, 34 bytes a 32

    def solve(self, w: torch.Tensor, stats: Statistics | None, name: str | None = None
              ) -> Compressed:
        from .gguf.gptq import gptq_ggml
        from .gguf.grids import block_type

        if self.type is None:
            raise RecipeError(f"GGUFQuant(ftype={self.ftype!r}) has no type for "
                              f"{name or 'this weight'}: a recipe resolves it per layer "
                              f"(Method.for_layer), or set type=")
        return gptq_ggml(w, stats.hessian, block_type(self.type), act_order=self.act_order,
                         damp=self.damp, block_size=self.block_size, imatrix=self.imatrix,
                         name=name, cross=stats.cross)


OWL_LMBDA = 0.04  # SparseGPT's default OWL spread for unstructured sparsity


@dataclass(frozen=True)
class SparseGPT(_Pruning, _HessianMethod):
    """SparseGPT pruning (Frantar & Alistarh, 2023), optionally quantizing the kept weights
    in the same sweep (``quant=GPTQ(...)``; its grid options apply, its damp, block and
    dense_output do not: the SparseGPT's own do; nor does its act_order: the mask selection
    sweeps columns in their natural order, so ``quant`` is stored with ``act_order=False``).

    ``n_m=(N, M)`` keeps N of every M consecutive input weights (2:4 keeps 2 of 4); otherwise
    ``sparsity`` is the unstructured fraction removed, selected adaptively per block of
    ``block_size`` columns. ``dense_output`` as for :class:`GPTQ`.

    ``owl_lmbda``: outlier-weighted layerwise sparsity (OWL; ``passes/owl.py``): the blocks'
    (decoder layers') sparsities span a range ``2·owl_lmbda`` wide around ``sparsity``, a block
    pruned less where more of its weights are outliers (Wanda score above ``owl_m`` × the
    block's mean), the model's overall sparsity staying ``sparsity``. ``None`` (default):
    0.04 for unstructured sparsity (at most a quarter of the distance to 0 or 0.99), off for
    N:M, whose pattern is the same in every layer; 0 turns it off. Measured a small gain on
    both texts at 50 % and 60 % on SmolLM2.

    ``solver="admm"`` (default) chooses the mask and the weights by ADMM instead of the
    paper's one-pass sweep (``solver="sweep"``; ``algorithms/admm.py``: the mask is re-selected
    while the weights converge to the exact least-squares fit of the kept ones; about 40
    weight-sized products per layer); with ``quant``, the kept weights are then quantized by
    the sweep with that mask fixed. ADMM with ``dense_output`` is the default because it
    halves the perplexity gap of 50 % sparsity on SmolLM2 — on the calibration domain and on
    another one — for about twice the compression time (benchmarks/RESULTS.md, ablation).
    """

    sparsity: float = 0.5
    n_m: tuple[int, int] | None = None
    quant: GPTQ | None = None
    damp: float = 0.01
    block_size: int = 128
    dense_output: bool = True
    solver: str = "admm"
    owl_lmbda: float | None = None
    owl_m: float = 5.0

    def __post_init__(self) -> None:
        _check_sparsity(self.sparsity, self.n_m)
        if not self.owl_m > 0:
            raise RecipeError(f"owl_m must be positive, got {self.owl_m}")
        if self.owl_lmbda is not None:
            room = min(self.sparsity, 0.99 - self.sparsity) / 2
            if self.owl_lmbda and self.n_m is not None:
                raise RecipeError("owl_lmbda spreads unstructured sparsity over the layers; "
                                  f"an N:M pattern ({self.n_m[0]}:{self.n_m[1]}) is the same "
                                  "in every layer: leave owl_lmbda None or 0")
            if not 0 <= self.owl_lmbda <= room + 1e-12:
                raise RecipeError(f"owl_lmbda must be in [0, {room:g}] for sparsity "
                                  f"{self.sparsity:g} (every layer's sparsity stays in "
                                  f"[0, 0.99]), got {self.owl_lmbda}")
        if self.n_m is not None:
            object.__setattr__(self, "n_m", tuple(self.n_m))
            n, m = self.n_m
            if self.block_size % m:
                raise RecipeError(f"block_size {self.block_size} must be a multiple of M={m}")
        if not 0 <= self.damp < 1:
            raise RecipeError(f"damp must be in [0, 1), got {self.damp}")
        if self.solver not in SOLVERS:
            raise RecipeError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.quant is not None and self.quant.act_order:  # GPTQ's default; see above
            object.__setattr__(self, "quant", dataclasses.replace(self.quant, act_order=False))
        if self.n_m and self.quant and self.quant.group_size != -1 \
                and self.quant.group_size % self.n_m[1]:
            raise RecipeError(f"group_size {self.quant.group_size} must be a multiple of "
                              f"M={self.n_m[1]}")

    @property
    def owl(self) -> float:
        """The OWL spread in effect (see the class docstring)."""
        if self.owl_lmbda is not None:
            return self.owl_lmbda
        if self.n_m is not None:
            return 0.0
        return min(OWL_LMBDA, min(self.sparsity, 0.99 - self.sparsity) / 4)

    def solve(self, w: torch.Tensor, stats: Statistics | None, name: str | None = None
              ) -> Compressed:
        from .algorithms import sparsegpt

        return sparsegpt(w, stats.hessian, self, name, stats.cross)

    def _extra_per_weight(self) -> int:
        return 0 if self.quant else 5


@dataclass(frozen=True)
class Magnitude(_Pruning, Method):
    """Magnitude pruning: the baseline every SparseGPT row is compared to. ``quant`` rounds the
    kept weights to nearest (the joint baseline)."""

    sparsity: float = 0.5
    n_m: tuple[int, int] | None = None
    quant: RTN | None = None

    def __post_init__(self) -> None:
        _check_sparsity(self.sparsity, self.n_m)
        if self.n_m is not None:
            object.__setattr__(self, "n_m", tuple(self.n_m))

    def solve(self, w: torch.Tensor, stats: Statistics | None = None, name: str | None = None
              ) -> Compressed:
        from .algorithms import magnitude

        return magnitude(w, self)

    def workspace(self, shape: tuple[int, int]) -> int:
        return 26 * shape[0] * shape[1] + _SMALL


def _check_sparsity(sparsity: float, n_m: tuple[int, int] | None) -> None:
    if n_m is not None:
        if len(n_m) != 2 or not all(isinstance(v, int) for v in n_m):
            raise RecipeError(f"n_m must be a pair of integers (N, M), got {n_m!r}")
        n, m = n_m
        if not 0 < n < m:
            raise RecipeError(f"N:M sparsity needs 0 < N < M (N weights kept of every M), "
                              f"got {n}:{m}")
    elif not 0 <= sparsity <= 0.99:
        raise RecipeError(f"sparsity must be in [0, 0.99], got {sparsity}")


METHODS: dict[str, type] = {c.__name__: c for c in (GPTQ, SparseGPT, RTN, Magnitude,
                                                     GGUFQuant)}


def method_to_dict(method: Method) -> dict[str, Any]:
    """``{"method": "GPTQ", ...fields}``, nested quant configs included."""
    out: dict[str, Any] = {"method": type(method).__name__}
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        if dataclasses.is_dataclass(value):
            value = method_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def method_from_dict(data: Mapping[str, Any]) -> Method:
    """Inverse of :func:`method_to_dict`; unknown methods or fields, and values of the wrong
    type (as a YAML/JSON file may hold), are clear errors."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"a method must be a mapping like {{method: GPTQ, bits: 4}}, got "
                          f"{_kind(data)}")
    data = dict(data)
    name = data.pop("method", None)
    if not isinstance(name, str) or name not in METHODS:
        raise RecipeError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    cls = METHODS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise RecipeError(f"{name} has no field(s) {sorted(unknown)}; fields: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    data = {k: _field_value(f"{name}.{k}", v, hints[k]) for k, v in data.items()}
    try:
        return cls(**data)
    except TypeError as e:
        raise RecipeError(f"{name}: {e}") from e


def _field_value(where: str, value: Any, hint: Any) -> Any:
    """``value`` as read from a file, checked against the field's type ``hint`` (and a
    nested method or an ``n_m`` list converted); a RecipeError says what was expected."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) \
        else (hint,)
    for t in options:
        if t is type(None) and value is None:
            return None
        if t in (int, float) and isinstance(value, (int, float)) \
                and not isinstance(value, bool) and (t is float or isinstance(value, int)):
            return value
        if t in (bool, str) and isinstance(value, t):
            return value
        if typing.get_origin(t) is tuple and isinstance(value, (list, tuple)) \
                and len(value) == len(typing.get_args(t)) \
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        if t in METHODS.values() and isinstance(value, Mapping) \
                and value.get("method") == t.__name__:
            return method_from_dict(value)
    expected = " or ".join(_EXPECTED.get(t) or _EXPECTED.get(typing.get_origin(t))
                           or f"a mapping like {{method: {t.__name__}, ...}}" for t in options)
    raise RecipeError(f"{where} must be {expected}, got {_kind(value)}")


_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             tuple: "a pair of integers like [2, 4]", type(None): "null"}

EXAMPLE = """\
version: 1
rules:                  # a list, tried in order: the first pattern matching a layer wins
  - pattern: 'model\\.layers\\..*'   # regular expression, matched against the whole name
    method: GPTQ        # GPTQ, SparseGPT, RTN, Magnitude, or null (leave the layers dense)
    bits: 4             # the method's fields (see `fxcompress recipes`)
    group_size: 64
  - pattern: '.*'
    method: null"""


def _kind(value: Any) -> str:
    """What a YAML/JSON value is, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, Mapping) and "method" in value:
        return f"a mapping with method {value['method']!r}"
    if isinstance(value, Mapping):
        return f"a mapping with keys {list(value)[:8]}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


def _shape_error(what: str) -> RecipeError:
    return RecipeError(f"{what}. A recipe file looks like this:\n{EXAMPLE}")


@dataclass(frozen=True, init=False, repr=False)
class Recipe:
    """Ordered rules ``{pattern: method or None}``; patterns are regular expressions matched
    against the whole module name (``re.fullmatch``); the first match wins."""

    rules: tuple[tuple[str, Method | None], ...]
    version: ClassVar[int] = RECIPE_VERSION

    def __init__(self, rules: Mapping[str, Method | None] | Method) -> None:
        if isinstance(rules, Method):
            rules = {".*": rules}
        if not isinstance(rules, Mapping):
            raise RecipeError(f"a Recipe takes a mapping {{pattern: method}} or one method, "
                              f"got {type(rules).__name__}")
        items = []
        for pattern, method in rules.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise RecipeError(f"invalid pattern {pattern!r}: {e}") from e
            if method is not None and not isinstance(method, Method):
                raise RecipeError(f"rule {pattern!r}: expected a method or None, got {method!r}")
            items.append((pattern, method))
        object.__setattr__(self, "rules", tuple(items))

    def match(self, name: str) -> tuple[str, Method | None] | None:
        """The first rule ``(pattern, method)`` whose pattern matches ``name``, or None."""
        for pattern, method in self.rules:
            if re.fullmatch(pattern, name):
                return pattern, method
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "rules": [{"pattern": p, **(method_to_dict(m) if m else {"method": None})}
                      for p, m in self.rules],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`: anything of another shape is a :class:`RecipeError`
        saying what was found, with an example of what is expected."""
        if not isinstance(data, Mapping):
            raise _shape_error(f"a recipe must be a mapping with a 'rules' list, got "
                               f"{'nothing (an empty file?)' if data is None else _kind(data)}")
        unknown = set(data) - {"version", "rules"}
        if unknown or "rules" not in data:
            raise _shape_error(f"a recipe has the keys 'rules' (and optionally 'version'), "
                               f"got {sorted(map(str, data))}")
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION or isinstance(version, bool):
            raise RecipeError(f"recipe version {version!r} is not supported "
                              f"(this fxcompress reads version {RECIPE_VERSION})")
        if not isinstance(data["rules"], list):
            raise _shape_error(f"'rules' must be a list (one '- pattern: ...' item per rule), "
                               f"got {_kind(data['rules'])}")
        rules: dict[str, Method | None] = {}
        for i, rule in enumerate(data["rules"]):
            pattern, method = _rule_from_dict(i, rule)
            if pattern in rules:
                raise RecipeError(f"rules[{i}]: pattern {pattern!r} appears twice (the first "
                                  f"match wins, so the second would never apply)")
            rules[pattern] = method
        return cls(rules)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"recipe is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe is not valid YAML: {e}") from e
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a ``.json``, ``.yaml`` or ``.yml`` recipe file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise RecipeError(f"cannot read recipe file {path}: {e}") from e
        try:
            return cls.from_json(text) if path.suffix == ".json" else cls.from_yaml(text)
        except RecipeError as e:
            raise RecipeError(f"recipe file {path}: {e}") from e

    def __repr__(self) -> str:
        return f"Recipe({dict(self.rules)!r})"


def _rule_from_dict(i: int, rule: Any) -> tuple[str, Method | None]:
    """``(pattern, method)`` of the ``i``-th rule of a recipe file."""
    if not isinstance(rule, Mapping):
        raise _shape_error(f"rules[{i}] must be a mapping with 'pattern' and 'method' keys, got "
                           f"{_kind(rule)}")
    rule = dict(rule)
    pattern = rule.pop("pattern", None)
    if not isinstance(pattern, str):
        raise _shape_error(f"rules[{i}] needs a 'pattern' (a regular expression string), got "
                           f"{_kind(pattern)}")
    if "method" not in rule:
        raise _shape_error(f"rules[{i}] ({pattern!r}) has no 'method': give one of "
                           f"{sorted(METHODS)}, or null to leave the layers dense")
    if rule["method"] is None:
        if len(rule) > 1:
            raise RecipeError(f"rules[{i}] ({pattern!r}): method null (dense) takes no fields, "
                              f"got {sorted(k for k in rule if k != 'method')}")
        return pattern, None
    try:
        return pattern, method_from_dict(rule)
    except RecipeError as e:
        raise RecipeError(f"rules[{i}] ({pattern!r}): {e}") from e


def _decoder(method: Method) -> Recipe:
    """Every linear except a language-model head (embeddings are never linears)."""
    return Recipe({"lm_head": None, ".*": method})


NAMED: dict[str, Recipe] = {
    "rtn-w4g64": _decoder(RTN(4, 64)),
    "gptq-w4g64": _decoder(GPTQ(4, 64)),
    "gptq-w4g64-act": _decoder(GPTQ(4, 64, act_order=True)),
    "gptq-w4g64-mse": _decoder(GPTQ(4, 64, mse=True)),
    "rtn-w4": _decoder(RTN(4, -1)),
    "gptq-w4": _decoder(GPTQ(4, -1)),
    "rtn-w3g64": _decoder(RTN(3, 64)),
    "gptq-w3g64": _decoder(GPTQ(3, 64)),
    "gptq-w4g128": _decoder(GPTQ(4, 128)),
    "gptq-w4g128-act": _decoder(GPTQ(4, 128, act_order=True)),
    "gptq-w3g128": _decoder(GPTQ(3, 128)),
    "gptq-w2g64": _decoder(GPTQ(2, 64)),
    "rtn-w8": _decoder(RTN(8, -1)),
    "gptq-w8": _decoder(GPTQ(8, -1)),
    "magnitude-50": _decoder(Magnitude(0.5)),
    "sparsegpt-50": _decoder(SparseGPT(0.5)),
    "magnitude-60": _decoder(Magnitude(0.6)),
    "sparsegpt-60": _decoder(SparseGPT(0.6)),
    "magnitude-2:4": _decoder(Magnitude(n_m=(2, 4))),
    "sparsegpt-2:4": _decoder(SparseGPT(n_m=(2, 4))),
    "magnitude-2:4+rtn-w4g64": _decoder(Magnitude(n_m=(2, 4), quant=RTN(4, 64))),
    "sparsegpt-2:4+w4g64": _decoder(SparseGPT(n_m=(2, 4), quant=GPTQ(4, 64))),
    "sparsegpt-2:4+w4g128": _decoder(SparseGPT(n_m=(2, 4), quant=GPTQ(4, 128))),
    # grids that are ggml block types: written to GGUF with their own codes and scales
    "gptq-q4_0": _decoder(GPTQ(4, 32, sym=True)),
    "gptq-q4_1": _decoder(GPTQ(4, 32)),
    "gptq-q8_0": _decoder(GPTQ(8, 32, sym=True)),
    "gptq-q4_k_m": _decoder(GGUFQuant("q4_k_m")),
    "gptq-q3_k_m": _decoder(GGUFQuant("q3_k_m")),
}


def resolve(spec: str | Path) -> Recipe:
    """A named recipe (see ``fxcompress recipes``) or a ``.yaml``/``.json`` recipe file."""
    if str(spec) in NAMED:
        return NAMED[str(spec)]
    path = Path(spec)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.exists():
            raise RecipeError(f"recipe file {path} does not exist")
        return Recipe.load(path)
    raise RecipeError(f"unknown recipe {str(spec)!r}: not a named recipe ({', '.join(NAMED)}) "
                      f"nor a .yaml/.json file")


def describe(method: Method | None) -> str:
    """A short human-readable form of a method, for tables."""
    if method is None:
        return "dense"
    fields = method_to_dict(method)
    name = fields.pop("method")
    return f"{name}(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"

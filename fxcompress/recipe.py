"""Recipes: what to do to which linear layer.

A :class:`Recipe` maps module-name patterns to methods (``fxcompress.methods``); the first
pattern that matches a linear's fully qualified name wins and ``None`` leaves the layer dense.
Recipes round-trip through JSON and YAML with a format version; a method is read from a
mapping through the methods' registry (:data:`~fxcompress.methods.METHODS`), its fields
checked against the types its dataclass declares. :data:`NAMED` holds the recipes the CLI and
the benchmarks know by name.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .errors import RecipeError
from .methods import GPTQ, METHODS, RTN, GGUFQuant, Magnitude, Method, SparseGPT

RECIPE_VERSION = 1


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
    method: GPTQ        # GPTQ, SparseGPT, RTN, Magnitude, GGUFQuant, or null (dense)
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
    "gptq-w4g64-mse": _decoder(GPTQ(4, 64, mse=True)),
    "rtn-w4": _decoder(RTN(4, -1)),
    "gptq-w4": _decoder(GPTQ(4, -1)),
    "rtn-w3g64": _decoder(RTN(3, 64)),
    "gptq-w3g64": _decoder(GPTQ(3, 64)),
    "gptq-w4g128": _decoder(GPTQ(4, 128)),
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

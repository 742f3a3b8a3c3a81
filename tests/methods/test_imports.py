"""The arrows between the rooms of this area point down: the solvers import nothing from the
methods or the recipes, and no import circle runs through algorithms/, methods/, kernels/,
recipe.py or errors.py (lazy imports inside functions included: they hide a circle, not
remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

import fxcompress

ROOT = Path(fxcompress.__file__).parent
AREA = ("fxcompress.algorithms", "fxcompress.methods", "fxcompress.kernels",
        "fxcompress.recipe", "fxcompress.errors")


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = ("fxcompress",) + p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fxcompress modules ``name`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {t for t in [target] + [f"{target}.{a.name}" for a in node.names]
                      if t in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    # a module's own packages are initialised before it: importing them closes no circle
    return {t for t in found if t != name and not name.startswith(t + ".")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for t in graph[todo.pop()]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def test_the_solvers_import_nothing_from_methods_or_recipes():
    graph = _graph()
    for m in (m for m in graph if m.startswith("fxcompress.algorithms")):
        upward = {t for t in graph[m] if t.startswith(("fxcompress.methods", "fxcompress.recipe",
                                                       "fxcompress.passes", "fxcompress.api"))}
        assert not upward, f"{m} imports {sorted(upward)}"


def test_no_import_circle_runs_through_this_area():
    graph = _graph()
    circles = [m for m in graph if m.startswith(AREA) and m in _reaches(graph, m)]
    assert not circles, f"modules on an import circle: {sorted(circles)}"


def test_no_import_circle_anywhere_in_the_package():
    graph = _graph()
    circles = [m for m in graph if m in _reaches(graph, m)]
    assert not circles, f"modules on an import circle: {sorted(circles)}"


def test_the_pipeline_s_rooms_import_nothing_above_them():
    """calibration/ knows no pipeline, output or checkpoint; checkpoint/ knows no
    calibration or pipeline; the pipeline knows neither of its two callers."""
    above = {"fxcompress.calibration": ("fxcompress.pipeline", "fxcompress.api",
                                        "fxcompress.streaming", "fxcompress.checkpoint"),
             "fxcompress.checkpoint": ("fxcompress.calibration", "fxcompress.pipeline",
                                       "fxcompress.api", "fxcompress.streaming"),
             "fxcompress.pipeline": ("fxcompress.api", "fxcompress.streaming",
                                     "fxcompress.checkpoint", "fxcompress.source")}
    graph = _graph()
    for room, banned in above.items():
        for m in (m for m in graph if m == room or m.startswith(room + ".")):
            upward = sorted(t for t in graph[m] if t.startswith(banned))
            assert not upward, f"{m} imports {upward}"


def test_the_check_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert {m for m in graph if m in _reaches(graph, m)} == {"a", "b", "c"}

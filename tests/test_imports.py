"""The house's import rules, read from the source: no import circle anywhere, and every library module's imports
point down (``space`` <- ``trials`` <- ``search`` <- ``dashboard``, and inside ``trials`` the layers below). A
command's ``main()`` is the one place allowed to import from above, since it wires the pieces together."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("space", "trials", "search", "dashboard", "benchmarks")  # bottom to top
# Inside trials, bottom to top; a module's layer is its longest matching prefix.
TRIALS_LAYERS = (
    ("trials.report", "trials.models.vocab"),
    ("trials.models",),
    ("trials.heldout", "trials.methods"),
    ("trials.tasks",),
    ("trials.run",),
    ("trials.probe", "trials.trained"),
    ("trials.train", "trials.predict", "trials.compare", "trials.pretraining"),
)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, bool]]]:
    """``{module: {(imported project module, imported inside a main() function)}}``: every import statement,
    at module level, in functions and under TYPE_CHECKING alike (a parent package's own import excluded)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    out: dict[str, set[tuple[str, bool]]] = defaultdict(set)
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        in_main = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "main"
                   for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target)
                if found and found != name and not name.startswith(found + "."):
                    out[name].add((found, id(node) in in_main))
    return out


def trials_layer(module: str) -> int:
    best, layer = -1, -1
    for i, prefixes in enumerate(TRIALS_LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    assert layer >= 0, f"{module} is in no layer of TRIALS_LAYERS: place it there"
    return layer


def test_there_is_no_import_circle():
    graph = {m: {t for t, _ in targets} for m, targets in imports(modules()).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_library_modules_import_only_downward():
    upward = []
    for module, targets in imports(modules()).items():
        for target, in_main in targets:
            if in_main:
                continue  # a command wires the pieces together
            here, there = PACKAGES.index(module.split(".")[0]), PACKAGES.index(target.split(".")[0])
            if there > here or (here == there == PACKAGES.index("trials")
                                and trials_layer(target) > trials_layer(module)):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_the_rules_see_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: on a tree with a circle and an upward import they report both."""
    for package, body in (("space", "import trials.run\n"), ("trials", "from space import x\n")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / ("x.py" if package == "space" else "run.py")).write_text(body)
    for package in PACKAGES[2:]:
        (tmp_path / package).mkdir()
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    graph = imports(modules())
    assert ("trials.run", False) in graph["space.x"] and ("space.x", False) in graph["trials.run"]
    for check, said in ((test_library_modules_import_only_downward, "space.x -> trials.run"),
                        (test_there_is_no_import_circle, "['space.x', 'trials.run']")):
        try:
            check()
        except AssertionError as exc:
            assert said in str(exc), str(exc)
        else:
            raise AssertionError(f"{check.__name__} did not report {said}")

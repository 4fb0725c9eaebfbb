"""The layering rules of docs/ARCHITECTURE.md, checked on the import statements of the package.

Each sub-package of ``sslbench/`` is a layer and may import only the layers below it: the trainer
(``train``) and the evaluators (``evaluation``) never import each other, plugins (``methods/``,
``evals/``) import sslbench only through ``sslbench.api``, the core imports nothing above it, and
no module imports itself through others (no import circle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The layers, each with the layers it may import (its own included).
ALLOWED = {
    "core": {"core"},  # the method contract and what everything shares
    "data": {"core", "data"},
    "backbones": {"core", "backbones"},
    "config": {"core", "data", "backbones", "config"},
    "results": {"core", "config", "results"},
    "evaluation": {"core", "data", "backbones", "config", "results", "evaluation"},
    "train": {"core", "data", "backbones", "config", "results", "train"},
    "api": {"core", "data", "backbones", "config", "results", "evaluation", "train"},
    "plugins": {"api", "plugins"},  # and only their own package (test_plugins_import_sslbench_only_through_the_api)
    "commands": {"core", "data", "backbones", "config", "results", "evaluation", "train", "api", "plugins", "commands"},
    "top": set(),  # sslbench/__init__.py, __main__.py, testing.py: any layer (checked below)
}
TOP = {"sslbench", "sslbench.__main__", "sslbench.testing"}
FILES = sorted(p for d in ("sslbench", "methods", "evals", "backbones") for p in (ROOT / d).rglob("*.py"))


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT)
    top = {"sslbench": "sslbench", "methods": "sslbench.methods", "evals": "sslbench.evals", "backbones": "sslbench.backbones"}[rel.parts[0]]
    rest = [p for p in rel.with_suffix("").parts[1:] if p != "__init__"]
    return ".".join([top, *rest])


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name | ast.Attribute) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def _nodes(tree: ast.AST, *, runtime: bool) -> list[ast.AST]:
    """Every node of ``tree``; with ``runtime``, not those under ``if TYPE_CHECKING:`` (never executed)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        todo.extend(c for c in ast.iter_child_nodes(node) if not (runtime and _is_type_checking(c)))
    return out


def _imports(path: Path, *, runtime: bool = False) -> set[str]:
    """Every sslbench module ``path`` imports (absolute or relative, at any depth of the file);
    ``runtime``: only the imports that run (not those for type checkers alone)."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in _nodes(ast.parse(path.read_text()), runtime=runtime):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sslbench")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("sslbench"):
                out.add(base)
                out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _layer(module: str) -> str:
    if module in TOP:
        return "top"
    if module == "sslbench.api":
        return "api"
    part = module.split(".")[1]
    if part in ("methods", "evals"):
        return "plugins"
    assert part in ALLOWED, f"{module} is in no layer: put it in a sub-package of sslbench/ (docs/ARCHITECTURE.md)"
    return part


def violations(module: str, imported: set[str], known: set[str]) -> list[str]:
    """The imports of ``module`` that its layer may not make."""
    me = _layer(module)
    if me == "top":
        return []
    # the root package holds only __version__: any module may read it
    return sorted(m for m in imported if m in known and m != "sslbench" and _layer(m) not in ALLOWED[me])


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path: Path) -> None:
    bad = violations(_module(path), _imports(path), {_module(p) for p in FILES})
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}, which its layer may not (docs/ARCHITECTURE.md)"


def test_the_rules_catch_each_forbidden_direction() -> None:
    trainer, knn, simclr, pipeline, method = (
        "sslbench.train.trainer",
        "sslbench.evals.knn",
        "sslbench.methods.simclr",
        "sslbench.commands.pipeline",
        "sslbench.core.method",
    )
    protocols, api, data = "sslbench.evaluation.protocols", "sslbench.api", "sslbench.data"
    known = {trainer, knn, simclr, pipeline, method, protocols, api, data}
    assert violations(trainer, {knn, protocols}, known) == [knn, protocols]
    assert violations(protocols, {trainer}, known) == [trainer]
    assert violations("sslbench.evals.finetune", {trainer}, known) == [trainer]
    assert violations(method, {simclr, pipeline, data}, known) == [pipeline, data, simclr]
    assert violations("sslbench.methods.byol", {trainer, method, api}, known) == [method, trainer]
    assert violations(method, {api}, known) == [api]
    assert violations(pipeline, {trainer, knn}, known) == []


def test_every_module_is_in_a_layer() -> None:
    for path in FILES:
        _layer(_module(path))  # asserts


def _own_package(module: str) -> str:
    return ".".join(module.split(".")[:2])  # sslbench.methods, sslbench.evals


@pytest.mark.parametrize("path", [p for p in FILES if p.relative_to(ROOT).parts[0] in ("methods", "evals")], ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_sslbench_only_through_the_api(path: Path) -> None:
    """What the built-in methods and evaluators use is what a third-party plugin gets: sslbench.api."""
    me = _module(path)
    bad = sorted(m for m in _imports(path) if m != "sslbench.api" and not m.startswith("sslbench.api.") and _own_package(m) != _own_package(me))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; plugins import sslbench through sslbench.api only (add the name there)"


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_module_imports_itself_through_others() -> None:
    """No import circle, counting imports inside functions (they run too) but not those under
    ``if TYPE_CHECKING:`` (for type checkers only; they never run)."""
    known = {_module(p) for p in FILES}
    graph = {_module(p): {m for m in _imports(p, runtime=True) if m in known and m != _module(p)} for p in FILES}
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []

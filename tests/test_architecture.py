"""The layering rules of docs/ARCHITECTURE.md, checked on the import statements of the package:
the trainer and the evaluators never import each other, plugins (methods/, evals/) import sslbench
only through ``sslbench.api``, the core imports no plugin, trainer, evaluator or command, and no
module imports itself through others (no import circle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINER = {
    "sslbench.run_setup",
    "sslbench.trainer",
    "sslbench.callbacks",
    "sslbench.batches",
    "sslbench.grad_cache",
    "sslbench.tracking",
    "sslbench.report",
}
COMMANDS = {
    "sslbench.cli",
    "sslbench.commands",
    "sslbench.compare",
    "sslbench.pipeline",
    "sslbench.__main__",
    "sslbench.curves",
    "sslbench.export",
    "sslbench.picture",
    "sslbench.doctor",
}
EVALUATION = {"sslbench.protocols"}  # the protocol registry and its declarations (the protocols are plugins in evals/)
API = {"sslbench.api"}  # what plugins import


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
    if module in API:
        return "api"
    if module in TRAINER:
        return "trainer"
    if module in COMMANDS:
        return "commands"
    if module in EVALUATION:
        return "evaluation"
    if module.startswith(("sslbench.methods", "sslbench.evals")):
        return "plugins"
    return "core"


ALLOWED = {
    "core": {"core"},
    "api": {"core", "evaluation", "trainer"},  # the contract, the registries and the base classes plugins build on
    "plugins": {"api", "plugins"},  # and only their own package (test_plugins_import_sslbench_only_through_the_api)
    "trainer": {"core", "trainer"},
    "evaluation": {"core", "evaluation"},
    "commands": {"core", "api", "plugins", "trainer", "evaluation", "commands"},
}
FILES = sorted(p for d in ("sslbench", "methods", "evals", "backbones") for p in (ROOT / d).rglob("*.py"))


def violations(module: str, imported: set[str], known: set[str]) -> list[str]:
    """The imports of ``module`` that its layer may not make."""
    me = _layer(module)
    return sorted(m for m in imported if m in known and _layer(m) not in ALLOWED[me])


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path: Path) -> None:
    bad = violations(_module(path), _imports(path), {_module(p) for p in FILES})
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}, which its layer may not (docs/ARCHITECTURE.md)"


def test_the_rules_catch_each_forbidden_direction() -> None:
    known = {"sslbench.trainer", "sslbench.evals.knn", "sslbench.methods.simclr", "sslbench.pipeline", "sslbench.method", "sslbench.api"}
    assert violations("sslbench.trainer", {"sslbench.evals.knn"}, known) == ["sslbench.evals.knn"]
    assert violations("sslbench.evals.finetune", {"sslbench.trainer"}, known) == ["sslbench.trainer"]
    assert violations("sslbench.method", {"sslbench.methods.simclr", "sslbench.pipeline"}, known) == ["sslbench.methods.simclr", "sslbench.pipeline"]
    assert violations("sslbench.methods.byol", {"sslbench.trainer", "sslbench.method", "sslbench.api"}, known) == [
        "sslbench.method",
        "sslbench.trainer",
    ]
    assert violations("sslbench.method", {"sslbench.api"}, known) == ["sslbench.api"]
    assert violations("sslbench.pipeline", {"sslbench.trainer", "sslbench.evals.knn"}, known) == []


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

"""The layering rules of docs/ARCHITECTURE.md, checked on the import statements of the package:
the trainer and the evaluators never import each other, plugins import only the core, and the core
imports no plugin, trainer, evaluator or command."""

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
    "sslbench.testing",  # the method contract's checks: builds, trains and runs methods through the CLI
}
EVALUATION = {"sslbench.protocols"}  # plus everything in evals/


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT)
    top = {"sslbench": "sslbench", "methods": "sslbench.methods", "evals": "sslbench.evals", "backbones": "sslbench.backbones"}[rel.parts[0]]
    rest = [p for p in rel.with_suffix("").parts[1:] if p != "__init__"]
    return ".".join([top, *rest])


def _imports(path: Path) -> set[str]:
    """Every sslbench module ``path`` imports (absolute or relative, at any depth of the file)."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
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
    if module in TRAINER:
        return "trainer"
    if module in COMMANDS:
        return "commands"
    if module in EVALUATION or module.startswith("sslbench.evals"):
        return "evaluation"
    if module.startswith("sslbench.methods"):
        return "plugins"
    return "core"


ALLOWED = {
    "core": {"core"},
    "plugins": {"core", "plugins"},
    "trainer": {"core", "trainer"},
    "evaluation": {"core", "evaluation"},
    "commands": {"core", "plugins", "trainer", "evaluation", "commands"},
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
    known = {"sslbench.trainer", "sslbench.evals.knn", "sslbench.methods.simclr", "sslbench.pipeline", "sslbench.method"}
    assert violations("sslbench.trainer", {"sslbench.evals.knn"}, known) == ["sslbench.evals.knn"]
    assert violations("sslbench.evals.finetune", {"sslbench.trainer"}, known) == ["sslbench.trainer"]
    assert violations("sslbench.method", {"sslbench.methods.simclr", "sslbench.pipeline"}, known) == ["sslbench.methods.simclr", "sslbench.pipeline"]
    assert violations("sslbench.methods.byol", {"sslbench.trainer", "sslbench.method"}, known) == ["sslbench.trainer"]
    assert violations("sslbench.pipeline", {"sslbench.trainer", "sslbench.evals.knn"}, known) == []

"""The plugin contract, checked for every registered method, the walkthrough's example (alignment and
uniformity, docs/examples/align_uniform.py) and toy
methods that use views of two sizes, the step's progress and a per-sample mask (tests/_toy_methods.py).

Parametrised over ``METHODS.names()``, so a method added later is held to the same rules: one SGD
step on a tiny timm ResNet on the CPU gives a finite scalar loss and gradients on the backbone;
target (momentum) networks get no gradient and are not moved by the optimizer, only by
``ema_update_``, exactly by its formula; ``momentum_pairs`` covers every frozen parameter; recipes
name valid optimizers; a small step against the gradient lowers the loss; a few more steps on easy
data stay finite. The checks are the installed ones a plugin author runs, :mod:`sslbench.testing`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from _toy_methods import TOYS

from sslbench.core.method import EMBEDDING_LOG, FAMILIES
from sslbench.core.optim import build_optimizer, param_groups
from sslbench.core.registry import METHODS, get_method
from sslbench.testing import (
    BATCH,
    SIZE,
    OneStep,
    check_builds,
    check_gradient_cache,
    check_loss_decreases,
    check_momentum,
    check_training_step,
    check_trains,
    make_batch,
    one_step,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "align_uniform.py"
EXAMPLE_MODULE = "sslbench_doc_example_align_uniform"


@pytest.fixture(scope="module", params=[*METHODS.names(), *TOYS])
def stepped(request: pytest.FixtureRequest) -> OneStep:
    return one_step(TOYS.get(request.param) or get_method(request.param))


def _load_example():
    """Import docs/examples/align_uniform.py from its path (registering "align_uniform")."""
    spec = importlib.util.spec_from_file_location(EXAMPLE_MODULE, EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_every_builtin_is_registered():
    assert {"simclr", "moco", "mocov3", "byol", "simsiam", "swav", "barlow_twins", "vicreg", "nnclr"} <= set(METHODS.names())
    for name in METHODS.names():
        assert get_method(name).name == name


def test_training_step_contract(stepped):
    check_training_step(stepped)


def test_every_builtin_hands_over_its_embedding_for_the_health_figures(stepped):
    """Issue 27: the collapse check measures the embedding each built-in method gives in its logs."""
    if type(stepped.method).__module__.startswith("sslbench.methods."):
        assert EMBEDDING_LOG in stepped.logs, type(stepped.method).__name__


def test_momentum_contract(stepped):
    check_momentum(stepped)


def test_views_and_recipes(stepped):
    """The class attributes, the encoder, views, recipes and optimizer groups (sslbench.testing.check_builds)."""
    check_builds(stepped)


def test_gradient_cache_hooks_agree_with_training_step(stepped):
    reason = check_gradient_cache(stepped)
    if reason:
        pytest.skip(reason)


def test_a_step_against_the_gradient_lowers_the_loss(stepped):
    check_loss_decreases(stepped)


def test_a_few_more_steps_on_easy_data_stay_finite(stepped):
    check_trains(stepped)


def test_hooks_are_never_looked_up_by_name():
    """The trainer, config and gradient cache call the Method hooks directly: no getattr/hasattr
    /inspect lookup of a hook remains (a misspelled hook must not silently do nothing)."""
    root = Path(__file__).resolve().parents[1] / "sslbench"
    hooks = (
        "momentum_pairs",
        "momentum_at",
        "param_groups",
        "views",
        "view_augmentations",
        "embed",
        "loss_from_embeddings",
        "recipe",
        "after_backward",
        "after_optimizer_step",
        "schedules",
        "validate",
    )
    for name in ("train/trainer.py", "train/run_setup.py", "train/callbacks.py", "config/__init__.py", "train/grad_cache.py", "train/batches.py"):
        text = (root / name).read_text()
        for hook in hooks:
            for lookup in (f'getattr(method, "{hook}"', f'hasattr(method, "{hook}"', f'"{hook}" in inspect'):
                assert lookup not in text, f"{name} looks up {hook} by name"
        assert "inspect.signature" not in text and "import inspect" not in text, name


@pytest.fixture
def example(monkeypatch):
    """The imported example module; it registers into a copy of the table, so "align_uniform"
    does not leak into other tests."""
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    monkeypatch.delitem(sys.modules, EXAMPLE_MODULE, raising=False)
    return _load_example()


def test_example_trains(example):
    assert get_method("align_uniform") is example.AlignUniform
    r = one_step(example.AlignUniform)
    check_builds(r)
    check_training_step(r)
    check_momentum(r)
    check_loss_decreases(r)
    # a second step on new views: still a finite loss, and every trainable parameter moves
    method = r.method
    opt = build_optimizer("sgd", param_groups(method, 1e-4), 1e-3, weight_decay=1e-4)
    before = [p.detach().clone() for p in method.parameters()]
    loss2, _ = method.training_step(make_batch([torch.randn(BATCH, 3, SIZE, SIZE) for _ in range(2)]))
    loss2.backward()
    opt.step()
    assert math.isfinite(loss2.item())
    assert all(not torch.equal(p, b) for p, b in zip(method.parameters(), before))


def reference_align_uniform(x: torch.Tensor, y: torch.Tensor, alpha: float, t: float) -> torch.Tensor:
    """Wang & Isola 2020: L_align = E ||f(x) - f(y)||^alpha over positive pairs and L_uniform =
    log E exp(-t ||f(x) - f(y)||^2) over pairs of different samples, averaged over the two views,
    written one pair at a time on the unit embeddings."""
    x, y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    n = x.shape[0]
    align = sum((x[i] - y[i]).norm() ** alpha for i in range(n)) / n

    def uniform(z: torch.Tensor) -> torch.Tensor:
        pairs = [torch.exp(-t * ((z[i] - z[j]) ** 2).sum()) for i in range(n) for j in range(n) if i < j]
        return torch.log(sum(pairs) / len(pairs))

    return align + (uniform(x) + uniform(y)) / 2


@pytest.mark.parametrize("n,d,alpha,t", [(2, 3, 2.0, 2.0), (7, 5, 2.0, 2.0), (10, 4, 1.0, 0.5)])
def test_example_loss_matches_formula(example, n, d, alpha, t):
    g = torch.Generator().manual_seed(n)
    x0, y0 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
    got = example.AlignUniformLoss(alpha=alpha, t=t)(x, y)
    got.backward()
    x2, y2 = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
    want = reference_align_uniform(x2, y2, alpha, t)
    want.backward()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-6) and torch.allclose(y.grad, y2.grad, rtol=1e-4, atol=1e-6)


def test_configs_reject_bad_values():
    from sslbench.core.errors import UserError

    bad = {
        "moco": {"queue_size": 0},
        "mocov3": {"temperature": 0.0},
        "byol": {"base_momentum": 1.5},
        "simsiam": {"proj_dim": 0},
        "simclr": {"temperature": -1.0},
        "swav": {"epsilon": 0.01},
        "barlow_twins": {"lambd": -1.0},
        "vicreg": {"var_weight": -1.0},
        "nnclr": {"queue_size": 0},
    }
    for name, change in bad.items():
        cfg = dataclasses.replace(get_method(name).Config(), **change)
        with pytest.raises(UserError):
            cfg.validate()


DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_walkthrough_quotes_the_example_file_verbatim():
    doc = (DOCS / "write-your-own-method.md").read_text()
    source = EXAMPLE.read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) >= 5
    for block in blocks:
        assert block in source, f"docs/write-your-own-method.md quotes code that is not in {EXAMPLE.name}:\n{block[:200]}"
    # together the quotes cover the whole file from the imports on
    body = source[source.index("from __future__ import annotations") :]
    assert sum(len(b) for b in blocks) >= len(body) - 50


def _recipe_table(name: str) -> tuple[list[str], dict[str, list[str]]]:
    """The column headers and the cells of each row of ``name``'s table in docs/recipes.md."""
    text = (DOCS / "recipes.md").read_text()
    match = re.search(rf"^## [^\n]*\(`{re.escape(name)}`[^\n]*\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"docs/recipes.md has no section for {name!r}"
    header: list[str] = []
    rows: dict[str, list[str]] = {}
    for line in match.group(1).splitlines():
        if not line.startswith("|"):
            if rows:
                break  # the first table of the section is the recipe's
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header:
            header = cells[1:]
        elif cells[0] and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return header, rows


def _column(header: list[str], size: int, family: str) -> int:
    """The one column of the recipe table that holds ``size`` px images on ``family`` backbones: a
    header names the size ("small" < 96 px, else ImageNet-size) and, where the families differ,
    the family ("convnet" or "ViT"); a header naming no family holds both."""
    small = size < 96

    def holds(h: str) -> bool:
        h = h.lower()
        named = "vit" if "vit" in h else "convnet" if "convnet" in h else None
        return ("small" in h) == small and named in (None, family)

    hits = [i for i, h in enumerate(header) if holds(h)]
    assert len(hits) == 1, f"recipe table columns {header} name {size} px {family} in {len(hits)} columns"
    return hits[0]


def _check_recipe_doc(name: str, cls: type) -> None:
    header, rows = _recipe_table(name)
    for size in (32, 224):
        for family in FAMILIES:
            recipe = dataclasses.asdict(cls.recipe(size, family))
            col = _column(header, size, family)
            opt = rows["optimizer"][col].split()[0].lower()
            lr, scaling = re.match(r"([0-9.e-]+) \((\w+)\)", rows["lr (scaling)"][col]).groups()
            wd = re.match(r"[0-9.e-]+", rows["weight decay"][col]).group(0)
            got = (opt, float(lr), scaling, float(wd))
            assert got == (recipe["optimizer"], recipe["lr"], recipe["lr_scaling"], recipe["weight_decay"]), f"{name} at {size} px, {family}"


@pytest.mark.parametrize("name", [n for n in METHODS.names() if get_method(n).__module__.startswith("sslbench.methods")])
def test_recipes_doc_agrees_with_recipe(name):
    _check_recipe_doc(name, get_method(name))


def test_recipes_doc_agrees_with_example_recipe(example):
    _check_recipe_doc("align_uniform", example.AlignUniform)

"""How well does each label-free figure predict k-NN and linear accuracy? A study of the committed runs.

Reads every results store committed under ``leaderboards/`` (``**/*.jsonl``, this study's own
folder excepted) and writes ``leaderboards/label-free/README.md`` and ``scatter.png``:

    python benchmarks/label_free_study.py            # rows -> README.md + scatter.png
    python benchmarks/label_free_study.py --check    # exit 1 when the committed README is stale

A *run* is one (results file, ``run_dir``, evaluation data). Its accuracies are the newest
``knn_top1`` and ``linear_top1`` at the encoder's output ``h`` (no label fraction); its label-free
figures are

- the label-free protocols' metrics at ``h`` (``sslbench eval --protocol
  rankme,alignment,uniformity,feature_std``, :mod:`sslbench.evals.label_free`): RankMe (Garrido et
  al. 2023), Wang & Isola's (2020) alignment and uniformity, the feature standard deviation;
- the training's health figures of the projector output ``z`` stored in every row's ``health``
  (:mod:`sslbench.core.health`): embedding std (x sqrt(d)), effective rank, DINO's teacher entropy.

For each figure and accuracy, over the runs that have both: Spearman's rho (Pearson's correlation
of average ranks; undefined below 3 runs or when one side is constant) and a percentile bootstrap
95% interval (:data:`RESAMPLES` resamples of the runs with replacement, ``numpy.random.default_rng``
seeded with :data:`SEED`; resamples whose rho is undefined are left out and counted). The README is
a pure function of the rows (:func:`readme`); ``tests/test_label_free_study.py`` regenerates it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ROWS_DIR = REPO / "leaderboards"
OUT_DIR = ROWS_DIR / "label-free"
PLOT_NAME = "scatter.png"
RESAMPLES = 2000  # bootstrap resamples of the runs
SEED = 0  # the bootstrap's generator seed
MIN_RUNS = 3  # Spearman's rho of fewer runs is not reported
TARGETS = ("knn_top1", "linear_top1")
LABEL_FREE_PROTOCOLS = ("rankme", "alignment", "uniformity", "feature_std")


@dataclass(frozen=True)
class Figure:
    """A label-free figure: where a row holds it and what it is."""

    name: str
    source: str  # "protocol" (a label-free protocol's metric) or "health" (the row's health entry)
    what: str


FIGURES = (
    Figure("rankme", "protocol", "RankMe (Garrido et al. 2023): exp entropy of the normalised singular values of the test features h"),
    Figure("alignment", "protocol", "Wang & Isola alignment: E||f(x)-f(y)||^2 of L2-normalised h over two augmented views (lower: better aligned)"),
    Figure(
        "uniformity", "protocol", "Wang & Isola uniformity: log E exp(-2||f(x)-f(y)||^2) of L2-normalised h over test pairs (lower: more uniform)"
    ),
    Figure("feature_std", "protocol", "standard deviation of the L2-normalised test features h"),
    Figure("feature_std_sqrt_d", "protocol", "the same times sqrt(d)"),
    Figure("embedding_std", "health", "std of the L2-normalised training embedding z at the end of training"),
    Figure("embedding_std_sqrt_d", "health", "the same times sqrt(d)"),
    Figure("embedding_rank", "health", "effective rank of the normalised training embedding z"),
    Figure("teacher_entropy_frac", "health", "teacher entropy / log K (DINO)"),
)


@dataclass
class Run:
    """One run's accuracies and label-free figures (the newest row of each)."""

    file: str  # the results file, relative to the repository
    run_dir: str
    data: str
    method: str
    targets: dict[str, float] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    commits: set[str] = field(default_factory=set)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _at_h(protocol: Mapping[str, Any]) -> bool:
    """Whether a row was scored on the encoder's output h (rows before depths existed were)."""
    depth = protocol.get("features")
    return not (isinstance(depth, str) and depth and " " not in depth and depth != "h")


def collect(rows_by_file: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[Run]:
    """The runs of ``rows_by_file`` (file name -> its rows in file order), files in sorted order."""
    runs: dict[tuple[str, str, str], Run] = {}
    for file in sorted(rows_by_file):
        indexed = sorted(enumerate(rows_by_file[file]), key=lambda item: (str(item[1].get("time") or ""), item[0]))
        for _, row in indexed:  # oldest first: newer rows overwrite
            protocol = row.get("protocol")
            metrics = row.get("metrics")
            if not isinstance(protocol, Mapping) or not isinstance(metrics, Mapping) or row.get("label_fraction") is not None:
                continue
            data = str(row.get("eval_data") or row.get("data"))
            key = (file, str(row.get("run_dir")), data)
            run = runs.setdefault(key, Run(file, key[1], data, str(row.get("method"))))
            commit = (row.get("env") or {}).get("git_commit")
            run.commits.add(str(commit) if commit else "not recorded")
            if _at_h(protocol):
                for name in TARGETS:
                    if _number(metrics.get(name)) is not None:
                        run.targets[name] = float(metrics[name])
                if protocol.get("name") in LABEL_FREE_PROTOCOLS:
                    for fig in FIGURES:
                        if fig.source == "protocol" and _number(metrics.get(fig.name)) is not None:
                            run.figures[fig.name] = float(metrics[fig.name])
            health = row.get("health")
            if isinstance(health, Mapping):
                for fig in FIGURES:
                    if fig.source == "health" and _number(health.get(fig.name)) is not None:
                        run.figures[fig.name] = float(health[fig.name])
    return list(runs.values())


# ---------------------------------------------------------------------------------------------
# Statistics


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of ``values``, ties sharing the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson's correlation of the average ranks; None below 2 pairs or when a side is constant."""
    if len(x) != len(y):
        raise ValueError("x and y need the same length")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denom if denom > 0 else None


def bootstrap_interval(x: Sequence[float], y: Sequence[float], *, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float, int] | None:
    """Percentile 95% interval of Spearman's rho over ``resamples`` resamples of the pairs with
    replacement (``numpy.random.default_rng(seed)``), and how many resamples had a defined rho."""
    n = len(x)
    if n < 2:
        return None
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    values = [r for r in (spearman(xs[p], ys[p]) for p in picks) if r is not None]
    if not values:
        return None
    lo, hi = np.quantile(np.asarray(values), [0.025, 0.975])
    return float(lo), float(hi), len(values)


@dataclass(frozen=True)
class Cell:
    figure: Figure
    target: str
    n: int
    rho: float | None
    interval: tuple[float, float, int] | None


def study(runs: Iterable[Run]) -> list[Cell]:
    """One :class:`Cell` per figure and accuracy, over the runs that have both."""
    runs = list(runs)
    cells = []
    for fig in FIGURES:
        for target in TARGETS:
            pairs = [(r.figures[fig.name], r.targets[target]) for r in runs if fig.name in r.figures and target in r.targets]
            xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
            enough = len(pairs) >= MIN_RUNS
            cells.append(Cell(fig, target, len(pairs), spearman(xs, ys) if enough else None, bootstrap_interval(xs, ys) if enough else None))
    return cells


# ---------------------------------------------------------------------------------------------
# README and plot


def _rho_text(cell: Cell) -> tuple[str, str]:
    if cell.n < MIN_RUNS:
        return "-", f"- (n < {MIN_RUNS})"
    rho = "undefined (a constant side)" if cell.rho is None else f"{cell.rho:+.2f}"
    if cell.interval is None:
        return rho, "-"
    lo, hi, used = cell.interval
    note = "" if used == RESAMPLES else f" ({used}/{RESAMPLES} resamples defined)"
    return rho, f"[{lo:+.2f}, {hi:+.2f}]{note}"


def _sources_table(rows_by_file: Mapping[str, Sequence[Mapping[str, Any]]], runs: list[Run]) -> list[str]:
    lines = ["| results file | rows | runs (rows at h, no label fraction) | with k-NN or linear | data | commits |", "|:--|--:|--:|--:|:--|:--|"]
    for file in sorted(rows_by_file):
        mine = [r for r in runs if r.file == file]
        data = sorted({r.data for r in mine})
        commits = sorted({c[:12] if c != "not recorded" else c for r in mine for c in r.commits})
        scored = sum(1 for r in mine if r.targets)
        lines.append(
            f"| `{file}` | {len(rows_by_file[file])} | {len(mine)} | {scored} | {', '.join(f'`{d}`' for d in data)} | {', '.join(commits)} |"
        )
    return lines


def readme(rows_by_file: Mapping[str, Sequence[Mapping[str, Any]]], plot_name: str = PLOT_NAME) -> str:
    """The study's README: a pure function of the rows (file name -> rows)."""
    runs = collect(rows_by_file)
    cells = study(runs)
    scored = [r for r in runs if r.targets]
    with_protocol = [r for r in scored if any(f.source == "protocol" and f.name in r.figures for f in FIGURES)]
    with_health = [r for r in scored if any(f.source == "health" and f.name in r.figures for f in FIGURES)]
    reported = [c for c in cells if c.n >= MIN_RUNS]
    out = [
        "# Label-free figures as predictors of k-NN and linear accuracy",
        "",
        "Generated by `python benchmarks/label_free_study.py` from the result rows committed under `leaderboards/`; "
        "do not edit by hand. For each label-free figure (no label is read to compute it) and each accuracy "
        "(`knn_top1`, `linear_top1`, at the encoder's output h), over the runs that have both: Spearman's rho and a "
        f"percentile bootstrap 95% interval ({RESAMPLES} resamples of the runs, seed {SEED}). A run is one "
        "(results file, run directory, evaluation data); rho needs at least "
        f"{MIN_RUNS} runs. Runs of different data, backbones and budgets are pooled: rho says whether the figure "
        "orders runs as their accuracy does, across all that the leaderboards hold.",
        "",
        "## What the committed rows hold",
        "",
        f"{len(runs)} runs in {len(rows_by_file)} results files, {len(scored)} with a k-NN or linear accuracy at h. "
        f"Runs with a label-free protocol row ({', '.join(LABEL_FREE_PROTOCOLS)}): {len(with_protocol)}; "
        f"with training health figures: {len(with_health)}. "
        + (
            f"{len(reported)} of {len(cells)} figure/accuracy pairs have the {MIN_RUNS} runs rho needs."
            if reported
            else f"No figure/accuracy pair has the {MIN_RUNS} runs rho needs: the study has no result yet."
        ),
        "",
    ]
    if not with_protocol:
        out += [
            "The committed runs were never scored with the label-free protocols, and their run directories "
            "(their encoders) are not kept in the repository, so those figures cannot be computed from what "
            "is committed: it takes training the runs again. To fill this study, score runs with "
            "`sslbench eval RUN --protocol knn,linear,rankme,alignment,uniformity,feature_std --results "
            "leaderboards/<board>/results.jsonl` (or `sslbench compare ... --protocol` with the same list), "
            "commit the rows and run the script again.",
            "",
        ]
    out += ["## Rows used", "", *_sources_table(rows_by_file, runs), ""]
    out += ["## Spearman's rho", "", "| figure | from | accuracy | n runs | rho | 95% interval |", "|:--|:--|:--|--:|--:|:--|"]
    for cell in cells:
        rho, interval = _rho_text(cell)
        out.append(f"| `{cell.figure.name}` | {cell.figure.source} | `{cell.target}` | {cell.n} | {rho} | {interval} |")
    out += ["", "Figures:", ""]
    out += [f"- `{f.name}` ({f.source}): {f.what}" for f in FIGURES]
    out += [
        "",
        "## Scatter",
        "",
        f"![each figure against each accuracy, one point per run]({plot_name})",
        "",
        "One panel per figure with at least one run, against each accuracy; one point per run, labelled with its method.",
        "",
    ]
    return "\n".join(out)


def plot(rows_by_file: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> None:
    """The scatter plot: one panel per (figure with a run, accuracy), one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = collect(rows_by_file)
    figures = [f for f in FIGURES if any(f.name in r.figures and r.targets for r in runs)]
    cols = len(TARGETS)
    rows = max(1, len(figures))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    if not figures:
        for ax in axes.flat:
            ax.set_axis_off()
        axes[0][0].text(0.0, 0.5, "no run has a label-free figure and an accuracy", fontsize=11)
    cells = {(c.figure.name, c.target): c for c in study(runs)}
    for i, f in enumerate(figures):
        for j, target in enumerate(TARGETS):
            ax = axes[i][j]
            pts = [(r.figures[f.name], r.targets[target], r.method) for r in runs if f.name in r.figures and target in r.targets]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18)
            for x, y, method in pts:
                ax.annotate(method, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            rho, _ = _rho_text(cells[f.name, target])
            ax.set_title(f"n={len(pts)}, rho={rho}", fontsize=9)
            ax.set_xlabel(f.name)
            ax.locator_params(axis="x", nbins=4)
            ax.tick_params(labelsize=7)
            ax.set_ylabel(target)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def read_committed(rows_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """file (relative to the repository) -> its rows, for every ``*.jsonl`` under ``rows_dir`` but :data:`OUT_DIR`."""
    from sslbench.results import read_rows

    out = {}
    for path in sorted(rows_dir.rglob("*.jsonl")):
        if OUT_DIR in path.parents:
            continue
        name = str(path.relative_to(REPO)) if REPO in path.parents else str(path)
        out[name] = read_rows(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=Path, default=ROWS_DIR, help=f"folder searched for *.jsonl results stores (default {ROWS_DIR})")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"folder of README.md and {PLOT_NAME} (default {OUT_DIR})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when README.md differs from what the rows give")
    args = parser.parse_args(argv)
    rows = read_committed(args.rows)
    text = readme(rows)
    target = args.out / "README.md"
    if args.check:
        same = target.is_file() and target.read_text() == text
        print(f"{target} is {'up to date' if same else 'stale: run python benchmarks/label_free_study.py'}")
        return 0 if same else 1
    args.out.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    plot(rows, args.out / PLOT_NAME)
    print(f"wrote {target} and {args.out / PLOT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

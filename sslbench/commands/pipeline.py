"""Training as the commands run it: the trainer, then the end-of-training picture and k-NN.

This is the layer above both the trainer and the evaluators (neither imports the other): it adds
the callbacks that come from elsewhere (the online probe from :mod:`sslbench.evals`, those named
in ``$SSLBENCH_CALLBACKS``), trains, draws the reconstruction picture of a method that
reconstructs images (:mod:`sslbench.commands.picture`, e.g. MAE), and scores the saved encoder with the same
feature extraction and k-NN that ``sslbench eval`` uses, recording the figures in ``results.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslbench.config import TrainConfig
from sslbench.core.errors import warn
from sslbench.data import ImageSplit, load_split
from sslbench.train.callbacks import Callback, callbacks_from_env
from sslbench.train.tracking import TrackerCallback, parse_trackers
from sslbench.train.trainer import TrainResult, train

__all__ = ["OnlineProbeCallback", "quick_knn", "train_and_score"]


def train_and_score(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    quiet: bool = False,
    resume_command: str | None = None,
    callbacks: list[Callback] | None = None,
) -> TrainResult:
    """Train ``cfg`` (with the online probe and the experiment trackers when configured); once it
    finishes, draw the reconstruction picture for a method that reconstructs images, score the
    encoder with the quick k-NN into ``results.json`` (when ``cfg.quick_knn``) and draw
    ``curves.png``."""
    tracker = TrackerCallback(parse_trackers(cfg.log_with))  # an unknown or missing tracker fails here, before any work
    cbs = [*callbacks_from_env(), *(callbacks or []), tracker]
    if cfg.online_probe:
        cbs.append(OnlineProbeCallback())
    try:
        result = train(cfg, resume=resume, quiet=quiet, resume_command=resume_command, callbacks=cbs, keep_lock=True)
        try:  # the run directory stays locked until its last file is written
            if result.stopped_early or not result.main:
                return result
            from sslbench.commands.picture import supports_picture, write_picture

            if supports_picture(cfg.method):
                picture = write_picture(result.run_dir)
                if not quiet:
                    print(f"reconstructions of test images: {picture}", file=sys.stderr)
            if cfg.quick_knn:
                _score(cfg, result, quiet)
                tracker.log_final(result.metrics)
            from sslbench.commands.curves import write_curves

            write_curves(result.run_dir)  # curves.png: loss, lr, images/s, probe accuracy (and the k-NN)
            return result
        finally:
            if result.lock is not None:
                result.lock.release()
                result.lock = None
    finally:
        tracker.close()


def _score(cfg: TrainConfig, result: TrainResult, quiet: bool) -> None:
    """The quick k-NN of a finished run, into ``result.metrics`` and its ``results.json``."""
    from sslbench.config.build import load_encoder
    from sslbench.core.rundir import RunDir, write_text_atomic

    path = RunDir(result.run_dir).results
    summary = json.loads(path.read_text())
    device = torch.device(str(summary.get("device", "cuda" if torch.cuda.is_available() else "cpu")))  # where the trainer trained
    precision = "bf16" if summary.get("precision") == "bf16" else "no"
    notes = summary.setdefault("warnings", [])  # (after setup's)
    result.metrics = quick_knn(cfg, load_encoder(result.run_dir), device, precision, quiet=quiet, record=notes)
    summary["metrics"] = result.metrics
    fix = f"the run is trained; score it with `sslbench eval {result.run_dir}`"
    write_text_atomic(path, json.dumps(summary, indent=2), fix)


def quick_knn(
    cfg: TrainConfig, encoder: nn.Module, device: torch.device, precision: str, *, quiet: bool = False, record: list[str] | None = None
) -> dict[str, float]:
    """The end-of-training k-NN (k=200, T=0.1, cosine) of h on the test split through the
    registered ``knn`` protocol (the code of ``sslbench eval --protocol knn``), and the same for
    the untrained backbone (same seed) as a baseline. The protocol's warnings (a k beyond the
    training images) go to ``record`` and, with the figures they qualify, to stderr unless ``quiet``
    (which prints neither)."""
    from accelerate.utils import set_seed

    from sslbench.backbones import create_backbone
    from sslbench.evaluation.features import eval_mode
    from sslbench.evaluation.protocols import EvalContext, EvalOptions, Score, get_protocol

    assert cfg.image_size is not None
    size = cfg.image_size
    train_split = load_split(cfg.data, "train", size, cache_dir=cfg.cache_dir, max_memory_gb=cfg.max_memory_gb)
    test_split = load_split(cfg.data, "test", size, cache_dir=cfg.cache_dir, max_memory_gb=cfg.max_memory_gb)
    if torch.unique(train_split.labels).numel() < 2:
        return {}  # one class: every accuracy is 100% (setup has warned)
    if not isinstance(train_split, ImageSplit) or not isinstance(test_split, ImageSplit):
        if not quiet:
            print(
                f"note: quick k-NN skipped for data read from disk (it would take two more passes over it); score the run with `sslbench eval {cfg.output}`",
                file=sys.stderr,
            )
        return {}
    knn = get_protocol("knn")
    opts = EvalOptions(protocols=["knn"], data=cfg.data)

    def score(enc: nn.Module) -> Score:
        with eval_mode(enc.to(device)):
            ctx = EvalContext(Path(str(cfg.output)), cfg, opts, enc, device, precision, cfg.data, train_split, test_split)
            return knn.run(ctx, None)

    trained_score = score(encoder)
    trained = dict(trained_score.metrics)
    for text in trained_score.protocol.get("warnings", ()):  # (the untrained score runs on the same bank)
        warn(text, record, show=not quiet)
    set_seed(cfg.seed)
    untrained = dict(score(create_backbone(cfg.backbone, size, **cfg.backbone_kwargs)).metrics)
    out = dict(trained)
    out.update({f"untrained_{k}": v for k, v in untrained.items()})
    if not quiet:
        k = trained_score.protocol.get("k_effective", cfg.knn_k)
        k_text = f"k={k}" if k == cfg.knn_k else f"k={k}: knn_k={cfg.knn_k} cut to the training images"
        print(
            f"k-NN top-1 on {cfg.data} test ({k_text}, T={cfg.knn_temperature}): trained {trained.get('knn_top1', float('nan')):.2f}%"
            f"  untrained {untrained.get('knn_top1', float('nan')):.2f}%"
        )
    return out


class OnlineProbeCallback(Callback):
    """The online probe (:class:`sslbench.evals.online_probe.OnlineProbe`) as a training callback
    (main process only): its head is built under a forked RNG, so a run with the probe trains
    bitwise the run without it (drop-path, dropout), updated on each step's first view, evaluated
    at the end of every epoch into ``metrics.jsonl``."""

    def __init__(self) -> None:
        self.probe: Any = None

    def on_train_start(self, run: Any) -> None:
        from sslbench.evals.online_probe import OnlineProbe

        if run.main:
            with torch.random.fork_rng(devices=[]):  # its head's init must not shift the run's random stream
                self.probe = OnlineProbe.for_run(run.cfg, run.method.encoder, run.train_split, run.device, run.precision)

    def on_step_end(self, run: Any, batch: Any, control: Any) -> None:
        if self.probe is not None:
            record = self.probe.after_step(run.method.encoder, batch.views[0], batch.index, control.done, run.plan)
            if record is not None:
                control.records.append(record)

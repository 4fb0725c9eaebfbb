"""The one training loop, for every method, on Accelerate: CPU, one GPU or many.

It reads like Accelerate's own examples: :func:`train` is setup (:func:`sslbench.train.run_setup.setup_run`),
a short loop (:func:`train_loop`) and finish (:func:`finish`). Everything method-specific comes
through :class:`sslbench.core.method.Method`, whose hooks the loop calls unconditionally; everything
that watches the loop is a :class:`sslbench.train.callbacks.Callback`. This file never names a method
and imports no evaluator: the end-of-training k-NN is the command layer's
(:mod:`sslbench.commands.pipeline`).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.profiler import record_function

from sslbench.config import TrainConfig
from sslbench.core import dist
from sslbench.core.errors import UserError
from sslbench.core.health import HealthMonitor
from sslbench.core.method import Batch
from sslbench.core.rundir import write_atomic, write_text_atomic
from sslbench.core.runlock import RunLock
from sslbench.results import device_hours, hardware_summary
from sslbench.train.batches import stream_batches
from sslbench.train.callbacks import Callback, CheckpointPolicy, Control, MetricsFile, ProgressDisplay, StopControl
from sslbench.train.run_setup import Run, apply_schedules, channels_last_views, setup_run

__all__ = ["NonFiniteGuard", "TrainResult", "finish", "train", "train_loop"]


@dataclass
class TrainResult:
    """What ``train`` returns (and writes to ``results.json``)."""

    run_dir: Path
    steps: int
    epochs: float
    images_seen: int
    wall_time_s: float  # this session's training time (a resumed run: since it resumed)
    images_per_s: float
    train_time_s: float = 0.0  # training time over every session of the run (Run.train_time_s)
    metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    stop_signal: int | None = None  # the signal (SIGTERM, SIGINT) that stopped the run early
    main: bool = True  # this is the main process (the one that writes the run's files)
    lock: RunLock | None = None  # the run directory's lock, when the caller asked to keep it (train(keep_lock=True))
    health: dict[str, Any] | None = None  # the collapse verdict and its figures (sslbench.core.health; None: no figures)


class NonFiniteGuard:
    """The non-finite-loss check, the same on every device.

    Each step's loss is tested on the device without a host sync and the first bad step is
    recorded; the record is read (and agreed over processes, the earliest bad step) at logging
    steps and before every checkpoint, so a NaN step is never saved. With ``nonfinite=skip`` every
    step is checked before its update instead (one host sync a step) and a bad step is skipped.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.per_step = run.cfg.nonfinite == "skip"
        self.first_bad = torch.full((), -1, dtype=torch.long, device=run.device)

    def step_ok(self, loss: Tensor, step: int) -> bool:
        """Whether to apply the step (False: skipped); raises once it must stop."""
        finite = torch.isfinite(loss.detach())
        if not self.per_step:
            self.first_bad.masked_fill_(~finite & (self.first_bad < 0), step + 1)
            return True
        run = self.run
        ok = bool(dist.all_reduce_mean(finite.float()) == 1) if run.world > 1 else bool(finite)
        if ok:
            return True
        if run.skipped < run.cfg.max_skipped_steps:
            run.skipped += 1
            run.optimizer.zero_grad(set_to_none=True)
            print(f"warning: non-finite loss at step {step + 1}; skipped ({run.skipped}/{run.cfg.max_skipped_steps})", file=sys.stderr)
            return False
        self._raise(step + 1)
        return False

    def check(self) -> None:
        """Raise if any process has recorded a non-finite loss since the start."""
        if self.per_step:
            return
        bad = int(self.first_bad)
        if self.run.world > 1:
            import torch.distributed as torch_dist

            none = torch.iinfo(torch.int64).max
            earliest = torch.where(self.first_bad >= 0, self.first_bad, torch.full_like(self.first_bad, none))
            torch_dist.all_reduce(earliest, op=torch_dist.ReduceOp.MIN)
            bad = -1 if int(earliest) == none else int(earliest)
        if bad >= 0:
            self._raise(bad)

    def _raise(self, step: int) -> None:
        cfg, run = self.run.cfg, self.run
        what = f"non-finite loss (NaN or inf) at step {step}"
        if run.skipped:
            what += f" after {run.skipped} skipped steps (max_skipped_steps={cfg.max_skipped_steps})"
        if run.last_ckpt:
            where = (
                f"the last good checkpoint is {run.last_ckpt}; lower the lr (or set grad_clip) and continue from it with "
                f"`sslbench train --output {cfg.output} --resume --lr LR`"
            )
        else:
            where = "no checkpoint was saved yet; lower --lr or set grad_clip"
        raise UserError(f"{what}; {where}, or pass --set nonfinite=skip")


def _forward(run: Run, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    if run.grad_cache is not None:
        return run.grad_cache.forward(batch)
    out: tuple[Tensor, dict[str, Tensor]] = run.model(batch)
    return out


def train_loop(run: Run, callbacks: list[Callback], *, health: HealthMonitor | None = None) -> tuple[int, int | None]:
    """Train from ``run.start_step``; returns (steps done, the signal that stopped it or None).
    ``health`` collects the collapse figures (:mod:`sslbench.core.health`; default: a fresh monitor)."""
    cfg, plan, acc = run.cfg, run.plan, run.accelerator
    guard = NonFiniteGuard(run)
    health = health or health_monitor(run)
    loss_sum, loss_n = torch.zeros((), device=run.device), 0
    t_log, images_since_log = time.perf_counter(), 0
    progress: float | None = None
    step, done = run.start_step, run.start_step
    if run.session_start is None:  # driven without train(): the time budget counts from here
        run.session_start = time.perf_counter()
    for cb in callbacks:
        cb.on_train_start(run)
    run.model.train()
    stream = stream_batches(
        run.train_split,
        run.specs,
        plan,
        seed=cfg.seed,
        start_step=run.start_step,
        rank=run.rank,
        device=run.device,
        num_workers=cfg.num_workers,
        data_on_device=run.data_on_device,
    )
    for step, views, idx, boxes in stream:
        batch = Batch(channels_last_views(views, run.channels_last), idx, run.info(step, progress if run.time_based else None), boxes)
        values = apply_schedules(run.optimizer, run.schedules, batch.info)
        with record_function("sslbench.forward"):  # named ranges for profilers (benchmarks/speed.py --profile)
            loss, logs = _forward(run, batch)
        health.take(logs, step)  # the embedding out of the logs (a reference; measured at logging steps)
        for cb in callbacks:
            loss = cb.on_loss(run, batch.info, loss)
        if not guard.step_ok(loss, step):
            continue
        with record_function("sslbench.backward"):
            acc.backward(loss)
            if run.grad_cache is not None:  # the loss's backward reached the cached embeddings only
                run.grad_cache.backward()
        with record_function("sslbench.optimizer"):
            if cfg.grad_clip is not None:
                acc.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
            run.method.after_backward(batch.info)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.method.after_optimizer_step(batch.info)
        loss_sum += loss.detach().float()
        loss_n += 1
        images_since_log += plan.global_batch
        done = step + 1
        control = Control(done=done, log=done % cfg.log_every == 0 or done == plan.total_steps)
        for cb in callbacks:
            cb.on_step_end(run, batch, control)
        progress = control.progress if control.progress is not None else progress
        for record in control.records:  # other callbacks' records (the online probe's), before the loop's
            for cb in callbacks:
                cb.on_record(run, record)
        if control.log:
            mean_loss = dist.all_reduce_mean(loss_sum / loss_n) if run.world > 1 else loss_sum / loss_n
            guard.check()
            now = time.perf_counter()
            ips = images_since_log / max(now - t_log, 1e-9)
            record = {
                "step": done,
                "epoch": round(done / plan.steps_per_epoch, 4),
                "loss": float(mean_loss),
                "lr": values["lr"],
                "images_per_s": round(ips, 2),
            }
            # Other scheduled values, then the method's logged scalars (last step), averaged over processes.
            record.update({k: v for k, v in values.items() if k != "lr"})
            record.update({k: float(dist.all_reduce_mean(v) if run.world > 1 else v) for k, v in logs.items() if k != "loss"})
            health.window(record)  # the health figures of the window's last batch; warns once on collapse
            for cb in callbacks:
                cb.on_record(run, record)
            loss_sum.zero_()
            loss_n, images_since_log, t_log = 0, 0, now
        if control.save or control.stop_signal is not None:  # a periodic checkpoint, or the one a signal asks for
            guard.check()
            _save(run, callbacks, done)
        if control.stop_signal is not None:
            if run.main:
                name = signal.Signals(control.stop_signal).name
                again = run.resume_command
                print(f"{name}: saved checkpoint at step {done} in {run.last_ckpt}; resume with: {again}", file=sys.stderr)
            return done, control.stop_signal
    guard.check()
    return (step + 1 if plan.total_steps > run.start_step else run.start_step), None


def health_monitor(run: Run) -> HealthMonitor:
    """The run's collapse check; a resumed run's step-0 reference and verdict come from ``metrics.jsonl``."""
    monitor = HealthMonitor(world=run.world, main=run.main)
    if run.main and run.start_step > 0:
        monitor.resume_from(run.files.metrics)
    return monitor


def _save(run: Run, callbacks: list[Callback], step: int, *, final: bool = False) -> None:
    def written(tmp: Path) -> None:
        for cb in callbacks:
            cb.on_checkpoint_written(run, step, tmp)

    run.save(step, final=final, on_written=written)


def finish(run: Run, callbacks: list[Callback], result: TrainResult) -> None:
    """The final checkpoint, the encoder and method weights, and ``results.json``."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from sslbench.backbones import save_encoder

    cfg, total = run.cfg, run.plan.total_steps
    _save(run, callbacks, total, final=True)
    run.accelerator.wait_for_everyone()
    if run.main:
        fix = f"the checkpoint of step {total} is saved: free some space and finish with `{run.resume_command}`"
        encoder_meta = {"backbone": cfg.backbone, "step": total}
        save_encoder(run.method.encoder, run.files.encoder, meta=encoder_meta, what=fix)
        state = {k: v.detach().contiguous().cpu() for k, v in run.method.state_dict().items()}
        write_atomic(run.files.method, lambda tmp: save_file(state, str(tmp)), fix, errors=(OSError, SafetensorError))
        write_text_atomic(run.files.results, json.dumps(results_json(run, result), indent=2), fix)
    run.accelerator.wait_for_everyone()


def results_json(run: Run, result: TrainResult) -> dict[str, Any]:
    """The ``results.json`` of a finished run: what ran (the effective precision, device, image
    size, batch, lr and schedule lengths), not only what was asked."""
    cfg, plan = run.cfg, run.plan
    return {
        "method": cfg.method,
        "backbone": cfg.backbone,
        "data": cfg.data,
        "image_size": cfg.image_size,
        "steps": result.steps,
        "epochs": result.epochs,
        "images_seen": result.images_seen,
        "batch_size": plan.global_batch,
        "wall_time_s": result.wall_time_s,
        "images_per_s": result.images_per_s,
        "precision": run.precision,
        "seed": cfg.seed,
        "processes": run.world,
        "train_time_s": result.train_time_s,
        "device_hours": device_hours(run.world, result.train_time_s),
        "device": run.device.type,
        "hardware": hardware_summary(run.device),
        "train_images": len(run.train_split),
        "steps_per_epoch": plan.steps_per_epoch,
        "warmup_steps": plan.warmup_steps,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "lr_scaling": cfg.lr_scaling,
        "metrics": result.metrics,
        "health": result.health,
        "warnings": list(run.warnings),  # one line each, as printed (setup's; the quick k-NN adds its own)
    }


def default_callbacks(quiet: bool) -> list[Callback]:
    """The loop's own observers, in the order they run after each step."""
    return [StopControl(), CheckpointPolicy(), MetricsFile(), ProgressDisplay(quiet)]


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    quiet: bool = False,
    resume_command: str | None = None,
    callbacks: list[Callback] | None = None,
    keep_lock: bool = False,
) -> TrainResult:
    """Train ``cfg``: setup, loop, finish; returns the run summary. ``callbacks`` run before the
    default ones by their ``order`` (a test's fault injection, the online probe). ``resume_command``:
    what the message after a SIGTERM/SIGINT tells to run to continue (default ``sslbench train
    --output RUN_DIR --resume``; ``compare`` passes its own command). The run directory is locked
    until the run ends; with ``keep_lock`` a finished run's lock is handed to the caller in
    ``result.lock`` (the pipeline writes the quick k-NN into ``results.json`` before letting go)."""
    run = setup_run(cfg, resume=resume, quiet=quiet, resume_command=resume_command)
    handed_over = False
    try:
        cbs = sorted([*(callbacks or []), *default_callbacks(quiet)], key=lambda cb: cb.order)
        t0 = run.session_start = time.perf_counter()
        health = health_monitor(run)
        try:
            steps_done, stop_signal = train_loop(run, cbs, health=health)
        finally:
            for cb in cbs:
                cb.on_train_end(run, run.start_step)
        wall = time.perf_counter() - t0
        plan = run.plan
        result = TrainResult(
            run_dir=run.run_dir,
            steps=steps_done,
            epochs=round(steps_done / plan.steps_per_epoch, 4),
            images_seen=steps_done * plan.global_batch,
            wall_time_s=round(wall, 3),
            train_time_s=round(run.train_time_s(), 3),
            images_per_s=round((steps_done - run.start_step) * plan.global_batch / max(wall, 1e-9), 2),
            stopped_early=stop_signal is not None,
            stop_signal=stop_signal,
            main=run.main,
            health=health.summary(),
        )
        if stop_signal is None:
            finish(run, cbs, result)
        if keep_lock and not result.stopped_early:
            result.lock, handed_over = run.lock, True
        return result
    finally:
        if not handed_over and run.lock is not None:
            run.lock.release()

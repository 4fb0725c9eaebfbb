"""The one training loop, for every method, on Accelerate: CPU, one GPU or many.

It reads like Accelerate's own examples: one ``prepare``, ``accelerator.backward``, and
``save_state``/``load_state`` for checkpoints. Everything method-specific comes through the plugin
contract (``sslbench.method``); this file never names a method.

Data order and augmentation are pure functions of ``(seed, epoch, position)``: a step's global
batch is a slice of a seeded permutation, each process takes its contiguous share, and views come
from :mod:`sslbench.augment`'s counter-based randomness. So N processes see exactly the batches
one process sees, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from . import _testhooks
from . import checkpoint as ckpt
from .augment import AugmentConfig, BatchAugment, per_image_transform
from .build import build_method  # (moved to sslbench.build; re-exported here for now)
from .config import TrainConfig, dump_yaml
from .data import FileSplit, ImageSplit, balanced_subset, load_split
from .errors import UserError
from .grad_cache import make_grad_cache
from .hostmem import keep_freed_memory
from .method import default_view_augmentations
from .momentum import ema_update_
from .optim import build_optimizer, lr_at, param_groups, scale_lr
from .results import hardware_summary
from .rundir import RunDir, write_atomic, write_text_atomic


class StepModule(nn.Module):
    """What DDP wraps: ``forward(views)`` is the method's training step, so gradient
    synchronisation hooks fire exactly as for a plain model. ``forward(views, embed=True)`` is
    ``method.embed(views)``, the gradient cache's forward (:mod:`sslbench.grad_cache`), and with
    ``targets=False`` its gradient-carrying part only."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, views: list[Tensor], embed: bool = False, targets: bool = True) -> Any:
        if embed:
            return self.method.embed(views) if targets else self.method.embed(views, targets=False)
        return self.method.training_step(views)


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@dataclass
class Schedule:
    """Step bookkeeping derived from the config and the data set size."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    global_batch: int
    local_batch: int

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


UNBOUNDED_STEPS = 2**62  # the step count of a run bounded only by its time budget (time_budget_s)


def make_schedule(cfg: TrainConfig, n_train: int, world_size: int, min_batch: int) -> Schedule:
    batch = cfg.batch_size
    if batch < min_batch:
        raise UserError(f"batch size {batch} is too small for {cfg.method} (needs >= {min_batch}); pass --batch-size {max(min_batch, 2) * 128}")
    if batch > n_train:
        batch = n_train - n_train % world_size
        print(f"note: batch size {cfg.batch_size} > {n_train} training images; using {batch}", file=sys.stderr)
    if batch % world_size:
        raise UserError(f"batch size {batch} must be divisible by the number of processes ({world_size})")
    steps_per_epoch = max(1, n_train // batch)  # drop_last: every step sees a full batch
    total = cfg.steps if cfg.steps is not None else (cfg.epochs or 10) * steps_per_epoch
    unbounded = cfg.time_budget_s is not None and cfg.steps is None and cfg.epochs is None
    if unbounded:  # a time budget alone: run until it is spent; the lr stays constant after warm-up
        total = UNBOUNDED_STEPS
    if cfg.warmup_epochs is not None:
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    else:
        warmup = steps_per_epoch if unbounded else min(10 * steps_per_epoch, total // 10)
    return Schedule(steps_per_epoch, total, min(warmup, total), batch, batch // world_size)


@dataclass
class TrainResult:
    """What ``train`` returns (and writes to ``results.json``)."""

    run_dir: Path
    steps: int
    epochs: float
    images_seen: int
    wall_time_s: float
    images_per_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    stop_signal: int | None = None  # the signal (SIGTERM, SIGINT) that stopped the run early


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits cleanly at the next step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def default_run_dir(cfg: TrainConfig) -> Path:
    data = cfg.data.replace(":", "-").replace("/", "_").strip("_")[-40:]
    return Path("runs") / f"{cfg.method}-{cfg.backbone}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"


def _prepare_run_dir(path: Path, *, create: bool = False) -> None:
    """Check, before any data is loaded, that the run directory can be written; it is created
    (``create=True``) only once training starts, so a run that fails during setup leaves nothing."""
    import tempfile

    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
            return
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(20, os.strerror(20), str(path))
        existing = next(p for p in (path, *path.absolute().parents) if p.exists())
        if not existing.is_dir():  # a regular file somewhere on the way
            raise NotADirectoryError(20, os.strerror(20), str(existing))
        os.rmdir(tempfile.mkdtemp(prefix=".sslbench-write-test-", dir=existing))
    except OSError as exc:
        raise UserError(f"cannot write to output directory {path}: {exc.strerror or exc}; pass a writable --output") from exc


def _refuse_existing_run(path: Path) -> None:
    """A new (not resumed) run must not write into a run directory that already holds checkpoints or
    results: its checkpoints would mix with the old ones and the old results would be lost."""
    run = RunDir(path)
    if ckpt.list_checkpoints(run.checkpoints) or run.summary.exists():
        raise UserError(
            f"{path} already holds a run (checkpoints or results.json); continue it with "
            f"`sslbench train --output {path} --resume`, or pass a new --output"
        )


def _truncate_metrics(path: Path, start_step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``start_step`` (none for a run starting at 0): the
    steps after the checkpoint a run resumes from are trained and logged again, so every step
    appears once. A torn last line (a crash mid-write) is dropped."""
    if not path.exists():
        return
    if start_step == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= start_step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept), "pass a writable --output")


class _FileViews(torch.utils.data.Dataset):
    """Per-image path for data that does not fit in memory: decode, then the torchvision pipeline,
    seeded per (seed, epoch, index, view) so it is independent of worker and process."""

    def __init__(self, split: FileSplit, augs: Sequence[AugmentConfig], image_size: int, seed: int) -> None:
        self.split = split
        self.transforms = [per_image_transform(a, image_size) for a in augs]
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[list[Tensor], int]:
        img = self.split.open(i)
        views = []
        for v, t in enumerate(self.transforms):
            torch.manual_seed(hash((self.seed, self.epoch, i, v)) & 0x7FFF_FFFF_FFFF)
            views.append(t(img))
        return views, i


def _to_device_async(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (on the host) copied to ``device`` without blocking the host: a plain ``.to(cuda)``
    from pageable memory synchronises the stream (the GPU's queue drains), so CUDA copies go
    through pinned memory with ``non_blocking``."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


DATA_GPU_SHARE = 0.25  # in-memory training data is copied to a GPU when it takes at most this share of its memory


def data_fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether in-memory training data of ``nbytes`` is kept on ``device`` (always on the CPU; on
    a GPU when it takes at most :data:`DATA_GPU_SHARE` of the GPU's memory, which leaves the rest
    to the model: 8 GB of data would not leave a 16 GB GPU room to train a ResNet-50)."""
    if device.type != "cuda":
        return True
    return nbytes <= DATA_GPU_SHARE * torch.cuda.get_device_properties(device).total_memory


def _batches(
    cfg: TrainConfig,
    train: ImageSplit | FileSplit,
    sched: Schedule,
    start_step: int,
    rank: int,
    device: torch.device,
    augmenters: list[BatchAugment],
    file_views: _FileViews | None,
    data_on_device: bool | None = None,
) -> Iterator[tuple[int, list[Tensor], Tensor]]:
    """Yield (step, views, local sample indices) from ``start_step`` on; each process gets its
    contiguous share of the step's global batch.

    In-memory data lives on ``device`` (``data_on_device``, default :func:`data_fits_on_device`)
    or else in host memory, where each step's images are gathered and copied to the device
    without blocking. Either way the indices are on ``device`` and nothing in a step waits for
    the device (no host sync)."""
    n = len(train)
    in_memory = isinstance(train, ImageSplit)
    if in_memory and data_on_device is None:
        data_on_device = data_fits_on_device(train.images.nbytes, device)
    images = (train.images.to(device) if data_on_device else train.images) if in_memory else None
    step = start_step
    while step < sched.total_steps:
        epoch = sched.epoch_of(step)
        perm = epoch_permutation(n, cfg.seed, epoch)
        first = step - epoch * sched.steps_per_epoch
        last = min(sched.steps_per_epoch, first + (sched.total_steps - step))

        def local(order: Tensor) -> list[Tensor]:
            return [
                order[p * sched.global_batch + rank * sched.local_batch : p * sched.global_batch + (rank + 1) * sched.local_batch]
                for p in range(first, last)
            ]

        if images is not None:
            perm_device = _to_device_async(perm, device)  # once per epoch; the steps slice it on the device
            for idx_host, idx in zip(local(perm), local(perm_device)):
                if step >= sched.total_steps:  # the loop may cut the run short (time budget)
                    return
                with record_function("sslbench.augment"):
                    imgs = images[idx] if data_on_device else _to_device_async(images[idx_host], device)
                    views = [aug(imgs, idx, seed=cfg.seed, epoch=epoch, view=v) for v, aug in enumerate(augmenters)]
                yield step, views, idx
                step += 1
        else:
            assert file_views is not None
            file_views.epoch = epoch
            loader = torch.utils.data.DataLoader(
                file_views,
                batch_sampler=[idx.tolist() for idx in local(perm)],
                num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
                persistent_workers=False,
            )
            for views, idx in loader:
                if step >= sched.total_steps:
                    return
                yield step, [v.to(device, non_blocking=True) for v in views], idx
                step += 1


def _launched_on_cpu() -> bool:
    """True for several processes (``torchrun``, ``WORLD_SIZE > 1``) on a machine without an
    accelerator: Accelerate sets up its multi-CPU (gloo) state only when told ``cpu=True``;
    otherwise every process would believe it is alone (rank 0 of 1) while ``torch.distributed``
    is initialised, so all would train on the same data and all would write the run files."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accel = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accel is None or not hasattr(accel, "is_available"):
        return not torch.cuda.is_available()
    if not accel.is_available():
        return True
    current = accel.current_accelerator()
    return current is not None and current.type == "mps"  # Accelerate has no multi-process MPS backend


def train(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False, resume_command: str | None = None) -> TrainResult:
    """Train ``cfg`` and evaluate the encoder with a quick k-NN; returns the run summary.
    ``resume_command``: what the message after a SIGTERM/SIGINT tells to run to continue
    (default ``sslbench train --output RUN_DIR --resume``; ``compare`` passes its own command)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    from sslbench import dist
    from sslbench.backbones import save_encoder

    cfg.resolve_defaults()
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=_launched_on_cpu(),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        dynamo_backend="inductor" if cfg.compile else None,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.device.type == "cuda":
        # Training shapes are fixed: cuDNN times its convolution algorithms once per shape and
        # keeps the fastest (not in deterministic runs, where the choice could vary).
        torch.backends.cudnn.benchmark = not cfg.deterministic
    if cfg.keep_freed_memory and accelerator.device.type == "cpu":
        keep_freed_memory()  # see sslbench/hostmem.py: ~25% faster CPU steps, fewer page faults
    main = accelerator.is_main_process

    run_dir = Path(cfg.output) if cfg.output else default_run_dir(cfg)
    cfg.output = str(run_dir)
    run = RunDir(run_dir)
    if main:
        if not resume:
            _refuse_existing_run(run_dir)
        _prepare_run_dir(run_dir)
    accelerator.wait_for_everyone()

    # ---- data
    train_split = load_split(cfg.data, "train", cfg.image_size, cache_dir=cfg.cache_dir, max_memory_gb=cfg.max_memory_gb)
    if cfg.train_subset is not None and cfg.train_subset < len(train_split):
        train_split = train_split.subset(balanced_subset(train_split.labels, cfg.train_subset, cfg.seed))

    # ---- model
    set_seed(cfg.seed)
    method = build_method(cfg)
    method_cls = type(method)
    sched = make_schedule(cfg, len(train_split), world, getattr(method_cls, "min_batch_size", 1))
    if world > 1 and cfg.sync_bn:
        method = dist.convert_sync_batchnorm(method)
    # NHWC: ~2x faster convolutions on CUDA and on AVX2 CPUs. PyTorch's channels-last CPU BatchNorm
    # computes the variance in one pass (E[x^2] - E[x]^2), which costs up to ~1% relative error in
    # fp32 gradients on inputs with a large mean; tests that compare gradients exactly turn it off.
    channels_last = cfg.channels_last
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    method = method.to(accelerator.device)  # before the optimizer, which picks fused CUDA kernels for CUDA parameters
    groups = param_groups(method, cfg.weight_decay)
    if hasattr(method, "param_groups"):
        groups = method.param_groups(groups)
    base_lr = scale_lr(cfg.lr, sched.global_batch, cfg.lr_scaling)
    optimizer = build_optimizer(
        cfg.optimizer, groups, base_lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay, lars_eta=cfg.lars_eta
    )
    step_module = StepModule(method)
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    unwrapped: nn.Module = accelerator.unwrap_model(step_module).method
    pairs = unwrapped.momentum_pairs() if hasattr(unwrapped, "momentum_pairs") else []
    grad_cache = make_grad_cache(cfg.grad_cache_chunk, step_module, unwrapped, accelerator) if cfg.grad_cache_chunk else None

    augs = default_view_augmentations(unwrapped, cfg.aug)
    augmenters = [BatchAugment(a, cfg.image_size) for a in augs]
    file_views = _FileViews(train_split, augs, cfg.image_size, cfg.seed) if isinstance(train_split, FileSplit) else None
    data_on_device = isinstance(train_split, ImageSplit) and data_fits_on_device(train_split.images.nbytes, accelerator.device)
    if isinstance(train_split, ImageSplit) and not data_on_device and main and not quiet:
        print(f"note: the training images ({train_split.images.nbytes / 2**30:.1f} GiB) stay in host memory (more than "
              f"{DATA_GPU_SHARE:.0%} of the GPU's); each step's batch is copied to the GPU", file=sys.stderr)
    probe = None  # opt-in online linear probe (evals/online_probe.py): main process only, its own optimizer, not DDP
    if cfg.online_probe and main:
        from sslbench.evals.online_probe import OnlineProbe

        with torch.random.fork_rng(devices=[]):  # its head's init must not shift the run's random stream (drop-path, dropout)
            probe = OnlineProbe.for_run(cfg, unwrapped.encoder, train_split, accelerator.device, precision)

    # ---- checkpoints
    ckpt_dir = run.checkpoints
    start_step = 0
    resumed_skipped = 0
    if resume:
        found = ckpt.latest_valid(ckpt_dir, warn=main)
        if found is not None:
            resumed_meta = ckpt.load(accelerator, found, model=step_module)
            start_step = resumed_meta["step"]
            resumed_skipped = int(resumed_meta.get("skipped", 0))
            if resumed_meta.get("final") and cfg.time_budget_s is not None:
                # A finished run under a time budget: its budget is spent. Resuming it only
                # rewrites its final files (as after a full disk), it never trains a second budget.
                sched.total_steps = start_step
            if start_step > sched.total_steps:
                raise UserError(
                    f"{run_dir}'s newest checkpoint is at step {start_step}, beyond this run's {sched.total_steps} steps; "
                    f"resume with --steps {start_step} or more (or the matching --epochs), or start a new --output"
                )
            if main:
                print(f"resuming {run_dir} from step {start_step} ({found.name})", file=sys.stderr)
        elif main:
            print(f"no checkpoint in {ckpt_dir}; starting from step 0", file=sys.stderr)
    if main:
        _prepare_run_dir(run_dir, create=True)
        write_text_atomic(run.config, dump_yaml(cfg), "pass a writable --output")
        _truncate_metrics(run.metrics, start_step)

    def save(step: int, final: bool = False) -> Path:
        meta = {"step": step, "epoch": sched.epoch_of(step), "skipped": skipped, "method": cfg.method, "backbone": cfg.backbone}
        if final:
            meta["final"] = True  # the end of training (a resume only rewrites the final files)
        return ckpt.save(accelerator, ckpt_dir, step, keep=cfg.keep_checkpoints, meta=meta)

    # ---- loop
    from .progress import TrainProgress

    progress = TrainProgress(sched.total_steps, start_step, enabled=main and not quiet)
    metrics_file = open(run.metrics, "a") if main else None
    last_ckpt: Path | None = ckpt.latest_valid(ckpt_dir, warn=False) if main else None
    skipped = resumed_skipped  # non-finite steps skipped so far (nonfinite=skip), kept across resumes
    first_bad = torch.full((), -1, dtype=torch.long, device=accelerator.device)
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_n = 0
    t0 = time.perf_counter()
    t_log = t0
    images_since_log = 0
    step = start_step
    stopped = False
    stop_signal: int | None = None
    check_each_step = (cfg.nonfinite == "skip" or accelerator.device.type == "cpu") and not _testhooks.deferred_nonfinite()

    def check_nonfinite() -> None:
        """Raise if any process has recorded a non-finite loss since the last check (a host sync,
        so only at logging steps and before every checkpoint: a NaN step is never saved)."""
        if not check_each_step:
            bad = _first_nonfinite(first_bad, world)
            if bad >= 0:
                _raise_nonfinite(bad, last_ckpt, cfg)

    step_module.train()
    with _StopFlag() as stop, progress:
        for step, views, idx in _batches(cfg, train_split, sched, start_step, rank, accelerator.device, augmenters, file_views, data_on_device):
            if channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            lr = lr_at(step, sched.total_steps, base_lr=base_lr, warmup_steps=sched.warmup_steps)
            for g in optimizer.param_groups:
                if not g.get("fixed_lr", False):
                    g["lr"] = lr * g.get("lr_scale", 1.0)
            with record_function("sslbench.forward"):  # named ranges for profilers (benchmarks/speed.py --profile)
                loss, logs = grad_cache.forward(views) if grad_cache is not None else step_module(views)
            if _testhooks.nan_at(step + 1):
                loss = loss * float("nan")
            finite = torch.isfinite(loss.detach())
            if check_each_step:
                finite_all = bool(dist.all_reduce_mean(finite.float()) == 1) if world > 1 else bool(finite)
                if not finite_all:
                    if cfg.nonfinite == "skip" and skipped < cfg.max_skipped_steps:
                        skipped += 1
                        optimizer.zero_grad(set_to_none=True)
                        print(f"warning: non-finite loss at step {step + 1}; skipped ({skipped}/{cfg.max_skipped_steps})", file=sys.stderr)
                        continue
                    _raise_nonfinite(step + 1, last_ckpt, cfg, skipped=skipped)
            else:
                first_bad.masked_fill_(~finite & (first_bad < 0), step + 1)  # no host sync: checked when logging
            with record_function("sslbench.backward"):
                accelerator.backward(loss)
                if grad_cache is not None:  # the loss's backward reached the cached embeddings only
                    grad_cache.backward()
            with record_function("sslbench.optimizer"):
                if cfg.grad_clip is not None:
                    accelerator.clip_grad_norm_(step_module.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if pairs:
                    m = unwrapped.momentum_at(step, sched.total_steps)
                    for online, target in pairs:
                        ema_update_(online, target, m)
            loss_sum += loss.detach().float()
            loss_n += 1
            images_since_log += sched.global_batch
            done = step + 1
            _testhooks.after_step(done)  # test-only fault injection (SSLBENCH_TEST_*), a no-op otherwise
            log_step = done % cfg.log_every == 0 or done == sched.total_steps
            # When to stop early (a signal, the wall-clock budget). Several processes must stop
            # after the same step: they agree at logging steps, which synchronise anyway (a signal
            # may reach them at different steps; one all-reduce, no per-step host sync).
            budget_spent = cfg.time_budget_s is not None and time.perf_counter() - t0 >= cfg.time_budget_s
            stop_signal = stop.signum
            if world > 1:
                stop_signal, budget_spent = _agree_to_stop(stop.signum, budget_spent, accelerator.device) if log_step else (None, False)
            if budget_spent and done < sched.total_steps:
                sched.total_steps = done  # the budget is spent: this step is the last (logged, saved and evaluated as usual)
                log_step = True
            if probe is not None and (probe_record := probe.after_step(unwrapped.encoder, views[0], idx, done, sched)) is not None:
                metrics_file.write(json.dumps(probe_record) + "\n")
            if log_step:
                mean_loss = dist.all_reduce_mean(loss_sum / loss_n) if world > 1 else loss_sum / loss_n
                check_nonfinite()
                now = time.perf_counter()
                ips = images_since_log / max(now - t_log, 1e-9)
                record = {"step": done, "epoch": round(done / sched.steps_per_epoch, 4), "loss": float(mean_loss), "lr": lr, "images_per_s": round(ips, 2)}
                # The method's other logged scalars (last step), averaged over processes like the loss.
                record.update({k: float(dist.all_reduce_mean(v) if world > 1 else v) for k, v in logs.items() if k != "loss"})
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                progress.update(done, loss=record["loss"], lr=lr, ips=ips)
                loss_sum.zero_()
                loss_n, images_since_log, t_log = 0, 0, now
            else:
                progress.advance(done)
            due = bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0 and done < sched.total_steps
            if due or stop_signal is not None:  # a periodic checkpoint, or the one a signal asks for
                check_nonfinite()
                last_ckpt = save(done)
            if stop_signal is not None:
                stopped = True
                if main:
                    name = signal.Signals(stop_signal).name
                    again = resume_command or f"sslbench train --output {run_dir} --resume"
                    print(f"{name}: saved checkpoint at step {done} in {last_ckpt}; resume with: {again}", file=sys.stderr)
                break
    wall = time.perf_counter() - t0
    if metrics_file is not None:
        metrics_file.close()
    steps_done = (step + 1) if sched.total_steps > start_step else start_step
    images_seen = steps_done * sched.global_batch
    result = TrainResult(
        run_dir=run_dir,
        steps=steps_done,
        epochs=round(steps_done / sched.steps_per_epoch, 4),
        images_seen=images_seen,
        wall_time_s=round(wall, 3),
        images_per_s=round((steps_done - start_step) * sched.global_batch / max(wall, 1e-9), 2),
        stopped_early=stopped,
        stop_signal=stop_signal if stopped else None,
    )
    if stopped:
        return result
    check_nonfinite()
    save(sched.total_steps, final=True)
    accelerator.wait_for_everyone()
    if main:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        finish = f"the checkpoint of step {sched.total_steps} is saved: free some space and finish with `sslbench train --output {run_dir} --resume`"
        save_encoder(unwrapped.encoder, run.encoder, meta={"backbone": cfg.backbone, "step": sched.total_steps}, what=finish)
        method_state = {k: v.detach().contiguous().cpu() for k, v in unwrapped.state_dict().items()}
        write_atomic(run.method, lambda tmp: save_file(method_state, str(tmp)), finish, errors=(OSError, SafetensorError))
        if cfg.quick_knn:
            result.metrics = quick_knn(cfg, unwrapped.encoder, accelerator.device, precision, quiet=quiet)
        summary = {
            "method": cfg.method, "backbone": cfg.backbone, "data": cfg.data, "image_size": cfg.image_size,
            "steps": result.steps, "epochs": result.epochs, "images_seen": result.images_seen,
            "batch_size": sched.global_batch, "wall_time_s": result.wall_time_s,
            "images_per_s": result.images_per_s, "precision": precision, "seed": cfg.seed,
            "processes": world, "hardware": hardware_summary(accelerator.device), "metrics": result.metrics,
        }
        write_text_atomic(run.summary, json.dumps(summary, indent=2), finish)
    accelerator.wait_for_everyone()
    return result


def _agree_to_stop(signum: int | None, budget_spent: bool, device: torch.device) -> tuple[int | None, bool]:
    """What every process of a multi-process run does after this step, the same on all: the
    largest signal number any process received (SIGTERM over SIGINT; ``None`` if none) and whether
    any process has spent the time budget. One all-reduce."""
    import torch.distributed as torch_dist

    flags = torch.tensor([signum or 0, int(budget_spent)], dtype=torch.int64).to(device, non_blocking=True)
    torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX)
    signal_max, spent = flags.tolist()
    return (signal_max or None), bool(spent)


def _first_nonfinite(first_bad: Tensor, world: int) -> int:
    """The earliest step at which any process recorded a non-finite loss (``first_bad``, -1 for
    none), the same on every process (one all-reduce when there are several)."""
    if world == 1:
        return int(first_bad)
    import torch.distributed as torch_dist

    none = torch.iinfo(torch.int64).max
    earliest = torch.where(first_bad >= 0, first_bad, torch.full_like(first_bad, none))
    torch_dist.all_reduce(earliest, op=torch_dist.ReduceOp.MIN)
    return -1 if int(earliest) == none else int(earliest)


def _raise_nonfinite(step: int, last_ckpt: Path | None, cfg: TrainConfig, *, skipped: int = 0) -> None:
    """Stop on a NaN/inf loss at ``step`` (1-based: the step after which ``step`` steps would be done)
    with one line naming the step and the last good checkpoint."""
    what = f"non-finite loss (NaN or inf) at step {step}"
    if skipped:
        what += f" after {skipped} skipped steps (max_skipped_steps={cfg.max_skipped_steps})"
    if last_ckpt:
        where = (f"the last good checkpoint is {last_ckpt}; lower the lr (or set grad_clip) and continue from it with "
                 f"`sslbench train --output {cfg.output} --resume --lr LR`")
    else:
        where = "no checkpoint was saved yet; lower --lr or set grad_clip"
    raise UserError(f"{what}; {where}, or pass --set nonfinite=skip")


def quick_knn(cfg: TrainConfig, encoder: nn.Module, device: torch.device, precision: str, *, quiet: bool = False) -> dict[str, float]:
    """The end-of-training k-NN (k=200, T=0.1, cosine) of h on the test split, and the same for
    the untrained backbone (same seed) as a baseline."""
    from accelerate.utils import set_seed

    from sslbench.backbones import create_backbone
    from sslbench.evals.features import extract_features
    from sslbench.evals.knn import knn_eval

    train_split = load_split(cfg.data, "train", cfg.image_size, cache_dir=cfg.cache_dir, max_memory_gb=cfg.max_memory_gb)
    test_split = load_split(cfg.data, "test", cfg.image_size, cache_dir=cfg.cache_dir, max_memory_gb=cfg.max_memory_gb)
    if not isinstance(train_split, ImageSplit) or not isinstance(test_split, ImageSplit):
        if not quiet:
            print(f"note: quick k-NN skipped for data read from disk (it would take two more passes over it); score the run with `sslbench eval {cfg.output}`", file=sys.stderr)
        return {}
    prec = "bf16" if precision == "bf16" else "no"

    def score(enc: nn.Module) -> dict[str, float]:
        enc = enc.to(device)
        tr = extract_features(enc, train_split.images, image_size=cfg.image_size, device=device, precision=prec)
        te = extract_features(enc, test_split.images, image_size=cfg.image_size, device=device, precision=prec)
        return knn_eval(tr.to(device), train_split.labels.to(device), te.to(device), test_split.labels.to(device), k=cfg.knn_k, temperature=cfg.knn_temperature)

    trained = score(encoder)
    set_seed(cfg.seed)
    untrained = score(create_backbone(cfg.backbone, cfg.image_size, **cfg.backbone_kwargs))
    out = dict(trained)
    out.update({f"untrained_{k}": v for k, v in untrained.items()})
    if not quiet:
        print(
            f"k-NN top-1 on {cfg.data} test (k={cfg.knn_k}, T={cfg.knn_temperature}): trained {trained.get('knn_top1', float('nan')):.2f}%"
            f"  untrained {untrained.get('knn_top1', float('nan')):.2f}%"
        )
    return out

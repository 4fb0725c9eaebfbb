"""Setting up a training run: everything before the loop (DINO's ``main_dino.py`` keeps this apart
from the loop too).

:func:`setup_run` resolves the device and precision, checks the run directory, loads the data,
builds the method, the optimizer and its schedules, and restores a checkpoint when resuming. It
returns a :class:`Run`, which the loop (:mod:`sslbench.train.trainer`) consumes. Nothing here names a
method: what is method-specific comes through :class:`sslbench.core.method.Method`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sslbench.config import DEFAULT_EPOCHS, TrainConfig, check_precision, dump_yaml
from sslbench.config.build import build_method
from sslbench.core.errors import UserError, warn
from sslbench.core.hostmem import keep_freed_memory
from sslbench.core.method import Batch, Method, Schedule, StepInfo, ViewSpec, default_views
from sslbench.core.optim import build_optimizer, lr_at, param_groups, scale_lr, set_scheduled_value
from sslbench.core.rundir import RUNS, RunDir, write_text_atomic
from sslbench.core.runlock import RunLock
from sslbench.core.schedules import cosine_between
from sslbench.data import FileSplit, ImageSplit, balanced_subset, load_split
from sslbench.train import checkpoint as ckpt
from sslbench.train.batches import DATA_GPU_SHARE, Plan, data_fits_on_device
from sslbench.train.grad_cache import GradCache, make_grad_cache

UNBOUNDED_STEPS = 2**62  # the step count of a run bounded only by its time budget (time_budget_s)


class StepModule(nn.Module):
    """What DDP wraps: ``forward(batch)`` is the method's training step, so gradient
    synchronisation hooks fire exactly as for a plain model. ``forward(batch, embed=True)`` is
    ``method.embed(batch)``, the gradient cache's forward (:mod:`sslbench.train.grad_cache`), and with
    ``targets=False`` its gradient-carrying part only."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: Batch, embed: bool = False, targets: bool = True) -> Any:
        if embed:
            return self.method.embed(batch, targets=targets)
        return self.method.training_step(batch)


def make_plan(cfg: TrainConfig, n_train: int, world_size: int, min_batch: int) -> Plan:
    """Batch sizes and step counts from the config and the data set size."""
    batch = cfg.batch_size
    if batch < min_batch:
        raise UserError(f"batch size {batch} is too small for {cfg.method} (needs >= {min_batch}); pass --batch-size {max(min_batch, 2) * 128}")
    if batch > n_train:
        batch = n_train - n_train % world_size
        if batch < min_batch:  # a one-image folder: SimCLR would train at loss 0 (no negatives), BatchNorm on one sample
            raise UserError(
                f"{cfg.data} has {n_train} training image{'' if n_train == 1 else 's'}, fewer than the {min_batch} that {cfg.method} "
                "needs for one batch (its loss or BatchNorm compares the samples of a batch; with fewer it learns nothing); add images to the data"
            )
        print(f"note: batch size {cfg.batch_size} > {n_train} training images; using {batch}", file=sys.stderr)
    if batch % world_size:
        raise UserError(f"batch size {batch} must be divisible by the number of processes ({world_size})")
    check_local_batch(cfg, batch, world_size, min_batch)
    steps_per_epoch = max(1, n_train // batch)  # drop_last: every step sees a full batch
    total = cfg.steps if cfg.steps is not None else (cfg.epochs or DEFAULT_EPOCHS) * steps_per_epoch
    unbounded = cfg.time_budget_s is not None and cfg.steps is None and cfg.epochs is None
    if unbounded:  # a time budget alone: run until it is spent; the lr stays constant after warm-up
        total = UNBOUNDED_STEPS
    if cfg.warmup_epochs is not None:
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        if warmup >= total and not unbounded and warmup > 0:
            raise UserError(
                f"warmup_epochs={cfg.warmup_epochs:g} is {warmup} steps, not shorter than the run's {total} steps: the lr would "
                f"only rise and never decay; pass a warmup_epochs below {total / steps_per_epoch:g} or a longer run"
            )
    else:
        warmup = steps_per_epoch if unbounded else min(10 * steps_per_epoch, total // 10)
    return Plan(steps_per_epoch, total, min(warmup, total), batch, batch // world_size)


def check_local_batch(cfg: TrainConfig, batch: int, world_size: int, min_batch: int) -> None:
    """Refuse a global ``batch`` whose share per process (``batch / world_size``) is below the
    method's ``min_batch`` when each process normalises its own share (``sync_bn=false``).

    With ``sync_bn`` on (the default) nothing that compares the samples of a batch is per process:
    BatchNorm statistics, in-batch negatives (gathered), DINO's centre, SwAV's Sinkhorn, Barlow
    Twins' and VICReg's statistics are all over the global batch, so one image per process trains
    what one process trains on the whole batch (docs/distributed.md; tests/test_multiprocess.py),
    and the global check of :func:`make_plan` suffices. With ``sync_bn=false`` each process's
    BatchNorm sees only its share: one image's views are normalised against each other, and the
    run trains without an error (BYOL at --batch-size 2 on 2 processes did) on statistics of one image."""
    local = batch // world_size
    if world_size < 2 or cfg.sync_bn or local >= min_batch:
        return
    need = min_batch * world_size
    if batch == cfg.batch_size:
        what, fix = f"--batch-size {batch}", f"pass --batch-size {need} or more ({min_batch} per process)"
    else:  # cut to the data (make_plan): a larger --batch-size cannot help
        what, fix = f"the batch of {batch} (all the training images)", f"add training images ({need} or more)"
    raise UserError(
        f"{what} over {world_size} processes is {local} image{'' if local == 1 else 's'} per process, fewer than the "
        f"{min_batch} that {cfg.method} needs per process with sync_bn=false (each process's BatchNorm normalises only its own share); "
        f"{fix}, run fewer processes, or keep sync_bn on (the default)"
    )


def make_schedules(cfg: TrainConfig, plan: Plan, base_lr: float, method: Method) -> dict[str, Schedule]:
    """Per-step values of parameter-group keys: the lr (linear warm-up, cosine decay), the weight
    decay when ``weight_decay_end`` is set (cosine, DINO's), then the method's own."""
    out: dict[str, Schedule] = {
        "lr": lambda info: lr_at(info.step, plan.total_steps, base_lr=base_lr, warmup_steps=plan.warmup_steps),
    }
    wd_end = cfg.weight_decay_end
    if wd_end is not None:
        assert cfg.weight_decay is not None
        wd0 = cfg.weight_decay
        out["weight_decay"] = lambda info: cosine_between(info.step, plan.total_steps, wd0, wd_end)
    out.update(method.schedules())
    return out


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: dict[str, Schedule], info: StepInfo) -> dict[str, float]:
    """Set every scheduled key in every group (:func:`sslbench.core.optim.set_scheduled_value`: times
    the group's ``<key>_scale``; groups with ``fixed_<key>`` keep their value); returns the
    values, for logging."""
    values = {key: fn(info) for key, fn in schedules.items()}
    for key, value in values.items():
        set_scheduled_value(optimizer, key, value)
    return values


def default_run_dir(cfg: TrainConfig) -> Path:
    data = cfg.data.replace(":", "-").replace("/", "_").strip("_")[-40:]
    return RUNS / f"{cfg.method}-{cfg.backbone}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(path: Path) -> None:
    """Check, before any data is loaded, that the run directory can be written; it is created
    only once training starts, so a run that fails during setup leaves nothing."""
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(20, os.strerror(20), str(path))
        existing = next(p for p in (path, *path.absolute().parents) if p.exists())
        if not existing.is_dir():  # a regular file somewhere on the way
            raise NotADirectoryError(20, os.strerror(20), str(existing))
        os.rmdir(tempfile.mkdtemp(prefix=".sslbench-write-test-", dir=existing))
    except OSError as exc:
        raise UserError(f"cannot write to output directory {path}: {exc.strerror or exc}; pass a writable --output") from exc


def create_run_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write to output directory {path}: {exc.strerror or exc}; pass a writable --output") from exc


def refuse_existing_run(path: Path) -> None:
    """A new (not resumed) run must not write into a run directory that already holds checkpoints or
    results: its checkpoints would mix with the old ones and the old results would be lost."""
    run = RunDir(path)
    if ckpt.list_checkpoints(run.checkpoints) or run.results.exists():
        raise UserError(
            f"{path} already holds a run (checkpoints or results.json); continue it with "
            f"`sslbench train --output {path} --resume`, or pass a new --output"
        )


def truncate_metrics(path: Path, start_step: int, what: str = "pass a writable --output") -> None:
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
    write_text_atomic(path, "".join(kept), what)


def launched_on_cpu() -> bool:
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


@dataclass
class Run:
    """A training run, set up: what the loop needs and nothing it computes."""

    cfg: TrainConfig
    accelerator: Any  # accelerate.Accelerator
    run_dir: Path
    files: RunDir  # the file names of the run directory
    precision: str  # the effective mixed precision: no | bf16 | fp16
    train_split: ImageSplit | FileSplit
    plan: Plan
    method: Method  # the unwrapped method (hooks, encoder)
    model: nn.Module  # the prepared StepModule (DDP, autocast)
    optimizer: torch.optim.Optimizer
    schedules: dict[str, Schedule]
    specs: list[ViewSpec]  # the method's views
    grad_cache: GradCache | None
    data_on_device: bool | None
    channels_last: bool
    start_step: int = 0
    skipped: int = 0  # non-finite steps skipped so far (nonfinite=skip), kept across resumes
    last_ckpt: Path | None = None
    time_based: bool = False  # a time budget alone bounds the run
    lock: RunLock | None = None  # the run directory's lock (main process), released when the run is done
    resume_command: str = ""  # the command that continues this run after a failure: `sslbench train --output DIR --resume`, or compare's own
    warnings: list[str] = field(default_factory=list)  # what setup warned of (main process): results.json's "warnings"
    trained_before_s: float = 0.0  # training wall time of earlier sessions, up to the checkpoint this run resumed from
    session_start: float | None = None  # perf_counter() when this session's training loop started (set by train())

    @property
    def device(self) -> torch.device:
        return torch.device(self.accelerator.device)

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def world(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def ckpt_dir(self) -> Path:
        return self.files.checkpoints

    def train_time_s(self) -> float:
        """Wall time spent training this run so far: earlier sessions (up to the checkpoint this
        session resumed from; time after a run's last checkpoint is lost with it) plus this one."""
        now = 0.0 if self.session_start is None else time.perf_counter() - self.session_start
        return self.trained_before_s + now

    def info(self, step: int, progress: float | None = None) -> StepInfo:
        """The :class:`StepInfo` of ``step``; ``progress`` overrides step / total (time budget)."""
        p = step / self.plan.total_steps if progress is None else progress
        return StepInfo(
            step, self.plan.epoch_of(step), self.plan.steps_per_epoch, self.plan.total_steps, min(max(p, 0.0), 1.0), self.cfg.seed, self.time_based
        )

    def save(self, step: int, *, final: bool = False, on_written: Any = None) -> Path:
        """A checkpoint of the full training state after ``step`` steps."""
        meta: dict[str, Any] = {
            "step": step,
            "epoch": self.plan.epoch_of(step),
            "skipped": self.skipped,
            "train_time_s": round(self.train_time_s(), 3),  # counted by a resumed run's time budget and device-hours
            "method": self.cfg.method,
            "backbone": self.cfg.backbone,
        }
        if final:
            meta["final"] = True  # the end of training (a resume only rewrites the final files)
        self.last_ckpt = ckpt.save(
            self.accelerator, self.ckpt_dir, step, keep=self.cfg.keep_checkpoints, meta=meta, on_written=on_written, again=self.resume_command
        )
        return self.last_ckpt


def _accelerator(cfg: TrainConfig, precision: str) -> Any:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=launched_on_cpu(),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        dynamo_backend="inductor" if cfg.compile else None,
    )
    if accelerator.device.type == "cuda":
        # Training shapes are fixed: cuDNN times its convolution algorithms once per shape and
        # keeps the fastest (not in deterministic runs, where the choice could vary).
        torch.backends.cudnn.benchmark = not cfg.deterministic
    if cfg.keep_freed_memory and accelerator.device.type == "cpu":
        keep_freed_memory()  # see sslbench/core/hostmem.py: activations reused, not page-faulted in every step
    return accelerator


def _load_train_split(cfg: TrainConfig) -> ImageSplit | FileSplit:
    assert cfg.image_size is not None
    split = load_split(cfg.data, "train", cfg.image_size, cache_dir=cfg.cache_dir, max_memory_gb=cfg.max_memory_gb)
    classes = int(torch.unique(split.labels).numel()) if len(split) else 0
    if cfg.train_subset is not None and cfg.train_subset < len(split):
        if cfg.train_subset < classes:
            raise UserError(
                f"--train-subset {cfg.train_subset} is smaller than the {classes} classes of {cfg.data}: a class-balanced subset "
                f"needs at least one image per class; pass --train-subset {classes} or more"
            )
        split = split.subset(balanced_subset(split.labels, cfg.train_subset, cfg.seed))
    return split


def _warn_single_class(cfg: TrainConfig, split: ImageSplit | FileSplit, record: list[str]) -> None:
    classes = int(torch.unique(split.labels).numel()) if len(split) else 0
    if classes < 2:
        warn(
            f"{cfg.data} has a single class: training works (labels are not used), but every k-NN, linear or "
            "fine-tuning accuracy would be 100% and mean nothing, so the quick k-NN is skipped",
            record,
        )


#: Training images whose median shorter side, as read, is below this many pixels are warned of.
#: 8 px is the side of the smallest data this suite ships and has measured, digits (8x8, upscaled
#: to 16 px by default: k-NN ~80% trained vs ~49% untrained, README), so nothing smaller is known
#: to hold enough detail to learn from; 2x2 images upscaled to 32 px are four colour blobs. The rule
#: is on the images, not on their upscaling: CIFAR's 32 px upscaled 7x to 224 px for an
#: ImageNet-size backbone is common practice, and a backbone too deep for the *training* size is
#: refused already (the stride check of sslbench.backbones).
MIN_USEFUL_SIDE = 8


def tiny_images_warning(data: str, source_side: int | None, image_size: int) -> str | None:
    """The warning for training images of ``source_side`` px (None: not known, no warning)."""
    if source_side is None or source_side >= MIN_USEFUL_SIDE:
        return None
    upscaled = f", upscaled {image_size / source_side:.3g}x to {image_size} px" if image_size > source_side else ""
    return (
        f"{data}'s training images are {source_side} px (median shorter side){upscaled}: below {MIN_USEFUL_SIDE} px an image holds "
        "too little detail to learn from (the smallest data set here, digits, is 8 px); check that these are the images you meant"
    )


def on_main(accelerator: Any, fn: Any) -> None:
    """``fn()`` on the main process only; an error there is raised on every process, with the same
    one-line message (the others would otherwise wait for the main one in the next collective)."""
    message: str | None = None
    failure: BaseException | None = None
    if accelerator.is_main_process:
        try:
            fn()
        except Exception as exc:
            failure = exc
            message = str(exc) if isinstance(exc, UserError) else f"the main process failed ({type(exc).__name__}); see its error"
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [message]
        broadcast_object_list(box, from_process=0)
        message = box[0]
    if failure is not None:
        raise failure
    if message is not None:
        raise UserError(message)


def _restore(run: Run, *, quiet: bool) -> None:
    """Resume from the newest valid checkpoint, if any (else start at step 0)."""
    found = ckpt.latest_valid(run.ckpt_dir, warn=run.main)
    if found is None:
        if run.main:
            print(f"no checkpoint in {run.ckpt_dir}; starting from step 0", file=sys.stderr)
        return
    meta = ckpt.load(run.accelerator, found, model=run.model)
    run.start_step, run.skipped = int(meta["step"]), int(meta.get("skipped", 0))
    run.trained_before_s = float(meta.get("train_time_s", 0.0))  # 0 for a checkpoint written before it was recorded
    if meta.get("final") and run.cfg.time_budget_s is not None:
        # A finished run under a time budget: its budget is spent. Resuming it only rewrites its
        # final files (as after a full disk), it never trains a second budget.
        run.plan.total_steps = run.start_step
    if run.start_step > run.plan.total_steps:
        raise UserError(
            f"{run.run_dir}'s newest checkpoint is at step {run.start_step}, beyond this run's {run.plan.total_steps} steps; "
            f"resume with --steps {run.start_step} or more (or the matching --epochs), or start a new --output"
        )
    if run.main:
        print(f"resuming {run.run_dir} from step {run.start_step} ({found.name})", file=sys.stderr)


def setup_run(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False, resume_command: str | None = None) -> Run:
    """Build the run of ``cfg``: accelerator, run directory (locked: :mod:`sslbench.core.runlock`),
    data, method, optimizer, schedules, and the restored state when resuming. The returned run
    holds the lock (``run.lock``); whoever finishes it releases it. ``resume_command`` is what every
    failure message tells to run to continue (default ``sslbench train --output RUN_DIR --resume``)."""
    cfg.resolve_defaults()
    assert cfg.image_size is not None
    check_precision(cfg.precision)  # before anything is written: fp16 on a CPU would train in fp32
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator = _accelerator(cfg, cfg.precision)
    run_dir = Path(cfg.output) if cfg.output else default_run_dir(cfg)
    cfg.output = str(run_dir)
    lock = RunLock(run_dir, what="train")

    def claim() -> None:  # the main process, before any data is loaded: one writer per run directory
        check_run_dir(run_dir)
        lock.acquire(fix="pass another --output" if not resume else "resume it once that process has stopped")
        if not resume:
            refuse_existing_run(run_dir)

    try:
        on_main(accelerator, claim)
        again = resume_command or f"sslbench train --output {run_dir} --resume"
        run = _build_run(cfg, accelerator, run_dir, resume=resume, quiet=quiet, resume_command=again)
    except BaseException:
        lock.release()  # (and the run directory, if this run made it and nothing is in it)
        raise
    run.lock = lock if lock.held else None
    return run


def _build_run(cfg: TrainConfig, accelerator: Any, run_dir: Path, *, resume: bool, quiet: bool, resume_command: str) -> Run:
    from accelerate.utils import set_seed

    from sslbench.core import dist
    from sslbench.train.report import start_banner

    assert cfg.image_size is not None
    world, main = accelerator.num_processes, accelerator.is_main_process
    train_split = _load_train_split(cfg)
    set_seed(cfg.seed)
    method = build_method(cfg)
    plan = make_plan(cfg, len(train_split), world, type(method).min_batch_size)
    notes: list[str] = []  # results.json's "warnings"
    if main:  # (after the checks that refuse the data: a refused run prints its error only)
        _warn_single_class(cfg, train_split, notes)
        tiny = tiny_images_warning(cfg.data, train_split.source_side if isinstance(train_split, ImageSplit) else None, cfg.image_size)
        if tiny is not None:
            warn(tiny, notes)
    module: nn.Module = method
    if world > 1 and cfg.sync_bn:
        module = dist.convert_sync_batchnorm(module)
    # NHWC (channels-last) for the convolutions. PyTorch's channels-last CPU BatchNorm
    # computes the variance in one pass (E[x^2] - E[x]^2), which costs up to ~1% relative error in
    # fp32 gradients on inputs with a large mean; tests that compare gradients exactly turn it off.
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    module = module.to(accelerator.device)  # before the optimizer, which picks fused CUDA kernels for CUDA parameters
    assert isinstance(module, Method)
    groups = module.param_groups(param_groups(module, cfg.weight_decay or 0.0))
    assert cfg.lr is not None and cfg.lr_scaling is not None and cfg.optimizer is not None
    base_lr = scale_lr(cfg.lr, plan.global_batch, cfg.lr_scaling)
    optimizer = build_optimizer(
        cfg.optimizer,
        groups,
        base_lr,
        momentum=cfg.sgd_momentum,
        weight_decay=cfg.weight_decay or 0.0,
        lars_eta=cfg.lars_eta or 0.001,
        lars_clip=bool(cfg.lars_clip),
        betas=cfg.betas or (0.9, 0.999),
    )
    model, optimizer = accelerator.prepare(StepModule(module), optimizer)
    unwrapped: Method = accelerator.unwrap_model(model).method
    grad_cache = None
    if cfg.grad_cache_chunk:
        grad_cache = make_grad_cache(cfg.grad_cache_chunk, model, unwrapped, accelerator)
    specs = default_views(unwrapped, cfg.aug, cfg.image_size)
    data_on_device = isinstance(train_split, ImageSplit) and data_fits_on_device(train_split.images.nbytes, accelerator.device)
    if isinstance(train_split, ImageSplit) and not data_on_device and main and not quiet:
        print(
            f"note: the training images ({train_split.images.nbytes / 2**30:.1f} GiB) stay in host memory (more than "
            f"{DATA_GPU_SHARE:.0%} of the GPU's); each step's batch is copied to the GPU",
            file=sys.stderr,
        )
    run = Run(
        cfg=cfg,
        accelerator=accelerator,
        run_dir=run_dir,
        files=RunDir(run_dir),
        precision=cfg.precision,
        train_split=train_split,
        plan=plan,
        method=unwrapped,
        model=model,
        optimizer=optimizer,
        schedules=make_schedules(cfg, plan, base_lr, unwrapped),
        specs=specs,
        grad_cache=grad_cache,
        data_on_device=data_on_device,
        channels_last=cfg.channels_last,
        time_based=plan.total_steps == UNBOUNDED_STEPS,
        resume_command=resume_command,
        warnings=notes,
    )
    if resume:
        _restore(run, quiet=quiet)
    if main:
        create_run_dir(run_dir)
        again = (
            f"the checkpoints are intact: free some space and continue with `{resume_command}`"
            if resume
            else "nothing was trained yet: free some space (or pass another --output) and run the command again"
        )
        write_text_atomic(run.files.config, dump_yaml(cfg), again)
        truncate_metrics(run.files.metrics, run.start_step, again)
    run.last_ckpt = ckpt.latest_valid(run.ckpt_dir, warn=False) if main else None
    if main and not quiet:  # last: a setup error is one line, not a banner and an error
        print("\n".join(start_banner(run)), file=sys.stderr)
    return run


def channels_last_views(views: list[Tensor], enabled: bool) -> list[Tensor]:
    """The views in NHWC when the run trains channels-last."""
    return [v.contiguous(memory_format=torch.channels_last) for v in views] if enabled else views

"""Typed configuration: dataclasses with a one-line comment per field, YAML in and out, and
validated ``key=value`` overrides (unknown keys are rejected with close matches).

Precedence, lowest first: dataclass defaults < the method's recipe (for fields left ``None``) <
``--config FILE.yaml`` < explicit CLI flags < ``--set key=value``. Keys for ``--set``: a top-level
field (``lr=0.3``), a method field (``method_cfg.temperature=0.2`` or just ``temperature=0.2``), an
augmentation field (``aug.jitter_strength=1.0``) or a timm keyword
(``backbone_kwargs.channels=16,32,64,128``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from sslbench.config.values import coerce, parse_literal, split_set_args, to_dict, update_dataclass
from sslbench.core.augment import AugmentConfig
from sslbench.core.errors import UserError
from sslbench.core.method import MethodConfig, Recipe

__all__ = [
    "TrainConfig",
    "build_config",
    "coerce",
    "config_from_dict",
    "dump_yaml",
    "load_run_config",
    "load_yaml",
    "parse_literal",
    "split_set_args",
    "to_dict",
    "training_identity",
    "update_dataclass",
]

PRECISIONS = ("auto", "no", "bf16", "fp16")
OPTIMIZERS = ("sgd", "lars", "adamw")
LR_SCALING = ("linear", "sqrt", "none")
NONFINITE = ("stop", "skip")
MIN_IMAGE_SIZE = 8  # px; smaller images give degenerate random crops
DEFAULT_EPOCHS = 10  # the budget of a run given neither epochs, steps nor a time budget


@dataclass
class TrainConfig:
    """Everything a training run needs; saved whole as ``config.yaml`` in the run directory."""

    method: str = "simclr"  # registered method name (`sslbench list methods`)
    backbone: str = "resnet18"  # any timm model name (`sslbench list backbones`)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model keywords
    data: str = "digits"  # data spec: digits, cifar10, cifar100, stl10, imagefolder:PATH, hf:NAME
    train_subset: int | None = None  # train on a class-balanced subset of this many images (None: all)
    image_size: int | None = None  # training and evaluation resolution in px (None: the data's own: digits 16, cifar 32, stl10 96, else 32)
    epochs: int | None = None  # passes over the training set (default 10 when neither steps nor time_budget_s is set)
    steps: int | None = None  # optimizer steps; overrides epochs when set
    time_budget_s: float | None = (
        None  # wall-clock budget of the training loop (s): stop after the step that crosses it; alone: lr constant after warm-up
    )
    batch_size: int = 256  # global batch over all processes (clipped to the data set size)
    optimizer: str | None = None  # sgd | lars | adamw (None: the method's recipe)
    lr: float | None = None  # base learning rate before scaling (None: the method's recipe)
    lr_scaling: str | None = None  # linear (lr*B/256) | sqrt (lr*sqrt(B)) | none (None: recipe)
    weight_decay: float | None = None  # weight decay; never on norm and bias parameters (None: recipe)
    weight_decay_end: float | None = None  # cosine weight-decay schedule from weight_decay to this (None: the recipe's; constant if it has none)
    betas: tuple[float, float] | None = None  # AdamW betas (None: the method's recipe, else (0.9, 0.999))
    sgd_momentum: float = 0.9  # momentum of SGD and LARS
    lars_eta: float | None = None  # LARS trust coefficient (None: the method's recipe; 0.001 as in SimCLR/BYOL)
    lars_clip: bool | None = None  # LARS ratio clipped to min(trust / lr, 1), solo-learn clip_lr (None: recipe)
    warmup_epochs: float | None = None  # linear warm-up length (None: 10% of training, at most 10 epochs)
    grad_clip: float | None = None  # clip the global gradient norm to this (None: off)
    precision: str = "auto"  # auto (bf16 on CUDA, no on CPU; recorded as what it resolved to) | no | bf16 | fp16 (CUDA only)
    channels_last: bool = True  # NHWC layout for the convolutions (CPU BatchNorm then uses a one-pass variance)
    compile: bool = False  # torch.compile the training step's model
    keep_freed_memory: bool = True  # CPU on Linux/glibc: malloc keeps freed activations for reuse instead of unmapping them (no page faults of each step's activations; RSS stays at its peak)
    sync_bn: bool = True  # convert BatchNorm to SyncBatchNorm when running on several processes
    grad_cache_chunk: int = 0  # gradient cache chunk size (exact full-batch gradient, less memory); 0: off
    seed: int = 0  # seed for weights, data order and augmentation
    deterministic: bool = False  # torch deterministic algorithms (exact resume checks)
    output: str | None = None  # run directory (None: runs/<method>-<backbone>-<data>-<time>)
    log_every: int = 10  # steps between logged metrics (one host sync each)
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end); 0: only at the end
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    nonfinite: str = "stop"  # on a NaN/inf loss: stop (with a message) | skip the step
    max_skipped_steps: int = 10  # with nonfinite=skip, stop after this many skipped steps
    num_workers: int = 2  # DataLoader workers for data that does not fit in memory
    max_memory_gb: float = 8.0  # data sets larger than this decoded are read per image from disk
    cache_dir: str | None = None  # download and decode cache (None: $SSLBENCH_CACHE or ~/.cache/sslbench)
    online_probe: bool = False  # train a linear probe on detached features during training, log it each epoch
    log_with: str | None = None  # experiment trackers, comma-separated: tensorboard, wandb, mlflow, comet_ml, aim, all (None: metrics.jsonl only)
    quick_knn: bool = True  # k-NN of the trained and the untrained encoder on the test split at the end
    knn_k: int = 200  # neighbours of the end-of-training k-NN evaluation
    knn_temperature: float = 0.1  # temperature of the weighted k-NN vote
    aug: AugmentConfig = field(default_factory=AugmentConfig)  # augmentation strengths
    method_cfg: Any = None  # the method's own config dataclass (filled from `method`)

    def resolve_defaults(self) -> None:
        """Fill the defaults that depend on other fields or on this machine, so that a saved
        config records what runs: ``image_size`` from ``data``, ``epochs`` (10) when no budget is
        given, ``precision`` auto as bf16 on CUDA and no elsewhere."""
        if self.image_size is None:
            from sslbench.data import default_image_size

            self.image_size = default_image_size(self.data)
        if self.epochs is None and self.steps is None and self.time_budget_s is None:
            self.epochs = DEFAULT_EPOCHS
        if self.precision == "auto":
            self.precision = auto_precision()

    def validate(self) -> None:
        """Range checks that dataclass types cannot express; raises :class:`UserError`."""
        self.resolve_defaults()
        _choice("precision", self.precision, PRECISIONS)
        if self.optimizer is not None:
            _choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr_scaling is not None:
            _choice("lr_scaling", self.lr_scaling, LR_SCALING)
        _choice("nonfinite", self.nonfinite, NONFINITE)
        _positive("batch_size", self.batch_size)
        if not 0 <= self.seed < 2**32:
            raise UserError(f"seed must be in 0..{2**32 - 1} (numpy's range), got {self.seed}")
        if not 0.0 <= self.sgd_momentum < 1.0:
            raise UserError(f"sgd_momentum must be in [0, 1), got {self.sgd_momentum}")
        if self.num_workers < 0 or self.max_skipped_steps < 0:
            raise UserError(f"num_workers and max_skipped_steps must be >= 0, got {self.num_workers} and {self.max_skipped_steps}")
        assert self.image_size is not None  # resolve_defaults() set it
        _positive("image_size", self.image_size)
        if self.image_size < MIN_IMAGE_SIZE:
            raise UserError(
                f"image_size {self.image_size} is too small: sslbench needs at least {MIN_IMAGE_SIZE} px "
                "(random crops of smaller images are a pixel or two); pass e.g. --image-size 32"
            )
        if self.epochs is not None:
            _positive("epochs", self.epochs)
        if self.steps is not None:
            _positive("steps", self.steps)
        if self.time_budget_s is not None:
            _positive("time_budget_s", self.time_budget_s)
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"lr must be > 0, got {self.lr}; pass e.g. --lr 0.3")
        if self.lars_eta is not None and not self.lars_eta > 0:
            raise UserError(f"lars_eta must be > 0, got {self.lars_eta}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UserError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.train_subset is not None:
            _positive("train_subset", self.train_subset)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UserError(f"grad_clip must be > 0 (or unset), got {self.grad_clip}")
        if self.grad_cache_chunk < 0:
            raise UserError(f"grad_cache_chunk must be >= 0, got {self.grad_cache_chunk}")
        if self.keep_checkpoints < 1:
            raise UserError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.checkpoint_every < 0 or self.log_every < 1:
            raise UserError("checkpoint_every must be >= 0 and log_every >= 1")
        if self.knn_k < 1 or not self.knn_temperature > 0:
            raise UserError("knn_k must be >= 1 and knn_temperature > 0")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise UserError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _validate_aug(self.aug)
        if self.weight_decay_end is not None and self.weight_decay_end < 0:
            raise UserError(f"weight_decay_end must be >= 0, got {self.weight_decay_end}")
        if self.betas is not None and not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"betas must be two numbers in [0, 1), got {self.betas}; pass e.g. --set betas=0.9,0.95")
        if isinstance(self.method_cfg, MethodConfig):
            self.method_cfg.validate()


def auto_precision() -> str:
    """What ``precision: auto`` means on this machine: bf16 with CUDA, else no (fp32)."""
    import torch

    return "bf16" if torch.cuda.is_available() else "no"


def check_precision(precision: str) -> None:
    """Refuse a precision this machine cannot train in (before anything is written). fp16 needs
    CUDA: on the CPU Accelerate does not autocast to fp16, so such a run would train in fp32 while
    its records said fp16; an error says so instead of a fallback that would mislabel the run."""
    import torch

    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError(
            "precision fp16 needs a CUDA GPU (on the CPU Accelerate does not autocast to fp16: the run would train in fp32); "
            "pass --precision no (fp32) or bf16"
        )


def _choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UserError(f"{key} must be one of {', '.join(valid)}; got {value!r}")


def _positive(key: str, value: int | float) -> None:
    if not value > 0:
        raise UserError(f"{key} must be > 0, got {value}")


def _validate_aug(aug: AugmentConfig) -> None:
    for f in fields(aug):
        v = getattr(aug, f.name)
        if f.name.endswith("_p") and not 0.0 <= v <= 1.0:
            raise UserError(f"aug.{f.name} is a probability in [0, 1], got {v}")
    lo, hi = aug.crop_scale
    if not 0 < lo <= hi <= 1:
        raise UserError(f"aug.crop_scale must satisfy 0 < min <= max <= 1, got {aug.crop_scale}")
    if aug.jitter_strength is not None and aug.jitter_strength < 0:
        raise UserError(f"aug.jitter_strength must be >= 0, got {aug.jitter_strength}")


# ---------------------------------------------------------------------------------------------
# Parsing values and applying overrides


def build_config(
    *,
    file_values: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> TrainConfig:
    """Resolve a :class:`TrainConfig`: defaults, method recipe, YAML values, CLI flags, ``--set``."""
    from sslbench.core.registry import get_method

    file_values = dict(file_values or {})
    for section in ("method_cfg", "aug", "backbone_kwargs"):
        value = file_values.get(section)
        if value is not None and not isinstance(value, dict):
            raise UserError(f"{section} in the config file must be a mapping of keys to values, got {value!r}")
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    top = {**{k: v for k, v in file_values.items() if k not in ("method_cfg", "aug")}, **flags}
    nested: dict[str, dict[str, Any]] = {
        "method_cfg": dict(file_values.get("method_cfg") or {}),
        "aug": dict(file_values.get("aug") or {}),
        "backbone_kwargs": dict(file_values.get("backbone_kwargs") or {}),
    }
    top.pop("backbone_kwargs", None)
    for k in list(top):
        if k in ("method_cfg", "aug"):
            nested[k].update(top.pop(k) or {})
    pairs = split_set_args(sets or [])
    for key, raw in pairs:
        if key == "method":  # the method decides which method_cfg keys exist: resolved first
            top["method"] = raw.strip()
    method_name = str(top.get("method", TrainConfig.method))
    method_cls = get_method(method_name)
    mcfg_names = {f.name for f in fields(method_cls.Config)}
    aug_names = {f.name for f in fields(AugmentConfig)}
    top_names = {f.name for f in fields(TrainConfig)}
    for key, raw in pairs:
        head, _, rest = key.partition(".")
        if rest and head in nested:
            nested[head][rest] = raw
        elif key in nested:
            some = sorted(mcfg_names if key == "method_cfg" else aug_names if key == "aug" else {"channels", "drop_path_rate"})
            raise UserError(f"{key} is a section: set one of its keys with --set {key}.KEY=VALUE (e.g. {', '.join(f'{key}.{n}' for n in some[:3])})")
        elif rest:
            raise UserError(f"unknown config section {head!r} in {key!r}; sections: aug, method_cfg, backbone_kwargs")
        elif key in top_names and key not in nested:
            top[key] = raw
        elif key in mcfg_names:
            nested["method_cfg"][key] = raw
        elif key in aug_names:
            nested["aug"][key] = raw
        elif other := _other_methods_key(key, method_name):
            raise UserError(other)
        else:
            allkeys = sorted(top_names | {f"method_cfg.{n}" for n in mcfg_names} | {f"aug.{n}" for n in aug_names})
            close = difflib.get_close_matches(key, allkeys, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(
                f"unknown config key {key!r}{hint}; the keys are the fields of TrainConfig in sslbench/config/__init__.py, "
                "aug.* (AugmentConfig) and the method's own (`sslbench list methods`)"
            )
    cfg: TrainConfig = update_dataclass(TrainConfig(), top)
    cfg.resolve_defaults()
    cfg.backbone_kwargs = {k: _backbone_value(k, v) for k, v in nested["backbone_kwargs"].items()}
    assert cfg.image_size is not None  # resolve_defaults() set it
    from sslbench.backbones import backbone_family  # imports timm: only when a config is built

    recipe: Recipe = method_cls.recipe(cfg.image_size, backbone_family(cfg.backbone, cfg.image_size, cfg.backbone_kwargs))
    cfg.aug = update_dataclass(dataclasses.replace(cfg.aug, **recipe.aug), nested["aug"], prefix="aug.")
    for key in nested["method_cfg"]:
        if key not in mcfg_names and (other := _other_methods_key(str(key), method_name, prefix="method_cfg.")):
            raise UserError(other)
    method_defaults = update_dataclass(method_cls.Config(), recipe.method, prefix="method_cfg.")
    cfg.method_cfg = update_dataclass(method_defaults, nested["method_cfg"], prefix="method_cfg.")
    apply_recipe(cfg, recipe)
    cfg.validate()
    return cfg


def _other_methods_key(key: str, method: str, *, prefix: str = "") -> str:
    """The message for ``key``, a setting of other methods but not of ``method`` (BYOL given
    ``temperature``), or ``""`` when no method has it (then it is a typo, with close matches)."""
    from sslbench.core.registry import METHODS

    owners = sorted(name for name, cls in METHODS.items() if name != method and key in {f.name for f in fields(cls.Config)})
    if not owners:
        return ""
    own = sorted(f.name for f in fields(METHODS.get(method).Config))
    return (
        f"config key {prefix + key!r} is a setting of {', '.join(owners)}, not of {method} (its own keys: {', '.join(own) or 'none'}); "
        f"drop it, or train one of those methods with --method"
    )


def _backbone_value(key: Any, value: Any) -> Any:
    """A ``backbone_kwargs`` value: CLI text parsed (``16,32,64,128`` -> a tuple), YAML lists as tuples."""
    if isinstance(value, str):
        try:
            return parse_literal(value)
        except UserError as exc:
            raise UserError(f"backbone_kwargs.{key}: {exc}") from None
    return tuple(value) if isinstance(value, list) else value


RECIPE_FIELDS = ("optimizer", "lr", "lr_scaling", "weight_decay", "weight_decay_end", "lars_eta", "lars_clip", "betas", "grad_clip")


def apply_recipe(cfg: TrainConfig, recipe: Recipe) -> None:
    """Fill the optimizer fields left ``None`` from the method's :class:`~sslbench.core.method.Recipe`
    for this image size (its augmentation defaults are applied before the user's ``aug`` values)."""
    for key in RECIPE_FIELDS:
        if getattr(cfg, key) is None:
            setattr(cfg, key, getattr(recipe, key))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a directory; pass a YAML file")
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); pass a YAML file") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return data


# Fields that decide how a run is executed, logged, stored or scored, not what it learns; the
# training identity (:func:`training_identity`) leaves them out.
OPERATIONAL_FIELDS = frozenset(
    {
        "seed",
        "output",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "num_workers",
        "max_memory_gb",
        "cache_dir",
        "online_probe",
        "log_with",
        "quick_knn",
        "knn_k",
        "knn_temperature",
        "keep_freed_memory",
        "compile",
        "deterministic",
        "channels_last",
        "nonfinite",
        "max_skipped_steps",
    }
)


def training_identity(cfg: TrainConfig) -> dict[str, Any]:
    """What a run learned from, as flat ``{dotted key: value}`` (e.g. ``backbone_kwargs.channels``,
    ``method_cfg.temperature``, ``aug.jitter_p``): the resolved config without the seed and the
    :data:`OPERATIONAL_FIELDS`. Result rows carry it so that a leaderboard never merges runs
    that trained differently (any field added later counts unless listed as operational)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = value

    for key, value in to_dict(cfg).items():
        if key not in OPERATIONAL_FIELDS:
            walk(f"{key}.", value)
    return out


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a saved config (``config.yaml``) exactly, without re-applying recipes."""
    return build_config(file_values=values)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    from sslbench.core.rundir import RunDir

    path = RunDir(run_dir).config
    if not path.is_file():
        raise UserError(f"{run_dir} is not an sslbench run directory (no config.yaml)")
    return run_config(path)


def run_config(path: str | Path) -> TrainConfig:
    """The saved config of a run, its file ``path`` (a run's ``config.yaml``) named in any mistake
    in it (a key another sslbench version wrote, a hand edit)."""
    try:
        return config_from_dict(load_yaml(path))
    except UserError as exc:
        if str(path) in str(exc):
            raise
        raise UserError(f"the run's saved config {path}: {exc}; correct or remove that entry in {path}") from None


def check_config_file(path: str, values: dict[str, Any], *, method: str) -> None:
    """The values of a ``--config`` file on their own, so that a mistake in it names the file: an
    unknown key, a wrong type or range, both ``epochs`` and ``steps``."""
    from sslbench.core.registry import get_method

    if values.get("epochs") is not None and values.get("steps") is not None:
        raise UserError(f"config file {path} gives both epochs ({values['epochs']}) and steps ({values['steps']}); keep one of them")
    get_method(method)  # an unknown method is the method flag's error, not the file's
    try:
        build_config(file_values={**values, "method": values.get("method", method)})
    except UserError as exc:
        raise UserError(f"config file {path}: {exc}") from None

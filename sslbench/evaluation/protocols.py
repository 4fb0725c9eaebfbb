"""Evaluation protocols: one registration each.

A protocol is a function that scores a loaded run (:class:`EvalContext`) and returns its metrics
and a self-describing record of how they were measured; its registration declares the rest::

    @register_protocol(
        "knn",
        options=[],  # the Option flags it adds to `sslbench eval` and `sslbench compare`
        reuse_key=lambda cfg, opts: {"k": cfg.knn_k, "temperature": cfg.knn_temperature},
    )
    def knn(ctx: EvalContext, fraction: float | None) -> Score:
        train, test = ctx.features()
        ...
        return Score({"knn_top1": ...}, {"k": ctx.cfg.knn_k, ...})

The commands do the rest for every protocol alike: ``--protocol NAME`` selects it, its options
become flags (checked before anything runs) and :class:`EvalOptions` attributes, each call's
:class:`Score` becomes one result row (``protocol.name`` is the protocol's name), and a re-run of
``compare`` reuses a stored row of the same run, protocol, label fraction and evaluation data whose
``protocol`` record holds the ``reuse_key`` fields (a value, or a predicate on the stored value).

With ``per_fraction=True`` the function is called once per ``--label-fractions`` value (the
row's ``label_fraction``), else once with ``fraction=None``. With ``per_features=True`` it is
called once per ``--features`` depth (``h``, ``proj1``, ..., ``z``: see
:func:`sslbench.evaluation.features.parse_depth`), with ``ctx.depth`` set and ``ctx.features()``
returning that depth's features; the row's ``protocol.features`` records the depth, and a stored
row is reused only at the same depth. ``in_memory=True`` refuses data read
from disk (it needs :class:`sslbench.data.ImageSplit`\\ s) before anything trains or is scored.
``prepare(ctx)`` runs before the data is loaded (to fail early).

The built-in protocols (knn, linear, finetune, distill, the label-free metrics) are in
``evals/protocols.py``, ``multilayer`` in ``evals/multilayer.py`` and ``attentive`` in
``evals/attentive.py``; packages
add theirs through the entry-point group ``sslbench.protocols`` (a module whose import registers
them), as methods do through ``sslbench.methods``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sslbench.core.errors import UserError
from sslbench.core.registry import Registry
from sslbench.results import protocol_depth

if TYPE_CHECKING:  # (torch and the data types are imported by the functions that use them: `sslbench --help` stays fast)
    import torch
    from torch import Tensor, nn

    from sslbench.config import TrainConfig
    from sslbench.data import FileSplit, ImageSplit

PROTOCOLS_ENTRY_POINT_GROUP = "sslbench.protocols"
DEFAULT_PROTOCOLS = "knn,linear"
DEFAULT_FRACTIONS = "0.01,0.1,1"
DEFAULT_FEATURES = "h"  # the encoder's output: what SimCLR and every SSL paper evaluates


# ---------------------------------------------------------------------------------------------
# Declarations


@dataclass(frozen=True)
class Option:
    """A protocol's flag, e.g. ``Option("--linear-epochs", 100, "linear-probe epochs", type=int,
    check=at_least(1))``. Its value is ``EvalOptions.<dest>`` (``opts.linear_epochs``); ``check``
    returns what is wrong with a value (``"must be >= 1"``) or None. Protocols may share an option
    (distillation uses the fine-tuning flags): it is added once."""

    flag: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[Any] | None = None
    metavar: str | None = None
    check: Callable[[Any], str | None] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def validate(self, value: Any) -> Any:
        problem = self.check(value) if self.check is not None and value is not None else None
        if problem:
            raise UserError(f"{self.flag} {problem}, got {value}")
        return value


def at_least(n: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= n else f"must be >= {n:g}"


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"  # (also NaN)


def within(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be in [{lo:g}, {hi:g}]"


class Score(NamedTuple):
    """What a protocol returns: the metrics of one row and the record of how they were measured
    (the row's ``protocol``, without ``name``, ``eval_data``, ``image_size`` and ``precision``,
    which the command adds). A ``warnings`` list in the record (one-line texts: the metrics were
    measured, but mislead, e.g. a k-NN k beyond its training images) stays in the row, and the
    command prints each as a ``warning:`` line."""

    metrics: dict[str, float]
    protocol: dict[str, Any]


@dataclass(frozen=True)
class EvalProtocol:
    name: str
    run: Callable[[EvalContext, float | None], Score]
    options: tuple[Option, ...] = ()
    reuse_key: Callable[[Any, EvalOptions], dict[str, Any] | None] | None = None  # None: never reused
    per_fraction: bool = False
    in_memory: bool = False
    prepare: Callable[[EvalContext], None] | None = None
    description: str = ""
    per_features: bool = False  # called once per --features depth (ctx.depth), the row's protocol.features
    uses_labels: bool = True  # False: scores data without labels (a single class is fine)
    module: str = ""  # the module that registered it (the built-ins list in the order of their modules)


def _same_protocol(old: EvalProtocol, new: EvalProtocol) -> bool:
    return getattr(old.run, "__qualname__", None) == getattr(new.run, "__qualname__", object())


#: The built-in protocols that have a module of their own in ``evals/`` (imported after ``evals/protocols.py``).
BUILTIN_PROTOCOL_MODULES = (
    "sslbench.evals.multilayer",
    "sslbench.evals.attentive",
    "sslbench.evals.fewshot",
    "sslbench.evals.transfer",
    "sslbench.evals.robustness",
    "sslbench.evals.ood",
)

#: The protocols in registration order (the order of ``--protocol``'s help and of the flags).
PROTOCOLS: Registry[EvalProtocol] = Registry(
    "protocol",
    PROTOCOLS_ENTRY_POINT_GROUP,
    ("sslbench.evals.protocols",) + BUILTIN_PROTOCOL_MODULES,
    same=_same_protocol,
    n_close=1,
    ordered=True,
    origin=lambda protocol: protocol.module,
)


def register_protocol(
    name: str,
    *,
    options: Iterable[Option] = (),
    reuse_key: Callable[[Any, EvalOptions], dict[str, Any] | None] | None = None,
    per_fraction: bool = False,
    in_memory: bool = False,
    prepare: Callable[[EvalContext], None] | None = None,
    description: str = "",
    per_features: bool = False,
    uses_labels: bool = True,
) -> Callable[[Callable[[EvalContext, float | None], Score]], Callable[[EvalContext, float | None], Score]]:
    """Decorator registering ``run(ctx, fraction) -> Score`` as the protocol ``name`` (see the
    module docstring). ``reuse_key(run_cfg, opts)``: the fields of a stored row's ``protocol``
    record under which ``compare`` reuses it (values, or predicates on the stored value); for a
    ``per_features`` protocol ``opts.features`` is then the one depth being matched."""
    module = str(sys._getframe(1).f_globals.get("__name__", ""))  # the registering module (e.g. evals/protocols.py for knn)

    def deco(run: Callable[[EvalContext, float | None], Score]) -> Callable[[EvalContext, float | None], Score]:
        PROTOCOLS.add(
            name, EvalProtocol(name, run, tuple(options), reuse_key, per_fraction, in_memory, prepare, description, per_features, uses_labels, module)
        )
        return run

    return deco


def unregister_protocol(name: str) -> None:
    """Remove a registered protocol (tests)."""
    PROTOCOLS.remove(name)


def get_protocol(name: str) -> EvalProtocol:
    """The protocol ``name``; a :class:`UserError` listing the valid names (and a close match) otherwise."""
    return PROTOCOLS.get(name)


def protocol_names() -> list[str]:
    return [p.name for p in PROTOCOLS.in_order()]


def protocol_options() -> list[Option]:
    """Every protocol's options, each once, in registration order."""
    seen: dict[str, Option] = {}
    for p in PROTOCOLS.in_order():
        for opt in p.options:
            seen.setdefault(opt.flag, opt)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------
# What `eval` and `compare` are asked to do, and a loaded run


@dataclass
class EvalOptions:
    """How ``eval`` and ``compare`` score an encoder (the same for every run of a comparison).
    A protocol option is an attribute too: ``opts.linear_epochs`` is ``settings["linear_epochs"]``,
    or the option's default when unset."""

    protocols: list[str] = field(default_factory=lambda: DEFAULT_PROTOCOLS.split(","))
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # label fractions (per_fraction protocols)
    features: list[str] = field(default_factory=lambda: [DEFAULT_FEATURES])  # feature depths (per_features protocols): h, proj1, ..., z
    data: str | None = None  # None: the run's own data
    max_memory_gb: float | None = None  # evaluation data larger than this is read from disk (None: the run's max_memory_gb)
    seed: int = 0  # linear-probe validation split, fine-tune subsets and batch order (not the run's seed)
    device: str | None = None  # None: cuda when available, else cpu
    settings: dict[str, Any] = field(default_factory=dict)  # protocol options by dest

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("settings")
        if settings is not None and name in settings:
            return settings[name]
        if not name.startswith("_"):
            for opt in protocol_options():
                if opt.dest == name:
                    return opt.default
        raise AttributeError(f"{type(self).__name__!r} has no attribute or protocol option {name!r}")


@dataclass
class EvalContext:
    """A run loaded for evaluation: what a protocol's function gets. ``train`` and ``test`` are
    loaded after the protocols' ``prepare``; ``cache`` is shared by the protocols of one
    evaluation (e.g. the fine-tuned teachers that distillation reuses). ``depth`` is the feature
    depth a ``per_features`` protocol is scoring (``h`` otherwise)."""

    run_dir: Path
    cfg: TrainConfig  # the run's config
    opts: EvalOptions
    encoder: nn.Module  # on ``device``, eval mode
    device: torch.device
    precision: str  # "no", "bf16" or "fp16" (the run's mixed precision on CUDA, else "no")
    data: str  # the data spec evaluated on
    train: ImageSplit | FileSplit | None = None  # loaded after the protocols' ``prepare``
    test: ImageSplit | FileSplit | None = None
    cache: dict[str, Any] = field(default_factory=dict)  # shared by the protocols of one evaluation
    depth: str = DEFAULT_FEATURES

    @property
    def image_size(self) -> int:
        """The run's training resolution (resolved when its config was loaded)."""
        size = self.cfg.image_size
        assert size is not None, "a loaded run's config has its image size resolved"
        return size

    def split(self, name: str) -> ImageSplit | FileSplit:
        """The loaded ``train`` or ``test`` split (loaded after the protocols' ``prepare``)."""
        data = self.train if name == "train" else self.test
        assert data is not None, f"the {name} split is loaded after the protocols' prepare"
        return data

    def in_memory(self, name: str) -> ImageSplit:
        """The ``train`` or ``test`` split of an ``in_memory`` protocol (the command refused data read from disk)."""
        from sslbench.data import ImageSplit

        data = self.split(name)
        assert isinstance(data, ImageSplit), "an in_memory protocol never sees data read from disk"
        return data

    def features(self) -> tuple[Tensor, Tensor]:
        """Frozen features of the train and test splits at ``depth`` (each computed once per evaluation)."""
        return self.split_features("train"), self.split_features("test")

    def split_features(self, split: str, depth: str | None = None) -> Tensor:
        """Frozen features ``(N, D)`` of ``split`` (``train`` or ``test``) at ``depth`` (default
        ``self.depth``): the encoder's output ``h``, computed once, then the run's projector
        layers up to ``depth`` (:func:`sslbench.evaluation.features.depth_head`) in eval mode."""
        depth = self.depth if depth is None else depth
        key = f"features:{split}:{depth}"
        if key not in self.cache:
            if depth == DEFAULT_FEATURES:
                from sslbench.evaluation.features import split_features

                self.cache[key] = split_features(
                    self.encoder,
                    self.split(split),
                    image_size=self.image_size,
                    device=self.device,
                    precision=self.precision,
                    num_workers=self.cfg.num_workers,
                )
            else:
                from sslbench.evaluation.features import apply_head

                h = self.split_features(split, DEFAULT_FEATURES)
                self.cache[key] = apply_head(self.head(depth), h, device=self.device)
        features: Tensor = self.cache[key]
        return features

    def head(self, depth: str | None = None) -> nn.Module | None:
        """The module that maps ``h`` to the features at ``depth`` (``None`` for ``h``), with the
        run's trained projector weights, on ``device``, loaded once."""
        depth = self.depth if depth is None else depth
        if depth == DEFAULT_FEATURES:
            return None
        key = f"head:{depth}"
        if key not in self.cache:
            from sslbench.evaluation.features import depth_head

            projector = self.cache.get("projector:whole")
            if projector is None:
                from sslbench.evaluation.features import load_projector

                projector = self.cache["projector:whole"] = load_projector(self.run_dir)
            self.cache[key] = depth_head(projector, depth, method=self.cfg.method).to(self.device)
        head: nn.Module | None = self.cache[key]
        return head


# ---------------------------------------------------------------------------------------------
# Flags


def parse_list(text: str, flag: str) -> list[str]:
    """``'a, b,,c'`` -> ``['a', 'b', 'c']`` (order kept, duplicates dropped); empty -> UserError."""
    items: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part and part not in items:
            items.append(part)
    if not items:
        raise UserError(f"{flag} needs at least one comma-separated value, got {text!r}")
    return items


def parse_protocols(text: str) -> list[str]:
    protocols = parse_list(text, "--protocol")
    for p in protocols:
        get_protocol(p)
    return protocols


def parse_fractions(text: str) -> list[float]:
    """``'0.01,0.1,1'`` -> ``[0.01, 0.1, 1.0]``; each must lie in (0, 1]."""

    out: list[float] = []
    for part in parse_list(text, "--label-fractions"):
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--label-fractions: {part!r} is not a number; write fractions like 0.01,0.1,1") from None
        value = check_fraction(value)
        if value not in out:
            out.append(value)
    return out


def parse_features(text: str) -> list[str]:
    """``'h,proj1,z'`` -> ``['h', 'proj1', 'z']``; each a valid depth name (whether the run's
    projector has it is checked when the run is loaded)."""
    from sslbench.evaluation.features import parse_depth

    return [parse_depth(part) for part in parse_list(text, "--features")]


def add_eval_flags(p: argparse.ArgumentParser, *, default_protocols: str = DEFAULT_PROTOCOLS) -> None:
    """The evaluation flags of ``eval`` and ``compare``: the common ones and every protocol's options."""
    p.add_argument("--protocol", default=default_protocols, help=f"comma-separated: {', '.join(protocol_names())} (default {default_protocols})")
    p.add_argument(
        "--label-fractions", default=DEFAULT_FRACTIONS, help=f"fine-tune and distill label fractions in (0, 1] (default {DEFAULT_FRACTIONS})"
    )
    p.add_argument(
        "--features",
        default=DEFAULT_FEATURES,
        metavar="DEPTHS",
        help="comma-separated feature depths the per-depth protocols score: h (the encoder's output), projK (the K-th "
        "hidden projector layer, after its activation), z (the projector's output); default h",
    )
    for opt in protocol_options():
        kwargs: dict[str, Any] = {"default": opt.default, "help": opt.help}
        if opt.choices is not None:
            kwargs["choices"] = list(opt.choices)
        else:
            kwargs["type"] = opt.type
        if opt.metavar is not None:
            kwargs["metavar"] = opt.metavar
        p.add_argument(opt.flag, dest=opt.dest, **kwargs)
    p.add_argument(
        "--max-memory-gb",
        type=float,
        metavar="GB",
        help="evaluation data larger than this is read from disk: k-NN and linear only (default: the run's max_memory_gb)",
    )
    p.add_argument("--eval-seed", type=int, default=0, help="seed of validation split, label subsets and batch order (default 0)")
    p.add_argument("--device", help="evaluation device (default cuda when available, else cpu)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def eval_options(args: argparse.Namespace, *, data: str | None = None) -> EvalOptions:
    """:class:`EvalOptions` from the flags of :func:`add_eval_flags`, every value checked."""
    settings = {opt.dest: opt.validate(getattr(args, opt.dest)) for opt in protocol_options()}
    if args.max_memory_gb is not None and not args.max_memory_gb >= 0:
        raise UserError(f"--max-memory-gb must be >= 0, got {args.max_memory_gb}")
    return EvalOptions(
        protocols=parse_protocols(args.protocol),
        fractions=parse_fractions(args.label_fractions),
        features=parse_features(args.features),
        data=data,
        max_memory_gb=args.max_memory_gb,
        seed=args.eval_seed,
        device=args.device,
        settings=settings,
    )


def reusable(opts: EvalOptions, cfg: Any, stored: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], EvalOptions | None]:
    """Split ``opts`` into the ``stored`` rows (of one run, oldest first) that it would evaluate
    again (the newest row of each protocol, label fraction and feature depth whose record holds
    the protocol's ``reuse_key``) and what is left to evaluate (``None``: nothing)."""
    data = opts.data or cfg.data
    here = [r for r in stored if isinstance(r.get("protocol"), dict)]

    def find(name: str, fraction: float | None, depth: str | None, expect: dict[str, Any]) -> dict[str, Any] | None:
        match = [
            r
            for r in here
            if r["protocol"].get("name") == name
            and r.get("label_fraction") == fraction
            and r["protocol"].get("eval_data") == data
            and (depth is None or row_depth(r) == depth)
            and all(_matches(r["protocol"].get(k), v) for k, v in expect.items())
        ]
        return match[-1] if match else None

    found: list[dict[str, Any]] = []
    protocols: list[str] = []
    fractions: list[float] = []
    depths: list[str] = []
    for name in opts.protocols:
        protocol = get_protocol(name)
        missing = False
        for depth in opts.features if protocol.per_features else [None]:
            at = dataclasses.replace(opts, features=[depth]) if depth is not None else opts
            expect = protocol.reuse_key(cfg, at) if protocol.reuse_key is not None else None
            for fraction in opts.fractions if protocol.per_fraction else [None]:
                row = find(name, fraction, depth, expect) if expect is not None else None
                found += [row] if row else []
                if row is None:
                    missing = True
                    if fraction is not None and fraction not in fractions:
                        fractions.append(fraction)
                    if depth is not None and depth not in depths:
                        depths.append(depth)
        protocols += [name] if missing else []
    # The per-fraction (per-depth) protocols share one list of fractions (depths): a stored row at
    # a fraction (depth) that is evaluated again for another protocol is replaced by the new row,
    # never counted twice.
    found = [r for r in found if not (r["protocol"]["name"] in protocols and _redone(r, fractions, depths))]
    if not protocols:
        return found, None
    return found, dataclasses.replace(opts, protocols=protocols, fractions=fractions or opts.fractions, features=depths or opts.features)


def row_depth(row: dict[str, Any]) -> str:
    """The feature depth a stored row was scored at: its ``protocol.features`` (``h`` for rows
    written before depths existed: :func:`sslbench.results.protocol_depth`)."""
    return protocol_depth(row.get("protocol")) or DEFAULT_FEATURES


def _redone(row: dict[str, Any], fractions: list[float], depths: list[str]) -> bool:
    """Whether evaluating ``fractions`` x ``depths`` again would write ``row``'s cell anew."""
    protocol = get_protocol(row["protocol"]["name"])
    fraction_redone = not protocol.per_fraction or not fractions or row.get("label_fraction") in fractions
    depth_redone = not protocol.per_features or not depths or row_depth(row) in depths
    return fraction_redone and depth_redone


def _matches(value: Any, expected: Any) -> bool:
    """A stored protocol field against what is asked: equal, or accepted by ``expected`` when it is a predicate."""
    return bool(expected(value)) if callable(expected) else value == expected


def check_fraction(fraction: float) -> float:
    """``fraction`` as a float in (0, 1], else a :class:`UserError`."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) <= 1.0 or math.isnan(fraction):
        raise UserError(f"label fraction must be in (0, 1], got {fraction!r}; e.g. 0.01 for 1% of the labels")
    return float(fraction)

"""Experiment tracking through Accelerate's trackers: TensorBoard, W&B, MLflow, Comet ML, Aim.

``--log-with tensorboard,wandb`` (config key ``log_with``; ``all``: every installed one) logs each
``metrics.jsonl`` record (loss, lr, images/s, the method's scalars, the online probe's accuracy),
the EMA momentum of methods with target networks, and the final evaluation metrics, with the
resolved config as hyper-parameters, into ``RUN_DIR/trackers/`` (W&B offline unless
``$WANDB_MODE`` says otherwise; MLflow to a local file store there unless ``$MLFLOW_TRACKING_URI``).
Each tracker's package is an optional extra (``pip install "sslbench[tensorboard]"``); asking for
one that is not installed is a one-line error naming the extra.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path
from typing import Any

from sslbench.config import TrainConfig, training_identity
from sslbench.core.errors import UserError
from sslbench.core.rundir import RunDir
from sslbench.train.callbacks import Callback

__all__ = ["TRACKERS", "TrackerCallback", "parse_trackers"]

# tracker -> (the module that must be importable, the sslbench extra that installs it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet"),
    "aim": ("aim", "aim"),
}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name][0]) is not None


def parse_trackers(spec: str | None) -> list[str]:
    """``'tensorboard,wandb'`` -> the tracker names, checked: known and installed (``all``: every
    installed one). A :class:`UserError` names the problem and the fix."""
    if not spec or spec.strip().lower() in ("none", ""):
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        found = [n for n in TRACKERS if _installed(n)]
        if not found:
            raise UserError('log_with=all: no tracker is installed; install one, e.g. pip install "sslbench[tensorboard]"')
        return found
    for name in names:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, list(TRACKERS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown tracker {name!r} in log_with{hint}; valid: {', '.join(TRACKERS)}, all")
        if not _installed(name):
            raise UserError(f'log_with={name}: the {TRACKERS[name][0]} package is not installed; pip install "sslbench[{TRACKERS[name][1]}]"')
    return list(dict.fromkeys(names))


def _hparams(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as flat scalar hyper-parameters (tuples and lists as strings)."""
    out: dict[str, Any] = {"seed": cfg.seed}
    for key, value in training_identity(cfg).items():
        out[key] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return {k: ("None" if v is None else v) for k, v in out.items()}


class TrackerCallback(Callback):
    """Logs the loop's records to the configured trackers (main process); :meth:`log_final` adds
    the end-of-training metrics and :meth:`close` ends the trackers (the pipeline calls both)."""

    order = 25  # after the records are complete, beside the metrics file

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.trackers: list[Any] = []
        self._last_step = 0

    def on_train_start(self, run: Any) -> None:
        if not run.main or not self.names or self.trackers:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        files = RunDir(run.run_dir)
        logdir = files.trackers
        logdir.mkdir(parents=True, exist_ok=True)
        name = Path(run.run_dir).name
        for tracker in self.names:
            cls = LOGGER_TYPE_TO_CLASS[tracker]
            if tracker == "wandb":
                os.environ.setdefault("WANDB_MODE", "offline")
                t = cls(name, dir=str(logdir), project="sslbench")
            elif tracker == "mlflow":
                os.environ.setdefault("MLFLOW_TRACKING_URI", (logdir / "mlruns").resolve().as_uri())
                t = cls(experiment_name="sslbench", logging_dir=str(logdir), run_name=name)
            elif tracker in ("tensorboard", "aim"):
                t = cls(name, str(logdir))
            else:
                t = cls(name)
            t.start()
            t.store_init_configuration(_hparams(run.cfg))
            self.trackers.append(t)

    def on_record(self, run: Any, record: dict[str, Any]) -> None:
        if not self.trackers:
            return
        step = int(record["step"])
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if "loss" in record and run.method.momentum_pairs():
            values["momentum"] = float(run.method.momentum_at(run.info(step - 1)))
        self._last_step = max(self._last_step, step)
        for t in self.trackers:
            t.log(values, step=step)

    def log_final(self, metrics: dict[str, float]) -> None:
        """The final evaluation metrics (the quick k-NN), at the last step, prefixed ``eval/``."""
        values = {f"eval/{k}": float(v) for k, v in metrics.items()}
        for t in self.trackers:
            if values:
                t.log(values, step=self._last_step)

    def close(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []

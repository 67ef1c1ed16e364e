"""The training log: ``train_log.csv`` in every run directory, and the same scalars streamed to loggers.

Every ``train_log_every`` optimizer steps, and at the end of each task, one row: the run's step count,
the task (1-based), the epoch of the strategy's training loop (empty where the loop has none, e.g.
Avalanche's), the mean training loss over the steps since the last row, the learning rate of the first
parameter group, and the samples (and, for language models, tokens) trained per second over those steps.
Every optimizer step of every strategy goes through ``Strategy.count_step``, which feeds this log.

On resume the rows after the checkpoint's last task are dropped (that task is trained again), so the
step, task, epoch and loss columns end as an uninterrupted run's; the rates are wall-clock.

``loggers=[tensorboard, wandb, mlflow]`` stream the same rows plus the accuracy on every seen task after
each task and the final metrics. Each is an optional package: TensorBoard event files go to
``<run>/tensorboard``; W&B runs in the mode its environment says (``WANDB_MODE=offline`` writes under
``<run>/wandb``); MLflow logs to ``MLFLOW_TRACKING_URI`` or, without one, the file store ``<run>/mlruns``
(MLflow 3 keeps it in maintenance mode; ``MLFLOW_ALLOW_FILE_STORE`` is set for it).
After a resume the streamed loggers receive the retrained steps again under the same step numbers.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
import time
from pathlib import Path

import torch

from cl_bench._io import atomic_write_text
from cl_bench.errors import UserError

COLUMNS = ("step", "task", "epoch", "loss", "lr", "samples_per_second", "tokens_per_second")
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class TrainLog:
    """Accumulates the steps between rows and writes them to ``train_log.csv`` (none when ``path`` is None:
    a data-parallel rank other than 0) and the loggers."""

    def __init__(self, path: Path | None, every: int, loggers: list | None = None):
        self.path, self.every, self.loggers = path, every, loggers or []
        self.task, self.lr = 0, None
        self._reset(time.perf_counter(), 0)

    def _reset(self, now: float, tokens: int) -> None:
        self.steps, self.samples, self.loss_sum, self.loss_count = 0, 0, None, 0
        self.began, self.tokens_at_start = now, tokens

    def resume(self, tasks_completed: int) -> None:
        """Keep the rows of the tasks a resumed run will not train again."""
        if self.path is None or not self.path.exists():
            return
        try:
            rows = list(csv.DictReader(io.StringIO(self.path.read_text(errors="replace"))))
        except csv.Error:
            rows = []
        kept = [row for row in rows if row.get("step") and (row.get("task") or "").isdigit()
                and int(row["task"]) <= tasks_completed and all(row.get(c) is not None for c in COLUMNS)]
        atomic_write_text(self.path, _csv_text(kept, header=True))

    def begin_task(self, task: int, strategy) -> None:
        self.task = task
        self._reset(time.perf_counter(), getattr(strategy, "tokens_trained", 0))

    def step(self, strategy, samples: int, loss, optimizer) -> None:
        """One optimizer step (``Strategy.count_step``); a row when ``every`` steps have gathered."""
        self.steps += 1
        self.samples += samples
        if loss is not None:
            value = loss.detach().float().sum() if isinstance(loss, torch.Tensor) else float(loss)
            self.loss_sum = value if self.loss_sum is None else self.loss_sum + value
            self.loss_count += 1
        if optimizer is not None:
            self.lr = optimizer.param_groups[0]["lr"]
        if strategy.optimizer_steps % self.every == 0:
            self.write_row(strategy)

    def end_task(self, strategy) -> None:
        if self.steps:
            self.write_row(strategy)

    def write_row(self, strategy) -> None:
        now = time.perf_counter()
        seconds = max(now - self.began, 1e-9)
        tokens = getattr(strategy, "tokens_trained", None)
        loss = None if self.loss_sum is None else float(self.loss_sum) / self.loss_count
        row = {"step": strategy.optimizer_steps, "task": self.task, "epoch": getattr(strategy, "epoch", None),
               "loss": loss, "lr": self.lr, "samples_per_second": self.samples / seconds,
               "tokens_per_second": None if tokens is None else (tokens - self.tokens_at_start) / seconds}
        try:  # appended, so a reader sees the rows as they come; resume() drops a torn last row
            if self.path is not None:
                with open(self.path, "a", newline="") as file:
                    file.write(_csv_text([row], header=file.tell() == 0))
        except OSError as error:
            raise OSError(error.errno, f"cannot write {self.path}: {error.strerror or error}") from error
        for logger in self.loggers:
            logger.scalars({f"train/{k}": v for k, v in row.items() if k not in ("step", "task", "epoch")},
                           row["step"])
        self._reset(now, tokens or 0)

    def scores(self, task: int, accuracy: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.scalars({f"accuracy/{name}": value for name, value in accuracy.items()}, task)

    def close(self, final: dict[str, float] | None) -> None:
        for logger in self.loggers:
            if final:
                logger.final({k: v for k, v in final.items() if isinstance(v, (int, float)) and math.isfinite(v)})
            logger.close()


def _csv_text(rows: list[dict], header: bool) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    return out.getvalue()


def check_loggers(names) -> list[str]:
    """``loggers`` as a list of known names whose packages are installed, or a UserError saying which not."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if not isinstance(name, str) or name not in LOGGER_PACKAGES:
            raise UserError(f"unknown logger {name!r} (known: {', '.join(LOGGER_PACKAGES)})")
        if importlib.util.find_spec(LOGGER_PACKAGES[name]) is None:
            raise UserError(f"loggers=[{name}] needs the {LOGGER_PACKAGES[name]} package: "
                            f"pip install 'cl-bench[loggers]' (or pip install {LOGGER_PACKAGES[name]})")
    return names


class TensorBoardLogger:
    def __init__(self, directory: Path, run_id: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {line}" for line in _yaml(config).splitlines()))

    def scalars(self, values: dict, step: int) -> None:
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)

    def final(self, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"final/{key}", value, 0)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, directory: Path, run_id: str, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cl-bench"), name=run_id, config=config,
                              dir=str(directory), reinit="create_new")
        self.run.define_metric("train/*", step_metric="train/step")
        self.run.define_metric("accuracy/*", step_metric="accuracy/after_task")

    def scalars(self, values: dict, step: int) -> None:
        axis = "train/step" if any(k.startswith("train/") for k in values) else "accuracy/after_task"
        self.run.log({**{k: v for k, v in values.items() if v is not None}, axis: step})

    def final(self, values: dict) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in values.items()})

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    def __init__(self, directory: Path, run_id: str, config: dict):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 keeps the file store in maintenance mode, behind this switch
            uri = (directory / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "cl-bench")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_id).info.run_id
        for key, value in _flat(config).items():
            self.client.log_param(self.run_id, key, str(value)[:500])

    def scalars(self, values: dict, step: int) -> None:
        for key, value in values.items():
            if value is not None:
                self.client.log_metric(self.run_id, key, float(value), step=step)

    def final(self, values: dict) -> None:
        for key, value in values.items():
            self.client.log_metric(self.run_id, f"final/{key}", float(value))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


LOGGERS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MlflowLogger}


def open_loggers(names: list[str], directory: Path, run_id: str, config: dict) -> list:
    loggers = []
    for name in names:
        try:
            loggers.append(LOGGERS[name](directory, run_id, config))
        except Exception as error:  # the logger's own setup (a tracking URI, a W&B login): the user's to fix
            for logger in loggers:
                logger.close()
            first_line = (str(error).splitlines() or [""])[0][:300]
            raise UserError(f"loggers=[{name}] could not start: {type(error).__name__}: {first_line}") from error
    return loggers


def _flat(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)

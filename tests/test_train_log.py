"""The training log: ``train_log.csv`` in every run, fed by every optimizer step, and the same scalars read
back from TensorBoard event files, an offline W&B run and an MLflow file store (no network)."""
import csv
import json
import math
import struct
from pathlib import Path

import pytest

from cl_bench.cli import main
from cl_bench.config import compose
from cl_bench.runner import Run, run


def toy_args(results: Path, *extra: str) -> list[str]:
    return ["scenario=toy", "strategy=finetune", "strategy.epochs=3", "progress=false", f"results_dir={results}",
            f"cache_dir={results}/cache", *extra]


def read_log(directory: Path) -> list[dict]:
    return list(csv.DictReader((directory / "train_log.csv").open()))


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """The same toy run logged every step and every 2 steps, the latter also to all three loggers."""
    root = tmp_path_factory.mktemp("logged")
    every_step = run(compose(toy_args(root / "every1", "train_log_every=1")))
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("WANDB_MODE", "offline")
        environment.setenv("WANDB_SILENT", "true")
        environment.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary = run(compose(toy_args(root / "every2", "train_log_every=2", "loggers=[tensorboard,wandb,mlflow]")))
    directory = Path(root / "every2" / "runs" / summary["run_id"])
    return read_log(Path(root / "every1" / "runs" / every_step["run_id"])), summary, directory


def test_rows_every_n_steps_and_at_each_task_end_with_the_mean_loss_of_their_steps(logged):
    single, summary, directory = logged
    rows = read_log(directory)
    steps_per_task = [p["optimizer_steps"] for p in summary["per_task"]]
    assert [int(r["step"]) for r in single] == list(range(1, sum(steps_per_task) + 1))
    ends = {sum(steps_per_task[:t + 1]) for t in range(len(steps_per_task))}
    assert [int(r["step"]) for r in rows] == sorted({s for s in range(1, sum(steps_per_task) + 1)
                                                     if s % 2 == 0} | ends)
    by_step = {int(r["step"]): r for r in single}
    previous = 0
    for row in rows:  # the mean of the single-step losses since the previous row (the same training)
        step = int(row["step"])
        losses = [float(by_step[s]["loss"]) for s in range(previous + 1, step + 1)]
        assert float(row["loss"]) == pytest.approx(sum(losses) / len(losses), rel=1e-6)
        assert row["task"] == by_step[step]["task"] and row["epoch"] == by_step[step]["epoch"]
        assert float(row["lr"]) == 0.01 and float(row["samples_per_second"]) > 0 and row["tokens_per_second"] == ""
        previous = step
    assert {r["epoch"] for r in single} == {"1", "2", "3"}
    assert [sum(r["task"] == str(t + 1) for r in single) for t in range(3)] == steps_per_task


def test_tensorboard_event_files_hold_the_log_the_scores_and_the_final_metrics(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, summary, directory = logged
    events = EventAccumulator(str(directory / "tensorboard"))
    events.Reload()
    rows = read_log(directory)
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [int(r["step"]) for r in rows]
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    assert [e.value for e in events.Scalars("accuracy/seen")] == pytest.approx(
        [p["score"] for p in summary["per_task"]])
    assert events.Scalars("final/acc_final_task_mean")[0].value == pytest.approx(
        summary["metrics"]["acc_final_task_mean"])


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (W&B's LevelDB-style log: 7-byte file header, 32 KiB blocks,
    each record chunk behind a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if room >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            position += room
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_an_offline_wandb_run_holds_the_log_and_the_final_metrics(logged):
    _, summary, directory = logged
    [file] = (directory / "wandb").glob("offline-run-*/run-*.wandb")
    history, final = [], {}
    for record in wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "summary":
            final.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                          for item in record.summary.update})
    rows = read_log(directory)
    train = [h for h in history if "train/loss" in h]
    assert [h["train/step"] for h in train] == [int(r["step"]) for r in rows]
    assert [h["train/loss"] for h in train] == pytest.approx([float(r["loss"]) for r in rows])
    assert final["final/acc_final_task_mean"] == pytest.approx(summary["metrics"]["acc_final_task_mean"])


def test_an_mlflow_file_store_holds_the_log_and_the_final_metrics(logged):
    import mlflow

    _, summary, directory = logged
    client = mlflow.MlflowClient(tracking_uri=(directory / "mlruns").as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "cl-bench"]
    [mlflow_run] = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.run_name == summary["run_id"] and mlflow_run.data.params["strategy.lr"] == "0.01"
    history = sorted(client.get_metric_history(mlflow_run.info.run_id, "train/loss"), key=lambda m: m.step)
    rows = read_log(directory)
    assert [(m.step, m.value) for m in history] == [(int(r["step"]), pytest.approx(float(r["loss"]))) for r in rows]
    assert mlflow_run.data.metrics["final/acc_final_task_mean"] == pytest.approx(
        summary["metrics"]["acc_final_task_mean"])


def test_avalanche_and_language_model_strategies_feed_the_same_log(tmp_path):
    avalanche = run(compose(["scenario=toy", "strategy=avalanche.naive", "progress=false", "train_log_every=1",
                             f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache"]))
    rows = read_log(Path(tmp_path / "runs" / avalanche["run_id"]))
    assert len(rows) == sum(p["optimizer_steps"] for p in avalanche["per_task"])
    assert all(math.isfinite(float(r["loss"])) and r["lr"] and r["epoch"] == "" for r in rows)
    lm = run(compose(["scenario=instruct_toy", "model=tiny_llama", "strategy=seqlora", "strategy.batch_size=4",
                      "progress=false", f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache"]))
    rows = read_log(Path(tmp_path / "runs" / lm["run_id"]))
    assert rows and all(float(r["tokens_per_second"]) > 0 and float(r["loss"]) > 0 for r in rows)


@pytest.mark.parametrize("argument, expected", [
    ("loggers=[nope]", "unknown logger 'nope'"),
    ("train_log_every=0", "train_log_every must be at least 1"),
    ("loggers=[[1]]", "unknown logger [1]"),
])
def test_bad_logging_settings_are_one_line_errors(capsys, tmp_path, argument, expected):
    assert main(["run", *toy_args(tmp_path), argument]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err
    assert not (tmp_path / "runs").exists()


def test_a_resumed_run_drops_the_rows_of_the_task_it_trains_again(tmp_path):
    cfg = compose(toy_args(tmp_path, "train_log_every=1"))
    run(cfg)
    directory = Run(cfg).directory
    finished = (directory / "train_log.csv").read_text()
    summary = json.loads((directory / "summary.json").read_text())
    task_one_rows = finished.splitlines()[: 1 + summary["per_task"][0]["optimizer_steps"]]
    from cl_bench.train_log import TrainLog
    TrainLog(directory / "train_log.csv", 1).resume(1)
    assert (directory / "train_log.csv").read_text().splitlines() == task_one_rows

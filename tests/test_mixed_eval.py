"""Evaluation that cannot leak the task: under ``eval_mode=cil`` every batch mixes the scored tasks, so a
strategy that reads the task off its batch gains nothing, while strategies that never look at the batch
score exactly as with per-task batches; ``til`` still hands the task over."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from cl_bench import runner
from cl_bench.config import compose
from cl_bench.evaluation import evaluate, evaluate_instructions, evaluate_mixed
from cl_bench.leaderboard import read_scores
from cl_bench.registry import STRATEGIES, hyperparameters
from cl_bench.scenarios.base import Samples, Task
from cl_bench.scenarios.instruct_toy import InstructToy
from cl_bench.strategies.base import ClassifierStrategy, Context, Strategy


def config(tmp_path, *extra):
    """The strategy's smoke setting; 3 epochs where it has epochs (contracon's default is 250)."""
    strategy_class = STRATEGIES.get(next((e.split("=")[1] for e in extra if e.startswith("strategy=")), "finetune"))
    epochs = ["strategy.epochs=3"] if "epochs" in hyperparameters(strategy_class) else []
    return compose([*strategy_class.smoke_args, "progress=false", f"results_dir={tmp_path}",
                    f"cache_dir={tmp_path}/cache", *epochs, *extra])


def scores(cfg):
    summary = runner.run(cfg)
    assert summary["status"] == "finished"
    return read_scores(runner.Run(cfg).directory / "scores.csv", summary["tasks_total"]), summary


def per_task_scoring(strategy, stream, row, columns, sums, counts, *, eval_mode, batch_size, seed):
    """The evaluation before mixed batches: one task's test set at a time, in order (``til`` masks)."""
    for j in columns:
        task = stream.tasks[j]
        sums[row, j], counts[row, j] = (evaluate_instructions(strategy, task) if stream.kind == "instructions"
                                        else evaluate(strategy, task, stream.num_classes, eval_mode, batch_size))


def per_task_scores(monkeypatch, cfg):
    with monkeypatch.context() as patch:
        patch.setattr(runner, "score_tasks", per_task_scoring)
        return scores(cfg)


class BatchMeanCheat(ClassifierStrategy):
    """Fine-tuning that reads the task off its batch: the stored task whose mean training input is nearest
    the batch's mean input answers, its logits masked to that task's classes."""

    def __init__(self, backbone, context, **kwargs):
        super().__init__(backbone, context, **kwargs)
        self.task_means, self.task_classes = [], []

    def after_task(self, task):
        self.task_means.append(task.train.inputs.float().mean(0))
        self.task_classes.append(list(task.classes))

    def predict(self, inputs):
        logits = self(inputs)
        distances = [float((mean - inputs.float().mean(0)).norm()) for mean in self.task_means]
        mask = torch.full_like(logits, -torch.inf)
        mask[:, self.task_classes[distances.index(min(distances))]] = 0
        return logits + mask


@pytest.fixture
def cheat():
    STRATEGIES.register("batch_mean_cheat", BatchMeanCheat)
    yield "batch_mean_cheat"
    STRATEGIES._entries.pop("batch_mean_cheat")
    STRATEGIES._origins.pop("batch_mean_cheat")


def test_reading_the_task_off_the_batch_gains_nothing_under_cil(tmp_path, monkeypatch, cheat):
    common = ("scenario=toy",)
    final = lambda summary: summary["metrics"]["acc_final_task_mean"]  # noqa: E731
    (_, _), finetune = scores(config(tmp_path / "finetune", *common))
    (_, _), mixed = scores(config(tmp_path / "mixed", *common, f"strategy={cheat}"))
    (_, _), per_task = per_task_scores(monkeypatch, config(tmp_path / "per_task", *common, f"strategy={cheat}"))
    (_, _), til = scores(config(tmp_path / "til", *common, f"strategy={cheat}", "eval_mode=til"))
    assert final(per_task) > final(finetune) + 20  # the leak mixed batches close is real
    assert final(mixed) <= final(finetune) + 5
    assert final(mixed) <= 100 / finetune["tasks_total"] + 5  # one task's classes for everything
    assert final(til) > final(mixed) + 40
    assert mixed["protocol"]["eval_batches"] == "mixed" and mixed["protocol"]["task_identity_test"] == "none"
    assert til["protocol"]["eval_batches"] == "per_task" and til["protocol"]["task_identity_test"] == "given"


@pytest.mark.parametrize("extra", [("strategy=finetune", "scenario=toy", "eval_unseen=true"),
                                   ("strategy=er", "scenario=digits", "strategy.buffer_size=40")])
def test_strategies_blind_to_their_batch_score_as_with_per_task_batches(tmp_path, monkeypatch, extra):
    """Same training (evaluation draws nothing from the run's generators), same predictions per sample,
    so the same correct counts per cell, bit for bit; small batches so that every batch mixes tasks."""
    (sums, counts), _ = scores(config(tmp_path / "mixed", *extra, "eval_batch_size=16"))
    (ref_sums, ref_counts), _ = per_task_scores(monkeypatch, config(tmp_path / "per_task", *extra,
                                                                    "eval_batch_size=16"))
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_array_equal(sums, ref_sums)
    assert not np.isnan(sums[-1]).any()


class Recorder(Strategy):
    """Predicts the class written in its input's first coordinate, except for odd classes; records its batches."""

    def __init__(self):
        super().__init__(torch.nn.Identity(), Context(generator=torch.Generator().manual_seed(5)))
        self.seen = []

    def predict(self, inputs):
        self.seen.append(inputs[:, 0].long().tolist())
        labels = inputs[:, 0].long()
        return torch.nn.functional.one_hot(torch.where(labels % 2 == 0, labels, 0), 6).float()


def test_mixed_batches_mix_every_task_and_split_counts_back_per_task():
    tasks = []
    for index, classes in enumerate([(0, 1), (2, 3), (4, 5)]):
        targets = torch.tensor([c for c in classes for _ in range(10 + index)])
        tasks.append(Task(index, f"t{index}", Samples(targets[:0, None].float(), targets[:0]),
                          Samples(targets[:, None].float(), targets), classes))
    strategy = Recorder()
    generator_state, global_state = strategy.context.generator.get_state(), torch.get_rng_state()
    results, own_task = evaluate_mixed(strategy, tasks, 6, batch_size=8, seed=3)
    # the even class of each task is right, its odd class wrong (class 0 is right either way)
    assert results == [(10.0, 20), (11.0, 22), (12.0, 24)]
    # task identified: all of task 0 (its odd class goes to class 0, still its own), the even halves of the rest
    assert own_task == 20 + 11 + 12
    assert all(len({label // 2 for label in batch}) > 1 for batch in strategy.seen[:-1])
    assert sorted(sum(strategy.seen, [])) == sorted(torch.cat([t.test.targets for t in tasks]).tolist())
    assert torch.equal(strategy.context.generator.get_state(), generator_state)
    assert torch.equal(torch.get_rng_state(), global_state)
    again = Recorder()
    evaluate_mixed(again, tasks, 6, batch_size=8, seed=3)
    assert again.seen == strategy.seen  # one fixed order for a seed


@pytest.fixture
def uneven_limits(monkeypatch):
    """instruct_toy with a different generation limit per task, some shorter than the answers."""
    build = InstructToy.build

    def with_limits(self):
        tasks, general, provenance = build(self)
        tasks = [dataclasses.replace(task, max_new_tokens=limit) for task, limit in zip(tasks, (3, 8, 5))]
        return tasks, general, provenance

    monkeypatch.setattr(InstructToy, "build", with_limits)


def test_mixed_instruction_batches_score_as_per_task_ones(tmp_path, monkeypatch, uneven_limits):
    extra = ("strategy=seqlora", "eval_batch_size=8")
    (sums, counts), summary = scores(config(tmp_path / "mixed", *extra))
    (ref_sums, ref_counts), _ = per_task_scores(monkeypatch, config(tmp_path / "per_task", *extra))
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_array_equal(sums, ref_sums)
    assert np.nansum(sums[1:]) > 0  # something was learnt, so the comparison is not between empty answers
    assert summary["protocol"]["eval_batches"] == "mixed"


# contracon scores every test image with T x 11 forward passes: two small tasks keep it quick
SMALL_DIGITS = ("scenario.increment=5", "scenario.max_per_class=30", "scenario.max_test_per_class=10")


@pytest.mark.parametrize("name, extra", [("coin_ema", ()), ("conpet_dynamic", ()), ("mos", ()),
                                         ("contracon", SMALL_DIGITS)])
def test_routing_strategies_run_end_to_end_on_mixed_batches(tmp_path, name, extra):
    cfg = config(tmp_path, f"strategy={name}", "eval_batch_size=8", *extra)
    (sums, counts), summary = scores(cfg)
    T = summary["tasks_total"]
    assert summary["tasks_completed"] == T >= 2
    assert not np.isnan(counts[1:][np.tril_indices(T)]).any()
    assert summary["protocol"]["eval_batches"] == "mixed"
    saved = json.loads((runner.Run(cfg).directory / "summary.json").read_text())
    assert saved["metrics"] == summary["metrics"]


class NeedsTaskAtTest(ClassifierStrategy):
    """A strategy that declares it must be told the task at test time (a task-incremental method)."""

    needs_task_at_test = True


def test_a_strategy_that_needs_the_task_at_test_runs_only_under_til(tmp_path, capsys):
    from cl_bench.cli import main

    STRATEGIES.register("needs_task_at_test", NeedsTaskAtTest)
    try:
        common = ["strategy=needs_task_at_test", "scenario=toy", "progress=false", f"results_dir={tmp_path}"]
        assert main(["run", *common]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "needs the task identity at test time" in error
        assert not (tmp_path / "runs").exists()
        assert main(["run", *common, "eval_mode=til"]) == 0
        (directory,) = (tmp_path / "runs").iterdir()
        card = json.loads((directory / "summary.json").read_text())["protocol"]
        assert card["task_identity_test"] == "given" and card["eval_batches"] == "per_task"
    finally:
        STRATEGIES._entries.pop("needs_task_at_test")
        STRATEGIES._origins.pop("needs_task_at_test")


def test_task_identification_is_recorded_per_task_under_cil_only(tmp_path):
    _, cil = scores(config(tmp_path / "cil", "scenario=toy"))
    identified = [p["task_identified"] for p in cil["per_task"]]
    assert identified[0] == 100.0  # one task seen: every prediction is among its classes
    # a right prediction is in its own task, so identification bounds accuracy from above
    assert all(p["score"] <= p["task_identified"] <= 100 for p in cil["per_task"])
    assert cil["metrics"]["task_identified_final"] == identified[-1]
    _, til = scores(config(tmp_path / "til", "scenario=toy", "eval_mode=til"))
    assert "task_identified" not in til["per_task"][-1] and "task_identified_final" not in til["metrics"]

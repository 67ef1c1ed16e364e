"""The protocol card's training counts against hand-computed numbers, the budget honoured by every
registered strategy (or refused in one line), bad budgets refused before anything runs, and the
counts surviving a resume.

Streams used: ``toy`` = 6 classes in 3 tasks of 2 classes, 40 training examples per class, so 80 per
task; ``instruct_toy`` = 3 tasks of 48 training examples.
"""
import json

import pytest

from cl_bench.cli import main
from cl_bench.config import compose
from cl_bench.registry import STRATEGIES, hyperparameters
from cl_bench.runner import run
from cl_bench.strategies.er import ER
from cl_bench.strategies.finetune import Finetune

TOY_TASKS = 3


def config(tmp_path, *args):
    return compose([*args, "progress=false", "device=cpu", f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache"])


def counts(summary) -> tuple[list[int], list[int], list[int]]:
    """(optimizer steps, samples trained, examples stored) per task, checked to agree with the card."""
    card, per_task = summary["protocol"], summary["per_task"]
    steps, samples = [p["optimizer_steps"] for p in per_task], [p["samples_trained"] for p in per_task]
    assert card["optimizer_steps_per_task"] == steps and card["optimizer_steps"] == sum(steps)
    assert card["samples_trained_per_task"] == samples and card["samples_trained"] == sum(samples)
    stored = [p["examples_stored"] for p in per_task]
    assert card["examples_stored"] == max(stored)
    return steps, samples, stored


# --- hand-computed counts ------------------------------------------------------------------------

def test_finetune_counts_epochs_and_both_budgets(tmp_path):
    # 80 examples, batch 32: batches of 32, 32, 16 = 3 steps and 80 samples per epoch; 2 epochs: 6, 160
    summary = run(config(tmp_path, "strategy=finetune", "scenario=toy", "strategy.epochs=2"))
    assert counts(summary) == ([6] * 3, [160] * 3, [0] * 3)
    assert summary["protocol"]["budget"] is None and summary["protocol"]["epochs"] == 2
    # 4 steps: a whole epoch (32 + 32 + 16) and the first batch of the next (32) = 112 samples
    summary = run(config(tmp_path, "strategy=finetune", "scenario=toy", "budget.steps_per_task=4"))
    assert counts(summary) == ([4] * 3, [112] * 3, [0] * 3)
    assert summary["protocol"]["budget"] == {"steps_per_task": 4}
    # 100 samples: 80 after the first epoch, 112 after the next batch, the first step to reach 100
    summary = run(config(tmp_path, "strategy=finetune", "scenario=toy", "budget.samples_per_task=100"))
    assert counts(summary) == ([4] * 3, [112] * 3, [0] * 3)
    assert summary["protocol"]["budget"] == {"samples_per_task": 100}


def test_er_counts_replayed_samples_and_its_buffer(tmp_path):
    # batch 32 + 16 replayed once the buffer holds anything; buffer of 50 filled by reservoir sampling.
    # Task 1: 32 (buffer empty) + (32 + 16) + (16 + 16) = 112 in 3 steps; the buffer then holds 50.
    # Tasks 2, 3: (32 + 16) + (32 + 16) + (16 + 16) = 128 in 3 steps; the buffer stays at 50.
    args = ("strategy=er", "scenario=toy", "strategy.buffer_size=50", "strategy.replay_batch_size=16")
    assert counts(run(config(tmp_path, *args))) == ([3] * 3, [112, 128, 128], [50] * 3)
    # 60 samples: task 1 reaches it after 32 + 48 = 80 (2 steps), tasks 2, 3 after 48 + 48 = 96 (2 steps)
    assert counts(run(config(tmp_path, *args, "budget.samples_per_task=60"))) == ([2] * 3, [80, 96, 96], [50] * 3)


def test_conpet_static_counts_dynamic_replay_steps_and_full_history(tmp_path):
    # batch 4 (2 new + 2 old), batch_limit 5. Task 1: a plain epoch over 48 examples = 12 steps, 48 samples.
    # Tasks t >= 2, constant policy: S = floor(0.8 * 5) = 4 steps of 4 = 16 samples; linear policy:
    # floor(0.8 * t * 5) = 8 (t=2) and 12 (t=3) steps. full_history keeps every example: 48, 96, 144.
    args = ("strategy=conpet_static", "scenario=instruct_toy", "model=tiny_llama", "strategy.epochs=1",
            "strategy.batch_size=4", "strategy.batch_limit=5", "strategy.lr=0.005")
    summary = run(config(tmp_path, *args))
    assert counts(summary) == ([12, 4, 4], [48, 16, 16], [48, 96, 144])
    assert summary["protocol"]["switches"] == {"batch_limit_policy": {"value": "constant", "paper": "constant"},
                                               "memory": {"value": "full_history", "paper": "full_history"}}
    summary = run(config(tmp_path, *args, "strategy.batch_limit_policy=linear"))
    assert counts(summary) == ([12, 8, 12], [48, 32, 48], [48, 96, 144])
    assert summary["protocol"]["switches"]["batch_limit_policy"] == {"value": "linear", "paper": "constant"}


def test_hft_budget_spans_the_task_and_a_stage_trains_half(tmp_path):
    # batch 4 over 48 examples = 12 steps per epoch. resample=epoch runs the family's loop per epoch with a
    # new mask: a budget of 15 steps is 12 (epoch 1) + 3 (epoch 2) for the whole task, 60 samples.
    summary = run(config(tmp_path, "strategy=hft", "scenario=instruct_toy", "model=tiny_llama", "strategy.lr=0.01",
                         "strategy.batch_size=4", "strategy.resample=epoch", "budget.steps_per_task=15"))
    assert counts(summary) == ([15] * 3, [60] * 3, [0] * 3)
    card = summary["protocol"]
    assert card["switches"] == {"granularity": {"value": "category", "paper": "category"},
                                "resample": {"value": "epoch", "paper": "stage"}}
    # a stage's mask freezes 82,176 parameters of the tiny LLaMA (tests/test_hft.py: half of the 4 layers'
    # attention+FFN and one of two norms per layer); the union over stages would be every parameter
    total = summary["per_task"][0]["total_params"]
    assert card["trainable_params_per_stage"] == [total - 82_176] * 3
    assert card["trainable_params_max_stage"] < summary["cost"]["trainable_params"]


def test_avalanche_replay_counts_memory_batches_and_buffer(tmp_path):
    # Avalanche's Replay: the data loader (batch 32: 32, 32, 16) decides an epoch's 3 iterations; each
    # iteration adds a memory batch of up to 32 drawn without replacement from the ExperienceBalancedBuffer
    # (mem_size 200, adaptive): it holds 80 after task 1, 160 after task 2, 200 after task 3.
    # Task 1: no memory, 80 samples. Task 2: memory of 80 gives 32, 32, 16: 80 + 80 = 160.
    # Task 3: memory of 160 gives 32, 32, 32: 80 + 96 = 176.
    args = ("strategy=avalanche.replay", "scenario=toy")
    assert counts(run(config(tmp_path, *args))) == ([3] * 3, [80, 160, 176], [80, 160, 200])
    # 2 steps: task 1 32 + 32 = 64; tasks 2, 3 (32 + 32) + (32 + 32) = 128; the buffer still gets the whole task
    assert counts(run(config(tmp_path, *args, "budget.steps_per_task=2"))) == ([2] * 3, [64, 128, 128],
                                                                               [80, 160, 200])


# --- every strategy under a budget ---------------------------------------------------------------

@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_registered_strategy_honours_a_steps_budget_or_refuses_it(tmp_path, capsys, name):
    strategy_class = STRATEGIES.get(name)
    args = [*strategy_class.smoke_args, f"strategy={name}", "budget.steps_per_task=2"]
    if not strategy_class.honours_budget:
        assert strategy_class.no_budget
        assert main(["run", *args, "progress=false", f"results_dir={tmp_path}", f"cache_dir={tmp_path}/c"]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and f"strategy '{name}' cannot honour budget" in lines[0]
        assert not (tmp_path / "runs").exists()
        return
    summary = run(config(tmp_path, *args))
    steps, _, _ = counts(summary)
    assert steps == [2] * summary["tasks_total"]
    assert summary["protocol"]["budget"] == {"steps_per_task": 2}


@pytest.mark.parametrize("name", ["avalanche.er_ace", "avalanche.der"])
def test_avalanche_strategies_with_their_own_loops_honour_a_steps_budget(tmp_path, name):
    summary = run(config(tmp_path, f"strategy={name}", "scenario=toy", "budget.steps_per_task=2"))
    assert counts(summary)[0] == [2] * TOY_TASKS


def test_a_samples_budget_on_a_language_model(tmp_path):
    # batch 4: 4, 8, 12 samples after 3 steps, the first to reach 10
    summary = run(config(tmp_path, "strategy=seqlora", *STRATEGIES.get("seqlora").smoke_args,
                         "budget.samples_per_task=10"))
    assert counts(summary)[:2] == ([3] * 3, [12] * 3)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_declared_switches_are_constructor_keys(name):
    strategy_class = STRATEGIES.get(name)
    keys = hyperparameters(strategy_class)
    assert set(strategy_class.protocol_switches) <= set(keys)
    for key, paper_value in strategy_class.protocol_switches.items():
        assert type(paper_value) is type(keys[key].default), (key, paper_value)


def test_batch_dependent_evaluation_records_the_eval_batch_size(tmp_path):
    summary = run(config(tmp_path, *STRATEGIES.get("mos").smoke_args, "strategy=mos", "strategy.adapter_merge=legacy",
                         "strategy.epochs=1", "eval_batch_size=50"))
    assert summary["protocol"]["switches"] == {"adapter_merge": {"value": "legacy", "paper": "paper"},
                                               "eval_batch_size": {"value": 50, "paper": None}}


# --- bad budgets ----------------------------------------------------------------------------------

def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("overrides, expected", [
    (["budget.steps_per_task=0"], "positive integer"),
    (["budget.steps_per_task=-1"], "positive integer"),
    (["budget.steps_per_task=1.5"], "positive integer"),
    (["budget.samples_per_task=x"], "positive integer"),
    (["budget.steps_per_task=true"], "positive integer"),
    (["budget.steps_per_task=2", "budget.samples_per_task=3"], "not both"),
    (["budget.epochs=2"], "unknown key 'budget.epochs'"),
    (["budget=5"], "mapping"),
])
def test_bad_budgets_give_one_line_and_write_nothing(capsys, tmp_path, overrides, expected):
    line = one_line_error(capsys, ["run", "strategy=finetune", "scenario=toy", *overrides, "progress=false",
                                   f"results_dir={tmp_path}"])
    assert expected in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("budget, expected", [
    *[(text, "'budget' must be one of") for text in ("5", "{steps_per_task: 0}", "{steps_per_task: 1.5}",
                                                      "{steps_per_task: x}", "{steps_per_task: true}",
                                                      "{steps_per_task: 2, samples_per_task: 3}", "[steps_per_task, 2]")],
    ("{epochs: 2}", "unknown key 'budget.epochs'"),
])
def test_bad_suite_budgets_give_one_line_and_write_nothing(capsys, tmp_path, budget, expected):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"budget: {budget}\nruns:\n  - strategy=finetune scenario=toy\n")
    line = one_line_error(capsys, ["bench", str(suite), "progress=false", f"results_dir={tmp_path}"])
    assert expected in line
    assert not (tmp_path / "runs").exists()


def test_a_suite_budget_applies_to_every_line(capsys, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("budget: {steps_per_task: 2}\nruns:\n  - strategy=finetune scenario=toy\n"
                     "  - strategy=er scenario=toy\n")
    assert main(["bench", str(suite), "progress=false", f"results_dir={tmp_path}", f"cache_dir={tmp_path}/c"]) == 0
    cards = [json.loads(path.read_text())["protocol"] for path in (tmp_path / "runs").glob("*/summary.json")]
    assert len(cards) == 2 and all(card["optimizer_steps_per_task"] == [2] * TOY_TASKS for card in cards)


# --- resume ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy_class, extra, expected", [
    (Finetune, ("strategy=finetune", "budget.steps_per_task=4"), ([4] * 3, [112] * 3, [0] * 3)),
    (ER, ("strategy=er", "strategy.buffer_size=50", "strategy.replay_batch_size=16"), ([3] * 3, [112, 128, 128],
                                                                                        [50] * 3)),
])
def test_counts_survive_a_resume(tmp_path, interrupt_and_resume, strategy_class, extra, expected):
    resumed = interrupt_and_resume(config(tmp_path, "scenario=toy", *extra), strategy_class, at_task=1)
    assert resumed["status"] == "finished"
    assert counts(resumed) == expected

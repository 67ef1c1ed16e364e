"""End-to-end runs through the runner: every strategy, resume, failure, evaluation modes."""
import json

import numpy as np
import pytest
import torch

from cl_bench.config import compose
from cl_bench.leaderboard import read_scores
from cl_bench.registry import STRATEGIES, hyperparameters
from cl_bench.runner import Run, RunFailed, run
from cl_bench.strategies.base import ClassifierStrategy
from cl_bench.strategies.finetune import Finetune


def toy_config(tmp_path, *extra):
    """A smoke run on the strategy's tiny setting (toy by default); 3 epochs where it has epochs."""
    strategy = next((e.split("=")[1] for e in extra if e.startswith("strategy=")), "finetune")
    strategy_class = STRATEGIES.get(strategy)
    epochs = ["strategy.epochs=3"] if "epochs" in hyperparameters(strategy_class) else []
    return compose([*strategy_class.smoke_args, "progress=false", f"results_dir={tmp_path}",
                    f"cache_dir={tmp_path}/cache", *epochs, *extra])


def matrix(cfg):
    directory = Run(cfg).directory
    summary = json.loads((directory / "summary.json").read_text())
    return read_scores(directory / "scores.csv", summary["tasks_total"]), summary


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_registered_strategy_runs_on_toy(tmp_path, name):
    cfg = toy_config(tmp_path, f"strategy={name}")
    summary = run(cfg)
    assert summary["status"] == "finished"
    T = summary["tasks_total"]
    assert summary["tasks_completed"] == T >= 2
    (sums, counts), saved = matrix(cfg)
    assert saved["metrics"] == summary["metrics"]
    # every seen task scored after every task, nothing above the diagonal
    assert not np.isnan(counts[1:][np.tril_indices(T)]).any()
    assert np.isnan(counts[1:][np.triu_indices(T, 1)]).all()
    # the run's own peak above its start: a tiny run in a warm process may add nothing
    assert summary["cost"]["trainable_params_per_task"] and summary["cost"]["peak_memory_mb"] >= 0
    card = summary["protocol"]
    assert card["optimizer_steps"] == sum(p["optimizer_steps"] for p in summary["per_task"])
    assert card["samples_trained_per_task"] == [p["samples_trained"] for p in summary["per_task"]]
    # smoke settings are easy: whatever the strategy, the first task is learnt well above chance
    assert 100 * sums[1, 0] / counts[1, 0] > 70


def test_baselines_order_on_toy(tmp_path):
    """The field's known ordering: joint >= replay >= finetune in final accuracy, finetune forgets most."""
    final = {}
    for name in ("finetune", "er", "joint"):
        final[name] = run(toy_config(tmp_path, f"strategy={name}", "strategy.buffer_size=60" if name == "er" else
                                     "strategy.batch_size=32"))["metrics"]
    assert final["joint"]["acc_final_task_mean"] > final["finetune"]["acc_final_task_mean"] + 20
    assert final["er"]["acc_final_task_mean"] > final["finetune"]["acc_final_task_mean"] + 10
    assert final["finetune"]["forgetting_max_prev"] > final["er"]["forgetting_max_prev"]


def test_interrupted_run_resumes_to_identical_scores(tmp_path, monkeypatch):
    reference = run(toy_config(tmp_path / "a", "strategy=er"))
    (ref_sums, _), _ = matrix(toy_config(tmp_path / "a", "strategy=er"))

    cfg = toy_config(tmp_path / "b", "strategy=er")
    original, calls = ClassifierStrategy.learn, []

    def learn_then_interrupt(self, task):
        calls.append(task.index)
        if task.index == 1:
            raise KeyboardInterrupt
        return original(self, task)

    monkeypatch.setattr(ClassifierStrategy, "learn", learn_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    (_, _), partial = matrix(cfg)
    assert partial["status"] == "interrupted" and partial["tasks_completed"] == 1
    monkeypatch.setattr(ClassifierStrategy, "learn", original)
    resumed = run(cfg)
    assert resumed["status"] == "finished"
    assert [p["task"] for p in resumed["per_task"]] == [1, 2, 3]
    (sums, _), _ = matrix(cfg)
    np.testing.assert_array_equal(sums, ref_sums)
    assert resumed["metrics"] == reference["metrics"]
    # a finished run is skipped: learn is never called again
    monkeypatch.setattr(ClassifierStrategy, "learn", learn_then_interrupt)
    calls.clear()
    assert run(cfg)["status"] == "finished" and calls == []


def test_resume_false_keeps_the_old_run(tmp_path):
    cfg = toy_config(tmp_path)
    run(cfg)
    again = compose(["scenario=toy", "progress=false", f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache",
                     "strategy.epochs=3", "resume=false"])
    summary = run(again)
    assert summary["run_id"].endswith("-r2")
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_non_finite_loss_fails_the_run_and_keeps_partial_results(tmp_path, monkeypatch):
    original = Finetune.loss

    def loss(self, inputs, targets):
        value = original(self, inputs, targets)
        return value * float("nan") if self.head.out_features > 2 else value

    monkeypatch.setattr(Finetune, "loss", loss)
    cfg = toy_config(tmp_path)
    with pytest.raises(RunFailed, match="loss became nan"):
        run(cfg)
    (sums, counts), summary = matrix(cfg)
    assert summary["status"] == "failed" and "nan" in summary["message"]
    assert summary["tasks_completed"] == 1 and counts[1, 0] > 0
    assert summary["metrics"]["acc_final_task_mean"] is not None


def test_task_incremental_masks_to_the_task_classes(tmp_path):
    cil = run(toy_config(tmp_path, "eval_mode=cil"))
    til = run(toy_config(tmp_path, "eval_mode=til"))
    # same training, so the same model; masking can only help on every task
    assert til["metrics"]["acc_final_task_mean"] >= cil["metrics"]["acc_final_task_mean"]
    assert til["metrics"]["acc_final_task_mean"] > 90
    assert til["config_hash"] != cil["config_hash"]


def test_eval_unseen_fills_row_zero_and_the_upper_triangle(tmp_path):
    cfg = toy_config(tmp_path, "eval_unseen=true")
    summary = run(cfg)
    (sums, counts), _ = matrix(cfg)
    assert not np.isnan(counts).any()
    assert summary["metrics"]["fwt_vs_init"] is not None


def test_seed_changes_training_but_not_the_split(tmp_path):
    a, b = run(toy_config(tmp_path, "seed=1")), run(toy_config(tmp_path, "seed=2"))
    assert a["provenance"]["stream"]["class_order"] == b["provenance"]["stream"]["class_order"]
    assert a["group_hash"] == b["group_hash"] and a["config_hash"] != b["config_hash"]
    c = run(toy_config(tmp_path, "scenario.order_seed=7"))
    assert c["provenance"]["stream"]["class_order"] != a["provenance"]["stream"]["class_order"]
    assert c["order_seed"] == 7 and a["order_seed"] == 1993


def test_summary_carries_provenance(tmp_path):
    summary = run(toy_config(tmp_path))
    provenance = summary["provenance"]
    assert provenance["versions"]["torch"] == torch.__version__.split("+")[0]
    assert "git_sha" in provenance and provenance["device"] == "cpu"
    assert len(summary["config_hash"]) == 16 and summary["seed"] == 0


def test_missing_data_writes_nothing(tmp_path):
    from cl_bench.errors import UserError

    with pytest.raises(UserError, match="apt-get install"):
        run(compose(["scenario=fmnist", f"scenario.root={tmp_path}", "model=mlp", "progress=false",
                     f"results_dir={tmp_path}/results"]))
    assert not (tmp_path / "results").exists()


def test_compiled_backbone_trains_to_the_same_scores(tmp_path):
    """strategy.compile=true compiles the backbone in place (torch.compile): same parameter names, hence
    checkpoints, and the same scores up to float rounding in the fused kernels."""
    plain = run(toy_config(tmp_path / "plain"))
    compiled_cfg = toy_config(tmp_path / "compiled", "strategy.compile=true")
    compiled = run(compiled_cfg)
    assert compiled["config_hash"] != plain["config_hash"]  # a protocol switch, recorded in the run id
    scores = [p["score"] for p in compiled["per_task"]]
    assert np.allclose(scores, [p["score"] for p in plain["per_task"]], atol=2.0), scores
    state = torch.load(Run(compiled_cfg).checkpoint_path, weights_only=True)["strategy"]
    assert not any("_orig_mod" in name for name in state)


@pytest.mark.parametrize("strategy", ["mos", "contracon"])
def test_compiled_backbone_follows_the_selected_adapters_and_task(tmp_path, monkeypatch, strategy):
    """MOS swaps adapter sets and ConTraCon per-task weights by plain attributes between forwards of the one
    compiled backbone; the compiled graph must follow them (guards, recompiles), not replay the first
    selection. Traced with the aot_eager backend: dynamo's capture and guards as with inductor, no C++ build."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module: compile_module(module, backend="aot_eager"))
    torch._dynamo.reset()
    plain = run(toy_config(tmp_path / "plain", f"strategy={strategy}", "strategy.epochs=2"))
    compiled = run(toy_config(tmp_path / "compiled", f"strategy={strategy}", "strategy.epochs=2",
                              "strategy.compile=true"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the backbone really ran compiled
    torch._dynamo.reset()
    scores = [p["score"] for p in compiled["per_task"]]
    assert np.allclose(scores, [p["score"] for p in plain["per_task"]], atol=2.0), scores


@pytest.mark.parametrize("strategy", ["finetune", "mos", "dkvb", "contracon", "simplecil", "seqft"])
def test_bf16_is_refused_on_the_cpu(tmp_path, strategy):
    from cl_bench.errors import UserError

    with pytest.raises(UserError, match="strategy.bf16=true is for GPU runs"):
        run(toy_config(tmp_path, f"strategy={strategy}", "strategy.bf16=true", "device=cpu"))
    assert not list(tmp_path.glob("*/*/summary.json"))

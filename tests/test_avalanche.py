"""Avalanche interoperability: its strategies in our runner (``strategy=avalanche.<Name>``), our streams as
Avalanche benchmarks, and the same run in Avalanche's own loop giving the same accuracy matrix."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import cl_bench
from cl_bench import compose, run
from cl_bench.errors import UserError
from cl_bench.leaderboard import read_scores
from cl_bench.registry import SCENARIOS, STRATEGIES, hyperparameters

# every strategy the adapter supports (kept literal so collecting this file does not import avalanche;
# test_the_list_is_complete checks it); L2P needs a ViT and has its own test
CPU_STRATEGIES = ("AGEM", "Cumulative", "DER", "ER_ACE", "ER_AML", "EWC", "FromScratchTraining", "GDumb", "GEM",
                  "ICaRL", "LFL", "LaMAML", "LwF", "MAS", "MER", "MIR", "Naive", "Replay", "SynapticIntelligence")
SMOKE = {"LaMAML": ["strategy.batch_size=10"]}  # LaMAML splits each batch into 5 inner steps


def runner_args(tmp_path, *extra):
    return [*extra, "progress=false", "device=cpu", f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache"]


def test_the_lists_are_complete(capsys):
    from cl_bench.cli import main
    from cl_bench.strategies.avalanche import ALIASES, SUPPORTED

    assert sorted(CPU_STRATEGIES + ("LearningToPrompt",)) == sorted(SUPPORTED)
    assert main(["list", "strategies"]) == 0
    listed = " ".join(capsys.readouterr().out.split())  # `cl-bench list` names them all
    assert "avalanche.<name>" in listed and "finetune" in listed
    for name in SUPPORTED:
        assert name.lower() in listed or name in ALIASES.values()
    for alias in ALIASES:
        assert alias in listed


def test_benchmark_suite_composes():
    from pathlib import Path

    from cl_bench.cli import load_suite

    lines, seeds = load_suite(str(Path(__file__).resolve().parents[1] / "benchmarks" / "avalanche_classic.yaml"))
    names = {compose(line).strategy.type for line in lines}
    assert names == {f"avalanche.{n}" for n in ("naive", "replay", "ewc", "lwf", "gem", "agem", "der")}
    assert seeds == [0, 1, 2]


def test_a_non_finite_loss_fails_the_run(tmp_path):
    from cl_bench.runner import RunFailed

    with pytest.raises(RunFailed, match="loss became .* try a smaller strategy.lr"):
        run(compose(runner_args(tmp_path, "strategy=avalanche.naive", "scenario=toy", "strategy.lr=1.0e+30")))


@pytest.mark.parametrize("name", CPU_STRATEGIES)
def test_every_strategy_runs_through_the_runner(tmp_path, name):
    summary = run(compose(runner_args(tmp_path, f"strategy=avalanche.{name.lower()}", "scenario=toy",
                                      "strategy.epochs=3", *SMOKE.get(name, []))))
    assert summary["status"] == "finished" and summary["tasks_completed"] == 3
    assert summary["per_task"][0]["score"] > 70  # the first task is learnt (two well-separated clusters)
    assert summary["cost"]["samples_per_second"] > 0
    checkpoints = tmp_path / "runs" / summary["run_id"] / "checkpoints"
    assert checkpoints.exists() == STRATEGIES.get(f"avalanche.{name}").resumable


def test_hyperparameters_are_config_keys_with_avalanche_defaults(tmp_path):
    import inspect

    from avalanche.training import EWC, Replay

    cfg = compose(["strategy=avalanche.ewc"])
    assert cfg.strategy.ewc_lambda == 1.0  # no Avalanche default: the documented table
    for key in ("mode", "decay_factor", "keep_importance_data"):
        assert cfg.strategy[key] == inspect.signature(EWC.__init__).parameters[key].default
    assert {"epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay"} <= set(cfg.strategy)
    assert all(p.kind is p.KEYWORD_ONLY for p in hyperparameters(STRATEGIES.get("avalanche.ewc")).values())
    assert compose(["strategy=avalanche.Replay"]).strategy.mem_size == \
        inspect.signature(Replay.__init__).parameters["mem_size"].default
    l2p = compose(["strategy=avalanche.l2p"]).strategy
    assert l2p.lr == 0.03 and "optimizer" not in l2p and "num_classes" not in l2p  # L2P makes its own Adam
    with pytest.raises(UserError, match="strategy.mem_size"):
        compose(["strategy=avalanche.replay", "strategy.mem_sise=3"])
    with pytest.raises(UserError, match="float or list"):
        compose(["strategy=avalanche.lwf", "strategy.alpha=x"])
    # an override reaches Avalanche's plugin
    cfg = compose(runner_args(tmp_path, "strategy=avalanche.replay", "scenario=toy", "strategy.mem_size=7"))
    from cl_bench.runner import build_strategy, build_stream
    from cl_bench.strategies.base import Context

    strategy, _, _ = build_strategy(cfg, build_stream(cfg), Context(), None)
    assert [p.mem_size for p in strategy.avalanche.plugins if type(p).__name__ == "ReplayPlugin"] == [7]


def test_names_aliases_and_unsupported_strategies():
    assert STRATEGIES.get("avalanche.si") is STRATEGIES.get("avalanche.SynapticIntelligence")
    assert STRATEGIES.get("avalanche.er_ace") is STRATEGIES.get("avalanche.ER_ACE")
    assert STRATEGIES.get("avalanche.l2p").avalanche_name == "LearningToPrompt"
    with pytest.raises(UserError, match="did you mean: avalanche.naive"):
        STRATEGIES.get("avalanche.nave")
    with pytest.raises(UserError, match="PNNStrategy is not supported.*task-incremental"):
        compose(["strategy=avalanche.pnnstrategy"])


# --------------------------------------------------------------------------- our streams in Avalanche

@pytest.mark.parametrize("name, settings", [("digits", {"init": 4, "increment": 3}),
                                            ("toy", {"num_classes": 7, "remainder": "extra_task"})])
def test_to_avalanche_keeps_class_order_and_splits_exactly(name, settings):
    """Experience k holds exactly task k's samples and classes, in the stream's class order (unequal task
    sizes included), and the benchmark over the first k tasks (what the adapter trains on) has the same
    experiences, sample for sample in the same order, and no future classes."""
    from cl_bench.avalanche_interop import benchmark_of, check_same_data

    stream = SCENARIOS.get(name)(**settings).stream()
    benchmark = cl_bench.to_avalanche(stream)
    check_same_data(stream, benchmark)  # raises on any difference in samples, labels or classes
    assert benchmark.classes_order == [c for task in stream.tasks for c in task.classes]
    assert benchmark.n_classes_per_exp == [len(task.classes) for task in stream.tasks]
    for k in range(1, len(stream.tasks) + 1):
        prefix = benchmark_of(stream.tasks[:k])
        assert list(prefix.train_stream[k - 1].future_classes) == []
        for split in ("train_stream", "test_stream"):
            for j in range(k):
                mine, full = getattr(prefix, split)[j].dataset, getattr(benchmark, split)[j].dataset
                assert len(mine) == len(full)
                for i in range(len(mine)):
                    assert torch.equal(mine[i][0], full[i][0]) and mine[i][1] == full[i][1]


# --------------------------------------------------------------------------- cross-check with Avalanche's loop

class _Net(torch.nn.Module):
    """cl-bench backbone (with its preprocessing) + Avalanche's IncrementalClassifier, written here
    independently of the adapter's wrapper."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(self.backbone.prepare(x, x.device)))


def avalanche_native(cfg, name: str, hyper: dict):
    """The run of ``cfg`` in Avalanche's own loop: ``strategy.train(experience)``, then
    ``strategy.eval(test_stream[:k + 1])`` with an EvaluationPlugin computing per-experience accuracy
    and stream forgetting. Seeded as cl-bench seeds a run (``seed_everything``, backbone, a generator
    with the run's seed handing ``RNGManager`` a seed before the model and before each experience).
    Returns (R in percent, rows = after experience k, Avalanche's stream forgetting after the last)."""
    import avalanche.training
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.models import IncrementalClassifier
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.plugins import EvaluationPlugin

    from cl_bench.models.factory import create_backbone
    from cl_bench.runner import build_stream, seed_everything

    seed_everything(cfg.seed)
    stream = build_stream(cfg)
    benchmark = cl_bench.to_avalanche(stream)
    backbone = create_backbone(cfg.model, stream.input_kind, stream.input_shape)
    seeds = torch.Generator().manual_seed(cfg.seed)

    def reseed():
        RNGManager.set_random_seeds(int(torch.randint(0, 2**31 - 1, (1,), generator=seeds)))

    reseed()
    warnings.filterwarnings("ignore", message="No loggers specified")
    model = _Net(backbone, IncrementalClassifier(backbone.out_dim))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.strategy.lr, momentum=cfg.strategy.momentum,
                                weight_decay=cfg.strategy.weight_decay)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), forgetting_metrics(stream=True), loggers=[])
    strategy = getattr(avalanche.training, name)(
        model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(), train_mb_size=cfg.strategy.batch_size,
        train_epochs=cfg.strategy.epochs, eval_mb_size=cfg.eval_batch_size, device="cpu", evaluator=evaluator, **hyper)
    T = len(stream.tasks)
    R = np.full((T, T), np.nan)
    for k, experience in enumerate(benchmark.train_stream):
        reseed()
        with warnings.catch_warnings(record=True):  # Avalanche's deprecation notices
            strategy.train(experience, eval_streams=[])
            results = strategy.eval(benchmark.test_stream[: k + 1])
        for j in range(k + 1):
            R[k, j] = 100 * results[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"]
    return R, results["StreamForgetting/eval_phase/test_stream"]


@pytest.mark.parametrize("name, hyper", [("Naive", {}), ("Replay", {"mem_size": 60}), ("EWC", {"ewc_lambda": 1.0})])
def test_same_accuracy_matrix_as_avalanches_own_loop(tmp_path, name, hyper):
    """Same strategy, split (Split-Digits, 5 tasks), seed, epochs, model and initialisation: Avalanche's loop
    and evaluation plugin versus the cl-bench runner. Tolerance: none on the number of correct test
    predictions per (after task, task) cell, because both do the same float operations in the same order on
    the CPU (same data order from the same seeds, same evaluation batches of 256); a mismatch means the
    adapter changed what Avalanche computes. The accuracies themselves then agree to float rounding
    (1e-9 percent points: Avalanche divides in its own order). cl-bench's forgetting_first_last equals
    Avalanche's StreamForgetting (x 100) on the same matrix."""
    overrides = [f"{key}={value}" for key, value in hyper.items()]
    cfg = compose(runner_args(tmp_path, f"strategy=avalanche.{name.lower()}", "scenario=digits", "model=mlp",
                              "strategy.epochs=2", "seed=3", *[f"strategy.{o}" for o in overrides]))
    summary = run(cfg)
    sums, counts = read_scores(tmp_path / "runs" / summary["run_id"] / "scores.csv", summary["tasks_total"])
    ours = 100 * sums[1:] / counts[1:]
    theirs, stream_forgetting = avalanche_native(cfg, name, hyper)
    lower = ~np.isnan(theirs)
    assert np.array_equal(np.isnan(ours), ~lower)
    correct = np.rint(theirs[lower] / 100 * counts[1:][lower])
    assert np.array_equal(sums[1:][lower], correct), f"cl-bench\n{ours}\nAvalanche\n{theirs}"
    assert np.allclose(ours[lower], theirs[lower], rtol=0, atol=1e-9)
    assert math.isclose(summary["metrics"]["forgetting_first_last"], 100 * stream_forgetting, abs_tol=1e-9)
    assert summary["metrics"]["forgetting_first_last"] > 5  # the check is not vacuous: there is forgetting


# --------------------------------------------------------------------------- L2P, errors, resume

def test_l2p_trains_prompts_on_a_copy_of_the_vit_backbone(tmp_path):
    cfg = compose(runner_args(tmp_path, "strategy=avalanche.l2p", "scenario=digits", "scenario.increment=5",
                              "model=vit_tiny_test", "strategy.pool_size=4", "strategy.top_k=2"))
    from cl_bench.runner import build_strategy, build_stream, seed_everything
    from cl_bench.strategies.base import Context

    seed_everything(0)
    stream = build_stream(cfg)
    strategy, stream, _ = build_strategy(cfg, stream, Context(num_classes=stream.num_classes), None)
    l2p = strategy.avalanche
    images = stream.tasks[0].test.inputs[:8]
    backbone = strategy.backbone
    with torch.no_grad():  # Avalanche's ViT got the backbone's weights and preprocessing
        assert torch.allclose(l2p.original_vit(images)["pre_logits"], backbone(backbone.prepare(images, "cpu")),
                              atol=1e-5)
    before = {n: p.detach().clone() for n, p in l2p.model.named_parameters()}
    strategy.learn(stream.tasks[0])
    changed = {n for n, p in l2p.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("prompt.", "head.")) for n in changed)  # the ViT stays frozen
    strategy.eval()
    assert strategy.predict(images).shape == (8, 5)  # logits over the classes seen so far
    assert run(cfg)["status"] == "finished"


def test_clear_errors_before_training(tmp_path):
    from torch import nn

    from cl_bench.models.backbone import TextBackbone
    from cl_bench.models.factory import mlp
    from cl_bench.strategies.base import Context

    with pytest.raises(UserError, match="handles classes streams.*instructions stream"):
        run(compose(runner_args(tmp_path, "strategy=avalanche.naive", "scenario=instruct_toy")))
    with pytest.raises(UserError, match="needs a ViT backbone"):
        run(compose(runner_args(tmp_path, "strategy=avalanche.l2p", "scenario=digits", "model=mlp")))
    with pytest.raises(UserError, match="needs the images, not cached features"):
        run(compose(runner_args(tmp_path, "strategy=avalanche.l2p", "scenario=digits", "model=vit_tiny_test",
                                "model.frozen=true")))
    assert not (tmp_path / "runs").exists()  # nothing was written
    text = TextBackbone(nn.Linear(1, 1), None, 4, max_length=8)
    with pytest.raises(UserError, match="needs tensor inputs.*model.frozen=true"):
        STRATEGIES.get("avalanche.naive")(text, Context())
    with pytest.raises(UserError, match="strategy.optimizer must be one of"):
        STRATEGIES.get("avalanche.naive")(mlp("vector", (4,)), Context(), optimizer="rmsprop")


def test_an_interrupted_run_that_cannot_resume_restarts_and_matches_an_uninterrupted_one(tmp_path,
                                                                                         interrupt_and_resume):
    cfg = compose(runner_args(tmp_path / "a", "strategy=avalanche.gdumb", "scenario=toy", "strategy.epochs=2"))
    reference = run(compose(runner_args(tmp_path / "b", "strategy=avalanche.gdumb", "scenario=toy",
                                        "strategy.epochs=2")))
    resumed = interrupt_and_resume(cfg, STRATEGIES.get("avalanche.gdumb"), at_task=1)
    assert resumed["status"] == "finished"
    assert resumed["scores_sha256"] == reference["scores_sha256"]


def test_scores_unseen_tasks_before_training(tmp_path):
    summary = run(compose(runner_args(tmp_path, "strategy=avalanche.icarl", "scenario=toy", "eval_unseen=true")))
    assert summary["status"] == "finished" and summary["metrics"]["acc_final_task_mean"] is not None

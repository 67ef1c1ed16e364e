"""ConPET (static and dynamic) on the tiny LLaMA: the spec's invariants (section 1.5) adapted to
instruction streams, the dynamic-replay loader, the selector, resume, and both variants end to end."""
import json

import pytest
import torch

from cl_bench.config import compose
from cl_bench.errors import UserError
from cl_bench.models.lm import tiny_llama
from cl_bench.registry import SCENARIOS
from cl_bench.runner import Run, run
from cl_bench.scenarios.base import Examples
from cl_bench.strategies.base import Context
from cl_bench.strategies.conpet import ConPETDynamic, ConPETStatic

EASY = dict(lr=0.005, batch_size=4, lora_alpha=16, batch_limit=25, epochs=2)  # learnable on the random model


def make(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(tiny_llama("text", ()), Context(generator=torch.Generator().manual_seed(seed)), **kwargs)


def toy_tasks():
    return SCENARIOS.get("instruct_toy")().stream().tasks


def base_state(strategy):
    return {n: p.detach().clone() for n, p in strategy.backbone.named_parameters() if "lora_" not in n}


def adapter_state(strategy, name):
    return {n: p.detach().clone() for n, p in strategy.backbone.named_parameters() if f".{name}." in n}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the dynamic-replay loader -----------------------------------------------------------------

@pytest.mark.parametrize("ratio, n_new", [(1.0, 4), (3.0, 6), (0.5, 2)])
def test_every_replay_batch_has_n_new_new_and_n_old_old_examples(ratio, n_new):
    strategy = make(ConPETStatic, batch_size=8, batch_new_old_ratio=ratio, batch_limit=50)
    assert (strategy.n_new, strategy.n_old) == (n_new, 8 - n_new)
    lengths = set()
    for t in range(2, 6):
        sizes = [7 + 3 * j for j in range(t - 1)] + [30]  # old pools, then the new task
        plan = strategy.epoch_plan(sizes)
        lengths.add(len(plan))
        for batch in plan:
            new = [i for s, i in batch if s == t - 1]
            assert len(batch) == 8 and len(new) == n_new and len(set(new)) == n_new  # no repeat within a batch
            assert all(0 <= i < sizes[s] for s, i in batch) and all(0 <= s < t for s, _ in batch)
    assert lengths == {int(0.8 * 50)}  # policy "constant": the same number of steps for t = 2..5


def test_batch_limit_policies_and_the_first_task():
    linear = make(ConPETStatic, batch_size=8, batch_limit=50, batch_limit_policy="linear")
    assert [len(linear.epoch_plan([10] * t)) for t in (2, 3, 4)] == [80, 120, 160]
    for strategy in (linear, make(ConPETStatic, batch_size=8, batch_limit_policy="none")):
        # task 1 (and every task under "none"): an ordinary epoch, each example exactly once
        for sizes in ([21], [5, 9, 21]) if strategy.policy == "none" else ([21],):
            pairs = [pair for batch in strategy.epoch_plan(sizes) for pair in batch]
            assert sorted(pairs) == [(s, i) for s, size in enumerate(sizes) for i in range(size)]


def test_old_task_draws_are_uniform_over_tasks_not_examples():
    """Chi-square on 10k old-slot draws: uniform over old tasks although the pools differ 100-fold."""
    strategy = make(ConPETStatic, batch_size=2)  # one old slot per batch
    sizes = [5, 500, 50, 7, 20]  # four old pools, then the new task
    draws = [s for _ in range(10_000) for s, i in strategy.replay_batch(sizes[-1], sizes[:-1]) if s < 4]
    counts = torch.bincount(torch.tensor(draws), minlength=4).double()
    assert counts.sum() == 10_000
    chi2 = ((counts - 2500) ** 2 / 2500).sum().item()
    assert chi2 < 16.27  # df = 3, p = 0.001
    in_pool = [i for _ in range(5000) for s, i in strategy.replay_batch(20, [5]) if s == 0]
    counts = torch.bincount(torch.tensor(in_pool), minlength=5).double()
    assert ((counts - 1000) ** 2 / 1000).sum().item() < 18.47  # df = 4, p = 0.001: uniform inside a pool


# --- dynamic ConPET: one training through the toy stream, checked in several tests --------------

@pytest.fixture(scope="module")
def dynamic_run():
    tasks = toy_tasks()
    strategy = make(ConPETDynamic, **EASY)
    record = {"base": base_state(strategy), "base_same": [], "experts": {}, "experts_same": [], "heads": []}
    for task in tasks:
        old_head = (strategy.selector_head.weight.detach().clone(), strategy.selector_head.bias.detach().clone())
        strategy.before_task(task)
        record["heads"].append((old_head, strategy.selector_head.weight.detach().clone(),
                                strategy.selector_head.bias.detach().clone()))
        record["trainable"] = {n for n, p in strategy.named_parameters() if p.requires_grad}
        strategy.learn(task)
        strategy.after_task(task)
        record["base_same"].append(same(record["base"], base_state(strategy)))
        record["experts_same"].append(all(same(state, adapter_state(strategy, name))
                                          for name, state in record["experts"].items()))
        record["experts"][f"expert_{task.index + 1}"] = adapter_state(strategy, f"expert_{task.index + 1}")
        if task.index == 0:
            record["first_predictions"] = strategy.predict(task.test.prompts, task.max_new_tokens)
    record["selected"] = [strategy.select_experts(task.test.prompts) for task in tasks]
    record["last_predictions"] = strategy.predict(tasks[0].test.prompts, tasks[0].max_new_tokens)
    return strategy, record


def test_base_weights_and_old_experts_stay_bit_identical(dynamic_run):
    strategy, record = dynamic_run
    assert record["base_same"] == [True, True, True]
    assert record["experts_same"] == [True, True, True]  # experts 1..t-1 untouched while task t trains
    assert strategy.experts == 3 and "selector" in strategy.backbone.model.peft_config


def test_selector_head_grows_keeping_old_rows_bit_identical(dynamic_run):
    _, record = dynamic_run
    sizes = [weight.shape[0] for _, weight, _ in record["heads"]]
    assert sizes == [0, 2, 3]
    (old_weight, old_bias), weight, bias = record["heads"][2]
    assert torch.equal(weight[:2], old_weight) and torch.equal(bias[:2], old_bias)
    assert not torch.equal(weight[2], weight[1])


def test_one_expert_per_task_with_the_spec_parameter_count(dynamic_run):
    strategy, record = dynamic_run
    layers, d, r = 4, 64, 4
    for name in ("expert_1", "expert_2", "expert_3", "selector"):
        assert sum(p.numel() for p in strategy.adapter_parameters(name)) == layers * 2 * (d * r + r * d)
    # at task 3 exactly expert 3 and the 3-row selector head train
    assert {n.split(".")[-2] for n in record["trainable"] if "lora_" in n} == {"expert_3"}
    assert {n for n in record["trainable"] if "lora_" not in n} == {"selector_head.weight", "selector_head.bias"}


def test_selector_routes_each_prompt_to_its_tasks_expert(dynamic_run):
    _, record = dynamic_run
    for task_index, chosen in enumerate(record["selected"]):
        assert sum(c == task_index for c in chosen) / len(chosen) >= 0.9
    # task 1's prompts all reach the frozen expert 1: its answers are those given right after task 1
    assert record["selected"][0] == [0] * len(record["selected"][0])
    assert record["last_predictions"] == record["first_predictions"]


def test_a_loaded_state_dict_recreates_experts_and_selector(dynamic_run):
    strategy, record = dynamic_run
    fresh = make(ConPETDynamic, seed=1, **EASY)
    fresh.load_state_dict(strategy.state_dict())  # strict: every expert and the selector exist again
    assert fresh.experts == 3 and len(fresh.pools) == 3
    assert all(same(state, adapter_state(fresh, name)) for name, state in record["experts"].items())
    prompts = toy_tasks()[1].test.prompts
    assert fresh.select_experts(prompts) == strategy.select_experts(prompts)
    assert fresh.predict(prompts, 8) == strategy.predict(prompts, 8)


# --- static ConPET -------------------------------------------------------------------------------

def test_static_keeps_the_base_and_replays_only_past_tasks():
    tasks = toy_tasks()
    strategy = make(ConPETStatic, epochs=1, batch_limit=5, batch_size=4)
    base, lora = base_state(strategy), adapter_state(strategy, "default")
    seen_prompts = []
    original = strategy.answer_nll

    def spy(batch: Examples):
        seen_prompts.append(list(batch.prompts))
        return original(batch)

    strategy.answer_nll = spy
    for task in tasks:
        seen_prompts.clear()
        strategy.before_task(task)
        strategy.learn(task)
        strategy.after_task(task)
        assert same(base, base_state(strategy))
        allowed = {p for t in tasks[: task.index + 1] for p in t.train.prompts}
        assert all(set(batch) <= allowed for batch in seen_prompts)
        if task.index:
            assert len(seen_prompts) == 4  # floor(0.8 * 5) steps, 2 new + 2 old examples each
            assert all(sum(p in task.train.prompts for p in batch) == 2 for batch in seen_prompts)
    assert not same(lora, adapter_state(strategy, "default"))
    assert sum(p.numel() for p in strategy.parameters() if p.requires_grad) == 4 * 2 * (64 * 4 + 4 * 64)


def test_options_are_validated():
    with pytest.raises(UserError, match="expert_topk"):
        make(ConPETDynamic, expert_topk=2)
    with pytest.raises(UserError, match="batch_limit_policy"):
        make(ConPETStatic, batch_limit_policy="sometimes")
    with pytest.raises(UserError, match="batch_new_old_ratio"):
        make(ConPETStatic, batch_size=1)
    with pytest.raises(UserError, match="memory"):
        make(ConPETStatic, memory="kmeans")
    strategy = make(ConPETStatic, lr=5e-4, late_lr=1e-4, late_lr_from=3)
    assert [strategy.task_lr(t) for t in (1, 2, 3, 4)] == [5e-4, 5e-4, 1e-4, 1e-4]


def test_random_exemplar_memory_keeps_memory_per_task_examples():
    strategy = make(ConPETStatic, memory="random_exemplars", memory_per_task=5, epochs=0)
    tasks = toy_tasks()
    for task in tasks[:2]:
        strategy.after_task(task)
    assert [len(p) for p in strategy.pools] == [5, 5]
    assert set(strategy.pools[1].prompts) <= set(tasks[1].train.prompts)


# --- end to end through the runner ----------------------------------------------------------------

def config(tmp_path, name, *extra):
    return compose([f"strategy={name}", "scenario=instruct_toy", "model=tiny_llama", "strategy.lr=0.005",
                    "strategy.batch_size=2", "strategy.lora_alpha=16", "strategy.batch_limit=20",
                    "strategy.epochs=3", "progress=false", f"results_dir={tmp_path}", f"cache_dir={tmp_path}/c",
                    *extra])


def scores(cfg):
    """(after task, evaluated task) -> score, both 1-based."""
    rows = (Run(cfg).directory / "scores.csv").read_text().splitlines()[1:]
    return {(int(a), int(e)): float(s) for a, e, _, _, s in (row.split(",") for row in rows)}


def test_static_end_to_end(tmp_path):
    cfg = config(tmp_path, "conpet_static")
    summary = run(cfg)
    assert summary["status"] == "finished" and summary["tasks_completed"] == 3
    assert summary["cost"]["trainable_params_per_task"] == [4096] * 3
    assert scores(cfg)[(1, 1)] > 70


def test_dynamic_end_to_end_resumes_to_identical_scores(tmp_path, interrupt_and_resume):
    reference_cfg = config(tmp_path / "a", "conpet_dynamic")
    reference = run(reference_cfg)
    assert reference["status"] == "finished"
    # one expert (4096 LoRA weights) per task, plus the selector head over t task ids from task 2 on
    assert reference["cost"]["trainable_params_per_task"] == [4096, 4096 + 2 * 65, 4096 + 3 * 65]
    matrix = scores(reference_cfg)
    assert matrix[(1, 1)] > 70 and matrix[(3, 1)] == matrix[(1, 1)]  # routed to a frozen expert: no forgetting

    cfg = config(tmp_path / "b", "conpet_dynamic")
    resumed = interrupt_and_resume(cfg, ConPETDynamic, at_task=2)
    assert resumed["metrics"] == reference["metrics"]
    assert (Run(cfg).directory / "scores.csv").read_text() == (Run(reference_cfg).directory / "scores.csv").read_text()
    assert json.loads((Run(cfg).directory / "summary.json").read_text())["status"] == "finished"

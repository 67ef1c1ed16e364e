"""LCIA / CoIN dynamic EMA (spec methods-llm.md §4.4): the balance weight and its fallbacks on hand-made
tensors, EMA bookkeeping, instruction grouping and test-time allocation, end to end on instruct_toy."""
import dataclasses
import json

import pytest
import torch

from cl_bench.config import compose
from cl_bench.errors import UserError
from cl_bench.models.lm import tiny_llama
from cl_bench.registry import SCENARIOS
from cl_bench.runner import Run, run
from cl_bench.strategies._language_model import LanguageModelStrategy
from cl_bench.strategies.base import Context
from cl_bench.strategies.coin_ema import (FALLBACK_ALPHA, CoINEMA, DynamicEMA, balance_weight, choose_group,
                                          pair_similarity, prompt_instruction)


def lm_config(tmp_path, *extra):
    return compose(["scenario=instruct_toy", "model=tiny_llama", "strategy.lr=0.01", "strategy.batch_size=4",
                    "strategy.epochs=3", "progress=false", f"results_dir={tmp_path}", f"cache_dir={tmp_path}/c",
                    *extra])


def toy_tasks():
    return SCENARIOS.get("instruct_toy")(train_size=16, test_size=4).stream().tasks


def strategy(**kwargs):
    return CoINEMA(tiny_llama("text", ()), Context(generator=torch.Generator().manual_seed(0)),
                   lr=0.01, batch_size=4, **kwargs)


# --- the balance weight ------------------------------------------------------------------------

def test_alpha_is_two_one_plus_grad_norm_over_distance_times_curvature():
    theta, ema = torch.tensor([2.0, -1.0]), torch.tensor([-1.0, 2.0])  # a = 6
    grad, prev = torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 0.0])  # b = 2, c = |2| + |-1| = 3
    alpha, fallback = balance_weight(theta, ema, grad, prev)
    assert alpha == pytest.approx(2 * (1 + 2) / (6 * 3)) and not fallback


@pytest.mark.parametrize("case", ["alpha>=1", "a=0", "c=0", "nan", "no grad", "no previous", "shape"])
def test_alpha_falls_back_to_one_hundredth(case):
    theta, ema = torch.tensor([2.0, -1.0]), torch.tensor([-1.0, 2.0])
    grad, prev = torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 0.0])
    if case == "alpha>=1":  # a = 0.6, b = 2, c = 3: α = 6 / 1.8 > 1
        ema = theta - torch.tensor([0.3, 0.3])
    elif case == "a=0":
        ema = theta.clone()
    elif case == "c=0":
        prev = grad.clone()
    elif case == "nan":
        grad = torch.tensor([float("nan"), 1.0])
    elif case == "no grad":
        grad = None
    elif case == "no previous":
        prev = None
    elif case == "shape":
        prev = torch.zeros(3)
    # α ≤ 0 cannot arise from norms (2(1+b) > 0, a·c ≥ 0); NaN and inf are the non-positive-side cases
    assert balance_weight(theta, ema, grad, prev) == (FALLBACK_ALPHA, True)


def sgd_run(gradients, steps_lr=0.1):
    """A parameter updated by plain SGD with the given gradients, the EMA updated after each step."""
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    ema, history = DynamicEMA(), []
    for grad in gradients:
        param.grad = grad.clone()
        with torch.no_grad():
            param -= steps_lr * param.grad
        ema.update([("p", param)])
        history.append((param.detach().clone(), ema.ema["p"].clone()))
    return param, ema, history


def test_first_step_copies_theta_and_replace_installs_the_ema():
    param, ema, history = sgd_run([torch.tensor([1.0, 2.0, -3.0]), torch.tensor([-5.0, 1.0, 0.0]),
                                   torch.tensor([2.0, 2.0, 2.0])])
    first_theta, first_ema = history[0]
    assert torch.equal(first_theta, first_ema)  # θ*_1 = θ_1
    assert not torch.equal(param.detach(), ema.ema["p"])
    ema.replace([("p", param)])
    assert torch.equal(param.detach(), ema.ema["p"])


def test_constant_gradient_gives_the_fixed_0_99_decay():
    grad = torch.tensor([0.5, -1.0, 2.0])
    param, ema, history = sgd_run([grad] * 6)
    expected = history[0][1].clone()
    for theta, got in history[1:]:
        expected = 0.99 * expected + 0.01 * theta
        assert torch.allclose(got, expected, atol=1e-7)
    assert ema.fallbacks == ema.updates == 6  # c = 0 every step (and the first step)


# --- instruction similarity ------------------------------------------------------------------------

def test_pair_similarity_identical_disjoint_and_stop_words():
    assert pair_similarity("Colour of {w}?", "Colour of {w}?") == pytest.approx(1.0)
    assert pair_similarity("Colour of {w}?", "Shape of {w}?") == 0.0
    assert pair_similarity("the of and", "of the") == 0.0  # empty vocabulary


def test_choose_group_threshold_is_inclusive_and_ties_go_to_the_lowest():
    books = [["Shape of {w}?"], ["Colour of {w}?"], ["Colour of {w}?"]]
    assert choose_group(["Colour of {w}?"], books, 0.9) == 1  # sim 1 in groups 1 and 2: the lower wins
    assert choose_group(["Colour of {w}?"], books, 1.0) == 1  # ≥, not >
    assert choose_group(["Size of {w}?"], books, 0.3) is None
    assert choose_group(["anything"], [], 0.3) is None


def test_prompt_instruction_recovers_the_template():
    templates = ["Colour of {w}?", "Answer:", "Name the colour of {w} in one word."]
    assert prompt_instruction("Colour of abc?", templates) == "Colour of {w}?"
    assert prompt_instruction("Name the colour of xy in one word.", templates) == templates[2]
    assert prompt_instruction("Twice: ab\nAnswer:", templates) == "Answer:"  # a fixed instruction inside
    assert prompt_instruction("Size of ab?", templates) == "Size of ab?"  # no match: the prompt itself


def test_grouping_reuses_expands_and_grows_codebooks_by_unseen_strings():
    colour, shape, _ = toy_tasks()
    model = strategy(threshold=0.5, epochs=0)
    tasks = [colour,
             dataclasses.replace(colour, index=1, instruction=["Colour of {w}?", "Name the colour of {w}."]),
             dataclasses.replace(shape, index=2),
             dataclasses.replace(colour, index=3)]
    for task in tasks:
        model.before_task(task)
        model.learn(task)
        model.after_task(task)
    assert model.task_groups == [0, 0, 1, 0]
    assert model.codebooks == [["Colour of {w}?", "Name the colour of {w}."], ["Shape of {w}?"]]
    assert [e["dema"] for e in model.dema_log] == [False, True, False, True]  # dema=auto: on when reused
    with pytest.raises(UserError, match="instruction"):
        model.before_task(dataclasses.replace(colour, instruction=None))


def test_new_group_starts_from_the_previous_task_lora_and_only_it_trains():
    colour, shape, size = toy_tasks()
    model = strategy(epochs=1)
    model.before_task(colour)
    model.learn(colour)
    group0 = {k: v.clone() for k, v in model.state_dict().items() if ".group0." in k}
    model.before_task(shape)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".group1." in n for n in trainable)
    for key, value in group0.items():  # the released scripts' --previous_task_model_path
        assert torch.equal(model.state_dict()[key.replace(".group0.", ".group1.")], value)
    fresh = strategy(epochs=1, expand_init="fresh")
    fresh.before_task(colour)
    fresh.learn(colour)
    fresh.before_task(shape)
    lora_b = [v for k, v in fresh.state_dict().items() if ".group1." in k and "lora_B" in k]
    assert lora_b and all(not v.any() for v in lora_b)


def test_test_time_allocation_by_instruction_and_fallback_to_the_latest_group():
    colour, shape, size = toy_tasks()
    model = strategy(epochs=0)
    for task in (colour, shape, size):
        model.before_task(task)
    model.predict(shape.test.prompts[:2], 1)
    assert model.test_groups == [1, 1]
    model.predict(colour.test.prompts[:2], 1)
    assert model.test_groups == [0, 0]
    model.predict(["Twice: ab\nAnswer:", "Twice: cd\nAnswer:"], 1)  # unseen instruction
    assert model.test_groups == [2, 2]


def test_each_prompt_of_a_mixed_batch_picks_its_own_group():
    colour, shape, size = toy_tasks()
    model = strategy(epochs=1)
    for task in (colour, shape, size):
        model.before_task(task)
        model.learn(task)
    mixed = [shape.test.prompts[0], colour.test.prompts[0], "Twice: ab\nAnswer:", shape.test.prompts[1]]
    limits = [3, 5, 2, 4]
    together = model.predict(mixed, limits)
    assert model.test_groups == [1, 0, 2, 1]
    assert together == [model.predict([prompt], limit)[0] for prompt, limit in zip(mixed, limits)]


def test_dema_on_a_reused_group_ends_with_the_ema_and_leaves_the_base_alone(monkeypatch):
    colour, _, _ = toy_tasks()
    model = strategy(epochs=2)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and torch.is_tensor(v)}
    seen = {}
    original = DynamicEMA.replace

    def replace(self, named):
        named = list(named)
        seen["differed"] = any(not torch.equal(p, self.ema[n]) for n, p in named)
        original(self, named)
        seen["equal"] = all(torch.equal(p, self.ema[n]) for n, p in named)
        seen["names"] = {n for n, _ in named}
        seen["updates"] = self.updates

    monkeypatch.setattr(DynamicEMA, "replace", replace)
    for index in range(2):  # the same instruction twice: the second task reuses group 0 with DEMA
        task = dataclasses.replace(colour, index=index)
        model.before_task(task)
        model.learn(task)
    assert seen["differed"] and seen["equal"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert seen["names"] == set(trainable) and seen["updates"] == len(trainable) * 2 * 4  # 16 examples / 4
    assert model.dema_log[1]["dema"] and 0 < model.fallback_fraction <= 1
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())


def test_options_are_validated():
    with pytest.raises(UserError, match="dema"):
        strategy(dema="sometimes")
    with pytest.raises(UserError, match="expand_init"):
        strategy(expand_init="random")
    with pytest.raises(UserError, match="threshold"):
        strategy(threshold=1.5)


# --- end to end ------------------------------------------------------------------------------------

def test_instruction_groups_on_the_toy_stream_keep_earlier_tasks(tmp_path):
    """Three disjoint instructions: three groups, each test task routed to its own; less forgetting than
    one sequential LoRA."""
    cfg = lm_config(tmp_path, "strategy=coin_ema", "strategy.lora_r=8", "strategy.lora_alpha=16")
    summary = run(cfg)
    assert summary["status"] == "finished"
    seqlora = run(lm_config(tmp_path, "strategy=seqlora"))
    assert summary["metrics"]["acc_final_task_mean"] > seqlora["metrics"]["acc_final_task_mean"]
    assert summary["metrics"]["forgetting_max_prev"] < seqlora["metrics"]["forgetting_max_prev"]
    state = torch.load(Run(cfg).checkpoint_path, weights_only=True)["strategy"]
    extra = state["_extra_state"]
    assert extra["codebooks"] == [["Colour of {w}?"], ["Shape of {w}?"], ["Size of {w}?"]]
    assert extra["task_groups"] == [0, 1, 2]
    assert any(".group2." in k for k in state)


def test_resume_recreates_the_groups(tmp_path, interrupt_and_resume):
    extra = ("strategy=coin_ema", "strategy.lora_r=4", "strategy.lora_alpha=8", "strategy.epochs=2")
    reference = run(lm_config(tmp_path / "a", *extra))
    resumed = interrupt_and_resume(lm_config(tmp_path / "b", *extra), LanguageModelStrategy, at_task=2)
    assert resumed["metrics"] == reference["metrics"]
    scores = [json.dumps(sorted(p.read_text().splitlines())) for p in
              (next((tmp_path / d / "runs").glob("*/scores.csv")) for d in ("a", "b"))]
    assert scores[0] == scores[1]



def test_recurring_instructions_retrain_their_group_with_dema_and_others_expand():
    """instruct_recurring: tasks 3 and 5 paraphrase tasks 1 and 2, so at the authors' τ = 0.9 they retrain
    those groups with DEMA and their test prompts go there; the other four tasks open groups."""
    try:
        stream = SCENARIOS.get("instruct_recurring")(max_train_per_task=4, test_per_task=2, general_size=1).stream()
    except UserError as error:
        pytest.skip(str(error))
    model = strategy(epochs=1)
    assert model.threshold == 0.9  # the authors' value for CoIN's original instructions
    for task in stream.tasks:
        model.before_task(task)
        model.learn(task)
        model.after_task(task)
    assert model.task_groups == [0, 1, 0, 2, 1, 3]  # 4 groups for 6 tasks
    log = {entry["task"]: entry for entry in model.dema_log}
    assert [name for name, entry in log.items() if entry["dema"]] == ["define_adjective", "antonym_noun"]
    assert all(log[name]["reused"] and log[name]["updates"] > 0 for name in ("define_adjective", "antonym_noun"))
    assert [len(book) for book in model.codebooks] == [2, 2, 1, 1]
    model.predict([task.test.prompts[0] for task in stream.tasks], 1)
    assert model.test_groups == [0, 1, 0, 2, 1, 3]

"""Instruction streams: scorers, the language-model wrapper, the LM baselines end to end, general
suites, token rates, resume and the offline stream."""

import numpy as np
import pytest
import torch

from cl_bench import leaderboard
from cl_bench.config import compose
from cl_bench.errors import UserError
from cl_bench.models.lm import IGNORE_INDEX, tiny_llama
from cl_bench.registry import SCENARIOS
from cl_bench.runner import Run, run
from cl_bench.scenarios.base import Examples
from cl_bench.scorers import SCORERS, normalize_answer
from cl_bench.strategies._language_model import LanguageModelStrategy
from cl_bench.strategies.base import Context


def lm_config(tmp_path, *extra):
    return compose(["scenario=instruct_toy", "model=tiny_llama", "strategy.lr=0.01", "strategy.batch_size=4",
                    "strategy.epochs=3", "progress=false", f"results_dir={tmp_path}", f"cache_dir={tmp_path}/c",
                    *extra])


# --- scorers, hand-computed -------------------------------------------------------------------

def test_normalisation_and_exact_match():
    assert normalize_answer("  The  Cat, sat! ") == "cat sat"
    scores = SCORERS["exact_match"](["The cat.", "dog", "", "a Dog"], [("cat",), ("cat", "dog"), ("x",), ("cat",)])
    assert scores.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_a_reference_that_normalises_to_nothing_is_compared_verbatim():
    assert SCORERS["exact_match"](["The", "a", "A."], [("A",)] * 3).tolist() == [0.0, 1.0, 0.0]
    assert SCORERS["accuracy"](["A\nbecause", "the"], [("A",)] * 2).tolist() == [1.0, 0.0]


def test_accuracy_reads_the_first_line_only():
    scores = SCORERS["accuracy"](["animal\nbecause it barks", "\n food", "animal food"], [("animal",)] * 3)
    assert scores.tolist() == [1.0, 0.0, 0.0]


def test_rouge_l_and_edit_similarity_by_hand():
    # LCS("a b c d", "a x c d") = 3 words: precision = recall = 3/4
    assert SCORERS["rouge_l"](["a x c d"], [("a b c d",)])[0] == pytest.approx(0.75)
    # Indel distance between "kitten" and "sitting": 5 over 13 characters -> 1 - 5/13
    assert SCORERS["edit_similarity"](["kitten"], [("sitting",)])[0] == pytest.approx(1 - 5 / 13)
    # the best of several references counts; an empty prediction scores 0
    assert SCORERS["rouge_l"](["red", ""], [("blue", "red"), ("",)]).tolist() == [1.0, 0.0]


def test_answer_recall_counts_reference_words_in_a_chatty_reply():
    scores = SCORERS["answer_recall"](["I think it was Richard Nixon.", "Nixon"], [("Richard Nixon",)] * 2)
    assert scores.tolist() == [1.0, 0.5]


# --- the language-model wrapper ----------------------------------------------------------------

def test_training_batch_masks_everything_but_the_answer():
    lm = tiny_llama("text", ())
    batch = lm.training_batch(["Q: hi", "Q: a longer prompt"], ["yes", "no"], "cpu")
    eos = lm.tokenizer.eos_token_id
    for row, labels, mask, answer in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], ["yes", "no"]):
        answer_ids = lm.tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert kept == answer_ids
        assert row[mask.bool()].tolist()[-len(answer_ids):] == answer_ids


def test_training_batch_truncates_the_prompt_never_the_answer():
    lm = tiny_llama("text", (), max_position_embeddings=32)
    batch = lm.training_batch(["x" * 200], ["the answer"], "cpu")
    assert batch["input_ids"].shape[1] == 32
    assert (batch["labels"] != IGNORE_INDEX).sum() == len("the answer") + 1


def test_batched_generation_equals_one_by_one():
    """Left padding, length sorting and the KV cache must not change greedy outputs or their order."""
    lm = tiny_llama("text", (), init_seed=3)
    prompts = ["a", "a much longer prompt here", "mid size", "zz"]
    together, count = lm.generate(prompts, max_new_tokens=6, batch_size=4, device="cpu")
    alone = [lm.generate([p], max_new_tokens=6, batch_size=1, device="cpu")[0][0] for p in prompts]
    assert together == alone
    assert count <= 6 * len(prompts)


def test_generation_limits_per_prompt_give_each_text_its_own_limit():
    lm = tiny_llama("text", (), init_seed=3)
    prompts = ["a", "a much longer prompt here", "mid size", "zz", "b"]
    limits = [2, 7, 4, 7, 1]
    together, count = lm.generate(prompts, max_new_tokens=limits, batch_size=2, device="cpu")
    alone = [lm.generate([p], max_new_tokens=n, batch_size=1, device="cpu") for p, n in zip(prompts, limits)]
    assert together == [text for (text,), _ in alone]
    assert count == sum(n for _, n in alone)
    with pytest.raises(ValueError, match="2 max_new_tokens limits for 5 prompts"):
        lm.generate(prompts, max_new_tokens=[1, 2], batch_size=2, device="cpu")


def test_language_model_strategies_refuse_class_streams(tmp_path):
    with pytest.raises(UserError, match="handles instructions streams"):
        run(compose(["strategy=seqlora", "scenario=toy", "progress=false", f"results_dir={tmp_path}"]))
    with pytest.raises(UserError, match="handles classes streams"):
        run(compose(["strategy=finetune", "scenario=instruct_toy", "progress=false", f"results_dir={tmp_path}"]))


# --- baselines end to end ----------------------------------------------------------------------

def test_lm_baselines_order_on_the_toy_stream(tmp_path):
    """multitask >= replay > seqlora in final score; seqlora forgets more than replay."""
    final = {name: run(lm_config(tmp_path, f"strategy={name}"))["metrics"]
             for name in ("seqlora", "replay", "multitask")}
    assert final["multitask"]["acc_final_task_mean"] >= final["replay"]["acc_final_task_mean"]
    assert final["replay"]["acc_final_task_mean"] > final["seqlora"]["acc_final_task_mean"] + 20
    assert final["seqlora"]["forgetting_max_prev"] > final["replay"]["forgetting_max_prev"]
    # the leaderboard takes multitask as the joint reference and shows the instruction-stream columns
    board, excluded, out = leaderboard.build(tmp_path)
    by_strategy = board.set_index("strategy")
    assert by_strategy.loc["multitask", "intransigence_mean"] == 0
    assert not np.isnan(by_strategy.loc["seqlora", "intransigence_mean"])
    text = (out / "LEADERBOARD.md").read_text()
    assert "general_retention_delta" in text and "generation_tokens_per_second" in text


def test_summary_has_general_suites_token_rates_and_lora_keeps_the_base(tmp_path):
    cfg = lm_config(tmp_path, "strategy=seqlora")
    summary = run(cfg)
    general = summary["general"]
    assert general["suites"] == ["twice"] and len(general["scores"]) == summary["tasks_total"] + 1
    scores = np.array(general["scores"], dtype=float)
    assert summary["metrics"]["general_retention_delta"] == pytest.approx(scores[-1, 0] - scores[0, 0])
    cost = summary["cost"]
    assert cost["train_tokens_per_second"] > 0 and cost["generation_tokens_per_second"] is not None
    assert all(p["tokens_trained"] > 0 for p in summary["per_task"])
    assert cost["trainable_params"] == 4 * 2 * (8 * 64 + 64 * 8)  # r=8 on q and v of 4 layers
    # the checkpoint holds the adapter, not the frozen random base it can rebuild
    state = torch.load(Run(cfg).checkpoint_path, weights_only=True)["strategy"]
    assert any("lora_" in k for k in state) and not any("embed_tokens" in k for k in state)


def test_lm_run_resumes_to_identical_scores(tmp_path, interrupt_and_resume):
    reference = run(lm_config(tmp_path / "a", "strategy=replay"))
    resumed = interrupt_and_resume(lm_config(tmp_path / "b", "strategy=replay"), LanguageModelStrategy, at_task=1)
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["general"] == reference["general"]
    a = (tmp_path / "a" / "runs").glob("*/scores.csv")
    b = (tmp_path / "b" / "runs").glob("*/scores.csv")
    assert next(a).read_text() == next(b).read_text()


def test_replay_memory_holds_examples_of_past_tasks_only(tmp_path):
    stream = SCENARIOS.get("instruct_toy")().stream()
    from cl_bench.strategies.replay import Replay
    strategy = Replay(tiny_llama("text", ()), Context(), memory_per_task=5, epochs=0)
    for task in stream.tasks[:2]:
        assert strategy.memory is None or all(p not in task.train.prompts for p in strategy.memory.prompts)
        strategy.learn(task)
        strategy.after_task(task)
    assert len(strategy.memory) == 10
    assert set(strategy.memory.prompts) <= set(stream.tasks[0].train.prompts) | set(stream.tasks[1].train.prompts)


# --- streams -----------------------------------------------------------------------------------

def test_examples_select_concat_and_state_round_trip():
    examples = Examples(["p1", "p2", "p3"], ["a1", "a2", "a3"], (("a1",), ("a2", "b2"), ("a3",)))
    part = examples.select([2, 0])
    assert part.prompts == ["p3", "p1"] and part.references == (("a3",), ("a1",))
    assert len(part.concat(examples)) == 5
    assert Examples.from_state(examples.state()) == examples
    assert Examples(["p"], ["a"]).references == (("a",),)


def test_offline_stream_has_five_formats_and_a_general_suite():
    try:
        stream = SCENARIOS.get("instruct_offline")(max_train_per_task=50, test_per_task=10, general_size=10).stream()
    except UserError as error:
        pytest.skip(str(error))
    assert stream.kind == "instructions" and len(stream) == 5
    assert len({t.instruction for t in stream.tasks}) == 5
    assert {t.scorer for t in stream.tasks} == {"accuracy", "rouge_l", "exact_match", "edit_similarity"}
    assert [g.name for g in stream.general] == ["trivia"]
    for task in stream.tasks:
        assert len(task.train) == 50 and len(task.test) == 10
        assert not set(task.train.prompts) & set(task.test.prompts)
    # the seeded split and typos are reproducible
    again = SCENARIOS.get("instruct_offline")(max_train_per_task=50, test_per_task=10, general_size=10).stream()
    assert again.provenance["data_hash"] == stream.provenance["data_hash"]
    reordered = SCENARIOS.get("instruct_offline")(order=["spelling", "category", "define", "antonym", "topic"],
                                                  max_train_per_task=50, test_per_task=10, general_size=10).stream()
    assert reordered.provenance["task_order"][0] == "spelling"


def test_recurring_stream_brings_back_two_instructions_as_paraphrases():
    from cl_bench.scenarios.instruct_recurring import RECURS, TASK_NAMES
    from cl_bench.strategies.coin_ema import pair_similarity

    try:
        stream = SCENARIOS.get("instruct_recurring")(max_train_per_task=20, test_per_task=5, general_size=5).stream()
    except UserError as error:
        pytest.skip(str(error))
    assert [t.name for t in stream.tasks] == list(TASK_NAMES) and len(stream) == 6
    assert len({t.instruction for t in stream.tasks}) == 6  # paraphrased, not repeated verbatim
    assert [g.name for g in stream.general] == ["trivia"]
    instruction = {t.name: t.instruction for t in stream.tasks}
    for task in stream.tasks:
        assert len(task.train) == 20 and len(task.test) == 5
        assert not set(task.train.prompts) & set(task.test.prompts)
        earlier = [t.name for t in stream.tasks[:task.index]]
        closest = max(earlier, key=lambda name: pair_similarity(task.instruction, instruction[name]), default=None)
        best = pair_similarity(task.instruction, instruction[closest]) if closest else 0.0
        if task.name in RECURS:  # CoIN's similarity (authors' threshold 0.9) sees the earlier instruction
            assert closest == RECURS[task.name] and best >= 0.9
        else:
            assert best < 0.5
    # the paraphrase pairs ask the same thing of different data
    answers = {t.name: set(t.test.answers) for t in stream.tasks}
    assert all(not answers[later] & answers[first] for later, first in RECURS.items())


def test_offline_stream_rejects_a_bad_order():
    with pytest.raises(UserError, match="scenario.order"):
        SCENARIOS.get("instruct_offline")(order=["category", "category"])


# --- language models from files ----------------------------------------------------------------

def test_causal_lm_loads_a_hugging_face_folder(tmp_path):
    from cl_bench.models.lm import causal_lm

    source = tiny_llama("text", (), init_seed=5)
    source.model.save_pretrained(tmp_path / "model")
    source.tokenizer.save_pretrained(tmp_path / "model")
    loaded = causal_lm("text", (), path=str(tmp_path / "model"), chat_template=False, max_length=64)
    prompts = ["abc", "hello there"]
    assert loaded.generate(prompts, max_new_tokens=5, batch_size=2, device="cpu") == \
        source.generate(prompts, max_new_tokens=5, batch_size=2, device="cpu")
    with pytest.raises(UserError, match="model.path"):
        causal_lm("text", (), path=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="language model"):
        causal_lm("image", (1, 8, 8), path=str(tmp_path / "model"))


def test_smollm2_converts_its_gguf_once_and_answers():
    """The packaged GGUF is dequantised into a cached folder; the model then answers a simple question."""
    from cl_bench.models import lm

    try:
        lm.smollm2_gguf_file()
    except UserError as error:
        pytest.skip(str(error))
    model = lm.smollm2_135m("text", ())
    assert (lm.cache_root() / "models").is_dir() and model.use_chat_template
    answer, _ = model.generate(["What is the capital of France?"], max_new_tokens=12, batch_size=1, device="cpu")
    assert "paris" in answer[0].lower()


NO_DROPOUT = ["strategy.lora_dropout=0"]
ACCUMULATING = {  # every LM strategy that accumulates (ConPET refuses), with the settings that make it exact
    "seqft": [], "seqlora": NO_DROPOUT, "hft": ["strategy.epochs=1"], "replay": NO_DROPOUT, "multitask": NO_DROPOUT,
    "coin_ema": [*NO_DROPOUT, "strategy.lora_r=8", "strategy.lora_alpha=16"],  # at rank 128, 6.7e-5 apart
    "loramoe": [*NO_DROPOUT, "strategy.blc_weight=0"],
    "iv_guided": [*NO_DROPOUT, "strategy.epochs=1", "strategy.heads=1:0", "strategy.kl_alpha1=0",
                  "strategy.kl_alpha2=0", "strategy.pr_alpha=0"]}


@pytest.mark.parametrize("strategy", ACCUMULATING)
def test_grad_accum_gives_the_update_of_the_larger_batch(tmp_path, strategy):
    """batch 3 x grad_accum 2 trains like batch 6 at once: same batches, same steps, weights within float
    noise. (LoRA dropout off: its masks are drawn per forward, so they differ between the two ways. LoRAMoE's
    and IV-guided's auxiliary terms are off: they are per-batch statistics, averaged over micro-batches.)"""
    from cl_bench.runner import build_strategy, build_stream, seed_everything
    from cl_bench.strategies.base import Context

    def trained(batch_size: int, grad_accum: int):
        cfg = compose(["scenario=instruct_toy", "model=tiny_llama", f"strategy={strategy}", "strategy.lr=0.01",
                       f"strategy.batch_size={batch_size}", f"strategy.grad_accum={grad_accum}",
                       "scenario.train_size=18", "progress=false", f"results_dir={tmp_path}",
                       *ACCUMULATING[strategy]])
        seed_everything(0)
        context = Context(generator=torch.Generator().manual_seed(0))
        learner, stream, _ = build_strategy(cfg, build_stream(cfg), context, lambda items, *a, **k: items)
        learner.before_task(stream.tasks[0])
        learner.learn(stream.tasks[0])
        return learner.optimizer_steps, learner.samples_trained, {n: p.detach().clone()
                                                                  for n, p in learner.named_parameters()
                                                                  if p.requires_grad}

    steps, samples, whole = trained(6, 1)
    accumulated_steps, accumulated_samples, accumulated = trained(3, 2)
    assert (accumulated_steps, accumulated_samples) == (steps, samples) == (3, 18)
    for name, tensor in whole.items():
        torch.testing.assert_close(accumulated[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    _, _, small = trained(3, 1)  # the control: half the batch is a different update
    assert any(not torch.allclose(small[n], t, rtol=1e-4, atol=1e-5) for n, t in whole.items())


def test_conpet_says_it_does_not_accumulate(capsys, tmp_path):
    from cl_bench.cli import main

    assert main(["run", "strategy=conpet_static", "scenario=instruct_toy", "model=tiny_llama",
                 "strategy.grad_accum=2", "progress=false", f"results_dir={tmp_path}"]) == 2
    assert "ConPET does not support strategy.grad_accum" in capsys.readouterr().err

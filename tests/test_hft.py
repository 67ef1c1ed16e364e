"""HFT (Half Fine-Tuning): the spec's invariants on the tiny LLaMA (category-level counts, exactly half
of the attention+FFN parameters frozen, the frozen half untouched by a stage of training, determinism,
ablation patterns) and runs end to end, including a resume."""
import pytest
import torch

from cl_bench.config import compose
from cl_bench.errors import UserError
from cl_bench.models.lm import LanguageModel, byte_tokenizer, tiny_llama
from cl_bench.registry import SCENARIOS
from cl_bench.runner import run
from cl_bench.strategies._language_model import LanguageModelStrategy
from cl_bench.strategies.base import Context
from cl_bench.strategies.hft import ATTENTION, FFN, HFT, NORMS, draw_mask

L = 4
TINY_FROZEN = 82_176  # 0.5 * 4 layers * 40,960 attention+FFN parameters + 4 norms of 64


def lm_config(tmp_path, *extra):
    return compose(["scenario=instruct_toy", "model=tiny_llama", "strategy=hft", "strategy.lr=0.01",
                    "strategy.batch_size=4", "strategy.epochs=3", "progress=false", f"results_dir={tmp_path}",
                    f"cache_dir={tmp_path}/c", *extra])


def frozen_names(strategy):
    return {n for n, p in strategy.named_parameters() if not p.requires_grad}


def stream():
    return SCENARIOS.get("instruct_toy")().stream()


@pytest.mark.parametrize("stage", [0, 1, 2, 7])
def test_category_mask_freezes_exactly_half_per_category(stage):
    strategy = HFT(tiny_llama("text", ()), Context(), mask_seed=11)
    strategy.begin_stage(stage)
    ffn_counts = []
    for layer, names in enumerate(strategy.mask):
        assert sum(n in ATTENTION for n in names) == 2
        assert sum(n in NORMS for n in names) == 1
        ffn_counts.append(sum(n in FFN for n in names))
        # the mask is what requires_grad says, module by module
        for name, module in strategy.layers[layer].items():
            assert all(p.requires_grad == (name not in names) for p in module.parameters())
    assert sorted(ffn_counts) == [1] * (L - L // 2) + [2] * (L // 2)
    frozen = frozen_names(strategy)
    assert not any(k in n for n in frozen for k in ("embed_tokens", "lm_head", "model.norm."))
    assert sum(p.numel() for n, p in strategy.named_parameters() if n in frozen) == TINY_FROZEN
    report = strategy.mask_report
    assert report["frozen_params"] == TINY_FROZEN and report["frozen_matrices"] == 14 and report["matrices"] == 28
    assert report["frozen_matrix_params"] == 81_920 == report["matrix_params"] // 2
    assert report["frozen_fraction_of_matrices"] == report["frozen_fraction_of_parameters"] == 0.5
    assert report["trainable_params"] == 292_416 - TINY_FROZEN


def test_grouped_query_attention_reports_matrices_and_parameters_separately():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)
    lm = LanguageModel(LlamaForCausalLM(config), byte_tokenizer(), max_length=64, chat_template=False, source="gqa")
    strategy = HFT(lm, Context(), mask_seed=0)
    for stage in range(4):
        strategy.begin_stage(stage)
        report = strategy.mask_report
        assert report["frozen_fraction_of_matrices"] == 0.5
        counted = sum(p.numel() for n, p in strategy.named_parameters()
                      if not p.requires_grad and "norm" not in n)
        assert report["frozen_matrix_params"] == counted
        assert report["frozen_fraction_of_parameters"] == counted / report["matrix_params"]
    # k/v are 4x smaller than q/o here: some stage's half of the matrices is not half of the parameters
    fractions = {HFT.count(strategy, strategy.stage_mask(s))["frozen_fraction_of_parameters"] for s in range(8)}
    assert fractions != {0.5}


def test_a_stage_trains_only_the_selected_half():
    task = stream().tasks[0]
    strategy = HFT(tiny_llama("text", ()), Context(), mask_seed=5, epochs=1, lr=0.01, batch_size=8,
                   weight_decay=0.1)
    strategy.before_task(task)
    frozen = frozen_names(strategy)
    before = {n: p.detach().clone() for n, p in strategy.named_parameters()}
    # frozen tensors get no gradient, and the optimizer holds the trainable ones only
    loss = strategy.loss(task.train.select(range(4)), task)
    loss.backward()
    for name, parameter in strategy.named_parameters():
        assert (parameter.grad is None) == (name in frozen)
    strategy.zero_grad(set_to_none=True)
    optimizer = strategy.make_optimizer()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in strategy.named_parameters() if n not in frozen}
    strategy.learn(task)
    for name, parameter in strategy.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, before[name]), name  # weight decay did not touch it either
            assert parameter.grad is None
        else:
            assert not torch.equal(parameter, before[name]), name


def test_masks_are_seeded_by_base_seed_plus_stage():
    a = HFT(tiny_llama("text", ()), Context(), mask_seed=3)
    b = HFT(tiny_llama("text", ()), Context(), mask_seed=3)
    c = HFT(tiny_llama("text", ()), Context(), mask_seed=4)
    assert a.stage_mask(0) == b.stage_mask(0) and a.stage_mask(2) == b.stage_mask(2)
    assert a.stage_mask(0) != a.stage_mask(1)
    assert len({str(a.stage_mask(s)) for s in range(6)}) > 1
    assert c.stage_mask(0) == a.stage_mask(1)  # seed = base_seed + stage
    # the default base seed is the run's seed (the context generator's)
    d = HFT(tiny_llama("text", ()), Context(generator=torch.Generator().manual_seed(3)))
    assert d.mask_seed == 3 and d.stage_mask(1) == a.stage_mask(1)


def test_granularity_patterns():
    layer_attention, model_per_layer = set(), set()
    for seed in range(20):
        layer = draw_mask(L, "layer", torch.Generator().manual_seed(seed))
        counts = sorted(sum(n not in NORMS for n in names) for names in layer)
        assert counts == [3] * (L - L // 2) + [4] * (L // 2)
        assert all(sum(n in NORMS for n in names) == 1 for names in layer)
        layer_attention |= {sum(n in ATTENTION for n in names) for names in layer}
        model = draw_mask(L, "model", torch.Generator().manual_seed(seed))
        assert sum(n not in NORMS for names in model for n in names) == 7 * L // 2
        assert sum(n in NORMS for names in model for n in names) == L
        model_per_layer |= {sum(n not in NORMS for n in names) for names in model}
    # neither coarser level keeps the per-category balance of HFT (2 of 4 attention matrices per layer)
    assert layer_attention - {2}
    assert model_per_layer - {3, 4}
    # an odd number of layers: floor(L/2) layers take the larger share
    odd = draw_mask(5, "category", torch.Generator().manual_seed(0))
    assert sorted(sum(n in FFN for n in names) for names in odd) == [1, 1, 1, 2, 2]


def test_epoch_resampling_draws_a_new_mask_each_epoch():
    task = stream().tasks[1]
    strategy = HFT(tiny_llama("text", ()), Context(), mask_seed=2, resample="epoch", epochs=2, batch_size=16)
    strategy.before_task(task)
    first = strategy.mask
    strategy.learn(task)
    assert strategy.epochs == 2 and strategy.mask_epoch == 1
    assert strategy.mask == strategy.stage_mask(1, 1) != first == strategy.stage_mask(1, 0)


def test_bad_settings_and_models_are_refused():
    with pytest.raises(UserError, match="granularity"):
        HFT(tiny_llama("text", ()), Context(), granularity="block")
    with pytest.raises(UserError, match="resample"):
        HFT(tiny_llama("text", ()), Context(), resample="step")
    with pytest.raises(UserError, match="LLaMA-style"):
        HFT(_gpt2(), Context())  # fused c_attn, no gate/up/down


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2))
    return LanguageModel(model, byte_tokenizer(), max_length=32, chat_template=False, source="gpt2")


def test_mask_round_trips_through_the_state_dict():
    task = stream().tasks[2]
    a = HFT(tiny_llama("text", ()), Context(), mask_seed=9)
    a.before_task(task)
    b = HFT(tiny_llama("text", ()), Context(), mask_seed=9)
    b.load_state_dict(a.state_dict(), strict=False)
    assert b.mask == a.mask and b.mask_stage == 2 and frozen_names(b) == frozen_names(a)
    assert b.mask_report == a.mask_report


def test_hft_end_to_end_and_resume(tmp_path, interrupt_and_resume):
    reference = run(lm_config(tmp_path / "a"))
    assert reference["status"] == "finished"
    assert [p["trainable_params"] for p in reference["per_task"]] == [292_416 - TINY_FROZEN] * 3
    assert reference["metrics"]["plasticity"] > 70
    resumed = interrupt_and_resume(lm_config(tmp_path / "b"), LanguageModelStrategy, at_task=1)
    assert resumed["metrics"] == reference["metrics"] and resumed["general"] == reference["general"]

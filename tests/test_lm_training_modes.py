"""The language-model strategies' memory and precision switches change cost, not the method.
Gradient checkpointing: every strategy trains two tasks to the same weights, bit for bit, as without it. The
backward reruns each layer's forward, so a method whose forward hooks or records something (IV-guided's
intervention and head capture, LoRAMoE's routing weights for L_lbc) must make that rerun the same as the first
forward. bf16: the CLI allows it on CUDA only, so here it is forced on the CPU's bfloat16 autocast, which
takes the same dtype paths (hooks adding float32 vectors to bf16 activations, float32 routers)."""
import pytest
import torch

from cl_bench.models.lm import tiny_llama
from cl_bench.registry import SCENARIOS, STRATEGIES
from cl_bench.strategies._language_model import LanguageModelStrategy
from cl_bench.strategies.base import Context

LM_STRATEGIES = [name for name in STRATEGIES.names() if name in {
    "seqft", "seqlora", "replay", "multitask", "hft", "loramoe", "conpet_static", "conpet_dynamic", "coin_ema",
    "iv_guided"}]
OPTIONS = {"iv_guided": {"heads": "1:0,2:3,3:1"}}  # the tiny model has no published heads: skip the search


def test_the_list_covers_every_built_in_language_model_strategy():
    built_in = {name for name in STRATEGIES.names() if isinstance(STRATEGIES.get(name), type)
                and issubclass(STRATEGIES.get(name), LanguageModelStrategy)
                and STRATEGIES.get(name).__module__.startswith("cl_bench.")}
    assert built_in == set(LM_STRATEGIES)


def trained_weights(name: str, checkpointing: bool, bf16: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # dropout draws from the global generator
    strategy = STRATEGIES.get(name)(tiny_llama("text", ()), Context(generator=torch.Generator().manual_seed(0)),
                                    lr=0.01, batch_size=4, epochs=1, gradient_checkpointing=checkpointing,
                                    **OPTIONS.get(name, {}))
    assert strategy.lm.is_activation_checkpointing == checkpointing
    strategy.bf16 = bf16  # past use_precision's refusal on the CPU
    for task in SCENARIOS.get("instruct_toy")(train_size=8, test_size=2).stream().tasks[:2]:
        strategy.before_task(task)
        strategy.learn(task)
        strategy.after_task(task)
    tensors = {**dict(strategy.named_parameters()), **dict(strategy.named_buffers())}
    return {k: v.detach().clone() for k, v in tensors.items() if v.is_floating_point()}


@pytest.mark.parametrize("name", LM_STRATEGIES)
def test_gradient_checkpointing_trains_the_same_weights(name):
    plain, checkpointed = trained_weights(name, False), trained_weights(name, True)
    assert plain.keys() == checkpointed.keys()
    moved = [k for k in plain if not torch.equal(plain[k], checkpointed[k])]
    assert not moved, f"{len(moved)} tensors differ, e.g. {moved[:3]}"


@pytest.mark.parametrize("name", LM_STRATEGIES)
def test_bf16_autocast_with_checkpointing_trains_every_strategy(name):
    """Finite weights, and not float32's (so autocast was on); on a random tiny model a few Adam steps in
    bfloat16 drift as far as the steps themselves, so closeness to float32 is not asserted."""
    full, half = trained_weights(name, True), trained_weights(name, True, bf16=True)
    assert all(torch.isfinite(t).all() for t in half.values())
    assert any(not torch.equal(full[k], half[k]) for k in full)

"""LoRAMoE: the spec's invariants on the tiny LLaMA (identity at initialisation, only routers and experts
train, routing weights sum to one, the localized balancing constraint's closed forms and the direction of
its gradient, parameter counts) and one run end to end."""
import pytest
import torch

from cl_bench.config import compose
from cl_bench.errors import UserError
from cl_bench.models.lm import tiny_llama
from cl_bench.registry import SCENARIOS
from cl_bench.runner import Run, run
from cl_bench.strategies.base import Context
from cl_bench.strategies.loramoe import LBCState, LoRAMoE, LoRAMoELinear, lbc_loss


def strategy(**options):
    return LoRAMoE(tiny_llama("text", ()), Context(generator=torch.Generator().manual_seed(0)), **options)


def stream():
    return SCENARIOS.get("instruct_toy")().stream()


def uniform_value(n, delta):
    return delta ** 2 * n / (n - 1)


def test_fresh_model_equals_the_base_model_exactly():
    base = tiny_llama("text", ())
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = base.model(input_ids=ids).logits
        moe = strategy()
        for mode in (False, True):  # dropout on the expert inputs changes nothing while B = 0
            moe.train(mode)
            assert torch.equal(moe.lm(input_ids=ids).logits, expected)


def test_only_routers_and_experts_train_and_the_base_stays_bit_identical():
    moe = strategy(epochs=1, lr=0.01, batch_size=8)
    trainable = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(n.rsplit(".", 2)[-2] in ("gate_proj", "up_proj", "down_proj") for n in trainable)
    # N r (d_in + d_out) + N d_in per linear: 4 layers x (4,992 + 4,992 + 5,376)
    assert sum(p.numel() for n, p in moe.named_parameters() if n in trainable) == 61_440
    assert len(moe.experts) == 12 and all(isinstance(m, LoRAMoELinear) for m in moe.experts)
    task = stream().tasks[1]
    loss = moe.loss(task.train.select(range(4)), task)
    loss.backward()
    assert all((p.grad is not None) == (n in trainable) for n, p in moe.named_parameters())
    moe.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    moe.learn(task)
    for name, parameter in moe.named_parameters():
        assert torch.equal(parameter, before[name]) == (name not in trainable), name


def test_router_rows_sum_to_one():
    moe = strategy()
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(2)) * 5
    gates = moe.experts[0].gates(x)
    assert gates.shape == (3, 7, 6) and gates.dtype == torch.float32
    assert torch.allclose(gates.sum(-1), torch.ones(3, 7), atol=1e-6, rtol=0)
    assert (gates > 0).all()  # dense: every expert takes part


@pytest.mark.parametrize("batch, experts, expected", [(2, 6, 0.0109091), (8, 6, 0.0102128)])
def test_lbc_of_uniform_routing_has_the_closed_form(batch, experts, expected):
    gates = torch.full((batch, 5, experts), 1.0 / experts)
    for types in (torch.zeros(batch), torch.ones(batch), torch.arange(batch) % 2):
        value = lbc_loss(gates, types, delta=0.1)
        assert value.item() == pytest.approx(expected, abs=1e-7)
        assert value.item() == pytest.approx(uniform_value(batch * experts, 0.1), rel=1e-5)
        assert lbc_loss(gates, types, delta=0.0).item() == pytest.approx(0.0, abs=1e-12)  # rounding only
    # the paper's printed form divides by the mean, not its square: the importance of each expert is T/N
    q = 5 / experts
    assert lbc_loss(gates, torch.ones(batch), delta=0.1, form="var_over_mean").item() == pytest.approx(
        uniform_value(batch * experts, 0.1) * q, rel=1e-5)


@pytest.mark.parametrize("form", ["cv2", "var_over_mean"])
def test_lbc_is_summed_over_every_wrapped_linear_times_beta(form):
    moe = strategy(blc_weight=0.5, lbc_form=form)
    for module in moe.experts:
        torch.nn.init.zeros_(module.lora_router)  # uniform routing everywhere
    task = stream().tasks[0]
    batch = task.train.select(range(4))
    encoded = moe.encode(batch)
    lm_loss, aux = moe.auxiliary_loss(encoded, moe.task_types(batch, task))
    # uniform routing: Q = T/N for every (sample, expert) and Mean(C) = 1, so Mean(Z) = T/N (T: padded length)
    mean_z = encoded["input_ids"].shape[1] / 6
    per_linear = uniform_value(4 * 6, 0.1) * (mean_z if form == "var_over_mean" else 1.0)
    assert aux.item() == pytest.approx(12 * 0.5 * per_linear, rel=1e-5)
    assert moe.loss(batch, task).item() == pytest.approx(lm_loss.item() + aux.item(), rel=1e-6)


def test_no_types_or_zero_weight_gives_exactly_zero_auxiliary_loss():
    task = stream().tasks[0]
    batch = task.train.select(range(4))
    moe = strategy()
    encoded = moe.encode(batch)
    assert moe.auxiliary_loss(encoded, None)[1].item() == 0.0
    assert moe.auxiliary_loss(encoded, moe.task_types(batch, task))[1].item() > 0
    assert strategy(task_type_rule="none").task_types(batch, task) is None
    zero = strategy(blc_weight=0.0)
    lm_loss, aux = zero.auxiliary_loss(encoded, torch.ones(4, dtype=torch.long))
    assert aux.item() == 0.0 and zero.loss(batch, task).item() == lm_loss.item()


def test_task_type_rules():
    tasks = stream().tasks
    batch = tasks[0].train.select(range(3))
    assert [strategy().task_types(batch, t).tolist() for t in tasks] == [[0] * 3, [1] * 3, [0] * 3]
    assert strategy(task_type_rule="all_downstream").task_types(batch, tasks[1]).tolist() == [0] * 3
    assert strategy(task_type_rule="all_knowledge").task_types(batch, tasks[0]).tolist() == [1] * 3


@pytest.mark.parametrize("task_type", [1, 0])
def test_a_step_on_lbc_moves_routing_mass_away_from_the_boosted_group(task_type):
    """Type 1 boosts group A (experts 0..N/2-1) by 1+delta: minimising CV^2 lowers A's raw mass relative to B.
    The router is scaled towards uniform routing, where the coefficients drive the gradient; from a strongly
    uneven router one step mostly evens out experts inside each group instead (a few % of random inits)."""
    torch.manual_seed(0)
    layer = LoRAMoELinear(torch.nn.Linear(16, 8), LBCState(), num_experts=6, r=4, alpha=32, dropout=0.0)
    with torch.no_grad():
        layer.lora_router *= 0.3
    x = torch.randn(4, 10, 16)
    types = torch.full((4,), task_type)

    def ratio():
        with torch.no_grad():
            gates = layer.gates(x)
        return (gates[..., :3].sum() / gates[..., 3:].sum()).item()

    before = ratio()
    loss = lbc_loss(layer.gates(x), types, delta=0.1)
    loss.backward()
    with torch.no_grad():
        layer.lora_router -= 0.05 * layer.lora_router.grad
    assert lbc_loss(layer.gates(x), types, delta=0.1).item() < loss.item()
    assert (ratio() < before) if task_type == 1 else (ratio() > before)


def test_bad_settings_are_refused():
    for options, match in [({"num_experts": 5}, "even"), ({"task_type_rule": "parity"}, "task_type_rule"),
                           ({"lbc_form": "cv"}, "lbc_form"), ({"lora_targets": "c_fc"}, "no linear layer")]:
        with pytest.raises(UserError, match=match):
            strategy(**options)


def test_state_dict_restores_the_trained_experts():
    task = stream().tasks[0]
    trained = strategy(epochs=1, lr=0.01, batch_size=8)
    trained.learn(task)
    fresh = strategy()
    fresh.load_state_dict(trained.state_dict())
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(4))
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(trained.lm(input_ids=ids).logits, fresh.lm(input_ids=ids).logits)


def test_loramoe_end_to_end(tmp_path):
    cfg = compose(["scenario=instruct_toy", "model=tiny_llama", "strategy=loramoe", "strategy.lr=0.01",
                   "strategy.batch_size=4", "strategy.epochs=3", "progress=false", f"results_dir={tmp_path}",
                   f"cache_dir={tmp_path}/c"])
    summary = run(cfg)
    assert summary["status"] == "finished" and summary["tasks_completed"] == 3
    assert summary["cost"]["trainable_params"] == 61_440
    assert summary["metrics"]["plasticity"] > 70
    state = torch.load(Run(cfg).checkpoint_path, weights_only=True)["strategy"]
    assert any("lora_router" in k for k in state) and not any("embed_tokens" in k for k in state)

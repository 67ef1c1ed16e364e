"""IV/FV-guided training (spec methods-llm.md §5.4) on the tiny LLaMA: the function vector, the
intervention hook, the auxiliary losses and their gates, the reference passes, merged adapters, and a
run on instruct_toy."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from cl_bench.config import compose
from cl_bench.errors import UserError
from cl_bench.models.lm import tiny_llama
from cl_bench.registry import SCENARIOS
from cl_bench.runner import Run, run
from cl_bench.strategies.base import Context
from cl_bench.strategies.iv_guided import IVGuided, gated, kd_loss


def toy_tasks():
    return SCENARIOS.get("instruct_toy")(train_size=16, test_size=4).stream().tasks


def strategy(**kwargs):
    options = {"lr": 0.01, "batch_size": 4, "heads": "1:0,2:3,3:1", **kwargs}
    return IVGuided(tiny_llama("text", ()), Context(generator=torch.Generator().manual_seed(0)), **options)


def encoded_batch(model, task, count=3):
    batch = task.train.select(range(count))
    return batch, model.encode(batch)


def adapters_enabled(model) -> bool:
    return all(not layer.disable_adapters for layer in model.lora_layers)


# --- the function vector ---------------------------------------------------------------------------

def test_vector_is_the_sum_of_o_proj_images_of_padded_head_means():
    colour = toy_tasks()[0]
    model = strategy(n_trials=1000)  # capped by the 16 training prompts: all of them
    means, _ = model.mean_head_activations(colour)
    assert means.shape == (4, 4, 16)
    # the same means one prompt at a time, from a pre-hook on o_proj at the last prompt token
    captured = {}
    hooks = [o.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0][0, -1]))
             for i, o in enumerate(model.o_projs)]
    total = torch.zeros(4, 64)
    with torch.no_grad():
        for prompt in colour.train.prompts:
            ids = torch.tensor([model.backbone.prompt_ids([prompt])[0]])
            model.lm(input_ids=ids)
            total += torch.stack([captured[i] for i in range(4)])
    for hook in hooks:
        hook.remove()
    assert torch.allclose(means, (total / 16).view(4, 4, 16), atol=1e-5)
    vector = model.vector_from_means(means)
    assert vector.shape == (64,)
    expected = torch.zeros(64)
    with torch.no_grad():
        for layer, head in model.heads:
            padded = torch.zeros(64)
            padded[head * 16:(head + 1) * 16] = means[layer, head]
            expected += model.o_projs[layer](padded)
    assert torch.allclose(vector, expected, atol=1e-6)


def test_output_norm_head_set_is_the_largest_mean_outputs_and_edit_layer_scales_with_depth():
    colour = toy_tasks()[0]
    model = strategy(heads="", top_heads=3, head_selection="output_norm")
    assert model.heads is None and model.edit_layer == round(9 * 4 / 32) == 1
    model.before_task(colour)
    norms = model.head_outputs(model.mean_head_activations(colour)[0]).norm(dim=-1)
    assert len(model.heads) == 3
    chosen = torch.tensor([norms[l, h] for l, h in model.heads])
    assert chosen.min() >= norms.flatten().sort(descending=True).values[2] - 1e-6
    assert strategy(edit_layer=3).edit_layer == 3
    with pytest.raises(UserError, match="edit_layer"):
        strategy(edit_layer=4)
    with pytest.raises(UserError, match="heads"):
        strategy(heads="1:9")
    with pytest.raises(UserError, match="heads"):
        strategy(heads="1-2")
    with pytest.raises(UserError, match="head_selection"):
        strategy(head_selection="random")


# --- the intervention hook -------------------------------------------------------------------------

def test_hook_changes_the_residual_only_at_the_edit_layer_and_last_prompt_token():
    colour = toy_tasks()[0]
    model = strategy(edit_layer=2)
    model.before_task(colour)
    model.eval()
    batch = colour.train.select([0, 1])
    encoded = model.backbone.training_batch(batch.prompts, [batch.answers[0], "a much longer answer"], "cpu")
    rows = torch.arange(2)
    positions = (encoded["labels"] != -100).int().argmax(1) - 1
    inputs = {k: encoded[k] for k in ("input_ids", "attention_mask")}
    outputs = {}
    with torch.no_grad(), model.lm.disable_adapter():
        plain = model.lm(**inputs, output_hidden_states=True).hidden_states
        record = model.o_projs[2].register_forward_hook(lambda m, a, o: outputs.__setitem__("before", o))
        model.lm(**inputs)
        record.remove()
        with model.added_vector(model.function_vector, rows, positions):
            edited = model.lm(**inputs, output_hidden_states=True).hidden_states
            record = model.o_projs[2].register_forward_hook(lambda m, a, o: outputs.__setitem__("after", o))
            model.lm(**inputs)  # this recorder runs after the intervention hook
            record.remove()
    # the o_proj output gains v exactly at (row, p_b) and nothing elsewhere
    difference = outputs["after"] - outputs["before"]
    assert torch.allclose(difference[rows, positions], model.function_vector.expand(2, -1), atol=1e-6)
    mask = torch.ones(difference.shape[:2], dtype=torch.bool)
    mask[rows, positions] = False
    assert torch.equal(difference[mask], torch.zeros_like(difference[mask]))
    # residual stream: layers before the edit bit-identical; after the edit layer only p_b changed
    for layer in range(3):
        assert torch.equal(plain[layer], edited[layer])
    changed = (plain[3] != edited[3]).any(-1)
    expected = torch.zeros_like(changed)
    expected[rows, positions] = True
    assert torch.equal(changed, expected)
    for layer in range(len(plain)):  # earlier positions never see it (causal attention)
        for row in range(2):
            assert torch.equal(plain[layer][row, :positions[row]], edited[layer][row, :positions[row]])


# --- the objective ---------------------------------------------------------------------------------

def test_kl_direction_is_new_to_reference():
    new, ref = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0]])  # peaked vs uniform
    p, q = F.softmax(new / 2, -1), F.softmax(ref / 2, -1)
    assert kd_loss(new, ref, 2.0) == pytest.approx(float((p * (p.log() - q.log())).sum()), rel=1e-5)
    assert kd_loss(new, ref, 2.0) != pytest.approx(float(kd_loss(ref, new, 2.0)), rel=1e-3)
    # batchmean divides by the batch only, also for (B, T, V) logits
    stacked_new, stacked_ref = torch.stack([new, new]).expand(2, 5, 3), torch.stack([ref, ref]).expand(2, 5, 3)
    assert kd_loss(stacked_new, stacked_ref, 2.0) == pytest.approx(5 * float(kd_loss(new, ref, 2.0)), rel=1e-5)


def test_gates_switch_small_terms_off():
    assert gated(20.0, torch.tensor(0.1), 0.1) == 0
    assert gated(20.0, torch.tensor(0.1001), 0.1) == pytest.approx(2.002)
    assert gated(1.0, torch.tensor(0.01), 0.01) == 0
    assert gated(1.0, torch.tensor(0.02), 0.01) == pytest.approx(0.02)
    model = strategy(heads="0:0", kl_alpha1=3.0, kl_alpha2=5.0, pr_alpha=7.0)
    rows, positions = torch.tensor([0]), torch.tensor([1])
    ce = torch.tensor(1.0)
    ref = torch.zeros(1, 3, 5)
    near = ref.clone()
    near[0, 1, 0] = 0.5  # K1 small (< 0.1): gated off; K2 the same
    heads = {0: torch.zeros(1, 64)}
    far_heads = {0: torch.zeros(1, 64)}
    far_heads[0][:, :16] = 0.5  # M = 0.25 > 0.01
    total = model.objective(ce, near, ref, heads, {0: torch.zeros(1, 64)}, rows, positions)
    assert 0 < model.last_terms["k1"] < 0.1 and float(total) == pytest.approx(1.0)
    far = ref.clone()
    far[0, 1, 0] = 5.0
    total = model.objective(ce, far, ref, far_heads, {0: torch.zeros(1, 64)}, rows, positions)
    terms = model.last_terms
    assert terms["k1"] > 0.1 and terms["k2"] == pytest.approx(terms["k1"]) and terms["m0:0"] == pytest.approx(0.25)
    assert float(total) == pytest.approx(1.0 + 3 * terms["k1"] + 5 * terms["k2"] + 7 * 0.25, rel=1e-5)


def test_fresh_lora_and_zero_vector_leave_only_cross_entropy_and_a_real_vector_gives_k1():
    colour = toy_tasks()[0]
    model = strategy()
    model.before_task(colour)
    model.train()
    batch, encoded = encoded_batch(model, colour)
    real = model.function_vector
    model.function_vector = torch.zeros_like(real)
    loss = model.loss(batch, colour)
    terms = model.last_terms
    # identical distributions and head outputs: zero up to rounding
    assert all(abs(v) < 1e-6 for k, v in terms.items() if k != "ce")
    with torch.no_grad():
        ce = model.lm(**encoded).loss
    assert float(loss) == pytest.approx(float(ce), abs=1e-6)
    model.function_vector = real
    model.loss(batch, colour)  # step 0: the progressive intervention adds all of v_t, as pass A does
    assert abs(model.last_terms["k1"]) < 1e-6
    model.progressive_intervention = False
    model.loss(batch, colour)
    assert model.last_terms["k1"] > 1e-4


def test_reference_passes_have_no_grad_and_adapters_come_back(monkeypatch):
    colour = toy_tasks()[0]
    model = strategy()
    model.before_task(colour)
    model.train()
    seen = {}
    original = IVGuided.objective

    def objective(self, ce, logits, ref_logits, heads, ref_heads, rows, positions):
        seen.update(ref=ref_logits.requires_grad or any(v.requires_grad for v in ref_heads.values()),
                    main=logits.requires_grad and all(v.requires_grad for v in heads.values()),
                    layers=sorted(heads) == sorted(ref_heads) == [1, 2, 3])
        return original(self, ce, logits, ref_logits, heads, ref_heads, rows, positions)

    monkeypatch.setattr(IVGuided, "objective", objective)
    batch, _ = encoded_batch(model, colour)
    loss = model.loss(batch, colour)
    assert seen == {"ref": False, "main": True, "layers": True}
    assert adapters_enabled(model)
    loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_reference_pass_b_stops_after_the_deepest_selected_head():
    colour = toy_tasks()[0]
    model = strategy(heads="1:0,2:3")
    model.before_task(colour)
    model.train()
    calls = {"o_proj 2": 0, "o_proj 3": 0, "logits": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1
        return hook

    model.o_projs[2].register_forward_pre_hook(counter("o_proj 2"))
    model.o_projs[3].register_forward_pre_hook(counter("o_proj 3"))
    model.lm.get_output_embeddings().register_forward_pre_hook(counter("logits"))
    model.loss(encoded_batch(model, colour)[0], colour)
    assert calls == {"o_proj 2": 3, "o_proj 3": 2, "logits": 2}  # A, B and main reach layer 2; B stops there
    assert sorted(model.last_terms) == ["ce", "k1", "k2", "m1:0", "m2:3"]


def test_merged_adapters_make_disabled_equal_the_previous_model_and_vectors_use_the_original():
    colour, shape, _ = toy_tasks()
    model = strategy(epochs=2, lr=0.05, n_trials=100)
    model.before_task(colour)
    first, _ = model.mean_head_activations(colour)
    assert model.trainable_parameters() and sum(p.numel() for p in model.trainable_parameters()) == 4 * 2 * (2 * 8 * 64)
    model.learn(colour)
    model.after_task(colour)
    model.eval()
    _, encoded = encoded_batch(model, shape)
    with torch.no_grad():
        trained = model.lm(**encoded).logits
        with model.lm.disable_adapter():
            base = model.lm(**encoded).logits
    assert not torch.allclose(trained, base, atol=1e-4)  # the LoRA learnt something
    model.before_task(shape)
    model.eval()
    with torch.no_grad():
        with model.lm.disable_adapter():
            merged = model.lm(**encoded).logits
        fresh = model.lm(**encoded).logits
    assert torch.allclose(merged, trained, atol=1e-5) and torch.allclose(fresh, trained, atol=1e-5)
    assert all(not layer.lora_B["default"].weight.any() for layer in model.lora_layers)
    # the vectors still come from the original model, not the merged one
    assert torch.allclose(model.mean_head_activations(colour)[0], first, atol=1e-6)


def test_progressive_intervention_decays_over_the_task():
    colour = toy_tasks()[0]
    model = strategy(progressive_intervention=True, epochs=2)
    model.before_task(colour)
    model.train()
    batch, _ = encoded_batch(model, colour)
    model._step, model._steps_total = 0, 8
    with_vector = float(model.loss(batch, colour))
    plain = strategy(progressive_intervention=False, epochs=2)
    plain.before_task(colour)
    plain.train()
    model.lm.eval(), plain.lm.eval()  # no dropout: the two differ only by the intervention
    model._step = 8
    at_end = float(model.loss(batch, colour))
    assert at_end == pytest.approx(float(plain.loss(batch, colour)), abs=1e-6)
    model._step = 0
    assert float(model.loss(batch, colour)) != pytest.approx(at_end, abs=1e-6)
    model.learn(colour)
    assert model._step == model._steps_total == 2 * 4
    assert with_vector > 0


# --- end to end ------------------------------------------------------------------------------------

def test_iv_guided_runs_on_the_toy_stream_and_merges_each_task(tmp_path):
    cfg = compose(["scenario=instruct_toy", "model=tiny_llama", "strategy=iv_guided", "strategy.lr=0.01",
                   "strategy.batch_size=4", "strategy.epochs=3", "strategy.n_trials=20", "progress=false",
                   f"results_dir={tmp_path}", f"cache_dir={tmp_path}/c"])
    summary = run(cfg)
    assert summary["status"] == "finished" and summary["tasks_completed"] == 3
    assert all(p["trainable_params"] == 4 * 2 * (8 * 64 + 64 * 8) for p in summary["per_task"])
    assert summary["per_task"][0]["score"] > 70
    state = torch.load(Run(cfg).checkpoint_path, weights_only=True)["strategy"]
    # earlier tasks' LoRAs live in the merged q/v weights; the original copy is not checkpointed
    assert any(k.endswith("q_proj.base_layer.weight") for k in state)
    assert not any(k.startswith("original.") for k in state)
    extra = state["_extra_state"]
    assert len(extra["heads"]) == 10 and len(extra["function_vectors"]) == 3
    # the AIE heads are the top of the effect averaged over the three tasks (tiny_llama: 4 x 4 = 16 heads)
    assert extra["effect_tasks"] == 3
    average = extra["effect_total"] / 3
    assert min(average[l, h] for l, h in extra["heads"]) >= average.flatten().sort(descending=True).values[9]


# --- the vector's scale (issue 14) -----------------------------------------------------------------

def briefly_trained_llama(tasks, steps=12):
    """tiny_llama after a few AdamW steps on all ``tasks`` at once: its first answer token depends on
    the prompt (colour, shape -> r; size -> b), with some probability."""
    backbone = tiny_llama("text", ())
    optimizer = torch.optim.AdamW(backbone.model.parameters(), lr=0.01)
    prompts = [p for task in tasks for p in task.train.prompts]
    answers = [a for task in tasks for a in task.train.answers]
    encoded = backbone.training_batch(prompts, answers, "cpu")
    for _ in range(steps):
        optimizer.zero_grad()
        backbone.model(**encoded).loss.backward()
        optimizer.step()
    return backbone


def gold_probability(model, task, vector=None):
    """Mean probability of the gold first answer token in pass A's model (adapters off), with ``vector``
    added at (ℓ_edit, p_b) when given."""
    _, encoded = encoded_batch(model, task, count=8)
    inputs = {k: encoded[k] for k in ("input_ids", "attention_mask")}
    rows = torch.arange(8)
    first_answer = (encoded["labels"] != -100).int().argmax(1)
    edit = model.added_vector(vector, rows, first_answer - 1) if vector is not None else nullcontext()
    with model.reference_pass(), edit:
        logits = model.lm(**inputs).logits[rows, first_answer - 1]
    return float(logits.softmax(-1)[rows, encoded["labels"][rows, first_answer]].mean())


def test_residual_norm_is_the_stream_the_vector_joins_and_scales_the_vector():
    colour = toy_tasks()[0]
    model = strategy(edit_layer=2, n_trials=1000)
    means, residual_norm = model.mean_head_activations(colour)
    # independently: the input of layer 2's post-attention norm is layer 2's input plus its attention output
    norms = []
    hook = model.lm.get_submodule("base_model.model.model.layers.2.post_attention_layernorm").register_forward_pre_hook(
        lambda m, a: norms.append(float(a[0][0, -1].norm())))
    with torch.no_grad():
        for prompt in colour.train.prompts:
            model.lm(input_ids=torch.tensor([model.backbone.prompt_ids([prompt])[0]]))
    hook.remove()
    assert residual_norm == pytest.approx(sum(norms) / len(norms), rel=1e-5)
    model.vector_scale = "residual_norm"
    model.before_task(colour)
    assert float(model.function_vector.norm()) == pytest.approx(residual_norm, rel=1e-5)
    raw = strategy(edit_layer=2, n_trials=1000)  # the default: the raw vector, as the paper
    raw.before_task(colour)
    assert torch.allclose(raw.function_vector, model.vector_from_means(means), atol=1e-6)
    assert torch.allclose(model.function_vector, raw.function_vector * residual_norm / raw.function_vector.norm())
    with pytest.raises(UserError, match="vector_scale"):
        strategy(vector_scale="unit")


def test_scaled_vector_keeps_the_gold_answer_likely_and_an_oversized_one_does_not():
    tasks = toy_tasks()
    colour = tasks[0]
    # as the output-norm heads on SmolLM2: late-layer heads added early in the stream
    model = IVGuided(briefly_trained_llama(tasks), Context(generator=torch.Generator().manual_seed(0)),
                     heads="3:0,3:1,3:2,3:3", edit_layer=0, n_trials=16)
    model.before_task(colour)
    without = gold_probability(model, colour)
    assert without > 0.2  # the model has learnt something to lose
    assert gold_probability(model, colour, model.function_vector) >= without / 10
    # the same direction far above the stream's norm (on SmolLM2 the raw vector is ~3x it) drowns the prompt
    assert gold_probability(model, colour, 100 * model.function_vector) < without / 10


# --- heads by average indirect effect (issue 14) ---------------------------------------------------

def test_indirect_effects_equal_one_full_pass_per_corrupted_prompt_and_head():
    """The sweep runs the shared prefix once with a KV cache; the same effects from a full forward pass
    of every corrupted prompt alone, patched and unpatched, for a few heads."""
    tasks = toy_tasks()
    model = IVGuided(briefly_trained_llama(tasks), Context(generator=torch.Generator().manual_seed(0)),
                     aie_trials=6, aie_shots=2)
    means, _ = model.mean_head_activations(tasks[0])
    model.context.generator.manual_seed(1)
    effects = model.indirect_effects(tasks[0], means)
    model.context.generator.manual_seed(1)
    prompts, golds = model.corrupted_prompts(tasks[0])
    assert len(prompts) == 6 and len({len(p) for p in prompts}) > 1  # left padding is exercised
    # each query follows two demonstrations (prompt, answer, eos): three prompt renderings in all
    assert all(p.count(model.backbone.tokenizer.eos_token_id) >= 2 for p in prompts)

    def gold_probabilities(layer=None):
        result = []
        for ids, gold in zip(prompts, golds):
            with torch.no_grad(), (model.patched_head(layer, 2, means[layer, 2]) if layer is not None
                                   else nullcontext()):
                logits = model.original_forward(input_ids=torch.tensor([ids])).logits[0, -1]
            result.append(float(logits.softmax(-1)[gold]))
        return torch.tensor(result, dtype=torch.float64)
    corrupted = gold_probabilities()
    for layer in (0, 3):
        assert float(effects[layer, 2]) == pytest.approx(float((gold_probabilities(layer) - corrupted).mean()),
                                                          abs=1e-6)
    assert effects.abs().max() > 1e-4  # a trained model: patches move the gold token


def test_aie_heads_follow_the_average_over_tasks_seen_and_survive_a_checkpoint():
    tasks = toy_tasks()
    model = IVGuided(briefly_trained_llama(tasks), Context(generator=torch.Generator().manual_seed(0)),
                     top_heads=3, aie_trials=4, aie_shots=1, n_trials=8)
    model.before_task(tasks[0])
    first = model.effect_total.clone()
    assert model.heads == model.top(first) and model.effect_tasks == 1
    model.before_task(tasks[1])
    assert model.effect_tasks == 2 and model.heads == model.top(model.effect_total / 2)
    assert not torch.equal(model.effect_total, 2 * first)  # the second task's effects were added
    restored = IVGuided(briefly_trained_llama(tasks), Context(generator=torch.Generator().manual_seed(0)),
                        top_heads=3, aie_trials=4, aie_shots=1)
    restored.set_extra_state(model.get_extra_state())
    assert restored.heads == model.heads and restored.effect_tasks == 2
    assert torch.equal(restored.effect_total, model.effect_total)
    with pytest.raises(UserError, match="aie_trials"):
        strategy(aie_trials=0)

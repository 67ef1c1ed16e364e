"""Discrete Key-Value Bottleneck: the paper's 2-D toy experiment, the invariants of the method
(frozen keys, local value updates, voting decoder, usage masking, EMA key initialisation),
key-init data of other shapes and kinds, resume, and end-to-end runs."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_bench import outside_data
from cl_bench.config import compose
from cl_bench.errors import UserError
from cl_bench.models import factory
from cl_bench.models.backbone import FeatureCache, VectorBackbone
from cl_bench.registry import SCENARIOS, STRATEGIES
from cl_bench.runner import Run, run
from cl_bench.scenarios.base import Samples, Stream, Task
from cl_bench.scenarios.chatterbot import ChatterBot
from cl_bench.strategies.base import Context
from cl_bench.strategies.dkvb import DKVB

if "dkvb" not in STRATEGIES.names():
    STRATEGIES.register("dkvb", DKVB)
if "chatterbot" not in SCENARIOS.names():
    SCENARIOS.register("chatterbot", ChatterBot)

# --- the paper's toy experiment (Fig. 2; notebooks/reproduce_experiments_figure_2.ipynb) -----------
# 8 Gaussian classes (sigma 0.035) in the unit square, 4 stages of 2 classes; relabelled here so that
# stage t holds classes 2t and 2t+1 (the notebook's pairs (0,4), (1,5), (2,6), (3,7)).
TOY_MEANS = [[(.25, .25), (.75, .5)], [(.75, .25), (.5, .75)], [(.75, .75), (.25, .5)], [(.25, .75), (.5, .25)]]


def toy_stage(stage: int, count: int, rng: np.random.Generator) -> Samples:
    which = rng.integers(0, 2, count)
    points = np.asarray(TOY_MEANS[stage])[which] + rng.normal(0, 0.035, (count, 2))
    return Samples(torch.tensor(points, dtype=torch.float32), torch.tensor(2 * stage + which))


def toy_tasks(seed=0, train=100, test=250):
    rng = np.random.default_rng(seed)
    return [Task(s, f"task{s + 1}", toy_stage(s, train, rng), toy_stage(s, test, rng), (2 * s, 2 * s + 1))
            for s in range(4)]


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(1) == targets).float().mean())


@pytest.mark.parametrize("values", ["fixed", "growing"])
def test_toy_2d_bottleneck_keeps_all_stages_while_an_mlp_forgets(values):
    """Spec 3.6: identity encoder, 1 codebook of 400 pairs on the raw 2-D input ("chunk"), keys from
    1000 EMA steps on 100 fresh uniform points each (no dead-key replacement), values 1e-3 N(0,1),
    Adam lr 1e-3, 1000 full-batch steps per stage, plain cross-entropy. MLP 2-32-8: fresh Adam per stage.
    The notebook's values have all 8 columns from the start (values=fixed); growing adds 2 per stage."""
    torch.manual_seed(0)
    tasks = toy_tasks()
    test = tasks[0].test
    for task in tasks[1:]:
        test = test.concat(task.test)

    context = Context(generator=torch.Generator().manual_seed(0), num_classes=8)
    dkvb = DKVB(VectorBackbone(nn.Identity(), 2), context, key_init_data="toy", values=values,
                num_codebooks=1, keys_per_codebook=400, key_dim=2, splitter="chunk", dead_key_threshold=0.0,
                value_init_std=1e-3, optimizer="adam", lr=1e-3, epochs=1000, batch_size=100,
                label_smoothing=0.0, grad_clip=0.0)
    uniform = torch.Generator().manual_seed(1)
    dkvb.fit_keys(torch.rand(100, 2, generator=uniform) for _ in range(1000))
    keys = dkvb.keys.clone()
    for task in tasks:
        dkvb.before_task(task)  # growing: values gain 2 columns; fixed: nothing happens
        dkvb.learn(task)  # keys are fitted already: learn does not fit them again
    dkvb.eval()
    dkvb_accuracy = accuracy(dkvb.predict(test.inputs), test.targets)

    mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 8))
    for task in tasks:
        optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-3)
        for _ in range(1000):
            optimizer.zero_grad()
            F.cross_entropy(mlp(task.train.inputs), task.train.targets).backward()
            optimizer.step()
    with torch.no_grad():
        mlp_accuracy = accuracy(mlp(test.inputs), test.targets)

    print(f"toy 2-D, 8 classes after 4 stages: DKVB ({values}) {dkvb_accuracy:.4f}, MLP {mlp_accuracy:.4f}")
    assert torch.equal(dkvb.keys, keys)  # bit-identical through all four stages
    assert dkvb_accuracy >= 0.95 and mlp_accuracy <= 0.5
    assert dkvb_accuracy - mlp_accuracy >= 0.30


# --- invariants on small random settings -----------------------------------------------------------
def vectors(count, dim=16, classes=(0, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    return Samples(torch.randn(count, dim, generator=g), torch.tensor(classes)[torch.randint(len(classes), (count,),
                                                                                          generator=g)])


def small(backbone=None, seed=0, num_classes=None, **settings):
    """A DKVB with a fitted codebook on 16-d features (keys from standard-normal vectors); growing values
    unless told otherwise (``num_classes``: the stream's class count lent for values=fixed)."""
    options = dict(key_init_data="toy", values="growing", num_codebooks=8, keys_per_codebook=64, key_dim=3,
                   batch_size=32, epochs=2)
    options.update(settings)
    context = Context(generator=torch.Generator().manual_seed(seed), num_classes=num_classes)
    strategy = DKVB(backbone or VectorBackbone(nn.Identity(), 16), context, **options)
    g = torch.Generator().manual_seed(100 + seed)
    strategy.fit_keys(torch.randn(32, 16, generator=g) for _ in range(20))
    return strategy


def task(index, count=64, seed=0):
    classes = (2 * index, 2 * index + 1)
    return Task(index, f"task{index + 1}", vectors(count, classes=classes, seed=seed),
                vectors(count, classes=classes, seed=seed + 1000), classes)


def test_keys_projection_and_encoder_never_change_and_only_values_train():
    backbone = factory.mlp("vector", (16,), hidden=16)  # not frozen: DKVB runs (and freezes) it itself
    strategy = small(backbone)
    frozen = {name: tensor.clone() for name, tensor in strategy.state_dict().items()
              if isinstance(tensor, torch.Tensor) and name != "values"}
    for t in range(3):
        strategy.before_task(task(t, seed=t))
        strategy.learn(task(t, seed=t))
    assert [name for name, p in strategy.named_parameters() if p.requires_grad] == ["values"]
    assert "keys" not in dict(strategy.named_parameters())
    after = strategy.state_dict()
    for name, tensor in frozen.items():
        if name != "usage":
            assert torch.equal(after[name], tensor), name
    assert after["usage"].sum() == 3 * 2 * 64 * 8  # tasks x epochs x samples x codebooks (top-1)
    assert not strategy.backbone.training and strategy.values.shape == (8, 64, 6)


def fetched_rows(strategy, inputs):
    with torch.no_grad():
        index = strategy.nearest(strategy.heads(strategy.embed(inputs)), strategy.top_k)
    mask = torch.zeros(strategy.values.shape[:2], dtype=torch.bool)
    mask[torch.arange(len(index)).view(-1, 1, 1), index] = True
    return mask


def one_step(strategy, optimizer, samples):
    strategy.train()
    loss = F.cross_entropy(strategy(samples.inputs), samples.targets, label_smoothing=strategy.label_smoothing)
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_([strategy.values], strategy.grad_clip)
    optimizer.step()


def test_fixed_values_cover_every_class_from_the_first_task_and_train_only_fetched_pairs():
    """values=fixed (the paper's): d_v = all 6 classes of the stream before task 1, never resized; a
    task trains exactly the pairs it fetched, in every column (softmax and smoothing span all classes),
    and prediction masks no class: the 4 classes not yet seen get equal, finite logits, below a seen one
    (each step moves a pair's unseen columns down by what its seen columns gain)."""
    strategy = small(values="fixed", num_classes=6)
    assert strategy.values.shape == (8, 64, 6) and not strategy.values.any()
    strategy.before_task(task(0))
    strategy.learn(task(0))
    assert strategy.values.shape == (8, 64, 6)
    fetched = strategy.usage > 0
    assert 0 < fetched.sum() < fetched.numel()
    assert not strategy.values[~fetched].any()  # pairs no sample fetched keep their zero values
    assert (strategy.values[fetched] != 0).all()  # fetched pairs moved in every class column, unseen ones too
    strategy.eval()
    test = task(0).test
    logits = strategy.predict(test.inputs)
    assert logits.shape == (len(test), 6) and torch.isfinite(logits).all()
    assert torch.equal(logits[:, 2:], logits[:, 2:3].expand(-1, 4))  # no class is masked, unseen ones tie
    assert (logits[:, 2] < 0).all() and (logits.argmax(1) < 2).all()


def test_values_size_is_checked():
    backbone = VectorBackbone(nn.Identity(), 16)
    with pytest.raises(UserError, match="values=fixed .* no class count was lent"):
        DKVB(backbone, Context(), key_init_data="toy")
    with pytest.raises(UserError, match="strategy.values must be one of fixed, growing, got 'grow'"):
        DKVB(backbone, Context(num_classes=4), key_init_data="toy", values="grow")


def test_sgd_step_changes_exactly_the_fetched_values():
    """The authors' optimiser (plain SGD, clipping, label smoothing): rows no sample fetched stay bit-identical."""
    strategy = small(top_k=2)
    strategy.before_task(task(0))
    strategy.values.data.normal_()
    batch = vectors(32)
    fetched = fetched_rows(strategy, batch.inputs)
    before = strategy.values.detach().clone()
    one_step(strategy, strategy.make_optimizer(), batch)
    changed = (strategy.values.detach() != before).any(-1)
    assert 0 < fetched.sum() < fetched.numel()
    assert torch.equal(changed, fetched)


def test_adam_moves_values_fetched_in_earlier_steps_only():
    """With Adam (the toy experiment's optimiser) locality holds per task, not per step: rows fetched by
    an earlier batch keep moving on their moments; rows never fetched stay bit-identical."""
    strategy = small(optimizer="adam", lr=1e-2)
    strategy.before_task(task(0))
    first, second = vectors(32, seed=1), vectors(32, seed=2)
    only_first = fetched_rows(strategy, first.inputs) & ~fetched_rows(strategy, second.inputs)
    never = ~fetched_rows(strategy, first.inputs) & ~fetched_rows(strategy, second.inputs)
    optimizer = strategy.make_optimizer()
    one_step(strategy, optimizer, first)
    pushed = (strategy.values.grad != 0).any(-1)  # a row whose samples' gradients cancel gets no moment
    before = strategy.values.detach().clone()
    one_step(strategy, optimizer, second)
    changed = (strategy.values.detach() != before).any(-1)
    assert (only_first & pushed).any() and changed[only_first & pushed].all()
    assert not changed[never].any()


def test_zero_values_give_zero_logits_and_decoder_averages_fetched_values():
    strategy = small(top_k=2)
    strategy.before_task(task(0))
    inputs = vectors(5).inputs
    strategy.train()
    assert torch.equal(strategy(inputs), torch.zeros(5, 2))  # authors' zero-initialised values
    strategy.values.data.normal_()
    heads = strategy.heads(inputs)  # identity encoder: features are the inputs
    expected = torch.zeros(5, 2)
    for c in range(8):
        distance = ((heads[c].unsqueeze(1) - strategy.keys[c].unsqueeze(0)) ** 2).sum(-1)  # (B, M)
        for b in range(5):
            expected[b] += strategy.values[c, distance[b].argsort()[:2]].sum(0).detach() / 8
    torch.testing.assert_close(strategy(inputs).detach(), expected)


def test_evaluation_never_fetches_a_pair_unused_in_training():
    strategy = small(keys_per_codebook=256)
    strategy.before_task(task(0))
    strategy.learn(task(0))
    strategy.eval()
    test = vectors(200, seed=7).inputs
    heads = strategy.heads(test)
    unused = strategy.usage == 0
    masked = strategy.nearest(heads, 1, excluded=unused)[..., 0]
    plain = strategy.nearest(heads, 1)[..., 0]
    assert not unused.gather(1, masked).any()
    assert unused.gather(1, plain).any()  # without the mask some test heads would land on unused pairs
    strategy.values.data.normal_()
    codebook = torch.arange(8).view(-1, 1)
    torch.testing.assert_close(strategy.predict(test), strategy.values[codebook, masked].mean(0).detach())


def test_ema_key_init_with_no_memory_moves_keys_to_means_and_zeroes_unassigned_keys():
    """Spec 3.7 item 6: decay 0, no dead keys: a key that got heads becomes their mean (up to the
    epsilon smoothing), a key that got none becomes the zero vector (unlike a Lloyd step)."""
    strategy = DKVB(VectorBackbone(nn.Identity(), 6), Context(generator=torch.Generator().manual_seed(0)),
                    key_init_data="toy", values="growing", num_codebooks=2, keys_per_codebook=16, key_dim=3,
                    decay=0.0, dead_key_threshold=0.0)
    features = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    heads = strategy.heads(features)
    assigned = strategy.nearest(heads, 1)[..., 0]
    strategy.fit_keys([features])
    for c in range(2):
        for j in range(16):
            members = heads[c][assigned[c] == j]
            if len(members):
                torch.testing.assert_close(strategy.keys[c, j], members.mean(0), atol=1e-4, rtol=1e-4)
            else:
                assert torch.equal(strategy.keys[c, j], torch.zeros(3))
    assert (assigned[0].bincount(minlength=16) == 0).any()  # the zero case was exercised
    assert strategy.keys_fitted and strategy.usage.sum() == 0


def test_dead_keys_are_replaced_by_heads_of_the_batch():
    strategy = DKVB(VectorBackbone(nn.Identity(), 6), Context(generator=torch.Generator().manual_seed(0)),
                    key_init_data="toy", values="growing", num_codebooks=2, keys_per_codebook=16, key_dim=3,
                    batch_size=4, dead_key_threshold=1.0)  # 1.0 * 4 / 16 = 0.25 > every EMA count after one step
    features = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    strategy.fit_keys([features])
    heads = strategy.heads(features)
    for c in range(2):
        distance = ((strategy.keys[c].unsqueeze(1) - heads[c].unsqueeze(0)) ** 2).sum(-1)
        assert torch.equal(distance.min(1).values, torch.zeros(16))  # each key is one of the batch's heads


# --- resume --------------------------------------------------------------------------------------
def test_state_dict_into_a_fresh_strategy_gives_identical_predictions():
    strategy = small(seed=0)
    for t in range(2):
        strategy.before_task(task(t, seed=t))
        strategy.learn(task(t, seed=t))
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    buffer.seek(0)
    fresh = DKVB(VectorBackbone(nn.Identity(), 16), Context(generator=torch.Generator().manual_seed(5)),
                 key_init_data="toy", values="growing", num_codebooks=8, keys_per_codebook=64, key_dim=3, batch_size=32)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    strategy.eval(), fresh.eval()
    inputs = vectors(100, seed=9).inputs
    assert bool(fresh.keys_fitted) and fresh.values.shape == (8, 64, 4)
    assert torch.equal(fresh.predict(inputs), strategy.predict(inputs))
    fresh.before_task(task(2))
    fresh.learn(task(2))  # fitted keys are kept: no key-init data is loaded after a resume
    assert torch.equal(fresh.keys, strategy.keys)


# --- key-initialisation data from another scenario -------------------------------------------------
def test_key_init_images_of_another_shape_map_to_the_same_features_frozen_or_not(tmp_path):
    """digits (1x8x8) keys for a 1x28x28 stream: the backbone's prepare resizes; the frozen path
    (cached features + identity backbone, via context.featurize) equals running the backbone."""
    torch.manual_seed(0)
    backbone = factory.vit_tiny_test("image", (1, 28, 28), image_size=32)
    settings = dict(key_init_data="digits", values="growing", key_init_samples=50, num_codebooks=4,
                    keys_per_codebook=16, key_dim=4, batch_size=16)
    digits = outside_data.load(DKVB, {"key_init_data": "digits"})
    direct = DKVB(backbone, Context(generator=torch.Generator().manual_seed(3), outside=digits), **settings)
    features = direct.key_init_features()
    assert features.shape == (50, 64)

    frozen = factory.vit_tiny_test("image", (1, 28, 28), image_size=32, frozen=True)
    frozen.load_state_dict(backbone.state_dict())
    cache = FeatureCache(tmp_path)
    context = Context(generator=torch.Generator().manual_seed(3), outside=digits,
                      featurize=lambda samples: Samples(cache.encode(frozen, samples), samples.targets))
    cached = DKVB(VectorBackbone(nn.Identity(), 64), context, **settings)
    torch.testing.assert_close(cached.key_init_features(), features, atol=1e-5, rtol=1e-5)
    first = Task(0, "task1", Samples(torch.zeros(2, 64), torch.tensor([0, 1])),
                 Samples(torch.zeros(2, 64), torch.tensor([0, 1])), (0, 1))
    cached.before_task(first)
    cached.learn(first)
    assert cached.keys_fitted and torch.isfinite(cached.keys).all()


def test_text_keys_come_from_the_chatterbot_corpus():
    backbone = factory.minilm("text", (), frozen=False)
    chatterbot = outside_data.load(DKVB, {"key_init_data": "chatterbot"})
    strategy = DKVB(backbone, Context(outside=chatterbot), key_init_data="chatterbot", values="growing",
                    key_init_samples=24, num_codebooks=4, keys_per_codebook=8, key_dim=4, batch_size=12)
    features = strategy.key_init_features()
    assert features.shape == (24, 384) and not any(p.requires_grad for p in strategy.backbone.parameters())
    strategy.fit_keys(strategy.feature_batches(features))
    assert strategy.keys_fitted and torch.isfinite(strategy.keys).all()


def test_chatterbot_scenario_is_a_clean_text_split():
    stream = ChatterBot().stream()
    assert stream.input_kind == "text" and stream.num_classes == 21 and len(stream) == 7
    train = [text for t in stream.tasks for text in t.train.inputs]
    test = [text for t in stream.tasks for text in t.test.inputs]
    assert len(set(train)) == len(train) and not set(train) & set(test) and len(train) + len(test) > 1800
    assert all(len(t.test) for t in stream.tasks)


def stream_of(name: str, input_kind: str) -> Stream:
    return Stream(name, "classes", (), input_kind)


@pytest.mark.parametrize("stream_name, input_kind, picked", [
    ("fmnist", "image", "digits"), ("cifar100", "image", "digits"), ("digits", "image", "fmnist"),
    ("wordnet", "text", "chatterbot"), ("chatterbot", "text", "wordnet")])
def test_auto_key_init_data_is_another_scenario_of_the_streams_modality(stream_name, input_kind, picked):
    settings = {"key_init_data": "auto", "key_init_args": None, "num_codebooks": 4}
    resolved = outside_data.resolve_auto(DKVB, settings, stream_of(stream_name, input_kind))
    assert resolved == {**settings, "key_init_data": picked} and settings["key_init_data"] == "auto"
    assert SCENARIOS.get(picked).input_kind == input_kind


def test_auto_never_picks_the_stream_and_names_only_offline_scenarios_of_their_kind():
    for input_kind, names in outside_data.OFFLINE_BY_INPUT_KIND.items():
        for name in names:
            assert SCENARIOS.get(name).input_kind == input_kind, name
            resolved = outside_data.resolve_auto(DKVB, {"key_init_data": "auto"}, stream_of(name, input_kind))
            assert resolved["key_init_data"] not in ("auto", name)
    explicit = {"key_init_data": "digits"}
    assert outside_data.resolve_auto(DKVB, explicit, stream_of("digits", "image")) == explicit  # the guard's job


def test_auto_without_another_scenario_of_the_kind_fails_with_one_clear_line():
    with pytest.raises(UserError, match="strategy.key_init_data=auto knows no offline scenario of vector inputs "
                                        "other than 'toy'; name one"):
        outside_data.resolve_auto(DKVB, {"key_init_data": "auto"}, stream_of("toy", "vector"))


def test_bad_key_init_settings_fail_with_one_clear_line():
    backbone = VectorBackbone(nn.Identity(), 16)
    with pytest.raises(UserError, match="key_init_data.*unknown scenario 'digit'.*digits"):
        outside_data.load(DKVB, {"key_init_data": "digit"})
    with pytest.raises(UserError, match="key_init_args: scenario 'toy' has no key 'data_sed'.*data_seed"):
        outside_data.load(DKVB, {"key_init_data": "toy", "key_init_args": {"data_sed": 1}})
    with pytest.raises(UserError, match="chunk"):
        DKVB(backbone, Context(), key_init_data="toy", values="growing", splitter="chunk", num_codebooks=3,
             key_dim=4)
    mlp = factory.mlp("vector", (16,), hidden=8)  # digits are 64-d when flattened
    strategy = DKVB(mlp, Context(outside=outside_data.load(DKVB, {"key_init_data": "digits"})),
                    key_init_data="digits", values="growing", num_codebooks=2, keys_per_codebook=4, key_dim=2)
    strategy.before_task(task(0))
    with pytest.raises(UserError, match="cannot encode key_init_data 'digits'"):
        strategy.learn(task(0))


# --- through the runner ------------------------------------------------------------------------------
def smoke_config(directory, *extra):
    return compose([*DKVB.smoke_args, "strategy=dkvb", "strategy.epochs=2", "progress=false",
                    f"results_dir={directory}", f"cache_dir={directory}/cache", "model.frozen=true", *extra])


def scores(cfg) -> str:
    return (Run(cfg).directory / "scores.csv").read_text()


def test_runner_trains_only_values_on_cached_features_and_resumes_to_identical_scores(tmp_path, monkeypatch):
    """model.frozen=true: keys come from context.featurize (cached features of the key-init data);
    growing values, so a checkpoint's values are narrower than the fresh strategy's."""
    def growing(directory):
        return smoke_config(directory, "strategy.values=growing")

    summary = run(growing(tmp_path / "a"))
    assert summary["status"] == "finished" and summary["metrics"]["acc_final_task_mean"] > 70
    C, M = 32, 256  # the smoke settings
    assert [p["trainable_params"] for p in summary["per_task"]] == [C * M * 2, C * M * 4, C * M * 6]

    original = DKVB.learn

    def learn_then_interrupt(self, task):
        if task.index == 2:
            raise KeyboardInterrupt
        return original(self, task)

    monkeypatch.setattr(DKVB, "learn", learn_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(growing(tmp_path / "b"))
    checkpoint = torch.load(Run(growing(tmp_path / "b")).checkpoint_path, weights_only=True)
    assert checkpoint["strategy"]["values"].shape == (C, M, 4) and bool(checkpoint["strategy"]["keys_fitted"])
    monkeypatch.setattr(DKVB, "learn", original)
    monkeypatch.setattr(DKVB, "key_init_features", lambda self: pytest.fail("keys were fitted again"))
    resumed = run(growing(tmp_path / "b"))
    assert resumed["status"] == "finished"
    assert scores(growing(tmp_path / "b")) == scores(growing(tmp_path / "a"))


def test_runner_default_values_are_fixed_for_every_class_and_the_card_says_so(tmp_path):
    summary = run(smoke_config(tmp_path))
    C, M = 32, 256  # the smoke settings; the toy stream has 6 classes
    assert summary["status"] == "finished" and summary["metrics"]["acc_final_task_mean"] > 70
    assert [p["trainable_params"] for p in summary["per_task"]] == [C * M * 6] * 3
    card = summary["protocol"]
    assert card["switches"]["values"] == {"value": "fixed", "paper": "fixed"}
    assert card["task_identity_train"] == "none"

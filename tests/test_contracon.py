"""ConTraCon: Q/K/V re-weighting, per-task parameter formula, frozen old tasks, entropic task id,
test-time views against Pillow, resume, and a run through the harness."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from cl_bench.config import compose
from cl_bench.errors import UserError
from cl_bench.models.cct import cct
from cl_bench.models.factory import mlp, vit_tiny_test
from cl_bench.registry import MODELS, STRATEGIES
from cl_bench.runner import run
from cl_bench.scenarios.base import Samples, Task
from cl_bench.strategies.base import Context
from cl_bench.strategies.contracon import (ConTraCon, Reweighting, autoaugment_views, entropic_task_choice,
                                           entropy_views)

if "contracon" not in STRATEGIES.names():
    STRATEGIES.register("contracon", ConTraCon)
if "cct" not in MODELS.names():
    MODELS.register("cct", cct)

POSITIONS = [(r, c) for r in (0, 2, 4, 6) for c in (0, 2, 4, 6)]


def tiny_cct(seed=0):
    torch.manual_seed(seed)
    return cct("image", (1, 8, 8), image_size=8, embed_dim=16, depth=2, num_heads=2)


def synthetic_tasks(count=3, classes_per_task=2, per_class=12, seed=0):
    """Grey 8x8 images: class c has a bright 2x2 square at its own position."""
    generator = torch.Generator().manual_seed(seed)

    def samples(labels):
        images = torch.randint(0, 60, (len(labels), 1, 8, 8), generator=generator).to(torch.uint8)
        for i, label in enumerate(labels.tolist()):
            r, c = POSITIONS[label % len(POSITIONS)]
            images[i, 0, r:r + 2, c:c + 2] = 255
        return Samples(images, labels)

    tasks = []
    for t in range(count):
        labels = torch.arange(t * classes_per_task, (t + 1) * classes_per_task).repeat(per_class)
        tasks.append(Task(t, f"task{t}", samples(labels), samples(labels[: 2 * classes_per_task]),
                          classes=tuple(range(t * classes_per_task, (t + 1) * classes_per_task))))
    return tasks


# --- Q/K/V re-weighting -------------------------------------------------------------------------

def test_reweighting_orientation_and_per_head_blocks():
    torch.manual_seed(0)
    base = torch.randn(3 * 2 * 4, 10)  # fused qkv of 2 heads of width 4 over D = 10
    reweighting = Reweighting(blocks=6, kernel_size=3)
    with torch.no_grad():
        reweighting.kernel.zero_()
        reweighting.bias.zero_()
        reweighting.gate.fill_(-1e4)
        reweighting.kernel[:, 0, 1, 1] = 1  # centre delta, closed gate: the base weight itself
        torch.testing.assert_close(reweighting(base), base)
        reweighting.kernel.zero_()
        reweighting.gate.fill_(0.7)  # no kernel: the gated skip alone
        torch.testing.assert_close(reweighting(base), torch.sigmoid(torch.tensor(0.7)) * base)
        reweighting.gate.fill_(-1e4)
        reweighting.kernel[:, 0, 2, 1] = 1  # cross-correlation: row i reads row i + 1 of its own head block
        reweighting.bias.fill_(0.5)
        expected = torch.zeros(6, 4, 10)
        expected[:, :3] = base.view(6, 4, 10)[:, 1:]  # a block's last row sees zero padding, not the next head
        torch.testing.assert_close(reweighting(base), expected.view_as(base) + 0.5)


def test_task_weights_start_from_conv_default_init_and_gates_of_one():
    strategy = ConTraCon(tiny_cct(), Context(), kernel_size=5)
    tasks = synthetic_tasks(2)
    for task in tasks:
        strategy.before_task(task)
    qkv = strategy.backbone.net.blocks[0].attn.qkv
    reweighting = qkv.tasks["1"]
    assert reweighting.kernel.shape == (6, 1, 5, 5) and torch.equal(reweighting.gate, torch.ones(6, 1, 1))
    assert reweighting.kernel.abs().max() <= 1 / 5 and reweighting.bias.abs().max() <= 1 / 5
    assert qkv.weight(1).shape == qkv.base.weight.shape and not torch.equal(qkv.weight(1), qkv.base.weight)
    norm = strategy.backbone.net.blocks[0].norm1.copies[1]
    assert torch.equal(norm.weight, torch.ones(16)) and torch.equal(norm.bias, torch.zeros(16))


# --- parameters per task ------------------------------------------------------------------------

def fake_task(index, classes):
    empty = Samples(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    return Task(index, f"task{index}", empty, empty, classes=tuple(classes))


def test_parameters_per_task_match_the_formula_for_cct6():
    """Spec Sec. 2.3: P_t = L[3H(k²+1) + 3H + 4D] + (D+1) + (D·C_t + C_t) = 25,315 for CCT-6, k 15, 10 classes."""
    torch.manual_seed(0)
    backbone = cct("image", (3, 32, 32))  # CCT-6: L 6, H 4, D 256
    strategy = ConTraCon(backbone, Context(), kernel_size=15)
    strategy.before_task(fake_task(0, range(10)))
    base_size = sum(p.numel() for p in strategy.parameters())
    assert sum(p.numel() for p in strategy.parameters() if p.requires_grad) == base_size == 3_163_649 + 2_570
    L, H, D, k = 6, 4, 256, 15
    for t, classes in [(1, range(10, 20)), (2, range(20, 40))]:
        strategy.before_task(fake_task(t, classes))
        classes = len(classes)
        formula = L * (3 * H * (k * k + 1) + 3 * H + 4 * D) + (D + 1) + (D * classes + classes)
        assert sum(p.numel() for p in strategy.parameters() if p.requires_grad) == formula
    assert formula == 27_885 and L * (3 * H * (k * k + 1) + 3 * H + 4 * D) + (D + 1) + (D * 10 + 10) == 25_315
    assert sum(p.numel() for p in strategy.parameters()) == base_size + 25_315 + 27_885


def test_parameters_per_task_on_a_timm_vit():
    """A ViT has no pool scorer; its per-task norms are norm1, norm2 of every block and the final norm."""
    torch.manual_seed(0)
    strategy = ConTraCon(vit_tiny_test("image", (1, 8, 8), image_size=8), Context(), kernel_size=5)
    strategy.before_task(fake_task(0, range(3)))
    strategy.before_task(fake_task(1, range(3, 6)))
    L, H, D, k, C = 2, 2, 64, 5, 3
    formula = L * (3 * H * (k * k + 1) + 3 * H + 4 * D) + 2 * D + (D * C + C)
    assert sum(p.numel() for p in strategy.parameters() if p.requires_grad) == formula


# --- training freezes everything but the current task -----------------------------------------

def test_only_the_current_task_trains_and_older_tasks_stay_bit_identical():
    strategy = ConTraCon(tiny_cct(), Context(generator=torch.Generator().manual_seed(0)), epochs=2,
                         batch_size=8, lr=3e-3, kernel_size=3)
    tasks = synthetic_tasks(3)
    for task in tasks[:2]:
        strategy.before_task(task)
        strategy.learn(task)
    before = {k: v.clone() for k, v in strategy.state_dict().items() if isinstance(v, torch.Tensor)}
    strategy.before_task(tasks[2])
    own = (".tasks.2.", ".copies.2.", "heads.2.")
    names = {name for name, p in strategy.named_parameters() if p.requires_grad}
    assert names == {name for name, _ in strategy.named_parameters() if any(tag in name for tag in own)}
    assert names.isdisjoint(before)
    initial = {name: p.detach().clone() for name, p in strategy.named_parameters() if name in names}
    strategy.learn(tasks[2])
    after = strategy.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed while training task 3"
    learnt = [name for name in names if name.endswith(("kernel", "gate", "heads.2.weight"))]
    assert len(learnt) == 2 * 2 + 1 and all(not torch.equal(after[n], initial[n]) for n in learnt)


# --- entropic task identification ---------------------------------------------------------------

def test_entropic_task_choice_by_hand():
    uniform, confident, certain = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[9.0, 0.0]])
    # p = (0.8808, 0.1192): -(0.8808 ln 0.8809 + 0.1192 ln 0.1193) = 0.3651, below ln 2 = 0.6931 for uniform
    p = torch.softmax(confident, 1)
    assert float(-(p * torch.log(p + 1e-4)).sum()) == pytest.approx(0.3651, abs=1e-4)
    assert entropic_task_choice([uniform, confident, certain]).tolist() == [2]
    assert entropic_task_choice([confident, uniform]).tolist() == [0]
    assert entropic_task_choice([confident, confident.clone()]).tolist() == [0]  # ties: lowest index
    batch = [torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]), torch.tensor([[4.0, 0.0], [0.0, 0.0]])]
    assert entropic_task_choice(batch).tolist() == [1, 0]  # heads may differ in size


def test_entropy_selection_finds_the_right_task_on_separable_synthetic_tasks(monkeypatch):
    """Heads that are confident only on their own task (bright square at one of the task's two
    positions, nothing there otherwise): every sample goes to its task and class through the views."""
    tasks = synthetic_tasks(3, per_class=4)
    strategy = ConTraCon(tiny_cct(), Context(), kernel_size=3)
    for task in tasks:
        strategy.before_task(task)

    def task_logits(prepared, task):
        cells = [prepared[:, 0, r:r + 2, c:c + 2].mean(dim=(1, 2)) for r, c in POSITIONS[2 * task:2 * task + 2]]
        return 3 * torch.stack(cells, dim=1)

    monkeypatch.setattr(strategy, "task_logits", task_logits)
    strategy.eval()
    for task in tasks:
        logits = strategy.predict(task.test.inputs)
        assert logits.shape == (len(task.test), 6)
        assert torch.equal(logits.argmax(1), task.test.targets)
        own = list(task.classes)  # the runner's til mask keeps the task's own head
        assert torch.equal(logits[:, own].argmax(1) + own[0], task.test.targets)


def pillow_views(image: Image.Image) -> list[Image.Image]:
    """The authors' ten test-time operations, written directly against Pillow."""
    width, height = image.size
    fill = 128 if image.mode == "L" else (128, 128, 128)
    far, near = 150 / 331, 150 / 331 / 3

    def shift(x=0.0, y=0.0):
        return image.transform(image.size, Image.AFFINE, (1, 0, x, 0, 1, y), fillcolor=fill)

    return [ImageEnhance.Contrast(image).enhance(1.6), shift(x=far * width), shift(y=far * height),
            ImageEnhance.Sharpness(image).enhance(1.3), ImageOps.equalize(image), ImageOps.invert(image),
            ImageOps.posterize(image, 5), shift(x=near * width), ImageEnhance.Brightness(image).enhance(1.7),
            ImageEnhance.Brightness(image).enhance(1.9)]


@pytest.mark.parametrize("channels, height, width", [(3, 32, 32), (1, 28, 28), (3, 13, 17)])
def test_autoaugment_views_match_pillow(channels, height, width):
    generator = torch.Generator().manual_seed(channels * height)
    images = torch.randint(0, 256, (3, channels, height, width), generator=generator, dtype=torch.uint8)
    images[1] = images[1] // 5 + 90  # low contrast: equalize and contrast do real work
    images[2, :, : height // 2] = 0  # large flat region: a skewed histogram
    ours = autoaugment_views(images)
    for b in range(len(images)):
        array = images[b].permute(1, 2, 0).numpy()
        reference = pillow_views(Image.fromarray(array[..., 0] if channels == 1 else array))
        for v, view in enumerate(reference):
            expected = torch.from_numpy(np.array(view)).float().reshape(height, width, channels).permute(2, 0, 1)
            assert torch.equal(ours[v][b], expected), f"view {v + 1} differs from Pillow"


def test_views_are_deterministic_and_per_image():
    images = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for kind in ("autoaugment", "gaussian"):
        first, again = entropy_views(images, kind, seed=5), entropy_views(images, kind, seed=5)
        assert len(first) == 10 and all(torch.equal(a, b) for a, b in zip(first, again))
    single = entropy_views(images[2:3], "autoaugment", seed=5)
    assert all(torch.equal(a[2:3], b) for a, b in zip(entropy_views(images, "autoaugment", seed=5), single))
    assert not torch.equal(entropy_views(images, "gaussian", 5)[0], entropy_views(images, "gaussian", 6)[0])


# --- resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["cct", "vit"])
def test_state_dict_round_trip_gives_identical_predictions(model):
    def fresh(seed):
        backbone = tiny_cct(seed) if model == "cct" else vit_tiny_test("image", (1, 8, 8), image_size=8, embed_dim=16)
        return ConTraCon(backbone, Context(generator=torch.Generator().manual_seed(seed)), epochs=1,
                         batch_size=8, kernel_size=3)

    strategy = fresh(0)
    tasks = synthetic_tasks(3)
    for task in tasks[:2]:
        strategy.before_task(task)
        strategy.learn(task)
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    buffer.seek(0)
    restored = fresh(1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.num_tasks == 2 and restored.task_classes == [[0, 1], [2, 3]]
    inputs = torch.cat([task.test.inputs for task in tasks[:2]])
    strategy.eval()
    restored.eval()
    assert torch.equal(strategy.predict(inputs), restored.predict(inputs))
    restored.before_task(tasks[2])  # and it carries on with the next task
    assert restored.predict(inputs).shape == (len(inputs), 6)


# --- settings and the harness ---------------------------------------------------------------

def test_bad_settings_fail_clearly():
    with pytest.raises(UserError, match="model=cct"):
        ConTraCon(mlp("image", (1, 8, 8)), Context())
    with pytest.raises(UserError, match="odd"):
        ConTraCon(tiny_cct(), Context(), kernel_size=4)
    with pytest.raises(UserError, match="views"):
        ConTraCon(tiny_cct(), Context(), views="random")
    strategy = ConTraCon(tiny_cct(), Context())
    strategy.before_task(synthetic_tasks(1)[0])
    with pytest.raises(UserError, match="uint8"):
        strategy.predict(torch.zeros(2, 1, 8, 8))


def test_runs_in_the_harness_with_its_smoke_settings(tmp_path):
    """What the registry-wide smoke test does, plus the trainable parameters the summary reports."""
    cfg = compose([*ConTraCon.smoke_args, "strategy=contracon", "strategy.epochs=3", "eval_mode=til",
                   "progress=false", f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache"])
    summary = run(cfg)
    assert summary["status"] == "finished" and summary["tasks_completed"] == 5
    assert summary["per_task"][0]["score"] > 70
    assert summary["metrics"]["acc_final_task_mean"] > 60  # each later task learnt by its 487 parameters
    L, H, D, k, C = 2, 2, 32, 3, 2
    per_task = L * (3 * H * (k * k + 1) + 3 * H + 4 * D) + (D + 1) + (D * C + C)
    counts = summary["cost"]["trainable_params_per_task"]
    assert counts[1:] == [per_task] * 4 and counts[0] > 10 * per_task


def test_authors_training_augmentation_changes_the_images_and_keeps_runs_reproducible(tmp_path):
    from cl_bench.strategies.contracon import authors_augmentation

    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    augment = authors_augmentation(8)
    augmented = torch.stack([augment(image) for image in images])
    assert augmented.shape == images.shape and augmented.dtype == torch.uint8
    assert (augmented != images).flatten(1).any(1).float().mean() > 0.9  # nearly every image is changed
    with pytest.raises(UserError, match="train_augment"):
        ConTraCon(tiny_cct(), Context(), train_augment="mixup")
    common = [*ConTraCon.smoke_args, "strategy=contracon", "strategy.epochs=2", "progress=false",
              f"cache_dir={tmp_path}/cache", "scenario.increment=5"]
    raw = run(compose([*common, f"results_dir={tmp_path}/raw"]))
    twice = [run(compose([*common, "strategy.train_augment=authors", f"results_dir={tmp_path}/{name}"]))
             for name in ("a", "b")]
    assert twice[0]["scores_sha256"] == twice[1]["scores_sha256"] != raw["scores_sha256"]
    assert raw["protocol"]["switches"]["train_augment"] == {"value": "none", "paper": "authors"}

"""Pretrained-model CIL benchmarks (APER folder layout) and the ViT-B/16 presets; fixtures generated here."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from cl_bench.config import compose
from cl_bench.errors import UserError
from cl_bench.models.factory import create_backbone
from cl_bench.registry import SCENARIOS
from cl_bench.runner import run
from cl_bench.scenarios import _image_folder
from cl_bench.scenarios.base import class_order, split_sizes
from cl_bench.scenarios.cub import CUB
from cl_bench.scenarios.imagenet_a import ImageNetA
from cl_bench.scenarios.imagenet_r import ImageNetR
from cl_bench.scenarios.objectnet import ObjectNet
from cl_bench.scenarios.omnibenchmark import OmniBenchmark
from cl_bench.scenarios.vtab import VTAB

Image = pytest.importorskip("PIL.Image")

LOADERS = {"imagenet_r": ImageNetR, "imagenet_a": ImageNetA, "cub": CUB, "objectnet": ObjectNet,
           "omnibenchmark": OmniBenchmark, "vtab": VTAB}
REAL_CLASSES = {"imagenet_r": 200, "imagenet_a": 200, "cub": 200, "objectnet": 200, "omnibenchmark": 300,
                "vtab": 50}
for _name, _cls in LOADERS.items():  # until cl_bench/_builtins.py registers them
    if _name not in SCENARIOS.names():
        SCENARIOS.register(_name, _cls)

# class folder -> colour; string order 0, 1, 10, 2 (not 0, 1, 2, 10) is ImageFolder's order
COLOURS = {"0": (220, 20, 20), "1": (20, 220, 20), "10": (20, 20, 220), "2": (220, 220, 20)}
SIZES = [(40, 30), (30, 44), (64, 64)]  # landscape, portrait, square: every resize branch


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setattr(_image_folder, "CACHE_DIR", directory)
    return directory


def write_split(folder, per_class, classes=COLOURS):
    for name, colour in classes.items():
        (folder / name / "nested").mkdir(parents=True)
        for i in range(per_class):
            size = SIZES[i % len(SIZES)]
            path = folder / name / ("nested" if i == 0 else "") / f"img{i}{'.PNG' if i % 2 else '.jpg'}"
            Image.new("RGB", size, colour).save(path)
        (folder / name / "notes.txt").write_text("not an image")


def write_dataset(root, train_per_class=3, test_per_class=2, classes=COLOURS):
    write_split(root / "train", train_per_class, classes)
    write_split(root / "test", test_per_class, classes)
    return root


def make(cls, expected=len(COLOURS), **kwargs):
    """The registered class with its class count set to the fixture's (the real count is tested apart)."""
    return type(cls.__name__, (cls,), {"expected_classes": expected})(**kwargs)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("name", LOADERS)
def test_loader_reads_the_layout_and_labels_match_images(tmp_path, name):
    cls = LOADERS[name]
    write_dataset(tmp_path / "data" / cls.folders[0])
    stream = make(cls, root=str(tmp_path / "data"), image_size=16, increment=2).stream()
    assert cls.default_model == "vit_b16_in21k" and cls.description
    order = class_order(4, 1993 if name != "vtab" else None)
    assert stream.provenance["class_order"] == order
    assert stream.class_names == tuple(["0", "1", "10", "2"][c] for c in order)
    assert [t.classes for t in stream.tasks] == [(0, 1), (2, 3)]
    assert stream.input_shape == (3, 16, 16) and stream.provenance["images"] == {"train": 12, "test": 8}
    for task in stream.tasks:
        for part, per_class in ((task.train, 3), (task.test, 2)):
            assert part.inputs.dtype == torch.uint8 and len(part) == 2 * per_class
            for image, label in zip(part.inputs, part.targets):
                colour = COLOURS[stream.class_names[label]]
                assert (image.float().mean((1, 2)) - torch.tensor(colour)).abs().max() < 8


def test_vtab_keeps_natural_order_and_others_shuffle_with_1993():
    assert VTAB(init=0).order_seed is None and ImageNetR().order_seed == 1993
    assert [LOADERS[n]().increment for n in LOADERS] == [20, 20, 10, 10, 30, 10]


def test_folder_variants_root_itself_and_vtab_cil(tmp_path):
    write_dataset(tmp_path / "plain")
    assert len(make(CUB, root=str(tmp_path / "plain"), image_size=8, increment=2).stream()) == 2
    write_dataset(tmp_path / "v" / "vtab-cil" / "vtab")
    assert make(VTAB, root=str(tmp_path / "v"), image_size=8, increment=2).locate() == tmp_path / "v/vtab-cil/vtab"


def test_real_class_count_is_enforced(tmp_path):
    write_dataset(tmp_path / "imagenet-r")
    with pytest.raises(UserError) as excinfo:
        ImageNetR(root=str(tmp_path), image_size=8).stream()
    assert "holds 4 class folders" in one_line_error(excinfo) and "has 200" in str(excinfo.value)


def test_train_and_test_must_hold_the_same_classes(tmp_path):
    write_split(tmp_path / "cub" / "train", 2)
    write_split(tmp_path / "cub" / "test", 2, {k: v for k, v in COLOURS.items() if k != "10"})
    with pytest.raises(UserError) as excinfo:
        make(CUB, root=str(tmp_path), image_size=8).stream()
    assert "different class folders" in one_line_error(excinfo) and "10" in str(excinfo.value)


@pytest.mark.parametrize("name", LOADERS)
def test_missing_data_is_one_line_naming_the_layout(tmp_path, name):
    with pytest.raises(UserError) as excinfo:
        LOADERS[name](root=str(tmp_path / "nowhere")).stream()
    message = one_line_error(excinfo)
    assert "scenario.root=DIR" in message and f"{LOADERS[name].folders[0]}/train/<class>/" in message
    assert "RevisitingCIL" in message


def test_unreadable_image_is_one_line(tmp_path):
    write_dataset(tmp_path / "cub")
    (tmp_path / "cub" / "test" / "2" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError) as excinfo:
        make(CUB, root=str(tmp_path), image_size=8).stream()
    assert "broken.jpg" in one_line_error(excinfo)


def test_second_load_reads_the_cache_without_decoding(tmp_path, cache_dir, monkeypatch):
    write_dataset(tmp_path / "imagenet-a")
    first = make(ImageNetA, root=str(tmp_path), image_size=16, increment=2).stream()
    files = list(cache_dir.glob("imagenet_a-*-16.pt"))
    assert len(files) == 1 and first.provenance["cache_file"] == str(files[0])

    def no_decoding(*args):
        raise AssertionError("decoded although the cache holds these files")

    with monkeypatch.context() as patch:
        patch.setattr(_image_folder, "decode", no_decoding)
        again = make(ImageNetA, root=str(tmp_path), image_size=16, increment=2).stream()
    assert again.provenance["data_hash"] == first.provenance["data_hash"]
    # a changed file (different byte size) misses the cache and is decoded
    Image.new("RGB", (50, 50), (1, 2, 3)).save(tmp_path / "imagenet-a" / "train" / "0" / "img1.PNG")
    changed = make(ImageNetA, root=str(tmp_path), image_size=16, increment=2).stream()
    assert changed.provenance["data_hash"] != first.provenance["data_hash"]
    assert len(list(cache_dir.glob("imagenet_a-*-16.pt"))) == 2
    uncached = make(ImageNetA, root=str(tmp_path), image_size=8, increment=2, cache=False).stream()
    assert uncached.provenance["cache_file"] is None and not list(cache_dir.glob("imagenet_a-*-8.pt"))


def test_damaged_cache_is_decoded_again(tmp_path, cache_dir):
    write_dataset(tmp_path / "objectnet")
    first = make(ObjectNet, root=str(tmp_path), image_size=8, increment=2).stream()
    (cache_file,) = cache_dir.glob("objectnet-*.pt")
    cache_file.write_bytes(b"garbage")
    again = make(ObjectNet, root=str(tmp_path), image_size=8, increment=2).stream()
    assert again.provenance["data_hash"] == first.provenance["data_hash"]
    assert cache_file.stat().st_size > 100


def test_storage_equals_the_authors_test_transform(tmp_path):
    """Resize(int(256/224*S), bicubic) + CenterCrop(S) as torchvision does it, on an odd-sized photo-like image."""
    transforms = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 61, 3), dtype=np.uint8))
    path = tmp_path / "odd.png"
    image.save(path)
    for size in (16, 56):
        reference = transforms.Compose([transforms.Resize(int(256 / 224 * size), interpolation=3),
                                        transforms.CenterCrop(size)])(image)
        expected = np.asarray(reference).transpose(2, 0, 1)
        assert np.array_equal(_image_folder.decode(path, size), expected)


# ---------------------------------------------------------------- presets

SCENARIO_PRESETS = {"imagenet_r_b0_inc20": ("imagenet_r", 10), "imagenet_a_b0_inc20": ("imagenet_a", 10),
                    "cub_b0_inc10": ("cub", 20), "objectnet_b0_inc10": ("objectnet", 20),
                    "omnibenchmark_b0_inc30": ("omnibenchmark", 10), "vtab_b0_inc10": ("vtab", 5),
                    "cifar100_b0_inc5": ("cifar100", 20), "cifar100_b0_inc10": ("cifar100", 10),
                    "cifar224": ("cifar100", 10)}


@pytest.mark.parametrize("preset", SCENARIO_PRESETS)
def test_scenario_presets_compose_with_the_papers_splits(preset):
    kind, tasks = SCENARIO_PRESETS[preset]
    cfg = compose([f"scenario={preset}", "model=vit_b16_in21k"])
    assert cfg.scenario.type == kind and cfg.scenario.init == 0
    assert cfg.scenario.order_seed == (None if kind == "vtab" else 1993)
    classes = REAL_CLASSES.get(kind, 100)
    assert len(split_sizes(classes, cfg.scenario.init, cfg.scenario.increment, cfg.scenario.remainder)) == tasks
    assert cfg.model.type == "vit_base_patch16_224.augreg_in21k"


def test_ptm_scenarios_default_to_the_in21k_vit():
    cfg = compose(["scenario=cub_b0_inc10"])
    assert cfg.model.name == "vit_b16_in21k"


@pytest.mark.parametrize("preset, tag", [("vit_b16_in21k", "vit_base_patch16_224.augreg_in21k"),
                                         ("vit_b16_in1k", "vit_base_patch16_224.augreg_in21k_ft_in1k")])
def test_model_presets_name_the_exact_timm_tags(preset, tag):
    model = compose(["scenario=imagenet_r_b0_inc20", f"model={preset}"]).model
    assert (model.type, model.pretrained, model.image_size, model.frozen, model.normalize) == (tag, True, 224,
                                                                                               False, False)


def weights_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("model.safetensors", "pytorch_model.bin"))


def test_vit_preset_without_weights_fails_fast_in_one_line():
    if weights_cached("timm/vit_base_patch16_224.augreg_in21k"):
        pytest.skip("the ViT-B/16 weights are in this machine's cache")
    model = compose(["scenario=imagenet_r_b0_inc20", "model=vit_b16_in21k"]).model
    start = time.perf_counter()
    with pytest.raises(UserError) as excinfo:
        create_backbone(model, "image", (3, 224, 224))
    assert time.perf_counter() - start < 10  # HF_HUB_OFFLINE=1 (conftest): no network retries
    message = one_line_error(excinfo)
    assert "hf download timm/vit_base_patch16_224.augreg_in21k" in message
    assert "model.pretrained_path=FILE" in message


def test_vit_b16_feature_is_the_normed_cls_token_on_unnormalised_pixels():
    model = compose(["scenario=imagenet_r_b0_inc20", "model=vit_b16_in21k", "model.pretrained=false"]).model
    backbone = create_backbone(model, "image", (3, 224, 224))
    assert backbone.out_dim == backbone.net.num_features == 768 and backbone.net.global_pool == "token"
    assert not backbone.frozen and all(p.requires_grad for p in backbone.parameters())
    images = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    prepared = backbone.prepare(images, "cpu")
    torch.testing.assert_close(prepared, images.float() / 255)  # [0, 1], no mean/std, as APER feeds it
    with torch.no_grad():
        torch.testing.assert_close(backbone(prepared), backbone.net.forward_features(prepared)[:, 0])


def test_pretrained_path_accepts_a_checkpoint_with_its_classifier_head(tmp_path):
    """A timm checkpoint as published (with its ImageNet head) loads into the headless feature extractor."""
    import timm

    torch.manual_seed(0)
    published = timm.create_model("test_vit", num_classes=10)
    torch.save(published.state_dict(), tmp_path / "weights.pt")
    model = compose(["scenario=cub_b0_inc10", "model=test_vit", "model.pretrained=true",
                     f"model.pretrained_path={tmp_path}/weights.pt"]).model
    backbone = create_backbone(model, "image", (3, 160, 160))
    torch.testing.assert_close(backbone.net.patch_embed.proj.weight, published.patch_embed.proj.weight)


# ---------------------------------------------------------------- end to end

def test_simplecil_runs_on_a_generated_imagenet_r(tmp_path, monkeypatch):
    write_dataset(tmp_path / "imagenet-r")
    monkeypatch.setattr(ImageNetR, "expected_classes", len(COLOURS))
    cfg = compose(["scenario=imagenet_r_b0_inc20", f"scenario.root={tmp_path}", "scenario.increment=2",
                   "scenario.image_size=32", "model=vit_tiny_test", "strategy=simplecil", "progress=false",
                   f"results_dir={tmp_path}/results", f"cache_dir={tmp_path}/features"])
    summary = run(cfg)
    assert summary["status"] == "finished" and summary["tasks_completed"] == 2
    assert summary["metrics"]["acc_final_sample_weighted"] > 90  # one solid colour per class: prototypes suffice

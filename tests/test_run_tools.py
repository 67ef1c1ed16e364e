"""``cl-bench run -m`` (comma lists to a product of runs), ``--help`` (every key of a strategy, scenario or
model) and ``--cfg`` (the composed configuration, nothing run)."""
import json

import pytest
import yaml
from omegaconf import OmegaConf

from cl_bench.cli import main
from cl_bench.config import compose
from cl_bench.errors import UserError
from cl_bench.registry import STRATEGIES, hyperparameters
from cl_bench.sweep import multirun_lines


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")


def test_comma_lists_expand_to_their_product_and_bracketed_or_quoted_values_stay_whole():
    lines = multirun_lines(["strategy=er,finetune", "seed=0,1,2", "scenario=toy", "plugins=[a,b]",
                            'strategy.lora_targets="q_proj,v_proj"', "strategy.lr=0.1,0.1"])
    assert len(lines) == 2 * 3
    assert lines[0] == ["strategy=er", "seed=0", "scenario=toy", "plugins=[a,b]",
                        'strategy.lora_targets="q_proj,v_proj"', "strategy.lr=0.1"]
    assert {(line[0], line[1]) for line in lines} == {(f"strategy={s}", f"seed={n}")
                                                      for s in ("er", "finetune") for n in (0, 1, 2)}
    with pytest.raises(UserError, match="empty value"):
        multirun_lines(["seed=0,,1"])


def test_multirun_trains_every_combination_once_and_writes_the_leaderboard(capsys, fast_args, tmp_results):
    argv = ["run", "-m", "strategy=finetune,joint", "seed=0,1", "scenario=toy", "jobs=1", *fast_args]
    assert main(argv) == 0
    summaries = [json.loads(p.read_text()) for p in (tmp_results / "runs").glob("*/summary.json")]
    assert sorted((s["strategy"], s["seed"], s["status"]) for s in summaries) == [
        ("finetune", 0, "finished"), ("finetune", 1, "finished"), ("joint", 0, "finished"), ("joint", 1, "finished")]
    assert (tmp_results / "LEADERBOARD.md").is_file()
    assert "4/4 done (4 finished, 0 already done" in capsys.readouterr().err  # the tally goes to stderr
    assert main(argv) == 0  # a second time: every run already done, none trained again
    assert "4/4 done (0 finished, 4 already done" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["seed=0,,1", "strategy=er,"])
def test_a_malformed_sweep_list_is_one_line_and_runs_nothing(capsys, fast_args, tmp_results, bad):
    assert main(["run", "-m", "scenario=toy", bad, *fast_args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "empty value in its sweep list" in err
    assert not (tmp_results / "runs").exists()


def test_a_comma_list_without_m_says_to_use_it(capsys, fast_args, tmp_results):
    assert main(["run", "scenario=toy", "seed=0,1", *fast_args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seed expects int" in err and "cl-bench run -m" in err
    assert not (tmp_results / "runs").exists()


def test_help_lists_every_key_of_the_named_strategy_with_default_preset_and_about(capsys):
    assert main(["run", "strategy=mos_cifar224", "--help"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.startswith("│ strategy.")}
    parameters = hyperparameters(STRATEGIES.get("mos"))
    assert set(rows) == {f"strategy.{key}" for key in parameters}
    kind, default, preset, about = rows["strategy.lr"]
    assert (kind, default, preset) == ("float", "0.03", "0.03")
    assert rows["strategy.momentum"][2] == ""  # not set by the preset
    assert "``adapter_merge``" in rows["strategy.adapter_merge"][3]
    assert "strategy=mos_cifar224 (type mos)" in out and "│ seed " in out and "│ results_dir " in out


def test_help_with_a_bad_name_is_one_line_and_prints_nothing_else(capsys):
    assert main(["run", "scenario=toyy", "--help"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "unknown scenario 'toyy'" in captured.err and "did you mean: toy" in captured.err


def test_cfg_prints_the_composed_config_and_runs_nothing(capsys, fast_args, tmp_results):
    argv = ["scenario=toy", "strategy=er", "strategy.buffer_size=7", *fast_args]
    assert main(["run", *argv, "--cfg"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == OmegaConf.to_container(compose(argv))
    assert printed["strategy"]["buffer_size"] == 7 and "replay_batch_size" in printed["strategy"]
    assert not (tmp_results / "runs").exists()


def test_every_registered_strategy_has_help():
    for name in STRATEGIES.names():
        assert main(["run", f"strategy={name}", "--help"]) == 0, name

"""The command line, called as ``main(argv)``: exit codes, one-line errors, and every command."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cl_bench.cli import main
from cl_bench.errors import UserError, check_ranges


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """Rich wraps tables at the terminal width; a wide one keeps names on one line."""
    monkeypatch.setenv("COLUMNS", "200")


def one_line_error(capsys, argv, code=2) -> str:
    """Run ``main(argv)``, check it exits with ``code`` and a single error line; return that line."""
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def run_dirs(results: Path) -> list[Path]:
    return sorted(p for p in (results / "runs").glob("*") if p.is_dir()) if (results / "runs").is_dir() else []


@pytest.mark.parametrize("overrides, expected", [
    (["strategy=nosuch"], "unknown strategy 'nosuch'"),
    (["strategy=finetun"], "finetune"),
    (["scenario=nosuch"], "unknown scenario 'nosuch'"),
    (["scenario=toy", "model=nosuch_model"], "unknown model 'nosuch_model'"),
    (["scenario=toy", "strategy.lrr=1"], "strategy.lr"),
    (["scenario=toy", "sede=1"], "seed"),
    (["scenario=toy", "strategy.lr=abc"], "float"),
    (["scenario=toy", "noequals"], "key=value"),
    (["scenario=toy", "eval_batch_size=0"], "eval_batch_size must be at least 1"),  # found by fuzz_inputs.py
    (["scenario=toy", "model.hidden=0"], "model.hidden must be >= 1"),
    # range errors name the dotted key (fuzz_inputs.py counted ones that named only the parameter)
    (["scenario=toy", "strategy.epochs=-1"], "strategy.epochs must be >= 0, got -1"),
    (["scenario=toy", "strategy.lr=-0.5"], "strategy.lr must be >= 0, got -0.5"),
    (["scenario=toy", "scenario.increment=0"], "scenario.increment must be >= 1, got 0"),
    (["scenario=toy", "scenario.num_classes=1"], "scenario.increment=2 asks for 2 classes in the first task"),
    # found by fuzz_inputs.py --examples 5000: a NaN setting, an int too large for a float, data beyond float32
    (["scenario=toy", "scenario.noise=.nan"], "scenario.noise must be a number, got nan"),
    (["scenario=toy", "scenario.noise=" + "9" * 400], "scenario.noise expects a float, got an integer too large"),
    (["scenario=toy", "scenario.noise=1.0e+300"], "scenario.noise=1e+300 gives points beyond float32's range"),
])
def test_bad_run_arguments_give_one_line_and_exit_2(capsys, fast_args, tmp_results, overrides, expected):
    line = one_line_error(capsys, ["run", *overrides, *fast_args])
    assert line.startswith("error:") and expected in line
    assert run_dirs(tmp_results) == []


@pytest.mark.parametrize("value, rule, fits", [
    (0, ">= 0", True), (-1e-9, ">= 0", False), (0, "> 0", False), (1, "in [0, 1]", True), (1, "in [0, 1)", False),
    (0, "in (0, 1)", False), (0.5, "in (0, 1)", True), (float("nan"), ">= 0", False), (float("nan"), "in [0, 1]", False),
])
def test_check_ranges_names_the_first_setting_that_breaks_its_rule(value, rule, fits):
    check_ranges("strategy", epochs=(1, ">= 0"))
    if fits:
        check_ranges("strategy", epochs=(1, ">= 0"), momentum=(value, rule))
    else:
        with pytest.raises(UserError, match=re.escape(f"strategy.momentum must be {rule}, got {value}")):
            check_ranges("strategy", epochs=(1, ">= 0"), momentum=(value, rule), lr=(-1, ">= 0"))


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["list", "nosuch"], ["show"], ["--no-such-flag"]])
def test_bad_command_lines_give_one_line_and_exit_2(capsys, argv):
    one_line_error(capsys, argv)


def test_debug_reraises(fast_args):
    with pytest.raises(UserError, match="unknown strategy"):
        main(["--debug", "run", "strategy=nosuch", *fast_args])


@pytest.mark.parametrize("group, expected", [
    ("strategies", ["finetune", "joint", "er", "simplecil"]),
    ("scenarios", ["toy", "fmnist", "wordnet", "digits", "cifar100"]),
    ("models", ["mlp", "small_cnn", "efficientnet_lite0", "minilm"]),
])
def test_list_each_group(capsys, group, expected):
    assert main(["list", group]) == 0
    out = capsys.readouterr().out
    assert group in out
    for name in expected:
        assert name in out


def test_list_everything(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("strategies", "scenarios", "models", "finetune", "toy", "mlp"):
        assert word in out


@pytest.fixture
def finished_run(capsys, fast_args, tmp_results) -> Path:
    assert main(["run", "scenario=toy", "strategy=finetune", "seed=3", *fast_args]) == 0
    capsys.readouterr()
    (directory,) = run_dirs(tmp_results)
    return directory


def test_run_end_to_end_writes_its_files(finished_run):
    for name in ("config.yaml", "scores.csv", "summary.json"):
        assert (finished_run / name).is_file(), name
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["strategy"] == "finetune" and summary["scenario"] == "toy" and summary["seed"] == 3
    assert summary["tasks_completed"] == summary["tasks_total"] == 3
    header = (finished_run / "scores.csv").read_text().splitlines()[0]
    assert header == "after_task,eval_task,sum,count,score"


def test_rerun_of_a_finished_run_is_skipped(capsys, finished_run, fast_args, tmp_results):
    before = (finished_run / "summary.json").read_text()
    assert main(["run", "scenario=toy", "strategy=finetune", "seed=3", *fast_args]) == 0
    assert "already finished" in capsys.readouterr().err
    assert (finished_run / "summary.json").read_text() == before
    assert run_dirs(tmp_results) == [finished_run]


def test_show_prints_the_matrix(capsys, finished_run, tmp_results):
    assert main(["show", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "score R[i][j]" in out and "finished" in out
    for column in ("task 1", "task 2", "task 3"):
        assert column in out
    assert "acc_final_task_mean" in out
    # by run id under --results-dir
    assert main(["show", finished_run.name, "--results-dir", str(tmp_results)]) == 0
    assert "score R[i][j]" in capsys.readouterr().out


def test_show_unknown_run(capsys, tmp_results):
    line = one_line_error(capsys, ["show", "nosuch-run", "--results-dir", str(tmp_results)])
    assert "nosuch-run" in line


def test_leaderboard_after_a_run(capsys, finished_run, tmp_results):
    assert main(["leaderboard", str(tmp_results)]) == 0
    assert "finetune" in capsys.readouterr().out
    assert (tmp_results / "leaderboard.csv").is_file() and (tmp_results / "LEADERBOARD.md").is_file()


@pytest.mark.parametrize("which", ["empty", "missing"])
def test_leaderboard_without_runs(capsys, tmp_path, which):
    directory = tmp_path / which
    if which == "empty":
        directory.mkdir()
    line = one_line_error(capsys, ["leaderboard", str(directory)])
    assert str(directory) in line


def test_missing_data_is_one_line_that_says_how_to_get_it(capsys, tmp_path, fast_args, tmp_results):
    empty = tmp_path / "no_data"
    empty.mkdir()
    line = one_line_error(capsys, ["run", "scenario=fmnist", f"scenario.root={empty}", *fast_args])
    assert "apt-get" in line and str(empty) in line


# --- bench --------------------------------------------------------------------------------------

TOY_LINE = "strategy=finetune scenario=toy"


@pytest.mark.parametrize("text, expected", [
    ("runs: [strategy=finetune\n", "not valid YAML"),
    ("seeds: [0]\n", "runs"),
    ("runs: []\n", "runs"),
    ("- strategy=finetune\n", "runs"),
    (f"runs:\n  - {TOY_LINE}\n  - strategy=finetune scenario=toy strategy.lrr=1\n", "suite.yaml, run 2: "),
    (f"runs:\n  - {TOY_LINE}\n  - strategy=nosuch scenario=toy\n", "run 2: unknown strategy"),
    (f"runs:\n  - {TOY_LINE}\n  - {TOY_LINE} ha\n", "run 2: expected key=value, got 'ha'"),
    (f"runs:\n  - {TOY_LINE}\n  - [strategy=er]\n", "key=value"),
    (f"seeds: [0, one]\nruns:\n  - {TOY_LINE}\n", "seeds"),
])
def test_bad_suite_fails_before_running_anything(capsys, tmp_path, fast_args, tmp_results, text, expected):
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    line = one_line_error(capsys, ["bench", str(suite), *fast_args])
    assert expected in line
    assert run_dirs(tmp_results) == []


def test_missing_suite_file(capsys, tmp_path, fast_args):
    assert "does not exist" in one_line_error(capsys, ["bench", str(tmp_path / "nope.yaml"), *fast_args])


def test_bench_runs_every_line_for_every_seed(capsys, tmp_path, fast_args, tmp_results):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"seeds: [0, 1]\nruns:\n  - {TOY_LINE}\n  - strategy=joint scenario=toy\n")
    assert main(["bench", str(suite), *fast_args]) == 0
    dirs = run_dirs(tmp_results)
    assert len(dirs) == 4
    assert all(json.loads((d / "summary.json").read_text())["status"] == "finished" for d in dirs)
    assert (tmp_results / "LEADERBOARD.md").is_file()
    out = capsys.readouterr().out
    assert "finetune" in out and "joint" in out


# --- the installed console script ---------------------------------------------------------------

def test_console_script_bad_key_has_no_traceback(tmp_results):
    script = Path(sys.executable).parent / "cl-bench"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable}")
    result = subprocess.run([str(script), "run", "scenario=toy", "strategy.lrr=1", "progress=false",
                             f"results_dir={tmp_results}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "strategy.lr" in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout

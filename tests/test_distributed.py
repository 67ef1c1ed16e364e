"""One run on two processes (``nproc=2``, gloo on the CPU): the same updates as one process taking the
same global batch, rank 0 alone writing, and a resume after kill -9 that reproduces the uninterrupted
two-process run."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cl_bench
from cl_bench import distributed
from cl_bench.cli import main

SRC = str(Path(cl_bench.__file__).resolve().parents[1])
# seqft has no dropout on tiny_llama, so one and two processes draw nothing differently
ARGS = ["strategy=seqft", "scenario=instruct_toy", "model=tiny_llama", "strategy.lr=0.01", "strategy.batch_size=4",
        "train_log_every=1", "progress=false", "device=cpu"]
LOSS_TOLERANCE = 1e-4  # relative; measured: 3e-7 over task 1 (float sums in another order)


def cl_bench_run(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cl_bench.cli", "run", *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": SRC, **env})


def only_run(results: Path) -> Path:
    [directory] = (results / "runs").iterdir()
    return directory


def train_log(results: Path) -> list[dict]:
    return list(csv.DictReader((only_run(results) / "train_log.csv").open()))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("two") / "results"
    done = cl_bench_run([*ARGS, "nproc=2", f"results_dir={results}"])
    assert done.returncode == 0, done.stdout + done.stderr
    return results


def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(tmp_path, two_process_run, capsys):
    assert main(["run", *ARGS, f"results_dir={tmp_path}"]) == 0
    one, two = train_log(tmp_path), train_log(two_process_run)
    assert [(r["step"], r["task"]) for r in one] == [(r["step"], r["task"]) for r in two]
    first_task = [(float(a["loss"]), float(b["loss"])) for a, b in zip(one, two) if a["task"] == "1"]
    assert len(first_task) >= 10
    assert all(abs(a - b) <= LOSS_TOLERANCE * a for a, b in first_task), first_task
    summary = json.loads((only_run(two_process_run) / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["provenance"]["nproc"] == 2
    assert json.loads((only_run(tmp_path) / "summary.json").read_text())["provenance"]["nproc"] == 1
    # the same configuration: nproc says how a run executes, not what it computes
    assert only_run(tmp_path).name == only_run(two_process_run).name
    # rank 0 alone wrote the log: one header, one row per step
    rows = (only_run(two_process_run) / "train_log.csv").read_text().splitlines()
    assert sum(line.startswith("step,") for line in rows) == 1 and len(rows) == len(two) + 1


def test_a_two_process_run_killed_inside_task_2_resumes_to_the_same_scores(tmp_path, two_process_run):
    uninterrupted = train_log(two_process_run)
    first_task_steps = sum(row["task"] == "1" for row in uninterrupted)
    args = [*ARGS, "nproc=2", f"results_dir={tmp_path}"]
    killed = cl_bench_run([*args, "plugins=[cl_bench.kill_switch]"], CL_BENCH_KILL_AT=f"step:{first_task_steps + 3}")
    assert killed.returncode != 0
    summary = json.loads((only_run(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "running" and summary["tasks_completed"] == 1
    resumed = cl_bench_run(args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming after task 1" in resumed.stdout + resumed.stderr
    assert (only_run(tmp_path) / "scores.csv").read_bytes() == (only_run(two_process_run) / "scores.csv").read_bytes()
    assert [r["loss"] for r in train_log(tmp_path)] == [r["loss"] for r in uninterrupted]


def test_a_strategy_with_its_own_loops_says_it_does_not_split(tmp_path, capsys):
    assert main(["run", "strategy=conpet_static", "scenario=instruct_toy", "model=tiny_llama", "nproc=2",
                 f"results_dir={tmp_path}"]) == 2
    assert "does not run data-parallel" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


RANK_ONE_FAILS = """
import os

from cl_bench.errors import UserError
from cl_bench.strategies.base import Strategy

if os.environ.get("RANK") == "1":
    def fail(self, *args):
        raise UserError("rank 1 fails on purpose")

    Strategy.count_step = fail
"""


def test_a_failing_rank_stops_the_others_and_is_reported_in_one_line(tmp_path):
    """Rank 1 stops with an error at its first step; rank 0, waiting for it in a collective, is stopped."""
    (tmp_path / "rank_one_fails.py").write_text(RANK_ONE_FAILS)
    done = cl_bench_run([*ARGS, "nproc=2", f"results_dir={tmp_path / 'results'}", "plugins=[rank_one_fails]"],
                        PYTHONPATH=f"{SRC}{os.pathsep}{tmp_path}", COLUMNS="200")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and lines[-1].startswith("error: rank 1 of nproc=2 stopped"), done.stderr
    assert lines[-1].endswith("error: rank 1 fails on purpose") and "Traceback" not in done.stderr


@pytest.mark.parametrize("count, world", [(10, 3), (2, 4), (8, 2)])
def test_shares_cover_the_batch_once_in_order(monkeypatch, count, world):
    shares = []
    for index in range(world):
        monkeypatch.setattr(distributed, "rank", lambda index=index: index)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        shares += list(distributed.share(count))
    assert shares == list(range(count))


def test_nproc_is_checked(capsys, tmp_path):
    assert main(["run", "nproc=0"]) == 2
    assert "nproc must be at least 1" in capsys.readouterr().err
    assert main(["run", "-m", *ARGS, "seed=0,1", "nproc=2", f"results_dir={tmp_path}"]) == 2
    assert "a sweep runs each configuration in one process" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()

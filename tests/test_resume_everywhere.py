"""Every resumable strategy survives ``kill -9`` inside its second task: the same command, rerun, gives
the uninterrupted run's ``scores.csv`` byte for byte, and its ``train_log.csv`` but for the wall-clock rates.

The kill is delivered by the process to itself at a chosen moment (``cl_bench.kill_switch``), so the
test never races a timer: at optimizer step N of the run, N drawn (seeded) inside task 2 from the
uninterrupted run's per-task step counts; a strategy that takes no optimizer step in task 2 is killed
when task 2 is scored, after it learnt task 2 and before its summary and checkpoint are written.
"""
import csv
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import cl_bench
from cl_bench.config import compose
from cl_bench.registry import STRATEGIES, hyperparameters
from cl_bench.runner import Run, run

SRC = str(Path(cl_bench.__file__).resolve().parents[1])


def smoke_args(name: str, results: Path) -> list[str]:
    strategy_class = STRATEGIES.get(name)
    epochs = ["strategy.epochs=2"] if "epochs" in hyperparameters(strategy_class) else []
    return [*strategy_class.smoke_args, f"strategy={name}", "progress=false", "device=cpu", *epochs,
            f"results_dir={results}", f"cache_dir={results.parent}/cache"]


# the Avalanche strategies that resume (literal, so collecting this file does not import avalanche)
AVALANCHE = ("Naive", "Cumulative", "Replay", "EWC", "SynapticIntelligence", "MAS", "LwF", "GEM", "AGEM", "DER",
             "ER_ACE")


def test_the_avalanche_list_is_the_adapters():
    from cl_bench.strategies._avalanche_state import RESUMABLE

    assert AVALANCHE == RESUMABLE
    assert all(STRATEGIES.get(f"avalanche.{name}").resumable for name in AVALANCHE)
    assert not STRATEGIES.get("avalanche.gdumb").resumable


@pytest.mark.parametrize("name", [n for n in STRATEGIES.names() if STRATEGIES.get(n).resumable] +
                         [f"avalanche.{n}" for n in AVALANCHE])
def test_kill_9_inside_task_2_then_rerun_gives_the_same_scores(tmp_path, name):
    reference_cfg = compose(smoke_args(name, tmp_path / "reference"))
    reference = run(reference_cfg)
    assert reference["status"] == "finished" and reference["tasks_total"] >= 2
    first, second = (p["optimizer_steps"] for p in reference["per_task"][:2])
    kill_at = f"step:{first + random.Random(name).randint(1, second)}" if second else "scoring:2"

    args = smoke_args(name, tmp_path / "killed")
    killed = subprocess.run([sys.executable, "-m", "cl_bench.cli", "run", *args, "plugins=[cl_bench.kill_switch]"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": SRC, "CL_BENCH_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    cfg = compose(args)
    assert Run(cfg).previous()["tasks_completed"] == 1  # killed inside task 2: task 1's files only

    resumed = run(cfg)
    assert resumed["status"] == "finished"
    resumed_scores = (Run(cfg).directory / "scores.csv").read_bytes()
    assert resumed_scores == (Run(reference_cfg).directory / "scores.csv").read_bytes()
    assert logged_steps(Run(cfg).directory) == logged_steps(Run(reference_cfg).directory)


def logged_steps(directory: Path) -> list[tuple]:
    """train_log.csv without its wall-clock columns (rates)."""
    path = directory / "train_log.csv"
    if not path.exists():  # a strategy without optimizer steps
        return []
    return [(r["step"], r["task"], r["epoch"], r["loss"], r["lr"]) for r in csv.DictReader(path.open())]

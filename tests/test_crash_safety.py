"""Crash safety: ``kill -9`` at random points and Ctrl-C, then the same command, give the uninterrupted
run's score matrix bit for bit; kept checkpoints are pruned and a damaged newest one is passed over."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cl_bench
from cl_bench import compose, run
from cl_bench.registry import STRATEGIES
from cl_bench.runner import Run

SRC = str(Path(cl_bench.__file__).resolve().parents[1])
# er draws from its buffer with the run's generator and torch's global RNG, across tasks: a resume that
# lost any random state would change the matrix
ARGS = ["strategy=er", "scenario=digits", "scenario.increment=1", "model=mlp", "strategy.epochs=40",
        "strategy.buffer_size=100",
        "progress=false", "device=cpu"]


def start(results: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cl_bench.cli", "run", *ARGS, f"results_dir={results}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200"})


def wait_for_task(process: subprocess.Popen, task: int) -> bool:
    """Read the run's output until it reports ``task`` done; False when it ended first."""
    for line in process.stdout:
        if f"task {task}/10 done" in line:
            return True
    return False


def run_dir(results: Path) -> Path:
    (directory,) = (results / "runs").iterdir()
    return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    results = tmp_path_factory.mktemp("reference")
    process = start(results)
    assert process.wait(timeout=300) == 0, process.stdout.read()
    return (run_dir(results) / "scores.csv").read_bytes()


def test_kill_9_at_random_points_then_rerun_gives_the_same_matrix(tmp_path, reference):
    chance = random.Random(7)
    results, kills = tmp_path / "r", []
    for _ in range(10):
        process = start(results)
        done = 0
        if (results / "runs").exists():
            done = json.loads((run_dir(results) / "summary.json").read_text())["tasks_completed"]
        if done >= 9:
            process.kill()
            break
        target = done + 1  # then a random moment: during its writes, or inside the next task
        alive = wait_for_task(process, target)
        time.sleep(chance.uniform(0.0, 0.15))
        if alive and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills.append(target)
        process.wait(timeout=60)
        process.stdout.close()
    assert len(kills) >= 5, kills  # most kills landed while the run was going
    summary = json.loads((run_dir(results) / "summary.json").read_text())
    assert summary["status"] in ("running", "failed")  # killed: no chance to say anything else
    final = start(results)
    output = final.communicate(timeout=300)[0]
    assert final.returncode == 0, output
    assert "resuming after task" in output
    assert (run_dir(results) / "scores.csv").read_bytes() == reference


# A plugin module (``plugins`` is not hashed: same run id) that parks the run at the start of task 3, after
# task 2's summary and checkpoint are written, until a signal arrives: Ctrl-C then lands at a known
# point however loaded the machine is, instead of racing a run that may finish first.
PAUSE_PLUGIN = """
import signal
import time
from cl_bench.registry import STRATEGIES

er = STRATEGIES.get("er")
before_task = er.before_task

def pause_before_task_3(self, task):
    if task.index == 2:
        # a suite started in the background of a non-interactive shell hands its children SIGINT ignored, and an
        # ignored SIGINT never arrives (the earlier sigwait then hung for good): take Ctrl-C's default back
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("paused before task 3", flush=True)
        # Python's handler raises KeyboardInterrupt here at the next bytecode, whichever thread the kernel
        # handed the signal to: the short sleeps only give it bytecodes to run
        while True:
            time.sleep(0.01)
    before_task(self, task)

er.before_task = pause_before_task_3
"""


def test_ctrl_c_marks_interrupted_and_resume_false_keeps_the_old_run(tmp_path, reference):
    results = tmp_path / "r"
    (tmp_path / "pause_plugin.py").write_text(PAUSE_PLUGIN)
    process = subprocess.Popen([sys.executable, "-m", "cl_bench.cli", "run", *ARGS, f"results_dir={results}",
                                "plugins=[pause_plugin]"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{tmp_path}",
                                               "COLUMNS": "200"})
    assert any("paused before task 3" in line for line in process.stdout)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130, output
    directory = run_dir(results)
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["tasks_completed"] == 2
    assert [p.name for p in (directory / "checkpoints").iterdir()] == [f"task-{summary['tasks_completed']:03d}.pt"]
    resumed = start(results)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert (directory / "scores.csv").read_bytes() == reference
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    fresh = start(results, "resume=false")
    assert fresh.wait(timeout=300) == 0, fresh.stdout.read()
    assert {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()} == files  # old run untouched
    assert (directory.with_name(directory.name + "-r2") / "scores.csv").read_bytes() == reference


def test_keep_checkpoints_prunes_and_a_damaged_newest_falls_back(tmp_path, capsys, monkeypatch):
    common = ["strategy=er", "scenario=digits", "model=mlp", "strategy.epochs=2", "progress=false", "device=cpu"]  # 5 tasks
    reference = run(compose([*common, f"results_dir={tmp_path / 'a'}"]))
    cfg = compose([*common, f"results_dir={tmp_path / 'b'}", "keep_checkpoints=2"])
    record = Run(cfg)
    assert run(cfg)["scores_sha256"] == reference["scores_sha256"]
    assert [p.name for p in record.checkpoints()] == ["task-005.pt", "task-004.pt"]

    cfg = compose([*common, f"results_dir={tmp_path / 'c'}", "keep_checkpoints=2"])
    record = Run(cfg)
    original = STRATEGIES.get("er").learn

    def stop_at_task_5(self, task):
        if task.index == 4:
            newest = record.checkpoints()[0]
            newest.write_bytes(newest.read_bytes()[:100])  # as a crash on a non-atomic disk would leave it
            raise KeyboardInterrupt
        return original(self, task)

    with monkeypatch.context() as patch:
        patch.setattr(STRATEGIES.get("er"), "learn", stop_at_task_5)
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
    from rich.console import Console

    resumed = run(cfg, console=Console(stderr=True))
    assert "checkpoint task-004.pt is unusable" in capsys.readouterr().err
    assert resumed["scores_sha256"] == reference["scores_sha256"]


def test_a_full_disk_mid_run_is_one_line_leaves_the_files_and_resumes(tmp_path, capsys, monkeypatch):
    import errno
    import hashlib

    from cl_bench.cli import main

    common = ["strategy=er", "scenario=digits", "model=mlp", "strategy.epochs=2", "progress=false", "device=cpu"]
    reference = run(compose([*common, f"results_dir={tmp_path / 'a'}"]))
    args = [*common, f"results_dir={tmp_path / 'b'}"]
    record, original, before = Run(compose(args)), STRATEGIES.get("er").learn, {}

    def no_space(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def disk_fills_during_task_3(self, task):
        if task.index == 2:
            before.update({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in record.directory.rglob("*") if p.is_file() and p.name != "train_log.csv"})
            before["train_log rows"] = (record.directory / "train_log.csv").read_text()
            monkeypatch.setattr(os, "fsync", no_space)  # every write from here on fails
        return original(self, task)

    with monkeypatch.context() as patch:
        patch.setattr(STRATEGIES.get("er"), "learn", disk_fills_during_task_3)
        assert main(["run", *args]) == 2
        monkeypatch.undo()
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error")]
    assert "Traceback" not in err and "internal error" not in err
    assert f"cannot write {record.directory}" in line and "No space left on device" in line
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in record.directory.rglob("*")
             if p.is_file() and p.name != "train_log.csv"}
    rows = before.pop("train_log rows")
    assert after == before  # task 2's files, untouched, and no temporary left behind
    assert (record.directory / "train_log.csv").read_text().startswith(rows)  # appended to, never rewritten
    assert json.loads(record.summary_path.read_text())["tasks_completed"] == 2
    resumed = run(compose(args))
    assert resumed["status"] == "finished" and resumed["scores_sha256"] == reference["scores_sha256"]
    assert (record.directory / "train_log.csv").read_text().count("\n") == \
        (Run(compose([*common, f"results_dir={tmp_path / 'a'}"])).directory / "train_log.csv").read_text().count("\n")


def test_keep_checkpoints_must_be_positive():
    from cl_bench.errors import UserError

    with pytest.raises(UserError, match="keep_checkpoints must be at least 1"):
        compose(["keep_checkpoints=0"])

"""`cl-bench bench` executors: a process pool and Ray give the same results as running inline, finished
runs are skipped, two bench processes never train the same run, a failed run does not stop the others."""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cl_bench
from cl_bench.cli import main
from cl_bench.locking import run_lock

SUITE = "seeds: [0, 1]\nruns:\n  - strategy=finetune scenario=toy strategy.epochs=3\n  - strategy=er scenario=toy\n"
SRC = str(Path(cl_bench.__file__).resolve().parents[1])


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def suite(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE)
    return path


def bench_args(results, *extra):
    return ["progress=false", "device=cpu", f"results_dir={results}", f"cache_dir={results}/cache", *extra]


def scores(results: Path) -> dict[str, str]:
    return {d.name: (d / "scores.csv").read_text() for d in sorted((results / "runs").iterdir())}


def finished_at(results: Path) -> dict[str, float]:
    return {d.name: json.loads((d / "summary.json").read_text())["provenance"]["finished_at"]
            for d in sorted((results / "runs").iterdir())}


def test_process_pool_gives_the_inline_results_and_a_rerun_skips_everything(capsys, tmp_path, suite):
    assert main(["bench", str(suite), *bench_args(tmp_path / "inline")]) == 0
    assert main(["bench", str(suite), *bench_args(tmp_path / "pool", "jobs=2")]) == 0
    inline, pool = scores(tmp_path / "inline"), scores(tmp_path / "pool")
    assert len(inline) == 4 and inline == pool
    capsys.readouterr()
    before = finished_at(tmp_path / "pool")
    assert main(["bench", str(suite), *bench_args(tmp_path / "pool", "jobs=2")]) == 0
    assert finished_at(tmp_path / "pool") == before  # nothing was trained again
    err = capsys.readouterr().err
    assert err.count("already finished") == 4 and "4/4 done (0 finished, 4 already done, 0 failed)" in err


def test_a_failed_run_is_reported_and_the_others_finish(capsys, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("runs:\n  - strategy=finetune scenario=toy strategy.lr=1.0e+30\n  - strategy=er scenario=toy\n")
    assert main(["bench", str(suite), *bench_args(tmp_path / "r", "jobs=2")]) == 2  # the settings' fault
    err = capsys.readouterr().err
    assert re.search(r"failed: finetune on toy / mlp, seed 0: run \S+ failed: loss became", err)
    assert "1 of 2 runs failed" in err
    statuses = {d.name.split("-")[2]: json.loads((d / "summary.json").read_text())["status"]
                for d in (tmp_path / "r" / "runs").iterdir()}
    assert statuses == {"finetune": "failed", "er": "finished"}


def test_a_locked_run_is_refused_by_run_and_waited_for_by_bench(capsys, tmp_path, suite, monkeypatch):
    from cl_bench import runner
    from cl_bench.config import compose, run_id

    results = tmp_path / "r"
    cfg = compose(["strategy=er", "scenario=toy", "seed=1", *bench_args(results)])
    lock = run_lock(results, run_id(cfg))
    lock.__enter__()  # as another process would hold it
    assert main(["run", "strategy=er", "scenario=toy", "seed=1", *bench_args(results)]) == 2
    assert "is already being run by pid" in capsys.readouterr().err
    assert not (results / "runs").exists()
    # the bench runs the others, then waits for the lock; the holder lets go when the bench starts
    # waiting (the event itself, not a timer that a loaded machine can outrun)
    def release_then_wait(results_dir, identity, *, wait=False):
        if wait:
            lock.__exit__(None, None, None)
        return run_lock(results_dir, identity, wait=wait)

    monkeypatch.setattr(runner, "run_lock", release_then_wait)
    assert main(["bench", str(suite), *bench_args(results)]) == 0
    err = capsys.readouterr().err
    assert "will wait for it after the others" in err
    assert err.index("will wait for it") < err.index("finished er on toy / mlp, seed 1")
    assert len(scores(results)) == 4


def test_a_run_finished_by_another_process_while_waiting_counts_as_already_done(capsys, tmp_path, suite,
                                                                                monkeypatch):
    from cl_bench import runner
    from cl_bench.config import compose, run_id

    results = tmp_path / "r"
    cfg = compose(["strategy=er", "scenario=toy", "seed=1", *bench_args(results)])
    lock = run_lock(results, run_id(cfg))
    lock.__enter__()  # another process holds the run...
    real_run_lock = runner.run_lock

    def finish_then_wait(results_dir, identity, *, wait=False):
        if wait:  # ...and finishes it while the bench waits for the lock
            lock.__exit__(None, None, None)
            runner.run(cfg)
        return real_run_lock(results_dir, identity, wait=wait)

    monkeypatch.setattr(runner, "run_lock", finish_then_wait)
    assert main(["bench", str(suite), *bench_args(results)]) == 0
    err = capsys.readouterr().err
    assert "already finished er on toy / mlp, seed 1" in err
    assert "4/4 done (3 finished, 1 already done" in err


def test_two_bench_processes_on_one_suite_train_each_run_once(tmp_path, suite):
    results = tmp_path / "r"
    command = [sys.executable, "-c", "from cl_bench.cli import console_main; console_main()", "bench", str(suite),
               *bench_args(results)]
    env = {**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200"}
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    runs = scores(results)
    assert len(runs) == 4
    for run_id in runs:  # trained by exactly one of the two processes
        assert sum(out.count(f"{run_id}: task 1/3 done") for out in outputs) == 1, outputs
    # and each process's tally counts as finished only the runs it trained
    trained = [sum(out.count(f"{run_id}: task 1/3 done") for run_id in runs) for out in outputs]
    tallies = [re.findall(r"4/4 done \((\d+) finished, (\d+) already done", out)[-1] for out in outputs]
    assert [int(finished) for finished, _ in tallies] == trained, outputs
    assert all(int(f) + int(a) == 4 for f, a in tallies)


def test_bench_keys_are_checked(capsys, tmp_path, suite):
    for bad, expected in [("executor=slurm", "executor must be local or ray"), ("jobs=0", "jobs expects"),
                          ("ray.cpus=-1", "ray.cpus expects"), ("ray.gpus=1", "need executor=ray"),
                          ("ray.adress=x:1", "unknown key 'ray.adress'")]:
        assert main(["bench", str(suite), *bench_args(tmp_path), bad]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_unreachable_ray_address_fails_fast_with_one_line(capsys, tmp_path, suite):
    pytest.importorskip("ray")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    began = time.monotonic()
    assert main(["bench", str(suite), *bench_args(tmp_path), "executor=ray", f"ray.address=127.0.0.1:{port}"]) == 2
    assert time.monotonic() - began < 60  # not Ray's minutes of retries (a bound, not a speed claim)
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in capsys.readouterr().err


def test_ray_local_instance_gives_the_inline_results(capsys, monkeypatch, tmp_path, suite):
    """Without ray.address a new local instance starts (a RAY_ADDRESS in the environment is not used) with
    no dashboard; the workers' run files come back to the driver's results directory."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", "10.255.255.1:6379")
    monkeypatch.setenv("PYTHONPATH", SRC)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token of the user's
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    assert main(["bench", str(suite), *bench_args(tmp_path / "inline")]) == 0
    assert main(["bench", str(suite), *bench_args(tmp_path / "ray", "executor=ray")]) == 0
    assert not ray.is_initialized()  # shut down after the suite
    err = capsys.readouterr().err
    assert "started a local instance at" in err and "dashboard off" in err and "10.255.255.1" not in err
    assert scores(tmp_path / "ray") == scores(tmp_path / "inline")
    # the instance authenticated with a token that never touched the disk, and took it away when done
    assert not (tmp_path / "home" / ".ray" / "auth_token").exists() and "RAY_AUTH_TOKEN" not in os.environ


def test_a_saved_ray_token_readable_by_others_is_made_owner_only(monkeypatch, tmp_path):
    from cl_bench.sweep import private_ray_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    saved = tmp_path / ".ray" / "auth_token"
    saved.parent.mkdir()
    saved.write_text("0" * 64)
    saved.chmod(0o644)
    assert private_ray_token() is False  # Ray uses the user's token
    assert saved.stat().st_mode & 0o777 == 0o600 and "RAY_AUTH_TOKEN" not in os.environ
    saved.unlink()
    assert private_ray_token() is True and len(os.environ.pop("RAY_AUTH_TOKEN")) == 64


def test_ray_connects_to_the_address_given(capsys, monkeypatch, tmp_path, suite):
    pytest.importorskip("ray")
    ray_cli = Path(sys.executable).parent / "ray"
    if not ray_cli.exists():
        pytest.skip("no ray command next to the interpreter")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # what is tested is connecting to the address given; a loopback head without token auth keeps the test
    # independent of tokens left in ~/.ray or cached in this process by earlier Ray tests
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": SRC}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    subprocess.run([str(ray_cli), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env, timeout=120)
    try:
        assert main(["bench", str(suite), *bench_args(tmp_path), "executor=ray", f"ray.address=127.0.0.1:{port}"]) == 0
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, env=env, timeout=120)
    assert re.search(rf"Ray: connected to \S+:{port}, dashboard off", capsys.readouterr().err)
    assert len(scores(tmp_path)) == 4


def test_gathered_files_are_written_only_when_missing_or_different(tmp_path):
    from cl_bench.sweep import write_gathered

    files = {"config.yaml": b"a: 1\n", "scores.csv": b"after_task\n", "summary.json": b"{}"}
    write_gathered(tmp_path, {"run_id": "x", "files": files})
    directory = tmp_path / "runs" / "x"
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == files
    stamp = (directory / "summary.json").stat().st_mtime_ns
    time.sleep(0.01)
    write_gathered(tmp_path, {"run_id": "x", "files": {**files, "scores.csv": b"after_task,eval_task\n"}})
    assert (directory / "summary.json").stat().st_mtime_ns == stamp
    assert (directory / "scores.csv").read_bytes() == b"after_task,eval_task\n"

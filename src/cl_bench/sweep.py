"""Suites of runs: ``cl-bench bench SUITE.yaml [executor=local|ray] [jobs=N] [ray.address=...]``, and
``cl-bench run -m key=a,b ...`` (the product of the comma lists, run as a suite).

A suite expands to argument lines x seeds; every line is composed (validated) before anything runs.
Each run goes to an executor:

* ``local`` (default): ``jobs=1`` runs in this process; ``jobs=N`` in a pool of N spawned processes,
  each with ``cpu_count // N`` torch threads.
* ``ray``: each run is a Ray task with ``ray.cpus`` CPUs and ``ray.gpus`` GPUs, on the cluster at
  ``ray.address`` or, without one, on a new local Ray instance (started with ``address="local"``, so a
  ``RAY_ADDRESS`` in the environment is ignored, and without the dashboard). Its services listen on the
  node's address (Ray maps a 127.0.0.1 node IP back to it) behind token auth: unless the user set up
  Ray's (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN[_PATH]``, ``~/.ray/auth_token``), a fresh token held in
  this process's environment for the bench's lifetime, so none is written to disk; an existing
  ``~/.ray/auth_token`` readable by others is made owner-only. Workers send back the run's
  ``config.yaml``, ``scores.csv`` and ``summary.json``, which the driver writes into its own results
  directory, so shared storage is optional.

Idempotent: a finished run is skipped and an interrupted one resumes (the runner does both); each run
holds a lock (``cl_bench.locking``), so two ``bench`` processes on one suite never train the same run:
the second puts a locked run at the end of its queue and then waits for the lock, so it returns only
when every run of the suite is finished or failed. A failed run is reported with its error and does not
stop the others. Progress (finished / running / failed / left, ETA) is printed as runs end.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import secrets
import socket
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from rich.markup import escape

from cl_bench.errors import UserError

RUN_FILES = ("config.yaml", "scores.csv", "summary.json")


@dataclass
class Options:
    """The bench's own keys (everything else on the command line goes to every run)."""

    executor: str = "local"
    jobs: int = 1
    ray_address: str | None = None
    ray_cpus: float = 1.0
    ray_gpus: float = 0.0


def split_overrides(overrides: list[str]) -> tuple[Options, list[str]]:
    """(bench options, overrides for every run)."""
    from cl_bench.config import parse_overrides

    options, rest = Options(), []
    for item, (key, value) in zip(overrides, parse_overrides(overrides)):
        if key == "executor":
            if value not in ("local", "ray"):
                raise UserError(f"executor must be local or ray, got {value!r}")
            options.executor = value
        elif key == "jobs":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"jobs expects a positive integer, got {value!r}")
            options.jobs = value
        elif key == "ray.address":
            if not isinstance(value, str) or not value:
                raise UserError(f"ray.address expects an address such as 10.0.0.5:6379, got {value!r}")
            options.ray_address = value
        elif key in ("ray.cpus", "ray.gpus"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < (0 if key == "ray.gpus" else 1e-9):
                raise UserError(f"{key} expects a {'non-negative' if key == 'ray.gpus' else 'positive'} "
                                f"number, got {value!r}")
            setattr(options, key.replace(".", "_"), float(value))
        elif key.startswith("ray."):
            raise UserError(f"unknown key '{key}' (bench knows ray.address, ray.cpus, ray.gpus)")
        else:
            rest.append(item)
    if options.executor != "ray" and (options.ray_address or options.ray_gpus or options.ray_cpus != 1.0):
        raise UserError("ray.* settings need executor=ray")
    return options, rest


@dataclass
class Job:
    argv: list[str]
    run_id: str
    label: str
    results_dir: Path
    wait_for_lock: bool = False


def multirun_lines(overrides: list[str]) -> list[list[str]]:
    """``cl-bench run -m``: every ``key=a,b,c`` gives one line per value, lines are the product over keys
    (Hydra's basic sweep). A value in brackets, braces or quotes is one value (``plugins=[a,b]``,
    ``strategy.lora_targets="q_proj,v_proj"``)."""
    choices = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or text.startswith(("[", "{", '"', "'")) or "," not in text:
            choices.append([item])
            continue
        values = text.split(",")
        if not all(values):
            raise UserError(f"{key}= has an empty value in its sweep list '{text}'"[:300])
        choices.append([f"{key}={value}" for value in dict.fromkeys(values)])
    return [list(line) for line in itertools.product(*choices)]


def expand(lines: list[list[str]], seeds: list[int] | None, overrides: list[str], origin: str = "") -> list[Job]:
    """One job per (line, seed), composed now so a bad line fails before any run starts; results_dir is
    made absolute (workers may start elsewhere) and a configuration listed twice runs once. ``seeds=None``:
    each line carries its own seed (or the default). A bad line's error starts with ``origin`` (e.g. the
    suite file) and the line's number."""
    from cl_bench.config import compose, run_id

    jobs, seen = [], set()
    for number, line in enumerate(lines, 1):
        for seed in [None] if seeds is None else seeds:
            seeded = line + ([] if seed is None else [f"seed={seed}"])
            try:
                cfg = compose(seeded + overrides)
            except UserError as error:
                raise UserError(f"{origin}, run {number}: {error}" if origin else str(error)) from None
            if cfg.nproc > 1:
                raise UserError(f"{origin + ', ' if origin else ''}run {number}: nproc={cfg.nproc} starts its processes "
                                f"from `cl-bench run`; a sweep runs each configuration in one process")
            results_dir = Path(cfg.results_dir).resolve()
            argv = seeded + overrides + [f"results_dir={results_dir}"]
            identity = run_id(cfg)
            if identity not in seen:
                seen.add(identity)
                label = f"{cfg.strategy.name} on {cfg.scenario.name} / {cfg.model.name}, seed {cfg.seed}"
                jobs.append(Job(argv, identity, label, results_dir))
    return jobs


def execute(argv: list[str], wait_for_lock: bool = False, gather: bool = False, console=None) -> dict:
    """Run one configuration (in whichever process or Ray worker the executor chose) and describe the
    outcome; never raises, except on Ctrl-C."""
    from cl_bench.config import compose
    from cl_bench.locking import RunBusy
    from cl_bench.runner import RunFailed, run

    began = time.time()
    outcome = {"status": "failed", "message": "", "seconds": 0.0, "files": {}, "run_id": ""}
    try:
        cfg = compose(argv)
        summary = run(cfg, console=console, wait_for_lock=wait_for_lock)
        # skipped: finished before, by an earlier bench or by another process while this one waited for its lock
        outcome.update(status="skipped" if summary.get("skipped") else "finished", run_id=summary["run_id"],
                       message=f"acc_final_task_mean {summary['metrics'].get('acc_final_task_mean') or 0:.2f}")
        if gather:
            directory = Path(cfg.results_dir) / "runs" / summary["run_id"]
            outcome["files"] = {name: (directory / name).read_bytes() for name in RUN_FILES}
    except RunBusy as error:
        outcome.update(status="busy", message=str(error))
    except (UserError, RunFailed, OSError) as error:
        outcome.update(message=str(error), kind="input")
    except Exception as error:  # a bug: reported as such, the other runs go on
        outcome.update(message=f"{type(error).__name__}: {error}", kind="internal")
    outcome["seconds"] = time.time() - began
    return outcome


def _limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class InlineExecutor:
    """jobs=1: runs one after another in this process, with the runs' own progress output."""

    capacity = 1

    def __init__(self, console):
        self.console = console

    def submit(self, job: Job) -> Future:
        future = Future()
        future.set_result(execute(job.argv, job.wait_for_lock, console=self.console))
        return future

    def close(self, cancel: bool = False) -> None:
        pass


class PoolExecutor:
    """jobs=N: a pool of spawned processes (fork is unsafe once torch has started its threads)."""

    def __init__(self, jobs: int):
        self.capacity = jobs
        threads = max(1, (os.cpu_count() or 1) // jobs)
        self.pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_limit_threads,
                                        initargs=(threads,))

    def submit(self, job: Job) -> Future:
        return self.pool.submit(execute, job.argv, job.wait_for_lock)

    def close(self, cancel: bool = False) -> None:
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


def _execute_on_ray(argv: list[str], wait_for_lock: bool, threads: int) -> dict:
    _limit_threads(threads)
    return execute(argv, wait_for_lock, gather=True)


class RayExecutor:
    """Each run a Ray task; see the module docstring for the addresses it connects to."""

    def __init__(self, options: Options, console):
        try:
            import ray
        except ImportError:
            raise UserError("executor=ray needs Ray: pip install 'cl-bench[ray]'") from None
        self.ray = ray
        passed = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "CL_BENCH_CACHE", "PYTHONPATH")
                  if k in os.environ}
        settings = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                        runtime_env={"env_vars": passed})
        if options.ray_address:
            check_reachable(options.ray_address)
        self.token_set = False
        try:
            if options.ray_address:
                context = ray.init(address=options.ray_address, **settings)
            else:
                self.token_set = private_ray_token()
                context = ray.init(address="local", num_cpus=os.cpu_count(), **settings)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise UserError(f"cannot reach a Ray cluster at {options.ray_address}: "
                            f"{' '.join(str(error).split())[:200]}") from None
        self.address = context.address_info.get("gcs_address", "")
        console.print(f"[dim]Ray: {'connected to' if options.ray_address else 'started a local instance at'} "
                      f"{self.address}, dashboard {'off' if not context.dashboard_url else context.dashboard_url}"
                      f"[/dim]")
        cpus = ray.cluster_resources().get("CPU", 1)
        self.capacity = max(1, int(cpus // options.ray_cpus))
        self.remote = ray.remote(num_cpus=options.ray_cpus, num_gpus=options.ray_gpus, max_retries=0)(
            _execute_on_ray)
        self.threads = max(1, int(options.ray_cpus))

    def submit(self, job: Job) -> Future:
        return self.remote.remote(job.argv, job.wait_for_lock, self.threads).future()

    def close(self, cancel: bool = False) -> None:
        self.ray.shutdown()
        if self.token_set:
            os.environ.pop(RAY_TOKEN, None)


RAY_TOKEN = "RAY_AUTH_TOKEN"


def private_ray_token() -> bool:
    """Before starting a local Ray instance: make an existing ``~/.ray/auth_token`` owner-only, or, when
    the user has set up no token at all, put a fresh one in this process's environment (Ray's processes
    inherit it; nothing is written to disk). Returns whether one was set here."""
    saved = Path.home() / ".ray" / "auth_token"
    if saved.is_file() and saved.stat().st_mode & 0o077:
        saved.chmod(0o600)
    if any(k in os.environ for k in ("RAY_AUTH_MODE", RAY_TOKEN, "RAY_AUTH_TOKEN_PATH")) or saved.is_file():
        return False
    os.environ[RAY_TOKEN] = secrets.token_hex(32)  # 256 bits, as Ray's own generator
    return True


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, when nothing listens at ``[ray://]host:port`` (``ray.init`` would
    retry for minutes). ``auto`` is left to Ray."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"ray.address must look like HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise UserError(f"cannot reach a Ray cluster at {address}: {error.strerror or error}") from None


def write_gathered(results_dir: Path, outcome: dict) -> None:
    """A Ray worker's run files, written into the driver's results directory unless already identical."""
    from cl_bench._io import atomic_write_text

    directory = results_dir / "runs" / outcome["run_id"]
    for name in RUN_FILES:  # summary last: it vouches for the others (scores sha256)
        data = outcome["files"].get(name)
        target = directory / name
        if data is not None and not (target.is_file() and target.read_bytes() == data):
            atomic_write_text(target, data.decode())


@dataclass
class Tally:
    total: int
    finished: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)
    running: int = 0
    durations: list = field(default_factory=list)

    def line(self, capacity: int) -> str:
        done = self.finished + self.skipped + len(self.failed)
        left = self.total - done - self.running
        text = (f"{done}/{self.total} done ({self.finished} finished, {self.skipped} already done, "
                f"{len(self.failed)} failed) · {self.running} running · {left} waiting")
        if self.durations and done < self.total:
            mean = sum(self.durations) / len(self.durations)
            eta = mean * math.ceil((left + self.running) / max(1, capacity))
            text += f" · ETA {eta // 60:.0f}m{eta % 60:02.0f}s"
        return text


def run_suite(jobs: list[Job], options: Options, console) -> Tally:
    """Run every job on the chosen executor; returns the tally (failed: (label, kind, message))."""
    if options.executor == "ray":
        executor = RayExecutor(options, console)
    elif options.jobs == 1:
        executor = InlineExecutor(console)
    else:
        executor = PoolExecutor(options.jobs)
    tally, queue, running = Tally(len(jobs)), deque(jobs), {}
    try:
        while queue or running:
            while queue and len(running) < executor.capacity:
                job = queue.popleft()
                if options.executor != "local" or options.jobs > 1:
                    console.print(f"[dim]started {escape(job.label)}[/dim]")
                running[executor.submit(job)] = job
                tally.running = len(running)
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                tally.running = len(running)
                outcome = future.result()
                if outcome["status"] == "busy" and not job.wait_for_lock:
                    job.wait_for_lock = True  # another process runs it: wait for it at the end of the queue
                    queue.append(job)
                    console.print(f"[yellow]{escape(job.label)}: {escape(outcome['message'])}; "
                                  f"will wait for it after the others[/yellow]")
                    continue
                if outcome.get("files"):
                    write_gathered(job.results_dir, outcome)
                report(tally, job, outcome, console, executor.capacity)
    except KeyboardInterrupt:
        executor.close(cancel=True)
        raise
    executor.close()
    return tally


def report(tally: Tally, job: Job, outcome: dict, console, capacity: int) -> None:
    status = outcome["status"]
    if status == "finished":
        tally.finished += 1
        tally.durations.append(outcome["seconds"])
        event = f"[green]finished[/green] {escape(job.label)} ({escape(outcome['message'])}, {outcome['seconds']:.0f}s)"
    elif status == "skipped":
        tally.skipped += 1
        event = f"[dim]already finished[/dim] {escape(job.label)}"
    else:
        tally.failed.append((job.label, outcome.get("kind", "input"), outcome["message"]))
        tally.durations.append(outcome["seconds"])
        event = f"[red]failed[/red] {escape(job.label)}: {escape(outcome['message'])}"
    console.print(f"{event}\n[bold]\\[bench][/bold] {tally.line(capacity)}", highlight=False, soft_wrap=True)

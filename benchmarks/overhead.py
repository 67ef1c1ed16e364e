"""Harness overhead: cl-bench's ``strategy=finetune`` against Avalanche's ``Naive`` and a plain PyTorch loop
on the same work.

What is measured
    Wall-clock seconds of one whole continual-learning run, train and evaluation, on Split-Fashion-MNIST
    (5 tasks x 2 classes, cl-bench's class order, seed 1993) with cl-bench's ``small_cnn`` backbone.

    * cl-bench: ``cl_bench.runner.run(compose([...]))`` end to end: config and provenance, model and
      strategy construction, training, scoring the seen tasks after each task, and writing
      ``config.yaml``, ``scores.csv``, ``summary.json`` and ``checkpoints/task-NNN.pt`` after every task.
    * Avalanche: ``avalanche.training.Naive`` in its own loop: model, optimizer and strategy
      construction, ``strategy.train(experience)`` and ``strategy.eval(test_stream[:k + 1])`` after each
      experience (the seen test experiences, as cl-bench does), with an ``EvaluationPlugin`` that
      computes accuracy only and has no loggers (nothing is printed).

    Not timed: reading the IDX files and splitting them, which happens once and is shared. cl-bench's
    stream is built once and handed to every run (``cl_bench.runner.build_stream`` is swapped for a
    function returning it); Avalanche's benchmark is built once, with ``nc_benchmark``, from exactly the
    tensors of that stream.

How the two are made identical
    * Data: the per-task train/test tensors of cl-bench's stream (subsampled with
      ``scenario.max_per_class`` / ``max_test_per_class``, relabelled by class order) are concatenated
      and given to ``nc_benchmark(n_experiences=5, fixed_class_order=range(10), task_labels=False)``,
      so experience k holds the classes {2k, 2k+1} = cl-bench's task k. Before timing, the script checks
      that every Avalanche experience holds exactly the same (image, label) multiset as cl-bench's task.
    * Model: the same ``small_cnn`` backbone built by cl-bench's model factory (same preprocessing code:
      uint8 -> float / 255, normalised with mean 0.5 and std 0.5, done inside the model's forward on each
      batch for both) and a head that grows with the classes seen (cl-bench's ``IncrementalLinear``;
      Avalanche's ``IncrementalClassifier`` without masking); cross-entropy over the seen classes.
    * Training: same epochs, batch size, SGD (lr, momentum), fresh optimizer state for every task
      (cl-bench makes a new optimizer per task; Avalanche gets ``reset_optimizer_state=True``), same
      evaluation batch size, same seed set before each run, same torch thread count, CPU, same process.
      Shuffling orders differ (each tool draws its own), so accuracies agree only approximately.

    * Plain PyTorch (``run_plain``): no harness at all, the same backbone module and preprocessing, a
      linear head grown by copying rows, a fresh SGD per task, batches sliced from ``torch.randperm``, and the
      pooled seen-task test accuracy after each task; nothing is written.

    Runs rotate (each tool takes each position in turn) after an untimed warm-up of all three on a tiny
    stream; the table reports medians. Targets: cl-bench / Avalanche <= 1.10, cl-bench / plain <= 1.05.
    The script always exits 0: it reports, the tests assert.

Usage
    .venv/bin/python benchmarks/overhead.py [--subsample N] [--test-subsample N] [--repeats R]
                                            [--batch-size B] [--threads K] [--profile]
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cl_bench.avalanche_interop import check_same_data, to_avalanche  # noqa: E402

TARGET_RATIO = 1.10
PLAIN_TARGET_RATIO = 1.05  # against a loop with no harness at all (issue 17)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--subsample", "--tasks-subsample", dest="subsample", type=int, default=2000,
                        help="training samples per class (scenario.max_per_class); 0 = all 6000")
    parser.add_argument("--test-subsample", type=int, default=500,
                        help="test samples per class (scenario.max_test_per_class); 0 = all 1000")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each tool, alternated")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up on a tiny stream")
    parser.add_argument("--results-dir", default=None,
                        help="where cl-bench writes its run directories (default: a temporary directory, removed)")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, run cl-bench once more under cProfile and print the top functions")
    return parser.parse_args(argv)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Meter:
    """Wall-clock and CPU seconds of this process, and how busy the other processes kept the CPUs meanwhile
    (from /proc/stat minus this process's share; None where /proc is missing). A shared machine makes
    wall-clock times noisy; ``foreign`` flags the runs that other processes slowed down."""

    def __enter__(self):
        self._wall, self._cpu, self._busy = time.perf_counter(), time.process_time(), _busy_jiffies()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
        busy = _busy_jiffies()
        self.foreign = None
        if busy is not None and self._busy is not None and self.wall > 0:
            ticks = os.sysconf("SC_CLK_TCK")
            others = (busy - self._busy) / ticks - self.cpu
            self.foreign = max(0.0, others / (self.wall * (os.cpu_count() or 1)))
        return False


def _busy_jiffies() -> int | None:
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait


# --------------------------------------------------------------------------------------------- cl-bench

def clbench_config(args, results_dir: str):
    from cl_bench.config import compose

    overrides = [
        "strategy=finetune", "scenario=fmnist", "model=small_cnn",
        f"strategy.epochs={args.epochs}", f"strategy.batch_size={args.batch_size}",
        "strategy.optimizer=sgd", f"strategy.lr={args.lr}", f"strategy.momentum={args.momentum}",
        f"eval_batch_size={args.eval_batch_size}", "eval_mode=cil", "eval_unseen=false",
        f"seed={args.seed}", "device=cpu", "progress=false", "resume=false", f"results_dir={results_dir}",
    ]
    if args.subsample > 0:
        overrides.append(f"scenario.max_per_class={args.subsample}")
    if args.test_subsample > 0:
        overrides.append(f"scenario.max_test_per_class={args.test_subsample}")
    return compose(overrides)


def run_clbench(cfg, stream) -> tuple[Meter, dict]:
    """One timed ``runner.run`` on the prebuilt stream; (meter, summary)."""
    from cl_bench import runner

    original = runner.build_stream
    runner.build_stream = lambda _cfg: stream
    try:
        gc.collect()
        with Meter() as meter:
            summary = runner.run(cfg)
    finally:
        runner.build_stream = original
    return meter, summary


# --------------------------------------------------------------------------------------------- Avalanche

class _AvalancheNet(torch.nn.Module):
    """cl-bench's backbone (its ``prepare`` does the preprocessing, as in cl-bench) + Avalanche's growing head."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, inputs):
        return self.head(self.backbone(self.backbone.prepare(inputs, inputs.device)))


def run_avalanche(cfg, stream, benchmark, args) -> tuple[Meter, dict]:
    """One timed Avalanche run; (meter, info with final accuracy and the train/eval split)."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.models import IncrementalClassifier
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin
    from cl_bench.models.factory import create_backbone

    gc.collect()
    meter = Meter().__enter__()
    seed_all(args.seed)
    backbone = create_backbone(cfg.model, stream.input_kind, stream.input_shape)
    head = IncrementalClassifier(backbone.out_dim, initial_out_features=len(stream.tasks[0].classes), masking=False)
    model = _AvalancheNet(backbone, head)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    strategy = Naive(model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(),
                     train_mb_size=args.batch_size, train_epochs=args.epochs, eval_mb_size=args.eval_batch_size,
                     device="cpu", evaluator=evaluator)
    train_seconds = eval_seconds = 0.0
    results = {}
    for k, experience in enumerate(benchmark.train_stream):
        began = time.perf_counter()
        strategy.train(experience, eval_streams=[], reset_optimizer_state=True)
        train_seconds += time.perf_counter() - began
        began = time.perf_counter()
        results = strategy.eval(benchmark.test_stream[: k + 1])
        eval_seconds += time.perf_counter() - began
    meter.__exit__(None, None, None)
    stream_keys = [key for key in results if key.startswith("Top1_Acc_Stream/eval_phase/test_stream")]
    accuracy = 100.0 * float(results[stream_keys[0]]) if stream_keys else float("nan")
    return meter, {"accuracy": accuracy, "train_seconds": train_seconds, "eval_seconds": eval_seconds}


# --------------------------------------------------------------------------------------------- plain PyTorch

def run_plain(cfg, stream, args) -> tuple[Meter, dict]:
    """The same training and evaluation with no harness at all: the backbone module, a linear head grown by
    copying its rows, a fresh SGD per task, batches sliced from a ``torch.randperm``, and after each task
    the accuracy over the pooled test samples of the seen tasks (one prediction per sample, as cl-bench)."""
    from cl_bench.models.factory import create_backbone

    gc.collect()
    meter = Meter().__enter__()
    seed_all(args.seed)
    backbone = create_backbone(cfg.model, stream.input_kind, stream.input_shape)
    head = torch.nn.Linear(backbone.out_dim, 0)
    train_seconds = eval_seconds = 0.0
    correct = total = 0
    for k, task in enumerate(stream.tasks):
        began = time.perf_counter()
        seen = max(max(t.classes) for t in stream.tasks[: k + 1]) + 1
        grown = torch.nn.Linear(backbone.out_dim, seen)
        with torch.no_grad():
            grown.weight[: head.out_features] = head.weight
            grown.bias[: head.out_features] = head.bias
        head = grown
        parameters = list(backbone.parameters()) + list(head.parameters())
        optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum)
        inputs, targets = task.train.inputs, task.train.targets
        backbone.train()
        for _ in range(args.epochs):
            order = torch.randperm(len(targets))
            for start in range(0, len(order), args.batch_size):
                index = order[start:start + args.batch_size]
                batch = inputs[index]
                loss = torch.nn.functional.cross_entropy(head(backbone(backbone.prepare(batch, batch.device))),
                                                         targets[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        train_seconds += time.perf_counter() - began
        began = time.perf_counter()
        backbone.eval()
        correct = total = 0
        with torch.no_grad():
            for seen_task in stream.tasks[: k + 1]:
                test_inputs, test_targets = seen_task.test.inputs, seen_task.test.targets
                for start in range(0, len(test_targets), args.eval_batch_size):
                    batch = test_inputs[start:start + args.eval_batch_size]
                    predicted = head(backbone(backbone.prepare(batch, batch.device))).argmax(1)
                    correct += int((predicted == test_targets[start:start + args.eval_batch_size]).sum())
                    total += len(batch)
        eval_seconds += time.perf_counter() - began
    meter.__exit__(None, None, None)
    return meter, {"accuracy": 100.0 * correct / max(total, 1), "train_seconds": train_seconds,
                   "eval_seconds": eval_seconds}


# --------------------------------------------------------------------------------------------- driver

def tiny_stream(stream, per_class: int = 32):
    """The first ``per_class`` train and test samples of each class of every task (for the warm-up)."""
    from cl_bench.scenarios.base import Stream, Task

    def head(samples):
        keep = torch.cat([torch.nonzero(samples.targets == c).flatten()[:per_class] for c in samples.targets.unique()])
        return samples.select(keep.sort().values)

    tasks = tuple(Task(t.index, t.name, head(t.train), head(t.test), t.classes) for t in stream.tasks)
    return Stream(stream.name, stream.kind, tasks, stream.input_kind, stream.input_shape, stream.class_names,
                  stream.provenance)


def profile_clbench(cfg, stream, top: int = 25) -> None:
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    meter, _ = run_clbench(cfg, stream)
    profiler.disable()
    seconds = meter.wall
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(order).print_stats(top)
        print(f"\n--- cl-bench under cProfile ({seconds:.2f} s with profiling), top {top} by {order} ---")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])


def describe(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="avalanche")
    from cl_bench import progress as _progress  # noqa: F401  (imported by runner.run: keep it out of the timing)
    from cl_bench.runner import build_stream
    import avalanche.training  # noqa: F401  (one-time import, not timed)

    owned_dir = args.results_dir is None
    results_dir = args.results_dir or tempfile.mkdtemp(prefix="cl-bench-overhead-")
    try:
        cfg = clbench_config(args, results_dir)
        began = time.perf_counter()
        stream = build_stream(cfg)
        load_seconds = time.perf_counter() - began
        began = time.perf_counter()
        benchmark = to_avalanche(stream)
        benchmark_seconds = time.perf_counter() - began
        checked = check_same_data(stream, benchmark)
        print(f"Split-Fashion-MNIST, {len(stream)} tasks, class order {stream.provenance['class_order']}; "
              f"samples per task: {checked}")
        print(f"identical per-task data in both tools: (image, label) multisets checked, "
              f"all {2 * len(stream)} splits equal")
        print(f"model small_cnn, epochs {args.epochs}, batch {args.batch_size}, "
              f"SGD lr {args.lr} momentum {args.momentum}, "
              f"eval batch {args.eval_batch_size}, seed {args.seed}, torch threads {torch.get_num_threads()}, "
              f"torch {torch.__version__}")
        print(f"not timed: cl-bench stream load+split {load_seconds:.2f} s, Avalanche nc_benchmark from it "
              f"{benchmark_seconds:.2f} s; cl-bench results in {results_dir}")

        if not args.no_warmup:
            small = tiny_stream(stream)
            small_benchmark = to_avalanche(small)
            run_clbench(cfg, small)
            run_avalanche(cfg, small, small_benchmark, args)
            run_plain(cfg, small, args)

        tools = ("cl-bench", "avalanche", "plain")
        runs = {tool: [] for tool in tools}
        for repeat in range(args.repeats):
            order = tools[repeat % 3:] + tools[: repeat % 3]  # each tool takes each position in turn
            for tool in order:
                if tool == "cl-bench":
                    meter, summary = run_clbench(cfg, stream)
                    cost = summary["cost"]
                    info = {"accuracy": summary["metrics"]["acc_final_sample_weighted"],
                            "train_seconds": cost["train_seconds"], "eval_seconds": cost["eval_seconds"]}
                elif tool == "avalanche":
                    meter, info = run_avalanche(cfg, stream, benchmark, args)
                else:
                    meter, info = run_plain(cfg, stream, args)
                if torch.get_num_threads() != args.threads:
                    print(f"warning: torch threads changed to {torch.get_num_threads()} during {tool}; resetting")
                    torch.set_num_threads(args.threads)
                info.update(wall=meter.wall, cpu=meter.cpu, foreign=meter.foreign,
                            other=meter.wall - info["train_seconds"] - info["eval_seconds"])
                runs[tool].append(info)
                foreign = "" if meter.foreign is None else f", other processes {100 * meter.foreign:.0f}% CPU"
                print(f"  repeat {repeat + 1}/{args.repeats} {tool:9s} {meter.wall:7.2f} s wall, "
                      f"{meter.cpu:7.2f} s CPU "
                      f"(train {info['train_seconds']:.2f} s, eval {info['eval_seconds']:.2f} s{foreign})  "
                      f"final accuracy {info['accuracy']:.2f}%", flush=True)

        print()
        header = (f"{'tool':10s} {'median s':>9s} {'min s':>7s} {'CPU s':>7s} {'train s':>8s} {'eval s':>7s} "
                  f"{'other s':>8s} {'final acc %':>12s}   wall per run (s)")
        print(header)
        print("-" * len(header))

        def median(tool, key):
            return statistics.median(run[key] for run in runs[tool])

        for tool in tools:
            print(f"{tool:10s} {median(tool, 'wall'):9.2f} {min(r['wall'] for r in runs[tool]):7.2f} "
                  f"{median(tool, 'cpu'):7.2f} {median(tool, 'train_seconds'):8.2f} "
                  f"{median(tool, 'eval_seconds'):7.2f} "
                  f"{median(tool, 'other'):8.2f} {median(tool, 'accuracy'):12.2f}   "
                  f"{describe([r['wall'] for r in runs[tool]])}")
        ratio = median("cl-bench", "wall") / median("avalanche", "wall")
        ratio_min = min(r["wall"] for r in runs["cl-bench"]) / min(r["wall"] for r in runs["avalanche"])
        ratio_cpu = median("cl-bench", "cpu") / median("avalanche", "cpu")
        verdict = "within target" if ratio <= TARGET_RATIO else "ABOVE target (rerun with --profile)"
        print(f"\nratio cl-bench / avalanche = {ratio:.3f} "
              f"(median wall-clock; target <= {TARGET_RATIO:.2f}: {verdict})")
        print(f"                            {ratio_min:.3f} (fastest run of each), {ratio_cpu:.3f} (median CPU time)")
        plain_ratio = median("cl-bench", "wall") / median("plain", "wall")
        verdict = "within target" if plain_ratio <= PLAIN_TARGET_RATIO else "ABOVE target (rerun with --profile)"
        print(f"ratio cl-bench / plain PyTorch = {plain_ratio:.3f} (median wall-clock; target <= "
              f"{PLAIN_TARGET_RATIO:.2f}: {verdict}), "
              f"{min(r['wall'] for r in runs['cl-bench']) / min(r['wall'] for r in runs['plain']):.3f} (fastest run)")
        print("final acc = accuracy over all test samples of all tasks after the last task (cl-bench "
              "acc_final_sample_weighted, Avalanche Top1_Acc_Stream); 'other' = setup, bookkeeping and "
              "result files outside the train and eval loops")
        loads = [r["foreign"] for tool in runs for r in runs[tool] if r["foreign"] is not None]
        if loads and max(loads) > 0.10:
            print(f"warning: other processes kept up to {100 * max(loads):.0f}% of the CPUs busy during timed runs, "
                  "so wall-clock times are inflated unevenly; trust the fastest-run ratio more, or rerun on an "
                  "idle machine (or with --threads 1)")

        if args.profile:
            profile_clbench(cfg, stream)
    finally:
        if owned_dir:
            shutil.rmtree(results_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs per minute of one suite through each executor, measured side by side in one process.

    .venv/bin/python benchmarks/sweep_throughput.py [--seeds 4] [--jobs 2]

The suite: finetune, er and joint of the default benchmark (Split Fashion-MNIST on cached EfficientNet-Lite0
features), each for ``--seeds`` seeds. The features are computed once before timing (the default cache);
every executor starts from an empty results directory, so nothing is skipped. Wall time
includes starting the executor (pool processes, the local Ray instance), as a user would see it. Prints
runs per minute and each executor's ratio to ``local jobs=1``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from rich.console import Console

from cl_bench import sweep

# the default benchmark's runs (benchmarks/default.yaml): seconds each once the features are cached
LINES = [["strategy=finetune", "scenario=fmnist", "model=efficientnet_lite0"],
         ["strategy=er", "scenario=fmnist", "model=efficientnet_lite0", "strategy.buffer_size=500"],
         ["strategy=joint", "scenario=fmnist", "model=efficientnet_lite0"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    quiet = Console(quiet=True)
    executors = {"local jobs=1": sweep.Options(), f"local jobs={args.jobs}": sweep.Options(jobs=args.jobs),
                 "ray (local instance)": sweep.Options(executor="ray")}
    with tempfile.TemporaryDirectory() as scratch:
        common = ["progress=false", "device=cpu"]
        sweep.run_suite(sweep.expand(LINES[:1], [0], common + [f"results_dir={scratch}/warm"]), sweep.Options(), quiet)
        rates = {}
        for name, options in executors.items():
            jobs = sweep.expand(LINES, list(range(args.seeds)), common + [f"results_dir={scratch}/{len(rates)}"])
            began = time.perf_counter()
            tally = sweep.run_suite(jobs, options, quiet)
            seconds = time.perf_counter() - began
            assert tally.finished == len(jobs), f"{name}: {tally.failed}"
            rates[name] = len(jobs) / seconds * 60
            print(f"{name:>22}: {len(jobs)} runs in {seconds:6.1f} s = {rates[name]:6.1f} runs/min")
    base = rates["local jobs=1"]
    for name, rate in rates.items():
        print(f"{name:>22}: {rate / base:.2f}x local jobs=1")


if __name__ == "__main__":
    main()

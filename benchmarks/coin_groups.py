"""CoIN's retrain-or-expand decision on an instruction stream, without training: for every task the
best instruction similarity to an earlier LoRA group (the TF-IDF cosine ``coin_ema`` computes), the
group that wins, and the branch taken (retrain that group with DEMA, or expand with a new group).

    .venv/bin/python benchmarks/coin_groups.py [--scenario instruct_recurring] [--threshold 0.9]

``--scenario`` is ``instruct_recurring`` or ``instruct_offline`` (built with one example per split).

The decision is ``coin_ema``'s own ``before_task`` on a tiny random model (no optimizer step).
"""
from __future__ import annotations

import argparse

import torch

from cl_bench.models.lm import tiny_llama
from cl_bench.registry import SCENARIOS
from cl_bench.strategies.base import Context
from cl_bench.strategies.coin_ema import CoINEMA, set_similarity, task_instructions


def decisions(tasks, threshold: float) -> list[dict]:
    """Per task: best similarity to the groups before it (None for the first), its group, the branch."""
    coin = CoINEMA(tiny_llama("text", ()), Context(generator=torch.Generator().manual_seed(0)), threshold=threshold)
    rows = []
    for task in tasks:
        similarities = [set_similarity(task_instructions(task), book) for book in coin.codebooks]
        coin.before_task(task)
        entry = coin.dema_log[-1]
        branch = "retrain + DEMA" if entry["reused"] else ("first group" if not similarities else "expand")
        rows.append({"task": task.name, "best": max(similarities, default=None),
                     "closest": similarities.index(max(similarities)) if similarities else None,
                     "group": entry["group"], "dema": entry["dema"], "branch": branch})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="instruct_recurring")
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    stream = SCENARIOS.get(args.scenario)(max_train_per_task=1, test_per_task=1, general_size=1).stream()
    print(f"{args.scenario}, threshold {args.threshold}")
    print(f"{'task':<20} {'best sim':>8} {'closest':>7} {'group':>5}  branch")
    for row in decisions(stream.tasks, args.threshold):
        best = "-" if row["best"] is None else f"{row['best']:.3f}"
        closest = "-" if row["closest"] is None else row["closest"]
        print(f"{row['task']:<20} {best:>8} {closest:>7} {row['group']:>5}  {row['branch']}")


if __name__ == "__main__":
    main()

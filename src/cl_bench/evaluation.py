"""Scoring after each task: ``sum[row, j]`` and ``count[row, j]`` for every scored task j.

``eval_mode=cil`` gives the strategy no task identity, not even through its batches: the test examples
of every task scored in that row are pooled, put in one fixed shuffled order (a generator of its own,
seeded with the run's seed, so training and resume never see it) and cut into batches of
``eval_batch_size``; correct counts or scores are split back per task afterwards, and for class streams
the share of predictions that fall among their own task's classes (task identification) is counted
too. Instruction prompts are
pooled the same way, each keeping its own task's ``max_new_tokens`` and scorer. ``eval_mode=til`` hands
the task over: per-task batches, logits masked to the task's classes. General suites are scored one
suite at a time (they are evaluation-only suites, not tasks of the stream).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from cl_bench import scorers
from cl_bench.scenarios.base import Samples, Task


def score_tasks(strategy, stream, row: int, columns, sums: np.ndarray, counts: np.ndarray, *, eval_mode: str,
                batch_size: int, seed: int) -> float | None:
    """Fill ``sums[row, j]``, ``counts[row, j]`` for the tasks ``columns``: mixed batches under ``cil``,
    per-task batches under ``til``. Returns the percent of the pooled samples predicted as a class of
    their own task (class streams under ``cil``; None otherwise)."""
    columns = list(columns)
    tasks = [stream.tasks[j] for j in columns]
    identified = None
    if eval_mode == "til":
        results = [evaluate_instructions(strategy, task) if stream.kind == "instructions"
                   else evaluate(strategy, task, stream.num_classes, "til", batch_size) for task in tasks]
    elif stream.kind == "instructions":
        results = evaluate_instructions_mixed(strategy, tasks, batch_size, seed)
    else:
        results, own_task = evaluate_mixed(strategy, tasks, stream.num_classes, batch_size, seed)
        identified = 100 * own_task / sum(count for _, count in results)
    for j, (total, count) in zip(columns, results):
        sums[row, j], counts[row, j] = total, count
    return identified


def score_general(strategy, stream, row: int, sums: np.ndarray, counts: np.ndarray) -> None:
    """Held-out general suites (instruction streams): general-ability retention."""
    for g, suite in enumerate(stream.general):
        sums[row, g], counts[row, g] = evaluate_instructions(strategy, suite)


def mixed_order(tasks: list[Task], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner task, row in its test set) of every pooled test example, in one shuffled order drawn from
    a generator of its own seeded with ``seed``."""
    sizes = torch.tensor([len(task.test) for task in tasks])
    owner = torch.repeat_interleave(torch.arange(len(tasks)), sizes)
    position = torch.cat([torch.arange(int(size)) for size in sizes])
    order = torch.randperm(len(owner), generator=torch.Generator().manual_seed(seed))
    return owner[order], position[order]


def gather(tests: list[Samples], owner: torch.Tensor, position: torch.Tensor) -> Samples:
    """The samples ``tests[owner[k]]`` row ``position[k]``, in that order."""
    present = owner.unique().tolist()
    grouped = functools.reduce(Samples.concat, [tests[j].select(position[owner == j]) for j in present])
    source = torch.cat([torch.nonzero(owner == j).flatten() for j in present])  # where each grouped row goes
    return grouped.select(torch.argsort(source))


def padded_logits(strategy, inputs, num_classes: int) -> torch.Tensor:
    """The strategy's logits, widened to ``num_classes``: classes it has no logit for yet get the lowest score."""
    logits = strategy.predict(inputs).float()
    if logits.shape[1] < num_classes:
        pad = logits.new_full((logits.shape[0], num_classes - logits.shape[1]), torch.finfo(logits.dtype).min)
        logits = torch.cat([logits, pad], dim=1)
    return logits


@torch.no_grad()
def evaluate_mixed(strategy, tasks: list[Task], num_classes: int, batch_size: int,
                   seed: int) -> tuple[list[tuple[float, int]], int]:
    """(correct predictions, samples) per task, from batches that mix all ``tasks``' test samples, and
    how many samples were predicted as a class of their own task."""
    strategy.eval()
    owner, position = mixed_order(tasks, seed)
    task_of_class = torch.full((num_classes,), -1, dtype=torch.long)
    for i, task in enumerate(tasks):
        task_of_class[list(task.classes)] = i
    correct = torch.zeros(len(tasks), dtype=torch.long)
    own_task = 0
    starts = range(0, len(owner), batch_size)
    for start in strategy.context.progress(starts, f"eval {len(tasks)} tasks, mixed", total=len(starts)):
        batch_owner = owner[start:start + batch_size]
        batch = gather([task.test for task in tasks], batch_owner, position[start:start + batch_size])
        predicted = padded_logits(strategy, batch.inputs, num_classes).argmax(1).cpu()
        hit = predicted == batch.targets.cpu()
        correct += torch.bincount(batch_owner[hit], minlength=len(tasks))
        own_task += int((task_of_class[predicted] == batch_owner).sum())
    return [(float(c), len(task.test)) for c, task in zip(correct.tolist(), tasks)], own_task


@torch.no_grad()
def evaluate(strategy, task: Task, num_classes: int, eval_mode: str, batch_size: int) -> tuple[float, int]:
    """(correct predictions, samples) on ``task.test`` alone, in order; ``til`` masks logits to the
    task's own classes."""
    strategy.eval()
    correct, device = 0, strategy.device
    allowed = None
    if eval_mode == "til":
        allowed = torch.zeros(num_classes, dtype=torch.bool, device=device)
        allowed[list(task.classes)] = True
    for inputs, targets in strategy.batches(task.test, batch_size, shuffle=False, description=f"eval {task.name}"):
        logits = padded_logits(strategy, inputs, num_classes)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -math.inf)
        correct += int((logits.argmax(1) == targets).sum())
    return float(correct), len(task.test)


def evaluate_instructions_mixed(strategy, tasks: list[Task], batch_size: int,
                                seed: int) -> list[tuple[float, int]]:
    """(summed scores, examples) per task, generating for chunks of prompts that mix all ``tasks``;
    each prompt gets its own task's ``max_new_tokens`` and each task's answers its own scorer."""
    owner, position = mixed_order(tasks, seed)
    predictions = [[""] * len(task.test) for task in tasks]
    for start in range(0, len(owner), batch_size):
        chunk = list(zip(owner[start:start + batch_size].tolist(), position[start:start + batch_size].tolist()))
        texts = strategy.predict([tasks[j].test.prompts[i] for j, i in chunk],
                                 [tasks[j].max_new_tokens for j, _ in chunk])
        for (j, i), text in zip(chunk, texts):
            predictions[j][i] = text
    return [scored(task, texts) for task, texts in zip(tasks, predictions)]


def evaluate_instructions(strategy, task: Task) -> tuple[float, int]:
    """(summed per-example scores, examples) on ``task.test`` alone: greedy generations scored by the task's scorer."""
    return scored(task, strategy.predict(task.test.prompts, task.max_new_tokens))


def scored(task: Task, predictions: list[str]) -> tuple[float, int]:
    scores = scorers.score(task.scorer, predictions, task.test.references, task.test.prompts)
    return float(scores.sum()), len(scores)

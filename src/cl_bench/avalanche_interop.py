"""cl-bench streams as Avalanche benchmarks, for Avalanche users who want our scenarios in their loops.

``to_avalanche(stream)`` builds an ``nc_benchmark`` whose experience k holds exactly the train and
test samples of cl-bench's task k, with the same relabelled classes (cl-bench relabels by class order,
so Avalanche keeps the order of the tasks' classes and does not shuffle). ``check_same_data`` verifies that.
"""
from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch

from cl_bench.errors import UserError


class LabelledData(torch.utils.data.Dataset):
    """(input, label) pairs over one or more ``Samples`` without copying them, with the ``targets``
    list Avalanche's generators read; inputs may be tensors or strings."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.targets = [int(y) for part in self.parts for y in part.targets.tolist()]
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part].inputs[index - int(self.starts[part])], self.targets[index]


def to_avalanche(stream):
    """An Avalanche ``nc_benchmark`` with the stream's class order, split and task sizes."""
    if stream.kind != "classes":
        raise UserError(f"to_avalanche needs a class-incremental stream; '{stream.name}' is a {stream.kind} stream")
    return benchmark_of(stream.tasks)


def benchmark_of(tasks):
    """The ``nc_benchmark`` whose experience k holds the train and test samples of ``tasks[k]``
    (also used by the Avalanche strategy adapter on the tasks seen so far)."""
    from avalanche.benchmarks import nc_benchmark

    sizes = [len(task.classes) for task in tasks]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nc_benchmark(LabelledData([t.train for t in tasks]), LabelledData([t.test for t in tasks]),
                            n_experiences=len(tasks), task_labels=False, shuffle=False,
                            fixed_class_order=[c for task in tasks for c in task.classes],
                            per_exp_classes=None if len(set(sizes)) == 1 else dict(enumerate(sizes)))


def _sample_keys(inputs, targets) -> list[bytes]:
    labels = np.asarray(targets, dtype=np.int64)
    if isinstance(inputs, torch.Tensor):
        rows = [row.tobytes() for row in inputs.reshape(len(inputs), -1).contiguous().numpy()]
    else:
        rows = [str(x).encode() for x in inputs]
    return sorted(hashlib.sha1(row + int(y).to_bytes(8, "little")).digest() for row, y in zip(rows, labels))


def check_same_data(stream, benchmark) -> str:
    """Raise unless Avalanche's experience k holds the same (input, label) multiset and classes as
    cl-bench's task k; returns a one-line summary of the sizes."""
    lines = []
    for split, avalanche_stream in (("train", benchmark.train_stream), ("test", benchmark.test_stream)):
        experiences = list(avalanche_stream)
        if len(experiences) != len(stream.tasks):
            raise AssertionError(f"{split}: Avalanche has {len(experiences)} experiences, "
                                 f"cl-bench {len(stream.tasks)} tasks")
        for task, experience in zip(stream.tasks, experiences):
            ours = getattr(task, split)
            items = [experience.dataset[i] for i in range(len(experience.dataset))]
            theirs = [item[0] for item in items]
            theirs = torch.stack(theirs) if isinstance(ours.inputs, torch.Tensor) else theirs
            if sorted(experience.classes_in_this_experience) != list(task.classes):
                raise AssertionError(f"{split} {task.name}: classes {sorted(experience.classes_in_this_experience)} "
                                     f"vs {list(task.classes)}")
            if _sample_keys(theirs, [int(item[1]) for item in items]) != _sample_keys(ours.inputs, ours.targets):
                raise AssertionError(f"{split} {task.name}: Avalanche's samples differ from cl-bench's")
        lines.append(f"{split} " + "/".join(str(len(getattr(t, split))) for t in stream.tasks))
    return "; ".join(lines)

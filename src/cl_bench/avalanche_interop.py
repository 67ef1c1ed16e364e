"""cl-bench streams as Avalanche benchmarks, for Avalanche users who want our scenarios in their loops.

``to_avalanche(stream)`` builds an ``nc_benchmark`` whose experience k holds exactly the train and
test samples of cl-bench's task k, with the same relabelled classes (cl-bench relabels by class order,
so Avalanche keeps the fixed order 0..C-1 and does not shuffle). ``check_same_data`` verifies that.
"""
from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch

from cl_bench.errors import UserError


class LabelledData(torch.utils.data.Dataset):
    """(input, label) pairs with the ``targets`` list Avalanche's generators read; inputs may be
    tensors or strings."""

    def __init__(self, inputs, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]


def to_avalanche(stream):
    """An Avalanche ``nc_benchmark`` with the stream's class order, split and task sizes."""
    from avalanche.benchmarks import nc_benchmark

    if stream.kind != "classes":
        raise UserError(f"to_avalanche needs a class-incremental stream; '{stream.name}' is a {stream.kind} stream")

    def dataset(split):
        parts = [getattr(task, split) for task in stream.tasks]
        targets = torch.cat([p.targets for p in parts])
        if isinstance(parts[0].inputs, torch.Tensor):
            return LabelledData(torch.cat([p.inputs for p in parts]), targets)
        return LabelledData([x for p in parts for x in p.inputs], targets)

    sizes = [len(task.classes) for task in stream.tasks]  # B{init}-Inc{increment}: only the first may differ
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nc_benchmark(dataset("train"), dataset("test"), n_experiences=len(stream.tasks), task_labels=False,
                            shuffle=False, fixed_class_order=list(range(stream.num_classes)),
                            per_exp_classes=None if len(set(sizes)) == 1 else {0: sizes[0]})


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

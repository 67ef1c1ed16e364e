"""Tasks, streams, class-incremental splits and instruction streams.

A class-incremental split B{init}-Inc{increment} shuffles the classes with a local
``numpy.random.RandomState(order_seed)`` (separate from the training seed; the same draw as PyCIL,
so seed 1993 reproduces the papers' class orders), relabels every sample by the position of its class in that order, and cuts the order into tasks: the first
task holds ``init`` classes (or ``increment`` when ``init`` is 0), every later one ``increment``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from cl_bench.errors import UserError, check_ranges


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's sha256 (a data file's identity in provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Samples:
    """Inputs (a tensor, or a list of strings for text) with integer targets, sliced by index arrays."""

    inputs: torch.Tensor | list
    targets: torch.Tensor

    def __post_init__(self):
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    def select(self, index) -> "Samples":
        index = torch.as_tensor(index, dtype=torch.long)
        if isinstance(self.inputs, torch.Tensor):
            inputs = self.inputs[index]
        else:
            inputs = [self.inputs[i] for i in index.tolist()]
        return Samples(inputs, self.targets[index])

    def concat(self, other: "Samples") -> "Samples":
        if isinstance(self.inputs, torch.Tensor):
            inputs = torch.cat([self.inputs, other.inputs])
        else:
            inputs = list(self.inputs) + list(other.inputs)
        return Samples(inputs, torch.cat([self.targets, other.targets]))

    def fingerprint(self) -> str:
        """A content hash: same inputs and targets give the same string on any machine."""
        digest = hashlib.sha256()
        if isinstance(self.inputs, torch.Tensor):
            digest.update(str((self.inputs.dtype, tuple(self.inputs.shape))).encode())
            digest.update(self.inputs.contiguous().numpy().tobytes())
        else:
            digest.update("\x1f".join(self.inputs).encode())
        digest.update(self.targets.numpy().astype(np.int64).tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class Examples:
    """Instruction examples: rendered prompts, the answer trained on, and the answers accepted when
    scoring (``references``; defaults to the answer alone)."""

    prompts: list
    answers: list
    references: tuple = ()

    def __post_init__(self):
        if len(self.prompts) != len(self.answers):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.answers)} answers")
        if not self.references:
            object.__setattr__(self, "references", tuple((a,) for a in self.answers))
        elif len(self.references) != len(self.answers):
            raise ValueError(f"{len(self.references)} reference sets for {len(self.answers)} answers")

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index) -> "Examples":
        index = [int(i) for i in torch.as_tensor(index, dtype=torch.long).tolist()]
        return Examples([self.prompts[i] for i in index], [self.answers[i] for i in index],
                        tuple(self.references[i] for i in index))

    def concat(self, other: "Examples") -> "Examples":
        return Examples(list(self.prompts) + list(other.prompts), list(self.answers) + list(other.answers),
                        tuple(self.references) + tuple(other.references))

    def state(self) -> list:
        """Plain lists, for checkpoints loaded with ``torch.load(weights_only=True)``."""
        return [list(self.prompts), list(self.answers), [list(r) for r in self.references]]

    @classmethod
    def from_state(cls, state: list) -> "Examples":
        prompts, answers, references = state
        return cls(prompts, answers, tuple(tuple(r) for r in references))

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for prompt, references in zip(self.prompts, self.references):
            digest.update(prompt.encode() + b"\x1e" + "\x1f".join(references).encode() + b"\x1d")
        digest.update("\x1f".join(self.answers).encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class Task:
    """One step of a stream. A class-incremental task has ``classes`` (the relabelled class ids it
    introduces); an instruction task has its ``instruction`` template, the name of its ``scorer``
    (see ``cl_bench.scorers``) and the generation budget ``max_new_tokens``."""

    index: int
    name: str
    train: Samples | Examples
    test: Samples | Examples
    classes: tuple[int, ...] = ()
    instruction: str | None = None
    scorer: str | None = None
    max_new_tokens: int = 0


@dataclass(frozen=True)
class Stream:
    """An ordered list of tasks plus what is needed to reproduce it."""

    name: str
    kind: str  # "classes" or "instructions"
    tasks: tuple[Task, ...]
    input_kind: str  # "image" or "text"
    input_shape: tuple[int, ...] = ()
    class_names: tuple[str, ...] = ()
    provenance: dict = field(default_factory=dict)
    # held-out suites scored before training and after every task (general-ability retention)
    general: tuple[Task, ...] = ()

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def map_inputs(self, encode: Callable[[Samples], torch.Tensor], input_kind: str) -> "Stream":
        """The same stream with every task's inputs replaced by ``encode(samples)`` (e.g. cached features)."""
        tasks = tuple(
            Task(t.index, t.name, Samples(encode(t.train), t.train.targets),
                 Samples(encode(t.test), t.test.targets), t.classes)
            for t in self.tasks
        )
        shape = tuple(tasks[0].train.inputs.shape[1:]) if tasks else ()
        return Stream(self.name, self.kind, tasks, input_kind, shape, self.class_names, self.provenance, self.general)


def class_order(num_classes: int, order_seed: int | None) -> list[int]:
    """Classes shuffled by ``order_seed``; ``None`` keeps the dataset's own order.

    Uses the legacy ``RandomState(order_seed).permutation``, the same draw as PyCIL/LAMDA-PILOT's
    ``np.random.seed(seed); np.random.permutation(n)``, so seed 1993 gives the papers' class order
    (without touching numpy's global state)."""
    if order_seed is None:
        return list(range(num_classes))
    return [int(c) for c in np.random.RandomState(order_seed).permutation(num_classes)]


def split_sizes(num_classes: int, init: int, increment: int, remainder: str) -> list[int]:
    """Classes per task for B{init}-Inc{increment}.

    When the classes after the first task do not divide by ``increment``, ``remainder`` says
    what to do with the leftover classes: ``error`` (the default: refuse), ``last_task`` (add
    them to the last task) or ``extra_task`` (one smaller task at the end).
    """
    if remainder not in ("error", "last_task", "extra_task"):
        raise UserError(f"scenario.remainder must be error, last_task or extra_task, got {remainder!r}")
    check_ranges("scenario", increment=(increment, ">= 1"), init=(init, ">= 0"))
    first = init or increment
    if first > num_classes:
        raise UserError(f"scenario.{'init' if init else 'increment'}={first} asks for {first} classes in the first "
                        f"task, but the data has {num_classes}")
    sizes = [first]
    rest = num_classes - first
    sizes += [increment] * (rest // increment)
    leftover = rest % increment
    if leftover:
        if remainder == "last_task":
            sizes[-1] += leftover
        elif remainder == "extra_task":
            sizes.append(leftover)
        else:
            raise UserError(
                f"B{init}-Inc{increment} leaves {leftover} of {num_classes} classes over; set "
                f"scenario.remainder=last_task or scenario.remainder=extra_task, or change the split")
    return sizes


def limit_per_class(targets: np.ndarray, max_per_class: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices keeping at most ``max_per_class`` random samples of each class (all when None), sorted."""
    if max_per_class is None:
        return np.arange(len(targets))
    keep = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        if len(members) > max_per_class:
            members = rng.choice(members, size=max_per_class, replace=False)
        keep.append(members)
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


def class_incremental_stream(
    name: str, train: Samples, test: Samples, class_names: Sequence[str], *, input_kind: str,
    init: int, increment: int, order_seed: int | None, remainder: str = "error",
    max_per_class: int | None = None, max_test_per_class: int | None = None,
    provenance: dict | None = None,
) -> Stream:
    """Split a labelled dataset into a class-incremental stream (see module docstring)."""
    num_classes = len(class_names)
    order = class_order(num_classes, order_seed)
    sizes = split_sizes(num_classes, init, increment, remainder)
    subsample_rng = np.random.default_rng(0 if order_seed is None else order_seed)
    train = train.select(limit_per_class(train.targets.numpy(), max_per_class, subsample_rng))
    test = test.select(limit_per_class(test.targets.numpy(), max_test_per_class, subsample_rng))
    relabel = torch.empty(num_classes, dtype=torch.long)
    relabel[torch.tensor(order)] = torch.arange(num_classes)
    train = Samples(train.inputs, relabel[train.targets])
    test = Samples(test.inputs, relabel[test.targets])
    tasks, start = [], 0
    for index, size in enumerate(sizes):
        classes = tuple(range(start, start + size))
        start += size
        in_train = (train.targets >= classes[0]) & (train.targets <= classes[-1])
        in_test = (test.targets >= classes[0]) & (test.targets <= classes[-1])
        tasks.append(Task(index, f"task{index + 1}", train.select(torch.nonzero(in_train).flatten()),
                          test.select(torch.nonzero(in_test).flatten()), classes))
    ordered_names = tuple(class_names[c] for c in order)
    info = dict(provenance or {})
    info.update(class_order=order, order_seed=order_seed, classes_per_task=sizes,
                data_hash=hashlib.sha256((train.fingerprint() + test.fingerprint()).encode()).hexdigest()[:16])
    first = train.inputs[0]
    shape = tuple(first.shape) if isinstance(first, torch.Tensor) else ()
    return Stream(name, "classes", tuple(tasks), input_kind, shape, ordered_names, info)


def instruction_stream(name: str, tasks: Sequence[Task], *, general: Sequence[Task] = (),
                       provenance: dict | None = None) -> Stream:
    """An instruction stream in the given task order; its provenance records the order and a data hash."""
    from cl_bench.scorers import SCORERS

    for task in [*tasks, *general]:
        if task.scorer not in SCORERS:
            raise UserError(f"task '{task.name}' names scorer {task.scorer!r}; known: {', '.join(SCORERS)}")
        if task.max_new_tokens < 1:
            raise UserError(f"task '{task.name}' needs max_new_tokens >= 1")
        if len(task.test) == 0:
            raise UserError(f"task '{task.name}' has no test examples")
    digest = hashlib.sha256()
    for task in [*tasks, *general]:
        digest.update(f"{task.name}|{task.instruction}|{task.scorer}|{task.max_new_tokens}".encode())
        digest.update((task.train.fingerprint() + task.test.fingerprint()).encode())
    info = dict(provenance or {})
    info.update(task_order=[t.name for t in tasks], general_suites=[g.name for g in general],
                scorers={t.name: t.scorer for t in [*tasks, *general]},
                examples={t.name: [len(t.train), len(t.test)] for t in [*tasks, *general]},
                data_hash=digest.hexdigest()[:16])
    return Stream(name, "instructions", tuple(tasks), "text", (), (), info, tuple(general))

"""Streams from any Hugging Face ``datasets`` dataset: ``scenario=hf`` (class-incremental) and
``scenario=hf_instructions`` (instruction tasks).

Loading goes through ``datasets``: ``scenario.path`` is what ``datasets.load_dataset`` takes (a hub id; a
builder such as ``parquet``, ``json``, ``csv`` or ``imagefolder`` with ``scenario.data_files``; a local
folder), with ``scenario.subset`` (the configuration, ``load_dataset``'s ``name``: ``scenario.name`` is
cl-bench's own) and ``scenario.revision``; a folder written by
``save_to_disk`` is read with ``datasets.load_from_disk``. Downloads land in the ``datasets`` cache
(``HF_DATASETS_CACHE``); with ``HF_DATASETS_OFFLINE=1`` only cached and local data loads. The provenance
records each split's ``datasets`` fingerprint, so two runs on different data never look alike.

``hf``: inputs from ``input_column`` (default: the first image column, else the first text column, else the
first numeric sequence), labels from ``label_column`` (a ``ClassLabel`` keeps its names; other values are
classes in sorted order). Images are decoded once, converted to RGB and resized and centre-cropped to
``image_size`` as the folder scenarios do. Without ``test_split`` a stratified ``test_fraction`` of the
training split is held out with ``split_seed``. The usual B/Inc keys split the classes.

``hf_instructions``: rows in the Alpaca format (``instruction``, ``input``, ``output``: the prompt is the
instruction, then the input after a blank line), the ShareGPT format (``conversations`` of ``from``/``value``
turns, or ``messages`` of ``role``/``content``: the answer is the last assistant turn, the prompt the turns
before it, one per line), or plain ``prompt_column``/``answer_column`` columns, as LLaMA-Factory-based
continual-learning toolkits (EasyCL) store them. A row's task is its ``task_column`` value; without that
column every split is one task (``data_files={task: file}`` gives one split per task). ``task_order`` picks
and orders tasks; ``scorer`` is one scorer name or a task -> scorer mapping; each task's test examples come
from ``test_split`` or a held-out ``test_fraction`` (``split_seed``).
"""
from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cl_bench.errors import UserError
from cl_bench.scenarios._image_folder import resize_and_crop
from cl_bench.scenarios._scenario import HeldOutScenario, InstructionScenario
from cl_bench.scenarios.base import Examples, Samples, Task

FORMATS = ("auto", "alpaca", "sharegpt", "columns")
USER_ROLES, ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant")


def load_splits(path: str, subset: str | None, data_files, revision: str | None):
    """The dataset's splits as a ``datasets.DatasetDict`` (a single dataset becomes its ``train`` split)."""
    import datasets

    if not path:
        raise UserError("scenario.path is required: a hub id, a builder (parquet, json, csv, imagefolder) with "
                        "scenario.data_files, a local folder, or a save_to_disk folder")
    local = Path(path).expanduser()
    shown = datasets.is_progress_bar_enabled()
    if not sys.stderr.isatty():  # progress bars only on a terminal: logs and captured stderr stay clean
        datasets.disable_progress_bars()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(path, subset, data_files=data_files, revision=revision)
    except Exception as error:  # datasets raises many types (missing files, offline hub, bad formats)
        first_line = (" ".join(str(error).split()) or type(error).__name__)[:300]
        raise UserError(f"scenario.path={path!r} could not be loaded with datasets: {type(error).__name__}: "
                        f"{first_line}") from None
    finally:
        if shown:
            datasets.enable_progress_bars()
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def pick_split(splits, name: str, path: str):
    if name not in splits:
        raise UserError(f"scenario.path={path!r} has no split {name!r} (it has: {', '.join(splits)})")
    if len(splits[name]) == 0:
        raise UserError(f"split {name!r} of scenario.path={path!r} is empty")
    return splits[name]


def fingerprints(splits) -> dict[str, str]:
    return {name: getattr(split, "_fingerprint", "") for name, split in splits.items()}


def held_out(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions of ``count`` rows, a random ``fraction`` (at least one row) held out."""
    order = np.random.default_rng(seed).permutation(count)
    tested = min(count - 1, max(1, math.ceil(fraction * count)))
    return np.sort(order[tested:]), np.sort(order[:tested])


class HFClasses(HeldOutScenario):
    """A ``datasets`` dataset as class-incremental tasks."""

    description = "any Hugging Face datasets dataset (hub id, local files, save_to_disk) as class-incremental tasks"
    default_model = None  # images or text: the data decides, so model= is asked for

    def __init__(self, *, path: str = "", subset: str | None = None, data_files: str | list | dict | None = None,
                 revision: str | None = None, train_split: str = "train", test_split: str | None = "test",
                 input_column: str | None = None, label_column: str = "label", image_size: int = 224, **split):
        super().__init__(**split)
        if image_size < 8:
            raise UserError(f"scenario.image_size must be at least 8, got {image_size}")
        self.path, self.subset, self.data_files, self.revision = path, subset, data_files, revision
        self.train_split, self.test_split = train_split, test_split
        self.input_column, self.label_column, self.image_size = input_column, label_column, image_size

    def input_of(self, features) -> tuple[str, str]:
        """(column, input kind) of the inputs."""
        import datasets

        kinds = {}
        for column, feature in features.items():
            if column == self.label_column:
                continue
            if isinstance(feature, datasets.Image):
                kinds[column] = "image"
            elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
                kinds[column] = "text"
            elif isinstance(feature, (datasets.Sequence, datasets.List if hasattr(datasets, "List") else ())) or \
                    type(feature).__name__.startswith("Array"):
                kinds[column] = "vector"
        if self.input_column is not None:
            if self.input_column not in features:
                raise UserError(f"scenario.input_column={self.input_column!r} is not a column of {self.path!r} "
                                f"(columns: {', '.join(features)})")
            if self.input_column not in kinds:
                raise UserError(f"scenario.input_column={self.input_column!r} holds {features[self.input_column]}, "
                                f"not images, text or numeric sequences")
            return self.input_column, kinds[self.input_column]
        for kind in ("image", "text", "vector"):
            for column, found in kinds.items():
                if found == kind:
                    return column, kind
        raise UserError(f"{self.path!r} has no image, text or numeric-sequence column besides "
                        f"{self.label_column!r}: set scenario.input_column")

    def inputs(self, dataset, column: str, kind: str):
        values = list(dataset[column])
        if kind == "image":
            return torch.from_numpy(np.stack([resize_and_crop(image.convert("RGB"), self.image_size)
                                              for image in values])) if values else torch.empty(0, 3, 1, 1)
        if kind == "text":
            return [str(value) for value in values]
        try:
            return torch.tensor(np.asarray(values, dtype=np.float32))
        except ValueError as error:
            raise UserError(f"scenario.input_column={column!r}: the sequences are not all of one length ({error})") from None

    def load(self) -> tuple[Samples, Samples, list[str], dict]:
        import datasets

        splits = load_splits(self.path, self.subset, self.data_files, self.revision)
        train = pick_split(splits, self.train_split, self.path)
        test = pick_split(splits, self.test_split, self.path) if self.test_split is not None else None
        if self.label_column not in train.features:
            raise UserError(f"scenario.label_column={self.label_column!r} is not a column of {self.path!r} "
                            f"(columns: {', '.join(train.features)})")
        column, self.input_kind = self.input_of(train.features)
        label = train.features[self.label_column]
        if isinstance(label, datasets.ClassLabel):
            names = list(label.names)
            to_target = int
        else:
            values = list(train[self.label_column]) + (list(test[self.label_column]) if test is not None else [])
            names = sorted({str(v) for v in values})
            index = {name: i for i, name in enumerate(names)}

            def to_target(value):
                return index[str(value)]

        def samples(dataset) -> Samples:
            targets = torch.tensor([to_target(v) for v in dataset[self.label_column]], dtype=torch.long)
            return Samples(self.inputs(dataset, column, self.input_kind), targets)

        everything = samples(train)
        if test is None:
            kept, tested = self.stratified_split(everything.targets.numpy())
            train_part, test_part = everything.select(kept), everything.select(tested)
        else:
            train_part, test_part = everything, samples(test)
        provenance = {"source": "datasets", "path": self.path, "subset": self.subset, "revision": self.revision,
                      "train_split": self.train_split, "test_split": self.test_split, "input_column": column,
                      "label_column": self.label_column, "fingerprints": fingerprints(splits),
                      "datasets_version": datasets.__version__}
        if test is None:
            provenance.update(test_fraction=self.test_fraction, split_seed=self.split_seed)
        return train_part, test_part, names, provenance


def _conversation(row: dict) -> tuple[str, str]:
    """(prompt, answer) of a ShareGPT row: the last assistant turn, after the turns before it."""
    turns = row.get("conversations") or row.get("messages") or []
    pairs = [(str(t.get("from", t.get("role", ""))), str(t.get("value", t.get("content", "")))) for t in turns
             if isinstance(t, dict)]
    last = max((i for i, (role, _) in enumerate(pairs) if role in ASSISTANT_ROLES), default=None)
    if last is None or last == 0:
        raise UserError("a ShareGPT row needs a user turn followed by an assistant turn "
                        f"(roles {'/'.join(USER_ROLES)} and {'/'.join(ASSISTANT_ROLES)}), got roles "
                        f"{[role for role, _ in pairs]}"[:300])
    return "\n".join(text for _, text in pairs[:last]), pairs[last][1]


class HFInstructions(InstructionScenario):
    """A ``datasets`` dataset of instruction examples (Alpaca, ShareGPT or prompt/answer columns) as tasks."""

    description = "instruction tasks from a Hugging Face datasets dataset (Alpaca, ShareGPT or prompt/answer columns)"

    def __init__(self, *, path: str = "", subset: str | None = None, data_files: str | list | dict | None = None,
                 revision: str | None = None, train_split: str = "train", test_split: str | None = None,
                 format: str = "auto", prompt_column: str = "prompt", answer_column: str = "answer",
                 task_column: str | None = "task", task_order: list | None = None, scorer: str | dict = "rouge_l",
                 max_new_tokens: int = 64, test_fraction: float = 0.2, split_seed: int = 0, **caps):
        super().__init__(**caps)
        if format not in FORMATS:
            raise UserError(f"scenario.format must be one of {', '.join(FORMATS)}, got {format!r}")
        if not 0 < test_fraction < 1:
            raise UserError(f"scenario.test_fraction must be between 0 and 1, got {test_fraction}")
        if max_new_tokens < 1:
            raise UserError(f"scenario.max_new_tokens must be at least 1, got {max_new_tokens}")
        self.path, self.subset, self.data_files, self.revision = path, subset, data_files, revision
        self.train_split, self.test_split, self.format = train_split, test_split, format
        self.prompt_column, self.answer_column, self.task_column = prompt_column, answer_column, task_column
        self.task_order, self.scorer, self.max_new_tokens = task_order, scorer, max_new_tokens
        self.test_fraction, self.split_seed = test_fraction, split_seed

    def detect_format(self, columns) -> str:
        if self.format != "auto":
            return self.format
        if {"instruction", "output"} <= set(columns):
            return "alpaca"
        if "conversations" in columns or "messages" in columns:
            return "sharegpt"
        if {self.prompt_column, self.answer_column} <= set(columns):
            return "columns"
        raise UserError(f"{self.path!r} is neither Alpaca (instruction/input/output), ShareGPT (conversations or "
                        f"messages) nor columns {self.prompt_column!r}/{self.answer_column!r}: its columns are "
                        f"{', '.join(columns)}"[:300])

    def rows(self, dataset, form: str) -> list[tuple[str, str, str]]:
        """(prompt, answer, instruction) per row."""
        out = []
        for row in dataset:
            if form == "alpaca":
                instruction, extra = str(row.get("instruction") or ""), str(row.get("input") or "")
                out.append((instruction + (f"\n\n{extra}" if extra else ""), str(row.get("output") or ""), instruction))
            elif form == "sharegpt":
                prompt, answer = _conversation(row)
                out.append((prompt, answer, ""))
            else:
                if self.prompt_column not in row or self.answer_column not in row:
                    raise UserError(f"{self.path!r} has no columns {self.prompt_column!r}/{self.answer_column!r} "
                                    f"(scenario.prompt_column, scenario.answer_column)")
                out.append((str(row[self.prompt_column]), str(row[self.answer_column]), ""))
        return out

    def grouped(self, splits, form: str) -> tuple[dict[str, list], dict[str, list]]:
        """Task name -> rows for training and (possibly empty) testing, in first-seen order."""
        train_rows, test_rows = {}, {}
        train = splits.get(self.train_split)
        if self.task_column is not None and train is not None and self.task_column in train.features:
            for name, target in ((self.train_split, train_rows), (self.test_split, test_rows)):
                if name is None:
                    continue
                dataset = pick_split(splits, name, self.path)
                if self.task_column not in dataset.features:
                    raise UserError(f"split {name!r} of {self.path!r} has no task column {self.task_column!r}")
                for task, row in zip(list(dataset[self.task_column]), self.rows(dataset, form)):
                    target.setdefault(str(task), []).append(row)
        else:  # every split is a task
            for name, dataset in splits.items():
                train_rows[name] = self.rows(pick_split(splits, name, self.path), form)
        return train_rows, test_rows

    def scorer_of(self, task: str) -> str:
        if isinstance(self.scorer, str):
            return self.scorer
        if task not in self.scorer:
            raise UserError(f"scenario.scorer names no scorer for task {task!r} (it names: "
                            f"{', '.join(map(str, self.scorer))})")
        return str(self.scorer[task])

    def build(self):
        import datasets

        splits = load_splits(self.path, self.subset, self.data_files, self.revision)
        form = self.detect_format(list(next(iter(splits.values())).features))
        train_rows, test_rows = self.grouped(splits, form)
        order = [str(t) for t in self.task_order] if self.task_order is not None else list(train_rows)
        unknown = [t for t in order if t not in train_rows]
        if unknown or not order:
            raise UserError(f"scenario.task_order names unknown tasks {unknown} (tasks: {', '.join(train_rows)})"[:300])
        tasks = []
        for index, name in enumerate(order):
            rows, tests = train_rows[name], test_rows.get(name)
            if tests is None:
                if len(rows) < 2:
                    raise UserError(f"task {name!r} has {len(rows)} example: at least 2 are needed to hold one out")
                kept, tested = held_out(len(rows), self.test_fraction, self.split_seed + index)
                rows, tests = [rows[i] for i in kept], [rows[i] for i in tested]
            instructions = Counter(instruction for _, _, instruction in rows if instruction)
            tasks.append(Task(index, name, Examples([p for p, _, _ in rows], [a for _, a, _ in rows]),
                              Examples([p for p, _, _ in tests], [a for _, a, _ in tests]),
                              instruction=instructions.most_common(1)[0][0] if instructions else name,
                              scorer=self.scorer_of(name), max_new_tokens=self.max_new_tokens))
        provenance = {"source": "datasets", "path": self.path, "subset": self.subset, "revision": self.revision,
                      "format": form, "task_column": self.task_column, "fingerprints": fingerprints(splits),
                      "datasets_version": datasets.__version__, "test_split": self.test_split,
                      **({} if self.test_split is not None else {"test_fraction": self.test_fraction,
                                                                  "split_seed": self.split_seed})}
        return tasks, [], provenance

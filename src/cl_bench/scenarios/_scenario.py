"""Base classes for registered scenarios: hyperparameters are keyword-only constructor arguments."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from cl_bench.errors import UserError
from cl_bench.scenarios.base import Examples, Samples, Stream, Task, class_incremental_stream, instruction_stream


class Scenario:
    """A named source of tasks. Subclasses set ``description`` and implement ``stream()``."""

    description = ""
    default_model = "mlp"

    def stream(self) -> Stream:
        raise NotImplementedError


class ClassIncrementalScenario(Scenario):
    """A labelled dataset cut into B{init}-Inc{increment} tasks (see ``base.split_sizes``).

    Subclasses implement ``load()`` returning ``(train, test, class_names, provenance)``.
    ``validation_fraction=F`` scores on a stratified fraction F of the training data held out with
    ``validation_seed`` instead of the test set, which is then never read: for choosing settings
    without looking at test data (the provenance says which split was scored).
    """

    input_kind = "image"

    def __init__(self, *, init: int = 0, increment: int = 2, order_seed: int | None = 1993,
                 remainder: str = "error", max_per_class: int | None = None,
                 max_test_per_class: int | None = None, validation_fraction: float | None = None,
                 validation_seed: int = 0):
        if validation_fraction is not None and not 0 < validation_fraction < 1:
            raise UserError(f"scenario.validation_fraction must be between 0 and 1 (or null), got {validation_fraction}")
        self.validation_fraction, self.validation_seed = validation_fraction, validation_seed
        self.init, self.increment, self.order_seed = init, increment, order_seed
        self.remainder = remainder
        self.max_per_class, self.max_test_per_class = max_per_class, max_test_per_class

    def load(self) -> tuple[Samples, Samples, list[str], dict]:
        raise NotImplementedError

    def stream(self) -> Stream:
        train, test, class_names, provenance = self.load()
        if self.validation_fraction is not None:
            train, test = validation_split(train, self.validation_fraction, self.validation_seed)
            provenance = {**provenance, "scored_split": f"validation: {self.validation_fraction} of the training "
                                                        f"data, seed {self.validation_seed}"}
        return class_incremental_stream(
            self.name, train, test, class_names, input_kind=self.input_kind, init=self.init,
            increment=self.increment, order_seed=self.order_seed, remainder=self.remainder,
            max_per_class=self.max_per_class, max_test_per_class=self.max_test_per_class,
            provenance=provenance)

    @property
    def name(self) -> str:
        return type(self).registered_name


def validation_split(train: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """(the rest, a stratified ``fraction`` of ``train``), fixed by ``seed``."""
    from sklearn.model_selection import train_test_split

    kept, held = train_test_split(np.arange(len(train)), test_size=fraction, stratify=train.targets.numpy(),
                                  random_state=seed)
    return train.select(np.sort(kept)), train.select(np.sort(held))


class HeldOutScenario(ClassIncrementalScenario):
    """A dataset without an official test split: ``test_fraction`` of it is held out for testing,
    fixed by ``split_seed`` (separate from the class-order and training seeds)."""

    def __init__(self, *, test_fraction: float = 0.25, split_seed: int = 0, **split):
        super().__init__(**split)
        if not 0 < test_fraction < 1:
            raise UserError(f"scenario.test_fraction must be between 0 and 1, got {test_fraction}")
        self.test_fraction, self.split_seed = float(test_fraction), int(split_seed)

    def stratified_split(self, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted train and test indices, stratified by class (scikit-learn's ``train_test_split``)."""
        from sklearn.model_selection import train_test_split

        try:
            train, test = train_test_split(np.arange(len(targets)), test_size=self.test_fraction, stratify=targets,
                                           random_state=self.split_seed)
        except ValueError as error:  # too few examples of a class to hold one out
            raise UserError(f"scenario {self.name}: cannot hold out a stratified scenario.test_fraction="
                            f"{self.test_fraction}: {' '.join(str(error).split())}"[:300]) from None
        return np.sort(train), np.sort(test)


class InstructionScenario(Scenario):
    """An ordered list of instruction tasks (and optional held-out general suites).

    Subclasses implement ``build()`` returning ``(tasks, general_suites, provenance)``; the base caps
    every task at ``max_train_per_task`` / ``max_test_per_task`` examples (a random subset drawn with
    ``subsample_seed``, separate from the training seed) and checks the stream.
    """

    default_model = "smollm2_135m"

    def __init__(self, *, max_train_per_task: int | None = None, max_test_per_task: int | None = None,
                 subsample_seed: int = 0):
        for key, value in (("max_train_per_task", max_train_per_task), ("max_test_per_task", max_test_per_task)):
            if value is not None and value < 1:
                raise UserError(f"scenario.{key} must be >= 1 (or null for all), got {value}")
        self.max_train_per_task, self.max_test_per_task = max_train_per_task, max_test_per_task
        self.subsample_seed = subsample_seed

    def build(self) -> tuple[list[Task], list[Task], dict]:
        raise NotImplementedError

    def stream(self) -> Stream:
        tasks, general, provenance = self.build()
        rng = np.random.default_rng(self.subsample_seed)

        def cap(examples: Examples, limit: int | None) -> Examples:
            if limit is None or len(examples) <= limit:
                return examples
            return examples.select(np.sort(rng.choice(len(examples), size=limit, replace=False)))

        tasks = [replace(t, index=i, train=cap(t.train, self.max_train_per_task),
                         test=cap(t.test, self.max_test_per_task)) for i, t in enumerate(tasks)]
        provenance = {**provenance, "max_train_per_task": self.max_train_per_task,
                      "max_test_per_task": self.max_test_per_task, "subsample_seed": self.subsample_seed}
        return instruction_stream(self.name, tasks, general=general, provenance=provenance)

    @property
    def name(self) -> str:
        return type(self).registered_name

"""Replay for instruction streams: after each task, ``memory_per_task`` of its training examples
(drawn uniformly without replacement) join an episodic memory, and every later task trains on its
own examples plus the whole memory, shuffled together, with the same LoRA adapter as ``seqlora``.
This is TRACE's replay baseline (Wang et al., 2023, arXiv:2310.06762, past-task data mixed into
each task's training set) with a fixed memory per task instead of a ratio, so the memory cost is
stated in examples.
"""
import torch

from cl_bench.scenarios.base import Examples, Task
from cl_bench.strategies._language_model import LoRAStrategy


class Replay(LoRAStrategy):
    description = "LoRA plus an episodic memory of memory_per_task examples of every past task"

    def __init__(self, backbone, context, *, memory_per_task: int = 20, **kwargs):
        super().__init__(backbone, context, **kwargs)
        self.memory_per_task = memory_per_task
        self.memory: Examples | None = None

    def training_data(self, task: Task) -> Examples:
        return task.train if self.memory is None else task.train.concat(self.memory)

    def after_task(self, task: Task) -> None:
        count = min(self.memory_per_task, len(task.train))
        chosen = torch.randperm(len(task.train), generator=self.context.generator)[:count]
        kept = task.train.select(chosen.sort().values)
        self.memory = kept if self.memory is None else self.memory.concat(kept)

    def examples_stored(self) -> int:
        return 0 if self.memory is None else len(self.memory)

    def get_extra_state(self):
        state = super().get_extra_state()
        if self.memory is not None:
            state["memory"] = self.memory.state()
        return state

    def set_extra_state(self, state):
        super().set_extra_state(state)
        if "memory" in state:
            self.memory = Examples.from_state(state["memory"])

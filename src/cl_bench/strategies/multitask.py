"""Multi-task training (the joint upper bound for instruction streams): at task t the LoRA adapter
keeps training on the union of the training examples of tasks 1..t, so no task is ever out of the
data. Like ``joint`` for class streams it stores all past data, which is what makes it a reference
rather than a continual method; the leaderboard uses it for intransigence."""
from cl_bench.scenarios.base import Examples, Task
from cl_bench.strategies._language_model import LoRAStrategy


class Multitask(LoRAStrategy):
    description = "LoRA trained on all tasks seen so far (upper bound)"

    def __init__(self, backbone, context, **kwargs):
        super().__init__(backbone, context, **kwargs)
        self.seen: Examples | None = None

    def training_data(self, task: Task) -> Examples:
        self.seen = task.train if self.seen is None else self.seen.concat(task.train)
        return self.seen

    def examples_stored(self) -> int:
        return 0 if self.seen is None else len(self.seen)

    def get_extra_state(self):
        state = super().get_extra_state()
        if self.seen is not None:
            state["seen"] = self.seen.state()
        return state

    def set_extra_state(self, state):
        super().set_extra_state(state)
        if "seen" in state:
            self.seen = Examples.from_state(state["seen"])

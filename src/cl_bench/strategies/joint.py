"""Joint training on everything seen so far (the cumulative upper bound).

At task t the model keeps training, from its current weights, on the union of the training data
of tasks 1..t (Avalanche's ``Cumulative``). Storing all past data is what makes it an upper bound
rather than a continual method.
"""
from cl_bench.scenarios.base import Samples, Task
from cl_bench.strategies.base import ClassifierStrategy


class Joint(ClassifierStrategy):
    description = "trains on all data of the tasks seen so far (upper bound)"

    def __init__(self, backbone, context, **kwargs):
        super().__init__(backbone, context, **kwargs)
        self.seen_data: Samples | None = None

    def training_data(self, task: Task) -> Samples:
        self.seen_data = task.train if self.seen_data is None else self.seen_data.concat(task.train)
        return self.seen_data

    def examples_stored(self) -> int:
        return 0 if self.seen_data is None else len(self.seen_data)

    def get_extra_state(self):
        state = super().get_extra_state()
        if self.seen_data is not None:
            state.update(inputs=self.seen_data.inputs, targets=self.seen_data.targets)
        return state

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.seen_data = Samples(state["inputs"], state["targets"]) if "inputs" in state else None

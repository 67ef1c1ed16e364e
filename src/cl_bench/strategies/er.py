"""Experience Replay with a reservoir buffer (Chaudhry et al., 2019, "On Tiny Episodic Memories
in Continual Learning", arXiv:1902.10486).

Every training step concatenates the incoming batch with an equally large batch drawn uniformly
from the buffer and takes one step on the joint cross-entropy; the incoming batch is then offered
to the buffer by reservoir sampling, so the buffer stays a uniform sample of the stream seen so
far (Algorithm 1 with the reservoir update). ``replay_batch_size`` defaults to the batch size.
"""
from cl_bench.scenarios.base import Samples
from cl_bench.strategies._helpers import ReservoirBuffer
from cl_bench.strategies.base import ClassifierStrategy


class ER(ClassifierStrategy):
    description = "experience replay with a reservoir buffer of buffer_size samples"

    def __init__(self, backbone, context, *, buffer_size: int = 500, replay_batch_size: int | None = None,
                 **kwargs):
        super().__init__(backbone, context, **kwargs)
        self.buffer = ReservoirBuffer(buffer_size, context.generator)
        self.replay_batch_size = replay_batch_size or self.batch_size

    def loss(self, inputs, targets):
        incoming = Samples(inputs, targets.cpu())
        batch = incoming
        if len(self.buffer):
            batch = incoming.concat(self.buffer.sample(self.replay_batch_size))
            self.samples_trained += len(batch) - len(incoming)  # replayed examples count as trained ones
        loss = super().loss(batch.inputs, batch.targets.to(self.device))
        self.buffer.add(incoming)
        return loss

    def examples_stored(self) -> int:
        return len(self.buffer)

    def get_extra_state(self):
        return {**super().get_extra_state(), "buffer": self.buffer.state()}

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.buffer.load(state["buffer"])

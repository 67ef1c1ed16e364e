"""Fine-tuning with label-smoothed cross-entropy (Szegedy et al., 2016, "Rethinking the Inception
Architecture", section 7): the target puts ``1 - smoothing`` on the true class and spreads
``smoothing`` uniformly over all classes seen so far.

Everything else (the growing linear head, the optimizer, the training loop) is
``ClassifierStrategy``'s; only ``loss`` changes.
"""
import torch
import torch.nn.functional as F

from cl_bench import ClassifierStrategy
from cl_bench.errors import UserError


class LabelSmoothingFinetune(ClassifierStrategy):
    description = "sequential fine-tuning with label-smoothed cross-entropy (example plugin)"

    def __init__(self, backbone, context, *, smoothing: float = 0.1, **kwargs):
        super().__init__(backbone, context, **kwargs)  # epochs, lr, ... keep their usual keys
        if not 0.0 <= smoothing < 1.0:
            raise UserError(f"strategy.smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def loss(self, inputs, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(inputs), targets, label_smoothing=self.smoothing)

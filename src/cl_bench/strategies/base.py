"""Strategy interface and the classifier family most strategies extend.

The runner calls, for each task in order: ``before_task(task)``, ``learn(task)``,
``after_task(task)``, then ``predict(inputs)`` on the test data of every task scored. Strategies
never see the config object or future tasks; hyperparameters are keyword-only constructor
arguments (their defaults are the config defaults) and runtime objects are positional.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.errors import UserError
from cl_bench.models.backbone import Backbone
from cl_bench.scenarios.base import Samples, Task
from cl_bench.strategies._helpers import IncrementalLinear


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops with status ``failed``."""


def no_progress(iterable, description="", total=None):
    return iterable


@dataclass
class Context:
    """What the runner lends a strategy: where to compute, its random generator, a progress wrapper."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    generator: torch.Generator = field(default_factory=torch.Generator)
    progress: Callable[..., Iterable] = no_progress
    # maps raw samples from outside the stream (e.g. key-initialisation data) into the inputs this
    # strategy receives: the cached features when the backbone is frozen, else unchanged
    featurize: Callable[[Samples], Samples] = lambda samples: samples
    # classes of the whole stream (scenario metadata, no data): for methods that size their output
    # layer once, as Avalanche's DER and L2P do; None outside the runner
    num_classes: int | None = None


class Strategy(nn.Module):
    """Base of every strategy. Class attributes declare what it supports."""

    description = ""
    stream_kinds: tuple[str, ...] = ("classes",)
    # arguments for the registry-wide smoke test: a tiny scenario and backbone this strategy runs on
    smoke_args: tuple[str, ...] = ("scenario=toy",)
    # False: the state cannot round-trip through a checkpoint, so the runner restarts an interrupted
    # run from task 1 instead of resuming it, saying why (``not_resumable``)
    resumable = True
    not_resumable = ""

    def __init__(self, backbone: Backbone, context: Context):
        super().__init__()
        self.backbone, self.context = backbone, context
        self.samples_trained = 0  # read by the runner for samples_per_second

    @property
    def device(self) -> torch.device:
        return self.context.device

    def before_task(self, task: Task) -> None:
        pass

    def learn(self, task: Task) -> None:
        raise NotImplementedError

    def after_task(self, task: Task) -> None:
        pass

    def predict(self, inputs) -> torch.Tensor:
        raise NotImplementedError

    def batches(self, samples: Samples, batch_size: int, *, shuffle: bool, description: str = ""):
        """(inputs, targets on device) batches; the order comes from the context's generator."""
        count = len(samples)
        order = torch.randperm(count, generator=self.context.generator) if shuffle else torch.arange(count)
        starts = range(0, count, batch_size)
        for start in self.context.progress(starts, description, total=len(starts)):
            part = samples.select(order[start:start + batch_size])
            yield part.inputs, part.targets.to(self.device)

    def check_finite(self, loss: torch.Tensor, description: str) -> None:
        """Stop the run (status ``failed``) on a NaN or infinite loss."""
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} in {description}; "
                                f"try a smaller strategy.lr (now {getattr(self, 'lr', '?')})")

    def get_extra_state(self):
        return {"samples_trained": self.samples_trained}

    def set_extra_state(self, state):
        self.samples_trained = state["samples_trained"]


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class ClassifierStrategy(Strategy):
    """Backbone + a linear head that grows by the classes of each new task, trained with
    cross-entropy over all classes seen so far. ``predict`` returns logits over seen classes."""

    def __init__(self, backbone: Backbone, context: Context, *, epochs: int = 1, batch_size: int = 32,
                 lr: float = 0.01, optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__(backbone, context)
        if optimizer not in OPTIMIZERS:
            raise UserError(f"strategy.optimizer must be one of {', '.join(OPTIMIZERS)}, got '{optimizer}'")
        if epochs < 0 or batch_size < 1 or lr < 0:
            raise UserError(f"need epochs >= 0, batch_size >= 1 and lr >= 0 (got {epochs}, {batch_size}, {lr})")
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.optimizer_name, self.momentum, self.weight_decay = optimizer, momentum, weight_decay
        self.head = IncrementalLinear(backbone.out_dim)

    def before_task(self, task: Task) -> None:
        self.head.grow(max(task.classes) + 1)

    def training_data(self, task: Task) -> Samples:
        return task.train

    def make_optimizer(self) -> torch.optim.Optimizer:
        parameters = [p for p in self.parameters() if p.requires_grad]
        options = dict(lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "sgd":
            options["momentum"] = self.momentum
        return OPTIMIZERS[self.optimizer_name](parameters, **options)

    def forward(self, inputs) -> torch.Tensor:
        return self.head(self.backbone(self.backbone.prepare(inputs, self.device)))

    def loss(self, inputs, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(inputs), targets)

    def learn(self, task: Task) -> None:
        data = self.training_data(task)
        self.train()
        optimizer = self.make_optimizer()
        for epoch in range(self.epochs):
            description = f"{task.name} epoch {epoch + 1}/{self.epochs}"
            for inputs, targets in self.batches(data, self.batch_size, shuffle=True, description=description):
                loss = self.loss(inputs, targets)
                self.check_finite(loss, description)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                self.samples_trained += len(targets)

    def predict(self, inputs) -> torch.Tensor:
        return self(inputs)

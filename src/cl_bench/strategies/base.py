"""Strategy interface and the classifier family most strategies extend.

The runner calls, for each task in order: ``before_task(task)``, ``learn(task)``,
``after_task(task)``, then ``predict(inputs)`` on the test data of every task scored. Strategies
never see the config object or future tasks; hyperparameters are keyword-only constructor
arguments (their defaults are the config defaults) and runtime objects are positional. Where a strategy
takes them, ``bf16=true`` runs its forward passes under bfloat16 autocast (CUDA only) and ``compile=true``
compiles its backbone in place with torch.compile (``Strategy.use_precision``).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.errors import UserError, check_ranges
from cl_bench.models.backbone import Backbone
from cl_bench.scenarios.base import Examples, Samples, Task
from cl_bench.strategies._helpers import IncrementalLinear


@dataclass(frozen=True)
class Budget:
    """A training budget per task that every strategy of a suite honours (``budget.steps_per_task`` or
    ``budget.samples_per_task``): training goes on, epoch after epoch, until the task has taken that
    many optimizer steps or trained on that many examples (replayed ones included), then stops, even
    mid-epoch. A samples budget ends at the first step that reaches it, so it may overshoot by less
    than one batch."""

    steps_per_task: int | None = None
    samples_per_task: int | None = None

    def __str__(self) -> str:
        return (f"{self.steps_per_task} optimizer steps per task" if self.steps_per_task is not None
                else f"{self.samples_per_task} samples per task")


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops with status ``failed``."""


@dataclass(frozen=True)
class OutsideData:
    """Data from outside the stream that the runner lends a strategy (see ``Strategy.outside_data_keys``):
    the raw train data of every task of another scenario, where it comes from, and its data hash."""

    source: str
    data_hash: str
    samples: Samples | Examples


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
    # the suite's budget per task (None: each strategy's own epochs decide)
    budget: Budget | None = None
    # outside data the runner lends, by the config key that names it (``Strategy.outside_data_keys``)
    outside: dict[str, OutsideData] = field(default_factory=dict)
    # hears every optimizer step (``Strategy.count_step``): the run's training log (``cl_bench.train_log``)
    on_step: Callable[..., None] | None = None


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
    # runs as one rank of a data-parallel run (nproc=K, cl_bench.distributed); else ``no_data_parallel`` says why
    data_parallel = False
    no_data_parallel = "only the language-model strategies split their steps over processes"
    # False: the training loop cannot stop at a declared budget; a run with one fails saying why
    honours_budget = True
    no_budget = ""
    # ``boundaries``: the strategy is told where tasks begin and end (before_task/after_task) while
    # training; ``none``: it would learn the same without them (task-free)
    task_identity_train = "boundaries"
    # True: predict needs to know the task of its inputs, so it cannot run under eval_mode=cil
    needs_task_at_test = False
    # settings where the paper and the authors' code differ, or that change the numbers beyond the
    # method itself: constructor key -> the paper's value; the runner records each in the protocol
    # card and the leaderboard flags a run whose value differs from the paper's
    protocol_switches: dict[str, object] = {}
    # True: predictions depend on which examples share an evaluation batch (eval_batch_size is recorded)
    eval_batch_dependent = False
    # config keys that name a scenario from outside the stream -> the key holding its settings (or
    # None): the runner builds it, refuses it when it overlaps the stream, and lends its train data
    # as ``context.outside[key]``; the protocol card lists it as extra data
    outside_data_keys: dict[str, str | None] = {}
    # the backbone of the method's paper (a model name or preset): compose picks it when model= is
    # not given and the scenario's default model does not fully match ``backbone_pattern`` (a regular
    # expression over the model's name or type; empty: any backbone fits); ``backbone_need`` says why
    paper_backbone: str | None = None
    backbone_pattern = ""
    backbone_need = ""
    # bfloat16 autocast over the forward passes (``strategy.bf16``, see ``use_precision``)
    bf16 = False

    def __init__(self, backbone: Backbone, context: Context):
        super().__init__()
        self.backbone, self.context = backbone, context
        self.samples_trained = 0  # examples that entered a training loss (replayed ones included)
        self.optimizer_steps = 0
        self._loop_origin = (0, 0)  # (optimizer_steps, samples_trained) when the current training loop began
        self._loop_budget: Budget | None = None  # what the current training loop may spend
        self.epoch: int | None = None  # 1-based epoch of the current training loop, for the training log

    @property
    def device(self) -> torch.device:
        return self.context.device

    def use_precision(self, *, bf16: bool = False, compile: bool = False) -> None:
        """``strategy.bf16``: the forward passes run under ``autocast()`` (bfloat16, GPU only);
        ``strategy.compile``: the backbone is compiled in place (``nn.Module.compile``), so parameter names,
        hence checkpoints, stay the same. Both are config keys, so a run's id records them."""
        if bf16 and self.device.type != "cuda":
            raise UserError("strategy.bf16=true is for GPU runs; on the CPU keep float32")
        self.bf16 = bf16
        if compile:
            self.backbone.compile()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

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

    def training_epochs(self, epochs: int, budget: Budget | None = None):
        """The epochs of one training loop: ``range(epochs)``, or under a budget as many as it takes to
        spend it (the loop over batches stops with ``budget_spent()``). The count starts here. ``budget``
        is this loop's part of the task's budget, for a strategy that trains a task in phases and splits
        ``context.budget`` between them; by default the loop spends the context's whole budget."""
        self._loop_origin = (self.optimizer_steps, self.samples_trained)
        self._loop_budget = budget or self.context.budget
        if self._loop_budget is None:
            for epoch in range(epochs):
                self.epoch = epoch + 1
                yield epoch
            return
        epoch = 0
        while not self.budget_spent():
            steps = self.optimizer_steps
            self.epoch = epoch + 1
            yield epoch
            epoch += 1
            if self.optimizer_steps == steps:
                raise UserError(f"strategy {type(self).__name__} took no optimizer step in a whole epoch, so it "
                                f"cannot spend the budget of {self._loop_budget}")

    def budget_spent(self) -> bool:
        """True once the current training loop has used its budget (never without one)."""
        budget = self._loop_budget
        if budget is None:
            return False
        steps, samples = self._loop_origin
        if budget.steps_per_task is not None:
            return self.optimizer_steps - steps >= budget.steps_per_task
        return self.samples_trained - samples >= budget.samples_per_task

    def planned_steps(self, epochs: int, steps_per_epoch: int, batch_size: int) -> int:
        """The optimizer steps a task's training loop will take, for schedules fixed before it starts:
        ``epochs * steps_per_epoch``, or the budget's steps (a samples budget: samples / batch_size
        rounded up, exact when every batch is full and nothing is replayed)."""
        budget = self.context.budget
        if budget is None:
            return epochs * steps_per_epoch
        if budget.steps_per_task is not None:
            return budget.steps_per_task
        return math.ceil(budget.samples_per_task / batch_size)

    def planned_epochs(self, epochs: int, examples: int, batch_size: int) -> int:
        """The epochs a task's training loop will run over ``examples`` in batches of ``batch_size``, for
        schedules stepped once per epoch: ``epochs``, or as many as the budget's steps take."""
        steps_per_epoch = max(1, math.ceil(examples / batch_size))
        return math.ceil(self.planned_steps(epochs, steps_per_epoch, batch_size) / steps_per_epoch)

    def count_step(self, samples: int, loss: torch.Tensor | float | None = None, optimizer=None) -> None:
        """Count one optimizer step on ``samples`` examples (the protocol card's training counts) and hand
        it, with its loss and optimizer (for the learning rate), to the training log."""
        self.optimizer_steps += 1
        self.samples_trained += samples
        if self.context.on_step is not None:
            self.context.on_step(self, samples, loss, optimizer)

    def resumed(self, learnt: list[Task]) -> None:
        """Called once a checkpoint's state is loaded, with the tasks learnt before it (never a later one):
        for state rebuilt from their data rather than stored."""

    def examples_stored(self) -> int:
        """Past examples held now (replay buffers, pools, prototypes' sources are not examples)."""
        return 0

    def outside_data(self) -> list[dict]:
        """Data from outside the stream this strategy uses: ``{"role", "source", "data_hash"}`` each (by
        default the data the runner lent it)."""
        return [{"role": key, "source": data.source, "data_hash": data.data_hash}
                for key, data in self.context.outside.items()]

    def check_finite(self, loss: torch.Tensor, description: str) -> None:
        """Stop the run (status ``failed``) on a NaN or infinite loss."""
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} in {description}; "
                                f"try a smaller strategy.lr (now {getattr(self, 'lr', '?')})")

    def get_extra_state(self):
        return {"samples_trained": self.samples_trained, "optimizer_steps": self.optimizer_steps}

    def set_extra_state(self, state):
        self.samples_trained = state["samples_trained"]
        self.optimizer_steps = state.get("optimizer_steps", 0)  # checkpoints written before it was counted


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class ClassifierStrategy(Strategy):
    """Backbone + a linear head that grows by the classes of each new task, trained with
    cross-entropy over all classes seen so far. ``predict`` returns logits over seen classes."""

    def __init__(self, backbone: Backbone, context: Context, *, epochs: int = 1, batch_size: int = 32,
                 lr: float = 0.01, optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
                 bf16: bool = False, compile: bool = False):
        super().__init__(backbone, context)
        self.use_precision(bf16=bf16, compile=compile)
        if optimizer not in OPTIMIZERS:
            raise UserError(f"strategy.optimizer must be one of {', '.join(OPTIMIZERS)}, got '{optimizer}'")
        check_ranges("strategy", epochs=(epochs, ">= 0"), batch_size=(batch_size, ">= 1"), lr=(lr, ">= 0"))
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
        """Logits in float32; with ``bf16`` the backbone and head run under bfloat16 autocast."""
        with self.autocast():
            logits = self.head(self.backbone(self.backbone.prepare(inputs, self.device)))
        return logits.float()

    def loss(self, inputs, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(inputs), targets)

    def learn(self, task: Task) -> None:
        data = self.training_data(task)
        self.train()
        optimizer = self.make_optimizer()
        for epoch in self.training_epochs(self.epochs):
            description = f"{task.name} epoch {epoch + 1}"
            for inputs, targets in self.batches(data, self.batch_size, shuffle=True, description=description):
                if self.budget_spent():
                    break
                loss = self.loss(inputs, targets)
                self.check_finite(loss, description)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                self.count_step(len(targets), loss, optimizer)

    def predict(self, inputs) -> torch.Tensor:
        return self(inputs)

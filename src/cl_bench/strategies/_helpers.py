"""Building blocks shared by strategies: a growing linear head and a reservoir buffer."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.scenarios.base import Samples


class IncrementalLinear(nn.Module):
    """A linear layer whose output count grows; old rows keep their values, new rows get
    nn.Linear's default initialisation. Loading a state dict resizes it to the saved size."""

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def grow(self, out_features: int) -> None:
        added = out_features - self.out_features
        if added <= 0:
            return
        bound = 1.0 / math.sqrt(self.in_features)
        weight = torch.empty(added, self.in_features, device=self.weight.device).uniform_(-bound, bound)
        bias = torch.empty(added, device=self.bias.device).uniform_(-bound, bound)
        self.weight = nn.Parameter(torch.cat([self.weight.data, weight]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, bias]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "weight")
        if saved is not None and saved.shape != self.weight.shape:
            self.weight = nn.Parameter(torch.empty_like(saved, device=self.weight.device))
            self.bias = nn.Parameter(torch.empty(saved.shape[0], device=self.bias.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ReservoirBuffer:
    """Reservoir sampling (Vitter's algorithm R): after n samples offered, each one is kept with
    probability capacity / n, so the buffer is a uniform sample of everything seen."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity, self.generator = capacity, generator
        self.samples: Samples | None = None
        self.seen = 0

    def __len__(self) -> int:
        return 0 if self.samples is None else len(self.samples)

    def add(self, batch: Samples) -> None:
        if self.capacity <= 0:
            return
        free = self.capacity - len(self)
        if free > 0:
            head = batch.select(torch.arange(min(free, len(batch))))
            self.samples = head if self.samples is None else self.samples.concat(head)
            self.seen += len(head)
            batch = batch.select(torch.arange(len(head), len(batch)))
        if len(batch) == 0:
            return
        # sample i of the rest is the (seen + i + 1)-th offered: keep it at slot j ~ U{0..seen+i}
        upper = torch.arange(self.seen + 1, self.seen + len(batch) + 1, dtype=torch.float64)
        slots = (torch.rand(len(batch), generator=self.generator, dtype=torch.float64) * upper).long()
        self.seen += len(batch)
        kept = torch.nonzero(slots < self.capacity).flatten().tolist()
        if not kept:
            return
        inputs, targets = self.samples.inputs, self.samples.targets.clone()
        inputs = inputs.clone() if isinstance(inputs, torch.Tensor) else list(inputs)
        for i in kept:  # in offer order, so a later sample overwrites an earlier one in the same slot
            inputs[slots[i]] = batch.inputs[i]
            targets[slots[i]] = batch.targets[i]
        self.samples = Samples(inputs, targets)

    def sample(self, count: int) -> Samples:
        index = torch.randint(len(self), (min(count, len(self)),), generator=self.generator)
        return self.samples.select(index)

    def state(self) -> dict:
        if self.samples is None:
            return {"seen": self.seen}
        return {"seen": self.seen, "inputs": self.samples.inputs, "targets": self.samples.targets}

    def load(self, state: dict) -> None:
        self.seen = state["seen"]
        self.samples = Samples(state["inputs"], state["targets"]) if "inputs" in state else None

"""Toy: synthetic Gaussian clusters, small enough for unit tests and smoke runs.

Source: generated on the fly from ``numpy.random.default_rng(data_seed)``; no files are read.
"""
from __future__ import annotations

import numpy as np
import torch

from cl_bench.errors import UserError
from cl_bench.scenarios._scenario import ClassIncrementalScenario
from cl_bench.scenarios.base import Samples

# Distance scale of the class centres relative to unit noise: with the default noise of 0.5
# the clusters are far apart and a linear classifier separates them almost perfectly.
CENTRE_SCALE = 3.0


class Toy(ClassIncrementalScenario):
    """Synthetic Gaussian clusters (one per class) in ``dim`` dimensions, generated from ``data_seed``."""

    description = "synthetic Gaussian clusters as float vectors, for tests and smoke runs"
    default_model = "mlp"
    input_kind = "vector"

    def __init__(self, *, num_classes: int = 6, dim: int = 16, per_class: int = 40,
                 test_per_class: int = 20, noise: float = 0.5, data_seed: int = 0, **split):
        super().__init__(**split)
        for key, value in (("num_classes", num_classes), ("dim", dim), ("per_class", per_class),
                           ("test_per_class", test_per_class)):
            if int(value) < 1:
                raise UserError(f"scenario.{key} must be at least 1, got {value}")
        if noise < 0:
            raise UserError(f"scenario.noise must be >= 0, got {noise}")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.per_class, self.test_per_class = int(per_class), int(test_per_class)
        self.noise, self.data_seed = float(noise), int(data_seed)

    def load(self) -> tuple[Samples, Samples, list[str], dict]:
        rng = np.random.default_rng(self.data_seed)
        centres = rng.standard_normal((self.num_classes, self.dim)) * CENTRE_SCALE

        def draw(count: int) -> Samples:
            targets = np.repeat(np.arange(self.num_classes), count)
            points = centres[targets] + rng.standard_normal((len(targets), self.dim)) * self.noise
            return Samples(torch.from_numpy(points.astype(np.float32)), torch.from_numpy(targets.astype(np.int64)))

        train = draw(self.per_class)
        test = draw(self.test_per_class)
        if not (torch.isfinite(train.inputs).all() and torch.isfinite(test.inputs).all()):
            raise UserError(f"scenario.noise={self.noise} gives points beyond float32's range; use a smaller noise")
        names = [f"class{c}" for c in range(self.num_classes)]
        provenance = {"source": "synthetic Gaussian clusters", "data_seed": self.data_seed,
                      "num_classes": self.num_classes, "dim": self.dim, "noise": self.noise}
        return train, test, names, provenance

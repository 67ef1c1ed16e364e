"""Digits: scikit-learn's bundled handwritten digits (8x8 grey images, 10 classes, 1797 samples).

Source: ``sklearn.datasets.load_digits`` (the UCI "Optical Recognition of Handwritten Digits"
test set, shipped inside scikit-learn, so no download is needed).
"""
from __future__ import annotations

import numpy as np
import torch

from cl_bench.errors import UserError
from cl_bench.scenarios._scenario import ClassIncrementalScenario
from cl_bench.scenarios.base import Samples


class Digits(ClassIncrementalScenario):
    """Split-Digits from scikit-learn's ``load_digits``: uint8 (N, 1, 8, 8) images, 0..16 scaled to 0..255."""

    description = "scikit-learn's bundled 8x8 handwritten digits, 10 classes (no download)"
    default_model = "mlp"

    def __init__(self, *, test_fraction: float = 0.25, split_seed: int = 0, **split):
        super().__init__(**split)
        if not 0 < test_fraction < 1:
            raise UserError(f"scenario.test_fraction must be between 0 and 1, got {test_fraction}")
        self.test_fraction, self.split_seed = float(test_fraction), int(split_seed)

    def load(self) -> tuple[Samples, Samples, list[str], dict]:
        import sklearn
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
        targets = bunch.target.astype(np.int64)
        train_idx, test_idx = train_test_split(
            np.arange(len(targets)), test_size=self.test_fraction, stratify=targets,
            random_state=self.split_seed)
        train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)

        def part(index: np.ndarray) -> Samples:
            return Samples(torch.from_numpy(images[index]), torch.from_numpy(targets[index]))

        provenance = {"source": "sklearn.datasets.load_digits", "sklearn_version": sklearn.__version__,
                      "test_fraction": self.test_fraction, "split_seed": self.split_seed}
        return part(train_idx), part(test_idx), [str(d) for d in range(10)], provenance

"""Digits: scikit-learn's bundled handwritten digits (8x8 grey images, 10 classes, 1797 samples).

Source: ``sklearn.datasets.load_digits`` (the UCI "Optical Recognition of Handwritten Digits"
test set, shipped inside scikit-learn, so no download is needed).
"""
from __future__ import annotations

import numpy as np
import torch

from cl_bench.scenarios._scenario import HeldOutScenario
from cl_bench.scenarios.base import Samples


class Digits(HeldOutScenario):
    """Split-Digits from scikit-learn's ``load_digits``: uint8 (N, 1, 8, 8) images, 0..16 scaled to 0..255."""

    description = "scikit-learn's bundled 8x8 handwritten digits, 10 classes (no download)"
    default_model = "mlp"

    def load(self) -> tuple[Samples, Samples, list[str], dict]:
        import sklearn
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
        targets = bunch.target.astype(np.int64)
        train_idx, test_idx = self.stratified_split(targets)

        def part(index: np.ndarray) -> Samples:
            return Samples(torch.from_numpy(images[index]), torch.from_numpy(targets[index]))

        provenance = {"source": "sklearn.datasets.load_digits", "sklearn_version": sklearn.__version__,
                      "test_fraction": self.test_fraction, "split_seed": self.split_seed}
        return part(train_idx), part(test_idx), [str(d) for d in range(10)], provenance

"""Your own dataset as a scenario: the rows of a CSV file (numeric feature columns and one label column)
as a class-incremental stream. ``load`` is the whole scenario; ``cl_bench.HeldOutScenario`` does the rest:
the class order (``scenario.order_seed``), the B{init}-Inc{increment} split, the held-out test fraction,
the per-class caps and the validation split."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

import cl_bench


class CsvClasses(cl_bench.HeldOutScenario):
    """Rows of ``scenario.path`` (a CSV file): every column but ``label_column`` is a feature."""

    description = "rows of a CSV file (numeric features, one label column) as class-incremental tasks"
    input_kind = "vector"
    default_model = "mlp"

    def __init__(self, *, path: str = "", label_column: str = "label", **split):
        super().__init__(**split)
        self.path, self.label_column = path, label_column

    def load(self) -> tuple[cl_bench.Samples, cl_bench.Samples, list[str], dict]:
        try:
            table = pd.read_csv(self.path)
            labels = table.pop(self.label_column)
            features = torch.tensor(table.to_numpy(np.float32))
        except (OSError, KeyError, ValueError) as error:
            raise cl_bench.UserError(f"scenario csv_classes cannot read scenario.path={self.path!r} with label "
                                     f"column {self.label_column!r}: {type(error).__name__}: {error}") from None
        names = sorted(labels.astype(str).unique())
        targets = labels.astype(str).map({name: i for i, name in enumerate(names)}).to_numpy(np.int64)
        train, test = self.stratified_split(targets)

        def part(index: np.ndarray) -> cl_bench.Samples:
            return cl_bench.Samples(features[index], torch.from_numpy(targets[index]))

        return part(train), part(test), names, {"source": str(self.path), "rows": len(targets)}

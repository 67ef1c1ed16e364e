"""Continual-learning metrics computed from an accuracy matrix, one function per named variant.

Pure numpy; this module must never import torch (directly or indirectly).

Inputs are ``sums`` and ``counts``: float arrays of shape ``(T+1, T)``.

* row 0 holds scores before any training (may be all NaN when not evaluated);
* row ``i`` (1..T) holds scores after training task ``i``;
* column ``k`` (0-based) is task ``k+1``.

``R = 100 * sums / counts``. In the docstrings below ``R[i][j]`` uses the spec's notation: ``i`` is
the row (0 = before training, T = after the last task) and ``j`` the 1-based task, so ``R[j][j]``
is task j scored right after it was trained (array element ``R[j, j-1]``).

Missing entries are NaN. A metric returns ``None`` when any entry it needs is missing (NaN, or a
zero count) or when it is undefined for the run (one task only for forgetting/BWT, no row 0 for
forward transfer, no joint reference, no general suite). It never substitutes 0. Entries that a
metric does not read (e.g. the upper triangle for accuracy metrics) may be missing freely.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

METRIC_COLUMNS: tuple[str, ...] = (
    "acc_final_task_mean",
    "acc_final_sample_weighted",
    "acc_avg_incremental",
    "acc_lower_triangle",
    "forgetting_max_prev",
    "forgetting_max_all",
    "forgetting_first_last",
    "bwt_last_row",
    "bwt_last_row_over_T",
    "bwt_all_pairs",
    "fwt_vs_init",
    "plasticity",
    "intransigence",
    "general_retention_delta",
)

__all__ = ["METRIC_COLUMNS", "DEFINITIONS", "score_matrix", "compute_all", *METRIC_COLUMNS]

DEFINITIONS: dict[str, str] = {
    "acc_final_task_mean": (
        "Unweighted average over tasks of the score on each task after training the last task: "
        "mean_j R[T][j]."
    ),
    "acc_final_sample_weighted": (
        "Score after the last task with all tasks' test samples pooled, so larger tasks weigh "
        "more: 100 * sum_j sum[T][j] / sum_j count[T][j]."
    ),
    "acc_avg_incremental": (
        "For each step i, pool the samples of the tasks seen so far (1..i) and score them after "
        "training task i; average these T pooled scores."
    ),
    "acc_lower_triangle": (
        "Average of every score of a task already trained, over the whole run: mean of R[i][j] "
        "for all 1 <= j <= i <= T."
    ),
    "forgetting_max_prev": (
        "For each task but the last, the best score it had before the final step minus its final "
        "score, averaged: mean_{j<T} (max_{j<=i<=T-1} R[i][j]) - R[T][j]."
    ),
    "forgetting_max_all": (
        "As forgetting_max_prev but the maximum also includes the final score, so a task never "
        "contributes a negative value: mean_{j<T} (max_{j<=i<=T} R[i][j]) - R[T][j]."
    ),
    "forgetting_first_last": (
        "For each task but the last, its score right after it was trained minus its final score, "
        "averaged: mean_{j<T} R[j][j] - R[T][j]."
    ),
    "bwt_last_row": (
        "Backward transfer: final score minus the score right after training, averaged over the "
        "first T-1 tasks: sum_{j<T} (R[T][j] - R[j][j]) / (T-1)."
    ),
    "bwt_last_row_over_T": (
        "Same sum as bwt_last_row but divided by T instead of T-1: "
        "sum_{j<T} (R[T][j] - R[j][j]) / T."
    ),
    "bwt_all_pairs": (
        "Change of each task's score at every later step relative to right after its training, "
        "averaged over all pairs i > j: mean_{i>j} R[i][j] - R[j][j]."
    ),
    "fwt_vs_init": (
        "Forward transfer: score on task j just before it is trained minus the score of the "
        "untrained model, averaged over tasks 2..T: mean_{j>1} R[j-1][j] - R[0][j]."
    ),
    "plasticity": (
        "Average score on each task right after training it (new-task accuracy): "
        "mean_j R[j][j]."
    ),
    "intransigence": (
        "How far each task's just-trained score falls short of a joint-training reference J: "
        "mean_j J[j] - R[j][j], J[j] = R[j][j] of the joint run (trained on tasks 1..j) of the same "
        "scenario, model and seed; empty without one."
    ),
    "general_retention_delta": (
        "Change on held-out general suites from before training to after the last task: "
        "mean_g G[T][g] - G[0][g]; empty without general suites."
    ),
}


# --------------------------------------------------------------------------- helpers


def _as_pair(sums, counts) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate shapes and return float copies of (sums, counts) and T."""
    s = np.array(sums, dtype=float, copy=True)
    c = np.array(counts, dtype=float, copy=True)
    if s.ndim != 2 or s.shape != c.shape:
        raise ValueError(
            f"sums and counts must be 2-D arrays of equal shape, got {s.shape} and {c.shape}"
        )
    n_rows, T = s.shape
    if T < 1 or n_rows != T + 1:
        raise ValueError(f"expected shape (T+1, T) with T >= 1, got {s.shape}")
    return s, c, T


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """100 * num / den elementwise, NaN where the count is missing, zero or negative."""
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    ok = np.isfinite(num) & np.isfinite(den) & (den > 0)
    np.divide(100.0 * num, den, out=out, where=ok)
    return out


def _mean_or_none(values) -> Optional[float]:
    """Plain mean as a Python float, or None when empty or any value is missing."""
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0 or not np.all(np.isfinite(v)):
        return None
    return float(v.mean())


def _diag(R: np.ndarray, T: int) -> np.ndarray:
    """R[j][j] for j = 1..T (array elements R[j, j-1])."""
    return np.array([R[j, j - 1] for j in range(1, T + 1)], dtype=float)


def _pooled(sums_row: np.ndarray, counts_row: np.ndarray) -> float:
    """100 * sum(sums) / sum(counts); NaN if anything is missing or the pool is empty."""
    if not (np.all(np.isfinite(sums_row)) and np.all(np.isfinite(counts_row))):
        return float("nan")
    if np.any(counts_row <= 0):
        return float("nan")
    return float(_ratio(np.sum(sums_row), np.sum(counts_row)))


# --------------------------------------------------------------------------- public API


def score_matrix(sums, counts) -> np.ndarray:
    """R = 100 * sums / counts, shape (T+1, T); NaN where an entry is missing or count <= 0."""
    s, c, _ = _as_pair(sums, counts)
    return _ratio(s, c)


def acc_final_task_mean(sums, counts) -> Optional[float]:
    """mean_j R[T][j]."""
    s, c, T = _as_pair(sums, counts)
    return _mean_or_none(_ratio(s[T], c[T]))


def acc_final_sample_weighted(sums, counts) -> Optional[float]:
    """100 * sum_j sum[T][j] / sum_j count[T][j]."""
    s, c, T = _as_pair(sums, counts)
    return _mean_or_none([_pooled(s[T], c[T])])


def acc_avg_incremental(sums, counts) -> Optional[float]:
    """mean_{i=1..T} of 100 * sum_{j<=i} sum[i][j] / sum_{j<=i} count[i][j]."""
    s, c, T = _as_pair(sums, counts)
    return _mean_or_none([_pooled(s[i, :i], c[i, :i]) for i in range(1, T + 1)])


def acc_lower_triangle(sums, counts) -> Optional[float]:
    """mean of R[i][j] over all 1 <= j <= i <= T."""
    s, c, T = _as_pair(sums, counts)
    R = _ratio(s, c)
    return _mean_or_none([R[i, k] for i in range(1, T + 1) for k in range(i)])


def forgetting_max_prev(sums, counts) -> Optional[float]:
    """mean_{j<T} (max_{j<=i<=T-1} R[i][j]) - R[T][j]; None if T == 1."""
    s, c, T = _as_pair(sums, counts)
    if T < 2:
        return None
    R = _ratio(s, c)
    # task j (1-based) = column j-1; rows j..T-1
    vals = [R[j : T, j - 1].max() - R[T, j - 1] for j in range(1, T)]
    return _mean_or_none(vals)


def forgetting_max_all(sums, counts) -> Optional[float]:
    """mean_{j<T} (max_{j<=i<=T} R[i][j]) - R[T][j]; None if T == 1."""
    s, c, T = _as_pair(sums, counts)
    if T < 2:
        return None
    R = _ratio(s, c)
    vals = [R[j : T + 1, j - 1].max() - R[T, j - 1] for j in range(1, T)]
    return _mean_or_none(vals)


def forgetting_first_last(sums, counts) -> Optional[float]:
    """mean_{j<T} R[j][j] - R[T][j]; None if T == 1."""
    s, c, T = _as_pair(sums, counts)
    if T < 2:
        return None
    R = _ratio(s, c)
    return _mean_or_none([R[j, j - 1] - R[T, j - 1] for j in range(1, T)])


def _bwt_terms(sums, counts) -> tuple[Optional[list[float]], int]:
    s, c, T = _as_pair(sums, counts)
    if T < 2:
        return None, T
    R = _ratio(s, c)
    return [R[T, j - 1] - R[j, j - 1] for j in range(1, T)], T


def bwt_last_row(sums, counts) -> Optional[float]:
    """sum_{j<T} (R[T][j] - R[j][j]) / (T-1); None if T == 1."""
    terms, _ = _bwt_terms(sums, counts)
    if terms is None:
        return None
    return _mean_or_none(terms)


def bwt_last_row_over_T(sums, counts) -> Optional[float]:
    """sum_{j<T} (R[T][j] - R[j][j]) / T; None if T == 1."""
    terms, T = _bwt_terms(sums, counts)
    if terms is None:
        return None
    m = _mean_or_none(terms)
    return None if m is None else float(m * (T - 1) / T)


def bwt_all_pairs(sums, counts) -> Optional[float]:
    """mean over all 1 <= j < i <= T of R[i][j] - R[j][j]; None if T == 1."""
    s, c, T = _as_pair(sums, counts)
    if T < 2:
        return None
    R = _ratio(s, c)
    vals = [R[i, j - 1] - R[j, j - 1] for j in range(1, T) for i in range(j + 1, T + 1)]
    return _mean_or_none(vals)


def fwt_vs_init(sums, counts) -> Optional[float]:
    """mean_{j=2..T} R[j-1][j] - R[0][j]; None if T == 1 or row 0 / R[j-1][j] is missing."""
    s, c, T = _as_pair(sums, counts)
    if T < 2:
        return None
    R = _ratio(s, c)
    # task j (1-based) = column j-1; scored after task j-1 (row j-1) and before training (row 0)
    return _mean_or_none([R[j - 1, j - 1] - R[0, j - 1] for j in range(2, T + 1)])


def plasticity(sums, counts) -> Optional[float]:
    """mean_j R[j][j]."""
    s, c, T = _as_pair(sums, counts)
    return _mean_or_none(_diag(_ratio(s, c), T))


def intransigence(sums, counts, joint_scores) -> Optional[float]:
    """mean_j J[j] - R[j][j], J = joint-training scores in percent; None without J."""
    s, c, T = _as_pair(sums, counts)
    if joint_scores is None:
        return None
    J = np.array(joint_scores, dtype=float, copy=True).ravel()
    if J.shape != (T,):
        raise ValueError(f"joint_scores must have length T={T}, got shape {J.shape}")
    return _mean_or_none(J - _diag(_ratio(s, c), T))


def general_retention_delta(general) -> Optional[float]:
    """mean_g G[T][g] - G[0][g], G of shape (T+1, G) in percent; None without general suites."""
    if general is None:
        return None
    G = np.array(general, dtype=float, copy=True)
    if G.ndim != 2 or G.shape[0] < 2:
        raise ValueError(f"general must have shape (T+1, G) with T >= 1, got {G.shape}")
    if G.shape[1] == 0:
        return None
    return _mean_or_none(G[-1] - G[0])


def compute_all(
    sums,
    counts,
    joint_scores: Optional[Sequence[float]] = None,
    general=None,
) -> dict[str, Optional[float]]:
    """Every metric, keyed and ordered as METRIC_COLUMNS (None = empty)."""
    _, _, T = _as_pair(sums, counts)
    if general is not None:
        G = np.asarray(general)
        if G.ndim == 2 and G.shape[0] != T + 1:
            raise ValueError(f"general must have T+1={T + 1} rows, got {G.shape[0]}")
    out: dict[str, Optional[float]] = {}
    for name in METRIC_COLUMNS:
        if name == "intransigence":
            out[name] = intransigence(sums, counts, joint_scores)
        elif name == "general_retention_delta":
            out[name] = general_retention_delta(general)
        else:
            out[name] = globals()[name](sums, counts)
    return out

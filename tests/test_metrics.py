"""Tests for cl_bench.metrics: hand-computed matrices, missing inputs, purity, Avalanche cross-check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cl_bench import metrics as M

NAN = np.nan
SRC = Path(__file__).resolve().parents[1] / "src"


# --------------------------------------------------------------------------- fixtures
#
# Three tasks of UNEQUAL size: task 1 has 100 test samples, task 2 has 50, task 3 has 200.
# Score matrix R (percent), rows = after_task (0 = before training), columns = task 1..3:
#
#            task1  task2  task3
#   R[0]  =  [ 10,    20,     5 ]     before training
#   R[1]  =  [ 90,    30,    10 ]     after task 1
#   R[2]  =  [ 95,    80,    25 ]     after task 2  (task 1 *improves* after its own training)
#   R[3]  =  [ 60,    90,    95 ]     after task 3  (task 2 ends at its maximum: negative forgetting)
#
# sums = R * count / 100 so all sums are whole numbers of correct predictions.

COUNTS_ROW = np.array([100.0, 50.0, 200.0])
R3 = np.array(
    [
        [10.0, 20.0, 5.0],
        [90.0, 30.0, 10.0],
        [95.0, 80.0, 25.0],
        [60.0, 90.0, 95.0],
    ]
)


def _three_task():
    counts = np.tile(COUNTS_ROW, (4, 1))
    sums = R3 * counts / 100.0
    return sums, counts


def _from_scores(R, count=100.0):
    """sums/counts for a score matrix with equal task sizes."""
    R = np.asarray(R, dtype=float)
    counts = np.full(R.shape, float(count))
    counts[np.isnan(R)] = NAN
    return R * counts / 100.0, counts


# --------------------------------------------------------------------------- hand computed


def test_score_matrix():
    sums, counts = _three_task()
    np.testing.assert_allclose(M.score_matrix(sums, counts), R3)
    assert sums[3].tolist() == [60.0, 45.0, 190.0]


def test_final_accuracy_task_mean_vs_sample_weighted_differ():
    sums, counts = _three_task()
    # task mean: (60 + 90 + 95) / 3 = 245/3 = 81.667
    assert M.acc_final_task_mean(sums, counts) == pytest.approx(245 / 3)
    # sample weighted: (60 + 45 + 190) / (100 + 50 + 200) = 295/350 = 84.286 %
    assert M.acc_final_sample_weighted(sums, counts) == pytest.approx(100 * 295 / 350)
    assert M.acc_final_task_mean(sums, counts) != pytest.approx(
        M.acc_final_sample_weighted(sums, counts)
    )


def test_acc_avg_incremental_is_sample_weighted_per_step():
    sums, counts = _three_task()
    # i=1: 90/100                      = 90
    # i=2: (95 + 40) / (100 + 50)      = 135/150 = 90     (task-mean would be (95+80)/2 = 87.5)
    # i=3: (60 + 45 + 190) / 350       = 590/7 = 84.286
    # mean = (90 + 90 + 590/7) / 3     = 1850/21 = 88.095
    assert M.acc_avg_incremental(sums, counts) == pytest.approx(1850 / 21)


def test_acc_lower_triangle():
    sums, counts = _three_task()
    # R[1][1], R[2][1], R[2][2], R[3][1], R[3][2], R[3][3] = 90, 95, 80, 60, 90, 95 -> 510 / 6
    assert M.acc_lower_triangle(sums, counts) == pytest.approx(85.0)


def test_forgetting_variants_differ():
    sums, counts = _three_task()
    # max_prev (max over i in j..T-1):
    #   j=1: max(R[1][1]=90, R[2][1]=95) - R[3][1]=60 = 35
    #   j=2: max(R[2][2]=80)            - R[3][2]=90 = -10   (negative forgetting kept)
    #   mean = 12.5
    assert M.forgetting_max_prev(sums, counts) == pytest.approx(12.5)
    # max_all (max over i in j..T, final row included):
    #   j=1: max(90, 95, 60) - 60 = 35
    #   j=2: max(80, 90)     - 90 = 0      (R[T][2] is the max -> clipped at 0)
    #   mean = 17.5
    assert M.forgetting_max_all(sums, counts) == pytest.approx(17.5)
    # first_last: j=1: 90 - 60 = 30; j=2: 80 - 90 = -10; mean = 10
    assert M.forgetting_first_last(sums, counts) == pytest.approx(10.0)


def test_bwt_denominators():
    sums, counts = _three_task()
    # numerator: (R[3][1]-R[1][1]) + (R[3][2]-R[2][2]) = (60-90) + (90-80) = -20
    assert M.bwt_last_row(sums, counts) == pytest.approx(-20 / 2)  # T-1 = 2
    assert M.bwt_last_row_over_T(sums, counts) == pytest.approx(-20 / 3)  # T = 3
    # all pairs i>j: (2,1): 95-90=5, (3,1): 60-90=-30, (3,2): 90-80=10 -> -15/3
    assert M.bwt_all_pairs(sums, counts) == pytest.approx(-5.0)


def test_fwt_plasticity_intransigence_general():
    sums, counts = _three_task()
    # fwt: j=2: R[1][2]-R[0][2] = 30-20 = 10; j=3: R[2][3]-R[0][3] = 25-5 = 20; mean 15
    assert M.fwt_vs_init(sums, counts) == pytest.approx(15.0)
    # plasticity: (90 + 80 + 95) / 3
    assert M.plasticity(sums, counts) == pytest.approx(265 / 3)
    # intransigence with J = [92, 85, 97]: (2 + 5 + 2) / 3 = 3
    assert M.intransigence(sums, counts, [92.0, 85.0, 97.0]) == pytest.approx(3.0)
    # general suites: G[0] = [50, 40], G[3] = [45, 42] -> ((45-50) + (42-40)) / 2 = -1.5
    G = np.array([[50.0, 40.0], [48.0, 41.0], [47.0, 41.0], [45.0, 42.0]])
    assert M.general_retention_delta(G) == pytest.approx(-1.5)


def test_compute_all_order_types_and_values():
    sums, counts = _three_task()
    G = np.array([[50.0, 40.0], [48.0, 41.0], [47.0, 41.0], [45.0, 42.0]])
    out = M.compute_all(sums, counts, joint_scores=[92.0, 85.0, 97.0], general=G)
    assert tuple(out) == M.METRIC_COLUMNS
    assert len(M.METRIC_COLUMNS) == 14
    assert set(M.DEFINITIONS) == set(M.METRIC_COLUMNS)
    assert all(isinstance(v, float) and type(v) is float for v in out.values())
    expected = {
        "acc_final_task_mean": 245 / 3,
        "acc_final_sample_weighted": 100 * 295 / 350,
        "acc_avg_incremental": 1850 / 21,
        "acc_lower_triangle": 85.0,
        "forgetting_max_prev": 12.5,
        "forgetting_max_all": 17.5,
        "forgetting_first_last": 10.0,
        "bwt_last_row": -10.0,
        "bwt_last_row_over_T": -20 / 3,
        "bwt_all_pairs": -5.0,
        "fwt_vs_init": 15.0,
        "plasticity": 265 / 3,
        "intransigence": 3.0,
        "general_retention_delta": -1.5,
    }
    assert out == pytest.approx(expected)


def test_every_function_has_formula_docstring():
    for name in M.METRIC_COLUMNS + ("score_matrix", "compute_all"):
        doc = getattr(M, name).__doc__
        assert doc and len(doc.strip().splitlines()) == 1, name


def test_bwt_is_minus_forgetting_first_last_on_random_matrix():
    rng = np.random.default_rng(0)
    T = 6
    counts = rng.integers(20, 300, size=(T + 1, T)).astype(float)
    sums = np.floor(rng.random((T + 1, T)) * counts)
    assert M.bwt_last_row(sums, counts) == pytest.approx(-M.forgetting_first_last(sums, counts))
    # max_all >= max_prev and max_all >= 0 always
    assert M.forgetting_max_all(sums, counts) >= M.forgetting_max_prev(sums, counts) - 1e-12
    assert M.forgetting_max_all(sums, counts) >= 0.0


# --------------------------------------------------------------------------- missing -> None


def test_single_task_gives_none_for_forgetting_bwt_fwt():
    sums, counts = _from_scores([[NAN], [70.0]])
    out = M.compute_all(sums, counts)
    for name in (
        "forgetting_max_prev",
        "forgetting_max_all",
        "forgetting_first_last",
        "bwt_last_row",
        "bwt_last_row_over_T",
        "bwt_all_pairs",
        "fwt_vs_init",
        "intransigence",
        "general_retention_delta",
    ):
        assert out[name] is None, name
    for name in (
        "acc_final_task_mean",
        "acc_final_sample_weighted",
        "acc_avg_incremental",
        "acc_lower_triangle",
        "plasticity",
    ):
        assert out[name] == pytest.approx(70.0), name


def test_no_row_zero_gives_none_for_fwt_only():
    sums, counts = _three_task()
    sums[0] = NAN
    counts[0] = NAN
    out = M.compute_all(sums, counts)
    assert out["fwt_vs_init"] is None
    assert out["forgetting_first_last"] == pytest.approx(10.0)
    assert out["acc_final_task_mean"] == pytest.approx(245 / 3)


def test_upper_triangle_not_evaluated():
    sums, counts = _three_task()
    for i in range(4):
        for k in range(3):
            if k + 1 > i:  # task k+1 not trained yet at row i
                sums[i, k] = NAN
                counts[i, k] = NAN
    out = M.compute_all(sums, counts)
    assert out["fwt_vs_init"] is None
    assert out["acc_avg_incremental"] == pytest.approx(1850 / 21)
    assert out["acc_lower_triangle"] == pytest.approx(85.0)
    assert out["forgetting_max_prev"] == pytest.approx(12.5)
    assert out["bwt_all_pairs"] == pytest.approx(-5.0)


def test_no_joint_reference_and_no_general_give_none():
    sums, counts = _three_task()
    assert M.intransigence(sums, counts, None) is None
    assert M.intransigence(sums, counts, [NAN, 85.0, 97.0]) is None
    assert M.general_retention_delta(None) is None
    out = M.compute_all(sums, counts)
    assert out["intransigence"] is None
    assert out["general_retention_delta"] is None


def test_missing_needed_entry_is_none_not_zero():
    sums, counts = _three_task()
    sums[3, 1] = NAN  # final score of task 2 missing
    assert M.acc_final_task_mean(sums, counts) is None
    assert M.acc_final_sample_weighted(sums, counts) is None
    assert M.forgetting_first_last(sums, counts) is None
    sums, counts = _three_task()
    counts[3, 0] = 0.0  # a zero count is missing, not a division by zero
    assert M.acc_final_task_mean(sums, counts) is None
    assert np.isnan(M.score_matrix(sums, counts)[3, 0])


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        M.acc_final_task_mean(np.zeros((3, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError):
        M.acc_final_task_mean(np.zeros((3, 2)), np.ones((4, 3)))
    sums, counts = _three_task()
    with pytest.raises(ValueError):
        M.intransigence(sums, counts, [1.0, 2.0])


# --------------------------------------------------------------------------- purity


def test_inputs_not_mutated():
    sums, counts = _three_task()
    sums[0, 0] = NAN
    joint = np.array([92.0, 85.0, 97.0])
    G = np.array([[50.0, 40.0], [48.0, 41.0], [47.0, 41.0], [45.0, 42.0]])
    before = [a.copy() for a in (sums, counts, joint, G)]
    M.compute_all(sums, counts, joint_scores=joint, general=G)
    M.score_matrix(sums, counts)
    for a, b in zip((sums, counts, joint, G), before):
        np.testing.assert_array_equal(a, b)  # NaN == NaN here
    assert sums.flags.writeable and counts.flags.writeable


def test_import_does_not_load_torch():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    code = (
        "import sys, cl_bench.metrics\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "ours = sorted(m for m in sys.modules if m.startswith('cl_bench'))\n"
        "assert not bad, f'torch loaded ({len(bad)} modules); cl_bench modules imported: {ours}'\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# --------------------------------------------------------------------------- Avalanche cross-check


def _drive_avalanche_stream_metric(metric, sums, counts, eval_row0=True):
    """Replay an accuracy matrix through an Avalanche plugin metric's own hooks.

    For each row i (0 = before training, i = after training experience i-1 in Avalanche's 0-based
    numbering) we run one evaluation over the whole test stream exactly as Avalanche's
    ``BaseTemplate.eval`` calls the plugin: ``before_eval``, then per experience
    ``before_eval_exp`` / ``after_eval_iteration`` (per minibatch) / ``after_eval_exp``, then
    ``after_eval``. The minibatches hold ``count`` labels of which ``sum`` are predicted right,
    so Avalanche's own TaskAwareAccuracy produces sum/count. Returns the value emitted by
    ``after_eval`` for each row (index 0 is the row-0 evaluation or None).
    """
    import torch

    T = sums.shape[1]
    strategy = SimpleNamespace(
        experience=None,
        mb_y=None,
        mb_output=None,
        is_eval=True,
        clock=SimpleNamespace(train_iterations=0),
    )
    stream = SimpleNamespace(name="test")
    emitted: list = []
    for i in range(T + 1):
        if i == 0 and (not eval_row0 or np.all(np.isnan(sums[0]))):
            emitted.append(None)
            continue
        if i > 0:
            strategy.is_eval = False
            strategy.experience = SimpleNamespace(
                current_experience=i - 1, origin_stream=SimpleNamespace(name="train"),
                task_labels=[0],
            )
            metric.before_training_exp(strategy)
            strategy.clock.train_iterations += 10
        strategy.is_eval = True
        metric.before_eval(strategy)
        for k in range(T):
            if np.isnan(sums[i, k]) or np.isnan(counts[i, k]):
                continue
            n, c = int(counts[i, k]), int(sums[i, k])
            strategy.experience = SimpleNamespace(
                current_experience=k, origin_stream=stream, task_labels=[0]
            )
            metric.before_eval_exp(strategy)
            y = torch.zeros(n, dtype=torch.long)
            pred = torch.ones(n, dtype=torch.long)
            pred[:c] = 0
            # two minibatches so Avalanche's running accuracy is exercised
            for sl in (slice(0, n // 2), slice(n // 2, n)):
                strategy.mb_y, strategy.mb_output = y[sl], pred[sl]
                metric.after_eval_iteration(strategy)
            metric.after_eval_exp(strategy)
        out = metric.after_eval(strategy)
        assert out is not None and len(out) == 1
        emitted.append(float(out[0].value))
    return emitted


def _random_matrix(T, seed):
    rng = np.random.default_rng(seed)
    counts = np.tile(rng.integers(10, 400, size=T).astype(float), (T + 1, 1))
    sums = np.floor(rng.random((T + 1, T)) * (counts + 1))
    return sums, counts


@pytest.mark.parametrize(
    "case", ["three_task", "random5_full", "random4_lower_only", "random3_no_row0"]
)
def test_forgetting_first_last_equals_avalanche_stream_forgetting(case):
    """Avalanche 0.6.0 ``StreamForgetting`` == our ``forgetting_first_last`` / 100.

    What Avalanche does (avalanche/evaluation/metrics/forgetting_bwt.py):
    ``before_training_exp`` stores the id of the experience being trained. In each evaluation,
    ``before_eval`` clears the per-experience "last" values and the stream Mean; ``after_eval_exp``
    stores the accuracy (in [0, 1]) of the experience being trained as its "initial" value
    (i.e. R[j][j]) and any other experience's accuracy as its "last" value. An experience's
    forgetting ``initial - last`` is added to an unweighted Mean only when both exist, so:

    * the experience just trained is EXCLUDED (it has an initial but no last in this eval),
      not counted as 0 - so the average runs over j < T, exactly as ours;
    * not-yet-trained experiences and the row-0 (pre-training) evaluation are ignored;
    * each experience weighs 1 regardless of its size (task mean, not sample weighted);
    * sign: positive = accuracy lost; scale: fraction, so ours = 100 * Avalanche.

    After the last experience the value is therefore mean_{j<T} R[j][j] - R[T][j], and after
    experience i (i >= 2) it equals our metric on the truncated matrix rows 0..i, columns 1..i.
    The one corner that differs: with a single trained experience Avalanche's Mean has no
    updates and returns 0.0, where we return None (empty, never 0).
    """
    from avalanche.evaluation.metrics import StreamForgetting

    if case == "three_task":
        sums, counts = _three_task()
    else:
        sums, counts = _random_matrix(int(case[6]), seed=len(case))
    if case == "random4_lower_only":
        T = sums.shape[1]
        for i in range(T + 1):
            sums[i, i:] = NAN
            counts[i, i:] = NAN
    eval_row0 = case != "random3_no_row0"
    if not eval_row0:
        sums[0] = NAN
        counts[0] = NAN

    emitted = _drive_avalanche_stream_metric(StreamForgetting(), sums, counts, eval_row0)
    T = sums.shape[1]
    assert emitted[1] == 0.0  # Avalanche: nothing to average after the first experience
    assert M.forgetting_first_last(sums[:2, :1], counts[:2, :1]) is None  # ours: empty
    for i in range(2, T + 1):
        ours = M.forgetting_first_last(sums[: i + 1, :i], counts[: i + 1, :i])
        assert ours is not None
        assert ours == pytest.approx(100.0 * emitted[i], abs=1e-9), i
    if case == "three_task":
        assert 100.0 * emitted[T] == pytest.approx(10.0)  # the hand-computed value


def test_forgetting_first_last_equals_avalanche_standalone_forgetting():
    """Same check through Avalanche's standalone ``Forgetting`` metric (initial=R[j][j], last=R[T][j]).

    ``Forgetting.result()`` gives initial - last per key; it is a dict over the keys that have both,
    so we feed initial for every task and last for tasks j < T and average the dict ourselves.
    """
    from avalanche.evaluation.metrics import Forgetting

    sums, counts = _three_task()
    acc = sums / counts  # Avalanche scale
    T = 3
    f = Forgetting()
    for k in range(T):
        f.update(k, float(acc[k + 1, k]), initial=True)
    for k in range(T - 1):
        f.update(k, float(acc[T, k]))
    per_exp = f.result()
    assert sorted(per_exp) == [0, 1]
    assert per_exp[0] == pytest.approx(0.30) and per_exp[1] == pytest.approx(-0.10)
    assert M.forgetting_first_last(sums, counts) == pytest.approx(
        100.0 * float(np.mean(list(per_exp.values())))
    )


@pytest.mark.parametrize("case", ["three_task", "random6_full"])
def test_bwt_last_row_equals_avalanche_stream_bwt(case):
    """Avalanche 0.6.0 ``StreamBWT`` == our ``bwt_last_row`` / 100.

    ``StreamBWT`` subclasses ``StreamForgetting`` and only negates each experience's value
    (``forgetting_to_bwt``), so it averages R[T][j] - R[j][j] over the T-1 experiences trained
    before the last one: denominator T-1 (not T, so it is NOT ``bwt_last_row_over_T``).
    Like StreamForgetting it emits 0.0 after the first experience, where we return None.
    """
    from avalanche.evaluation.metrics import StreamBWT

    if case == "three_task":
        sums, counts = _three_task()
    else:
        sums, counts = _random_matrix(6, seed=11)
    emitted = _drive_avalanche_stream_metric(StreamBWT(), sums, counts)
    T = sums.shape[1]
    assert emitted[1] == 0.0
    assert M.bwt_last_row(sums[:2, :1], counts[:2, :1]) is None
    for i in range(2, T + 1):
        ours = M.bwt_last_row(sums[: i + 1, :i], counts[: i + 1, :i])
        assert ours == pytest.approx(100.0 * emitted[i], abs=1e-9), i
    if case == "three_task":
        assert 100.0 * emitted[T] == pytest.approx(-10.0)
        assert 100.0 * emitted[T] != pytest.approx(M.bwt_last_row_over_T(sums, counts))

"""Leaderboard: aggregation over seeds, intransigence from a joint run, loud exclusion of bad runs."""
import json
import math

import pandas as pd
import pytest

from cl_bench import leaderboard
from cl_bench.config import compose
from cl_bench.errors import UserError
from cl_bench.runner import run


def toy_run(results, strategy="finetune", seed=0):
    return run(compose(["scenario=toy", f"strategy={strategy}", f"seed={seed}", "progress=false",
                        f"results_dir={results}", f"cache_dir={results}/cache"]))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("results")
    summaries = {(s, seed): toy_run(directory, s, seed) for s in ("finetune", "joint") for seed in (0, 1, 2)}
    return directory, summaries


def test_groups_runs_that_differ_only_in_seed(results):
    directory, summaries = results
    board, excluded, out = leaderboard.build(directory, directory / "out")
    assert excluded == []
    assert sorted(board["strategy"]) == ["finetune", "joint"]
    row = board.set_index("strategy").loc["finetune"]
    assert row["n_seeds"] == 3 and row["seeds"] == "0 1 2"
    values = [summaries[("finetune", seed)]["metrics"]["acc_final_task_mean"] for seed in (0, 1, 2)]
    assert row["acc_final_task_mean_mean"] == pytest.approx(sum(values) / 3)
    assert row["acc_final_task_mean_std"] == pytest.approx(pd.Series(values).std(ddof=1))
    csv = pd.read_csv(out / "leaderboard.csv")
    assert {"forgetting_max_prev_mean", "bwt_last_row_std", "samples_per_second_mean"} <= set(csv.columns)
    assert "## toy on mlp" in (out / "LEADERBOARD.md").read_text()


def test_intransigence_uses_the_joint_run_of_the_same_seed(results):
    directory, summaries = results
    board, _, _ = leaderboard.build(directory, directory / "out")
    collected = leaderboard.collect(directory)
    leaderboard.add_intransigence(collected.runs)
    finetune = next(r for r in collected.runs if r["strategy"] == "finetune" and r["seed"] == 1)
    joint = next(r for r in collected.runs if r["strategy"] == "joint" and r["seed"] == 1)
    R_joint = 100 * joint["_sums"] / joint["_counts"]
    R = 100 * finetune["_sums"] / finetune["_counts"]
    expected = sum(R_joint[j + 1, j] - R[j + 1, j] for j in range(3)) / 3
    assert finetune["metrics"]["intransigence"] == pytest.approx(expected)
    assert joint["metrics"]["intransigence"] == 0.0


def test_partial_failed_and_corrupt_runs_are_excluded_with_reasons(results, tmp_path):
    directory, _ = results
    copy = tmp_path / "results"
    import shutil
    shutil.copytree(directory / "runs", copy / "runs")
    runs = sorted((copy / "runs").iterdir())
    # 1: truncated summary; 2: scores edited after the fact; 3: marked partial; 4: garbage scores.csv
    (runs[0] / "summary.json").write_text((runs[0] / "summary.json").read_text()[:50])
    scores = runs[1] / "scores.csv"
    scores.write_text(scores.read_text().replace(",100.000000", ",99.000000", 1) + "1,1,0,1,0.0\n")
    summary = json.loads((runs[2] / "summary.json").read_text())
    summary.update(status="failed", tasks_completed=2, message="loss became nan")
    (runs[2] / "summary.json").write_text(json.dumps(summary))
    (runs[3] / "scores.csv").write_bytes(b"\x00\xff garbage")
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}

    board, excluded, _ = leaderboard.build(copy)
    reasons = dict(excluded)
    assert set(reasons) == {r.name for r in runs[:4]}
    assert reasons[runs[0].name].startswith("corrupt")
    assert "checksum" in reasons[runs[1].name]
    assert reasons[runs[2].name] == "failed after 2/3 tasks: loss became nan"
    assert reasons[runs[3].name].startswith("corrupt")
    assert board["n_seeds"].sum() == 2  # 6 runs, 4 excluded
    markdown = (copy / "LEADERBOARD.md").read_text()
    assert "## Excluded runs" in markdown and runs[2].name in markdown
    # reading never touches the run files
    assert all(p.read_bytes() == data for p, data in before.items())


def test_a_rerun_with_resume_false_is_counted_once(tmp_path):
    toy_run(tmp_path)
    run(compose(["scenario=toy", "progress=false", f"results_dir={tmp_path}", f"cache_dir={tmp_path}/cache",
                 "resume=false"]))
    board, excluded, _ = leaderboard.build(tmp_path)
    assert board["n_seeds"].tolist() == [1]
    assert len(excluded) == 1 and "duplicate" in excluded[0][1]


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no runs"):
        leaderboard.build(tmp_path)


def test_single_seed_has_empty_std(tmp_path):
    toy_run(tmp_path)
    board, _, _ = leaderboard.build(tmp_path)
    assert math.isnan(board.loc[0, "acc_final_task_mean_std"])


def test_latex_table_bolds_the_best_of_each_column_and_escapes_names(results, tmp_path):
    directory, _ = results
    import shutil
    shutil.copytree(directory / "runs", tmp_path / "runs")
    from cl_bench.cli import main
    assert main(["leaderboard", str(tmp_path), "--format", "latex"]) == 0
    tex = (tmp_path / "leaderboard.tex").read_text()
    board, _, _ = leaderboard.build(tmp_path)
    assert tex.count(r"\begin{tabular}") == 1 and r"\caption{toy on mlp: mean $\pm$ sample std" in tex
    lines = [line.rstrip(" \\") for line in tex.splitlines()]
    header = next(line for line in lines if line.startswith("strategy &")).split(" & ")
    assert header[3] == r"acc\_final\_task\_mean" and header[-1] == r"protocol\_flags"
    rows = {cells[0]: cells for cells in (line.split(" & ") for line in lines)
            if cells[0] in ("finetune", "joint")}
    by_strategy = board.set_index("strategy")
    for metric, best in (("acc_final_task_mean", max), ("forgetting_max_prev", min)):
        column = header.index(metric.replace("_", r"\_"))
        means = by_strategy[f"{metric}_mean"]
        winner = best(means.index, key=lambda name: means[name])
        for name, cells in rows.items():
            text = (f"{means[name]:.2f} $\\pm$ {by_strategy.loc[name, f'{metric}_std']:.2f}")
            assert cells[column] == (r"\bfseries " + text if name == winner else text), (metric, name)

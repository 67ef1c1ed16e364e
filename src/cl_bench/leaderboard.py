"""Collect runs, check them, aggregate over seeds, write leaderboard.csv and LEADERBOARD.md.

Runs are grouped by ``group_hash`` (the config hash without the seed): mean, std and n_seeds per
metric, the protocol columns of their cards and the flags of rows whose protocol differs from the
others in their table (``protocol_flags``). A run is excluded, with its reason, when its summary is
unreadable or malformed (a damaged protocol card included), it was written before protocol cards
(schema 1: its numbers have no protocol, and its cil evaluation batches were per task), its scores
file is missing or does not match the checksum recorded in its summary, it did not finish, or a newer
finished run has the same config hash.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cl_bench import metrics, protocol_flags
from cl_bench._io import atomic_write_text, read_summary
from cl_bench.errors import UserError

GROUP_COLUMNS = ["scenario", "model", "strategy", "eval_mode", "group_hash"]
COST_COLUMNS = ["train_seconds", "eval_seconds", "trainable_params", "params_added_per_task",
                "peak_memory_mb", "samples_per_second", "train_tokens_per_second", "generation_tokens_per_second"]
# read from summary["metrics"] like the metrics, but not computable from the score matrices
DIAGNOSTIC_COLUMNS = ["task_identified_final"]
COLUMN_DEFINITIONS = {  # the columns that are not metrics.METRIC_COLUMNS
    "task_identified_final": "Percent of the last evaluation's pooled test samples (cil, class streams) predicted as a "
                             "class of their own task, right or wrong: how often the task is identified; 100/T for "
                             "a model that puts every prediction in one task's classes.",
    "train_tokens_per_second": "tokens (prompt and answer, no padding) trained on per second of training",
    "generation_tokens_per_second": "tokens generated per second of generation during evaluation",
}
# strategies whose runs serve as the joint-training reference for intransigence
JOINT_REFERENCES = ("joint", "multitask")
MARKDOWN_METRICS = ["acc_final_task_mean", "acc_final_sample_weighted", "acc_avg_incremental",
                    "forgetting_max_prev", "forgetting_first_last", "bwt_last_row", "intransigence"]
# shown in a section only when one of its runs has them (instruction streams)
OPTIONAL_MARKDOWN = ["task_identified_final", "general_retention_delta", "train_tokens_per_second", "generation_tokens_per_second"]


@dataclass
class Collected:
    runs: list[dict]  # usable summaries, each with its score matrices under "_sums"/"_counts"
    excluded: list[tuple[str, str]]  # (run directory name, reason)


NUMBER = (int, float)
# summary.json: the fields the leaderboard, `show` and reports read, with their JSON types
SCHEMA = {"schema": int, "run_id": str, "status": str, "strategy": str, "strategy_type": str, "scenario": str,
          "model": str, "seed": int, "eval_mode": str, "config_hash": str, "group_hash": str, "setting_hash": str,
          "tasks_total": int, "tasks_completed": int, "metrics": dict, "cost": dict, "scores_sha256": str,
          "per_task": list, "provenance": dict}
STATUSES = ("running", "finished", "failed", "interrupted")
FIRST_WITH_PROTOCOL = 2  # summary schema that added the protocol card
# one leaderboard table: the rows whose protocols are compared
TABLE_COLUMNS = ["scenario", "model", "eval_mode"]
MAX_TASKS = 100_000


def validate_summary(summary: dict) -> None:
    """ValueError naming the first field of summary.json that is missing or of the wrong type."""
    for key, kind in SCHEMA.items():
        if key not in summary:
            raise ValueError(f"summary.json lacks {key}")
        value = summary[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"summary.json: {key} should be {'an object' if kind is dict else kind.__name__}, "
                             f"got {type(value).__name__}")
    if summary["status"] not in STATUSES:
        raise ValueError(f"summary.json: unknown status {summary['status'][:40]!r}")
    if not 1 <= summary["tasks_total"] <= MAX_TASKS or not 0 <= summary["tasks_completed"] <= summary["tasks_total"]:
        raise ValueError("summary.json: tasks_total/tasks_completed out of range")
    for section in ("metrics", "cost"):
        for name, value in summary[section].items():
            if not (value is None or isinstance(value, (*NUMBER, str, list)) and not isinstance(value, bool)):
                raise ValueError(f"summary.json: {section}.{name} is a {type(value).__name__}")
            if section == "metrics" and not (value is None or isinstance(value, NUMBER)):
                raise ValueError(f"summary.json: metrics.{name} should be a number")
    if not all(isinstance(p, dict) for p in summary["per_task"]):
        raise ValueError("summary.json: per_task should hold objects")
    if summary["schema"] >= FIRST_WITH_PROTOCOL:
        if "protocol" not in summary:
            raise ValueError("summary.json lacks protocol")
        protocol_flags.validate_card(summary["protocol"])


def read_checked_summary(path: Path) -> dict:
    """summary.json, read and checked against SCHEMA; ValueError saying why it cannot be used."""
    try:
        summary = read_summary(path)
    except UserError as error:
        raise ValueError(str(error)) from None
    validate_summary(summary)
    return summary


def read_scores(path: Path, tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """The sum and count matrices of scores.csv; ValueError when a row does not fit a ``tasks``-task run."""
    table = pd.read_csv(path)
    if list(table.columns) != ["after_task", "eval_task", "sum", "count", "score"]:
        raise ValueError("unexpected columns")
    sums, counts = np.full((tasks + 1, tasks), np.nan), np.full((tasks + 1, tasks), np.nan)
    for row in table.itertuples(index=False):
        after, task, total, count = row.after_task, row.eval_task, float(row.sum), float(row.count)
        if not (float(after).is_integer() and float(task).is_integer() and 0 <= after <= tasks and 1 <= task <= tasks):
            raise ValueError(f"row after_task={after}, eval_task={task} outside a {tasks}-task run")
        if not (np.isfinite(total) and np.isfinite(count) and count >= 0 and 0 <= total <= count):
            raise ValueError(f"row after_task={after}, eval_task={task}: sum {total} / count {count} impossible")
        sums[int(after), int(task) - 1], counts[int(after), int(task) - 1] = total, count
    return sums, counts


def check_run(directory: Path) -> dict:
    """The run's summary with its matrices, or ValueError with the reason it is not usable."""
    try:
        summary = read_checked_summary(directory / "summary.json")
    except ValueError as error:
        raise ValueError(f"corrupt: {error}") from None
    if summary["schema"] < FIRST_WITH_PROTOCOL:
        raise ValueError("written before protocol cards; rerun it")
    if summary["status"] != "finished":
        message = f": {summary.get('message')}" if summary.get("message") else ""
        raise ValueError(f"{summary['status']} after {summary['tasks_completed']}/{summary['tasks_total']} tasks"
                         f"{message}")
    scores = directory / "scores.csv"
    if not scores.is_file():
        raise ValueError("corrupt: scores.csv is missing")
    if hashlib.sha256(scores.read_bytes()).hexdigest() != summary["scores_sha256"]:
        raise ValueError("corrupt: scores.csv does not match the checksum in summary.json")
    try:
        summary["_sums"], summary["_counts"] = read_scores(scores, int(summary["tasks_total"]))
    except (ValueError, TypeError, IndexError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"corrupt: scores.csv unreadable ({error})") from None
    return summary


def collect(results_dir: str | Path) -> Collected:
    runs_dir = Path(results_dir) / "runs"
    if not runs_dir.is_dir():
        raise UserError(f"no runs in {results_dir} (expected a runs/ folder); run `cl-bench run ...` first")
    usable, excluded = {}, []
    for directory in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        try:
            summary = check_run(directory)
        except ValueError as reason:
            excluded.append((directory.name, str(reason)))
            continue
        key = summary["config_hash"]
        if key in usable:  # the same config run twice (resume=false): keep the newest
            older, newer = sorted([usable[key], summary], key=lambda s: s["provenance"].get("finished_at", 0))
            excluded.append((older["run_id"], f"duplicate of {newer['run_id']} (same config and seed)"))
            summary = newer
        usable[key] = summary
    return Collected(list(usable.values()), excluded)


def add_intransigence(runs: list[dict]) -> None:
    """Intransigence needs a joint run on the same scenario, model, seed and eval mode. Its
    reference J[j] is that run's R[j][j]: a model trained on all data of tasks 1..j, scored on
    task j (Chaudhry et al., 2018, "Riemannian Walk", Sec. 4), so a joint run's own value is 0."""
    joint = {r["setting_hash"]: r for r in runs if r["strategy_type"] in JOINT_REFERENCES}
    for summary in runs:
        reference = joint.get(summary["setting_hash"])
        value = None
        if reference is not None and reference["_sums"].shape == summary["_sums"].shape:
            diagonal = [100 * reference["_sums"][j + 1, j] / reference["_counts"][j + 1, j]
                        for j in range(reference["_sums"].shape[1])]
            value = metrics.intransigence(summary["_sums"], summary["_counts"], diagonal)
        summary["metrics"]["intransigence"] = value


def aggregate(runs: list[dict]) -> pd.DataFrame:
    rows = []
    for summary in runs:
        row = {key: summary[key] for key in GROUP_COLUMNS + ["seed"]}
        row.update({name: summary["metrics"].get(name) for name in [*metrics.METRIC_COLUMNS, *DIAGNOSTIC_COLUMNS]})
        row.update({name: summary["cost"].get(name) for name in COST_COLUMNS})
        rows.append(row)
    columns = GROUP_COLUMNS + ["seed"] + list(metrics.METRIC_COLUMNS) + DIAGNOSTIC_COLUMNS + COST_COLUMNS
    table = pd.DataFrame(rows, columns=columns)
    values = [c for c in columns if c not in GROUP_COLUMNS + ["seed"]]
    table[values] = table[values].apply(pd.to_numeric, errors="coerce")
    grouped = table.groupby(GROUP_COLUMNS, sort=False)
    board = grouped["seed"].agg(n_seeds="count", seeds=lambda s: " ".join(str(v) for v in sorted(s)))
    for name in values:
        board[f"{name}_mean"] = grouped[name].mean()
        board[f"{name}_std"] = grouped[name].std(ddof=1)
    board = board.reset_index()
    board = board.sort_values(["scenario", "model", "acc_final_task_mean_mean"], ascending=[True, True, False],
                              na_position="last", ignore_index=True)
    return add_protocol(board, runs)


def add_protocol(board: pd.DataFrame, runs: list[dict]) -> pd.DataFrame:
    """The protocol columns of each row (from its seeds' cards) and its flags within its table."""
    cards: dict[tuple, list[dict]] = {}
    for summary in runs:
        cards.setdefault(tuple(summary[key] for key in GROUP_COLUMNS), []).append(summary["protocol"])
    row_cards = [cards[tuple(row)] for row in board[GROUP_COLUMNS].itertuples(index=False)]
    columns = pd.DataFrame([protocol_flags.protocol_columns(c) for c in row_cards],
                           columns=protocol_flags.PROTOCOL_COLUMNS, index=board.index)
    columns["protocol_flags"] = ""
    for rows in board.groupby(TABLE_COLUMNS, sort=False).indices.values():
        for index, flags in zip(rows, protocol_flags.table_flags([row_cards[i] for i in rows])):
            columns.at[index, "protocol_flags"] = protocol_flags.SEPARATOR.join(flags)
    return pd.concat([board, columns], axis=1)


def _cell(mean, std) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.2f} ± {std:.2f}" if not pd.isna(std) else f"{mean:.2f}"


def markdown(board: pd.DataFrame, excluded: list[tuple[str, str]]) -> str:
    out = io.StringIO()
    out.write("# Leaderboard\n\nMean ± sample std over seeds (percent points). Columns are named by their "
              "definition; see `results/README.md`.\n")
    for (scenario, model), part in board.groupby(["scenario", "model"], sort=False):
        out.write(f"\n## {scenario} on {model}\n\n")
        shown = MARKDOWN_METRICS + [m for m in OPTIONAL_MARKDOWN if part[f"{m}_mean"].notna().any()]
        header = ["strategy", "eval", "seeds"] + shown + ["train_seconds", "trainable_params", "protocol_flags"]
        out.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
        for row in part.itertuples(index=False):
            row = row._asdict()
            cells = [row["strategy"], row["eval_mode"], str(row["n_seeds"])]
            cells += [_cell(row[f"{m}_mean"], row[f"{m}_std"]) for m in shown]
            cells += [_cell(row["train_seconds_mean"], row["train_seconds_std"]),
                      "" if pd.isna(row["trainable_params_mean"]) else f"{row['trainable_params_mean']:.0f}",
                      row["protocol_flags"].replace("|", "/")]
            out.write("| " + " | ".join(cells) + " |\n")
        rules = protocol_flags.legend(list(part["protocol_flags"]))
        out.write("\nProtocol flags (rows compared within the same eval mode): "
                  + ("; ".join(rules) if rules else "none, every row trained and evaluated alike") + ".\n")
    out.write("\n## Definitions\n\n")
    for name in MARKDOWN_METRICS + OPTIONAL_MARKDOWN:
        out.write(f"- `{name}`: {metrics.DEFINITIONS.get(name) or COLUMN_DEFINITIONS[name]}\n")
    if excluded:
        out.write("\n## Excluded runs\n\n")
        for name, reason in excluded:
            out.write(f"- `{name}`: {reason}\n")
    return out.getvalue()


# metrics where a smaller value is the better one (the LaTeX table bolds the best per column)
LOWER_IS_BETTER = {"forgetting_max_prev", "forgetting_first_last", "intransigence"}
FORMATS = ("markdown", "latex")


def _best_rows(part: pd.DataFrame, metric: str) -> set:
    """Index labels of the best mean of ``metric`` within each eval mode (rows are compared within one)."""
    best = set()
    for _, rows in part.groupby("eval_mode", sort=False):
        means = rows[f"{metric}_mean"].dropna()
        if len(means) > 1:
            top = means.min() if metric in LOWER_IS_BETTER else means.max()
            best |= set(means.index[np.isclose(means, top, rtol=0, atol=1e-9)])
    return best


def latex(board: pd.DataFrame) -> str:
    """One booktabs table per scenario and model (pandas' Styler): mean $\\pm$ std, the best of each metric
    column in bold within its eval mode, protocol flags last."""
    tables = []
    for (scenario, model), part in board.groupby(["scenario", "model"], sort=False):
        shown = MARKDOWN_METRICS + [m for m in OPTIONAL_MARKDOWN if part[f"{m}_mean"].notna().any()]
        cells = pd.DataFrame({"strategy": part["strategy"], "eval": part["eval_mode"], "seeds": part["n_seeds"]})
        for name in shown:
            cells[name] = [_cell(mean, std).replace(" ± ", r" $\pm$ ") for mean, std in
                           zip(part[f"{name}_mean"], part[f"{name}_std"])]
        cells["protocol_flags"] = part["protocol_flags"]
        bold = {name: _best_rows(part, name) for name in shown}
        styler = (cells.style.hide(axis="index")
                  .format(escape="latex", subset=["strategy", "eval", "protocol_flags"])
                  .format_index(escape="latex", axis=1)
                  .apply(lambda column: ["font-weight: bold" if index in bold[column.name] else ""
                                         for index in column.index], subset=shown))
        caption = f"{scenario} on {model}: mean ± sample std over seeds (percent points); best per column in bold"
        tables.append(styler.to_latex(caption=_latex_text(caption), hrules=True, convert_css=True,
                                      position_float="centering", column_format="llr" + "r" * len(shown) + "l"))
    return "\n".join(tables)


LATEX_SPECIALS = str.maketrans({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                                "^": r"\textasciicircum{}", "±": r"$\pm$"})


def _latex_text(text: str) -> str:
    return text.translate(LATEX_SPECIALS)


def build(results_dir: str | Path, out_dir: str | Path | None = None,
          formats: tuple[str, ...] = ("markdown",)) -> tuple[pd.DataFrame, list, Path]:
    """Aggregate ``results_dir/runs`` and write leaderboard.csv, LEADERBOARD.md and, with ``latex`` among
    ``formats``, leaderboard.tex into ``out_dir``."""
    collected = collect(results_dir)
    add_intransigence(collected.runs)
    board = aggregate(collected.runs)
    out = Path(out_dir or results_dir)
    atomic_write_text(out / "leaderboard.csv", board.to_csv(index=False, float_format="%.4f"))
    atomic_write_text(out / "LEADERBOARD.md", markdown(board, collected.excluded))
    if "latex" in formats:
        atomic_write_text(out / "leaderboard.tex", latex(board))
    return board, collected.excluded, out

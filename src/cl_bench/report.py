"""Figures and a static HTML report of a results directory (``cl-bench report``, ``show --plot``).

Per (scenario, model): the leaderboard table (sortable), accuracy on the seen tasks after each task
(mean over seeds, band = min..max over seeds), forgetting per task, accuracy versus trainable
parameters and versus training time, the protocol table (each row's protocol columns and flags); per
run: the score matrix heatmap, the protocol card and the provenance.

Figures use matplotlib's Agg canvas and stay readable in greyscale: each strategy has its own
marker, line style and hatch. Text from results is never parsed as mathtext in figures and is
escaped with ``html.escape`` in the page; the page loads nothing from outside (images are inline
base64 PNGs).
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cl_bench import leaderboard, metrics, protocol_flags
from cl_bench._io import _atomic, atomic_write_text

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
LINE_STYLES = ["-", "--", ":", "-."]
HATCHES = ["//", "..", "xx", "\\\\", "oo", "--", "++", "**"]
HTML_DPI, PNG_DPI = 85, 200


@dataclass
class Group:
    """The runs of one leaderboard row (one setting, several seeds)."""
    label: str
    row: dict
    runs: list[dict]


@dataclass
class Section:
    scenario: str
    model: str
    groups: list[Group] = field(default_factory=list)


def style(index: int, count: int) -> dict:
    """Marker, line style, hatch and a colour whose lightness differs from its neighbours'."""
    shade = matplotlib.colormaps["viridis"](0.85 * index / max(count - 1, 1))
    return {"marker": MARKERS[index % len(MARKERS)], "linestyle": LINE_STYLES[index % len(LINE_STYLES)],
            "hatch": HATCHES[index % len(HATCHES)], "color": shade}


def literal(text) -> str:
    """Text from results as matplotlib shows it verbatim: a "$" would otherwise start mathtext."""
    return str(text).replace("$", r"\$")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.") or "x"


def unique(taken, name: str) -> str:
    """``name``, or ``name`` with a number before its suffix when it is taken already."""
    stem, suffix, number = name.rsplit(".", 1)[0], "." + name.rsplit(".", 1)[1], 2
    while name in taken:
        name, number = f"{stem}-{number}{suffix}", number + 1
    return name


# --- the numbers each figure plots ----------------------------------------------------------------

def seen_task_scores(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Pooled score on tasks 1..i after training task i, for i = 1..T (NaN where missing); their mean
    is ``acc_avg_incremental``."""
    tasks = sums.shape[1]
    values = np.full(tasks, np.nan)
    for i in range(1, tasks + 1):
        total = counts[i, :i].sum()
        if np.isfinite(total) and total > 0:
            values[i - 1] = 100 * sums[i, :i].sum() / total
    return values


def forgetting_per_task(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Best score of task j before the last step minus its final score, j = 1..T-1; their mean is
    ``forgetting_max_prev``."""
    scores = metrics.score_matrix(sums, counts)
    tasks = scores.shape[1]
    return np.array([scores[j:tasks, j - 1].max() - scores[tasks, j - 1] for j in range(1, tasks)])


def seed_band(runs: list[dict], per_run) -> dict[str, np.ndarray]:
    """Mean, min and max over the runs (seeds) of ``per_run(sums, counts)``."""
    values = np.array([per_run(run["_sums"], run["_counts"]) for run in runs])
    return {"mean": values.mean(axis=0), "low": values.min(axis=0), "high": values.max(axis=0),
            "std": values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(values.shape[1])}


# --- figures ---------------------------------------------------------------------------------------

def new_figure(width: float, height: float):
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.add_subplot()


def curves_figure(groups: list[Group], title: str) -> tuple[Figure, dict]:
    """Accuracy on seen tasks after each task, one line per group with its seed band."""
    figure, axes = new_figure(6.4, 3.8)
    plotted = {}
    for index, group in enumerate(groups):
        band = seed_band(group.runs, seen_task_scores)
        steps = np.arange(1, len(band["mean"]) + 1)
        look = style(index, len(groups))
        axes.fill_between(steps, band["low"], band["high"], color=look["color"], alpha=0.2, linewidth=0)
        axes.plot(steps, band["mean"], marker=look["marker"], linestyle=look["linestyle"], color=look["color"],
                  label=literal(f"{group.label} ({len(group.runs)} seed{'s' if len(group.runs) > 1 else ''})"))
        plotted[group.label] = {"steps": steps, **band}
    axes.set(xlabel="after training task", ylabel="accuracy on seen tasks (%)", ylim=(-2, 102),
             title=literal(title))
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize="small", title="line: mean, band: min..max over seeds", title_fontsize="small")
    return figure, plotted


def read_train_log(directory: Path) -> pd.DataFrame | None:
    """A run's ``train_log.csv`` (step and loss columns, rows with a number for both), or None when it is
    missing or unreadable: a damaged log leaves the rest of the report alone."""
    try:
        frame = pd.read_csv(directory / "train_log.csv", usecols=["step", "loss"])
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError):
        return None
    frame = frame.apply(pd.to_numeric, errors="coerce").dropna()
    frame = frame[np.isfinite(frame["loss"]) & np.isfinite(frame["step"])]
    return frame if len(frame) else None


def loss_figure(groups: list[Group], runs_dir: Path, title: str) -> tuple[Figure, dict] | None:
    """Training loss against the optimizer step (``train_log.csv``), one line per group: the mean over its
    seeds at each logged step, the band min..max; None when no run of the groups has a log."""
    figure, axes = new_figure(6.4, 3.8)
    plotted = {}
    for index, group in enumerate(groups):
        folders = [runs_dir / str(run["run_id"]) for run in group.runs]  # the runner names a folder by its id
        logs = [log for folder in folders if folder.parent == runs_dir and (log := read_train_log(folder)) is not None]
        if not logs:
            continue
        by_step = pd.concat(logs).groupby("step")["loss"].agg(["mean", "min", "max"])
        steps, mean, low, high = by_step.index.to_numpy(), by_step["mean"], by_step["min"], by_step["max"]
        look = style(index, len(groups))
        axes.fill_between(steps, low, high, color=look["color"], alpha=0.2, linewidth=0)
        axes.plot(steps, mean, linestyle=look["linestyle"], color=look["color"],
                  label=literal(f"{group.label} ({len(logs)} log{'s' if len(logs) > 1 else ''})"))
        plotted[group.label] = {"steps": steps, "mean": mean.to_numpy(), "low": low.to_numpy(), "high": high.to_numpy()}
    if not plotted:
        return None
    axes.set(xlabel="optimizer step", ylabel="training loss (mean over logged steps)", title=literal(title))
    axes.legend(fontsize="small", title="line: mean, band: min..max over seeds", title_fontsize="small")
    return figure, plotted


def forgetting_figure(groups: list[Group], title: str) -> tuple[Figure, dict]:
    """Forgetting of each task (all but the last), grouped bars with the seed std as error bars."""
    figure, axes = new_figure(6.4, 3.6)
    plotted = {}
    width = 0.8 / max(len(groups), 1)
    for index, group in enumerate(groups):
        if group.runs[0]["_sums"].shape[1] < 2:
            continue
        band = seed_band(group.runs, forgetting_per_task)
        tasks = np.arange(1, len(band["mean"]) + 1)
        look = style(index, len(groups))
        light = [0.45 + 0.55 * channel for channel in look["color"][:3]]  # black hatches stay visible
        axes.bar(tasks - 0.4 + width * (index + 0.5), band["mean"], width, yerr=band["std"], capsize=2,
                 color=light, hatch=look["hatch"], edgecolor="black", linewidth=0.5, label=literal(group.label))
        plotted[group.label] = {"tasks": tasks, **band}
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set(xlabel="task", ylabel="forgetting (points)", title=literal(title))
    axes.xaxis.get_major_locator().set_params(integer=True)
    if plotted:
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1),
                    title="forgetting_max_prev\nper task;\nerror bar: seed std", title_fontsize="small")
    return figure, plotted


def scatter_figure(groups: list[Group], cost: str, label: str, title: str) -> tuple[Figure, dict]:
    """Final accuracy (mean ± std over seeds) against a cost column, each point named."""
    figure, axes = new_figure(6.4, 3.8)
    plotted = {}
    for index, group in enumerate(groups):
        x, y = group.row.get(f"{cost}_mean"), group.row.get("acc_final_task_mean_mean")
        if pd.isna(x) or pd.isna(y):
            continue
        std = group.row.get("acc_final_task_mean_std")
        look = style(index, len(groups))
        axes.errorbar([x], [y], yerr=[0 if pd.isna(std) else std], marker=look["marker"], color=look["color"],
                      markeredgecolor="black", markersize=8, linestyle="none", capsize=3,
                      label=literal(group.label))
        axes.annotate(literal(group.label), (x, y), textcoords="offset points", xytext=(6, 4), fontsize="small")
        plotted[group.label] = (float(x), float(y))
    xs = [x for x, _ in plotted.values()]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 30:
        axes.set_xscale("log")
    axes.set(xlabel=label, ylabel="acc_final_task_mean (%)", title=literal(title))
    return figure, plotted


def heatmap_figure(sums: np.ndarray, counts: np.ndarray, title: str) -> tuple[Figure, np.ndarray]:
    """The score matrix R[i][j] with its values written in the cells (row 0 only when evaluated)."""
    scores = metrics.score_matrix(sums, counts)
    first = 0 if np.isfinite(scores[0]).any() else 1
    shown = scores[first:]
    tasks = shown.shape[1]
    figure, axes = new_figure(max(4.8, 0.55 * tasks + 2.2), max(3.2, 0.45 * len(shown) + 1.8))
    image = axes.imshow(np.ma.masked_invalid(shown), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    axes.set_facecolor("#eeeeee")
    if tasks <= 25:
        for (i, j), value in np.ndenumerate(shown):
            if np.isfinite(value):
                axes.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize="x-small",
                          color="white" if value < 60 else "black")
    axes.set_xticks(range(tasks), [str(j + 1) for j in range(tasks)])
    axes.set_yticks(range(len(shown)), ["before" if first + i == 0 else str(first + i) for i in range(len(shown))])
    axes.set(xlabel="scored on task j", ylabel="after training task i")
    axes.set_title(literal("\n".join(textwrap.wrap(title, 48))), fontsize="small")
    figure.colorbar(image, ax=axes, label="R[i][j] (%)")
    return figure, scores


def png(figure: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# --- results ---------------------------------------------------------------------------------------

def group_labels(rows: list[dict]) -> list[str]:
    """Strategy names, with eval mode and group hash added where a name alone is ambiguous."""
    labels = [str(row["strategy"]) for row in rows]
    for index, row in enumerate(rows):
        if labels.count(str(row["strategy"])) > 1:
            labels[index] = f"{row['strategy']} ({row['eval_mode']}, {str(row['group_hash'])[:6]})"
    return labels


def load(results_dir) -> tuple[list[Section], pd.DataFrame, list[tuple[str, str]]]:
    """Sections per (scenario, model) in leaderboard order, the leaderboard and the excluded runs."""
    collected = leaderboard.collect(results_dir)
    leaderboard.add_intransigence(collected.runs)
    board = leaderboard.aggregate(collected.runs)
    runs_by_group: dict[tuple, list[dict]] = {}
    for run in collected.runs:
        runs_by_group.setdefault(tuple(run[key] for key in leaderboard.GROUP_COLUMNS), []).append(run)
    sections = []
    for (scenario, model), part in board.groupby(["scenario", "model"], sort=False):
        rows = part.to_dict("records")
        section = Section(str(scenario), str(model))
        for label, row in zip(group_labels(rows), rows):
            runs = sorted(runs_by_group[tuple(row[key] for key in leaderboard.GROUP_COLUMNS)], key=lambda r: r["seed"])
            section.groups.append(Group(label, row, runs))
        sections.append(section)
    return sections, board, collected.excluded


def section_figures(section: Section, runs_dir: Path) -> dict[str, tuple[Figure, object]]:
    """The figures of one (scenario, model), keyed by the name their PNG file ends with (the loss curves
    where its runs have training logs)."""
    where = f"{section.scenario} on {section.model}"
    figures = {"curves": curves_figure(section.groups, f"{where}: accuracy after each task"),
               "forgetting": forgetting_figure(section.groups, f"{where}: forgetting per task"),
               "acc-vs-params": scatter_figure(section.groups, "trainable_params", "trainable parameters",
                                               f"{where}: accuracy vs trainable parameters"),
               "acc-vs-train-time": scatter_figure(section.groups, "train_seconds", "training time (s)",
                                                   f"{where}: accuracy vs training time")}
    loss = loss_figure(section.groups, runs_dir, f"{where}: training loss")
    return {**figures, "loss": loss} if loss else figures


def run_heatmap(run: dict) -> Figure:
    return heatmap_figure(run["_sums"], run["_counts"], f"score matrix R[i][j] of {run['run_id']}")[0]


def plot_run(directory: Path, summary: dict, sums: np.ndarray, counts: np.ndarray) -> list[Path]:
    """Write a run's heatmap, accuracy curve, forgetting bars and loss curve into ``directory/figures``."""
    run = {**summary, "_sums": sums, "_counts": counts}
    group = [Group(str(summary.get("strategy")), {}, [run])]
    name = summary.get("run_id")
    figures = {"heatmap": run_heatmap(run),
               "accuracy_curve": curves_figure(group, f"{name}: accuracy after each task")[0],
               "forgetting": forgetting_figure(group, f"{name}: forgetting per task")[0]}
    loss = loss_figure([Group(group[0].label, {}, [{"run_id": directory.name}])], directory.parent,
                       f"{name}: training loss")
    if loss:
        figures["loss"] = loss[0]
    written = []
    for stem, figure in figures.items():
        path = directory / "figures" / f"{stem}.png"
        data = png(figure, PNG_DPI)
        _atomic(path, lambda file: file.write(data))
        written.append(path)
    return written


# --- HTML ------------------------------------------------------------------------------------------

def escape(value) -> str:
    return html.escape(str(value), quote=True)


def image(figure: Figure, alt: str) -> str:
    encoded = base64.b64encode(png(figure, HTML_DPI)).decode()
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{encoded}">'


def number_cell(mean, std, text: str) -> str:
    value = "" if pd.isna(mean) else repr(float(mean))
    return f'<td data-value="{value}">{escape(text)}</td>'


def board_table(section: Section, columns: list[str]) -> str:
    head = "".join(f"<th>{escape(name)}</th>" for name in ["strategy", "eval", "seeds", *columns,
                                                           "train_seconds", "trainable_params"])
    rows = []
    for group in section.groups:
        row = group.row
        cells = [f"<td>{escape(group.label)}</td>", f"<td>{escape(row['eval_mode'])}</td>",
                 f'<td data-value="{int(row["n_seeds"])}" title="seeds {escape(row["seeds"])}">'
                 f'{int(row["n_seeds"])}</td>']
        for name in [*columns, "train_seconds"]:
            mean, std = row[f"{name}_mean"], row[f"{name}_std"]
            cells.append(number_cell(mean, std, leaderboard._cell(mean, std)))
        params = row["trainable_params_mean"]
        cells.append(number_cell(params, None, "" if pd.isna(params) else f"{params:.0f}"))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="wide"><table class="board"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
            f'</table></div>')


def protocol_table(section: Section) -> str:
    """One row per leaderboard row: its protocol columns and flags, and the legend of the flags present."""
    head = "".join(f"<th>{escape(name)}</th>" for name in ["strategy", "eval", *protocol_flags.PROTOCOL_COLUMNS])
    rows = "".join("<tr>" + f"<td>{escape(group.label)}</td><td>{escape(group.row['eval_mode'])}</td>"
                   + "".join(f"<td>{escape(protocol_flags.display(group.row[name]))}</td>"
                             for name in protocol_flags.PROTOCOL_COLUMNS) + "</tr>" for group in section.groups)
    rules = protocol_flags.legend([group.row["protocol_flags"] for group in section.groups])
    return (f'<details open><summary>protocol: what each row trained on, stored and could see</summary>'
            f'<div class="wide"><table class="protocol"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
            f'</div><p>Flags: {escape("; ".join(rules) or "none, every row trained and evaluated alike")}</p>'
            f'</details>')


def run_details(run: dict, runs_dir: Path, heatmap: Figure) -> str:
    metric_rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape('' if v is None else f'{v:.4g}')}</td></tr>"
                          for k, v in {**run["metrics"], **{k: v for k, v in run["cost"].items()
                                                            if isinstance(v, (int, float))}}.items())
    config = runs_dir / str(run["run_id"]) / "config.yaml"  # the runner names a run's folder after its id
    config_text = config.read_text() if config.parent.parent == runs_dir and config.is_file() else "(missing)"
    provenance = {key: run.get(key) for key in ("run_id", "seed", "order_seed", "config_hash", "group_hash",
                                                 "setting_hash", "scores_sha256")}
    provenance.update(run.get("provenance", {}))
    return (f"<details class=\"run\"><summary>{escape(run['run_id'])}: {escape(run['strategy'])}, "
            f"seed {escape(run['seed'])}</summary>{image(heatmap, 'score matrix of ' + str(run['run_id']))}"
            f"<table class=\"metrics\">{metric_rows}</table>"
            f"<details><summary>protocol card</summary><pre>{escape(json.dumps(run['protocol'], indent=1))}"
            f"</pre></details>"
            f"<details><summary>config.yaml</summary><pre>{escape(config_text)}</pre></details>"
            f"<details><summary>provenance</summary><pre>{escape(json.dumps(provenance, indent=1, default=str))}"
            f"</pre></details></details>")


SORT_SCRIPT = """
for (const table of document.querySelectorAll("table.board")) {
  table.querySelectorAll("th").forEach((th, column) => {
    th.tabIndex = 0;
    th.title = "click to sort";
    const sort = () => {
      const ascending = th.dataset.order !== "asc";
      table.querySelectorAll("th").forEach(other => delete other.dataset.order);
      th.dataset.order = ascending ? "asc" : "desc";
      const key = row => {
        const cell = row.cells[column];
        if (cell.dataset.value === undefined) return cell.textContent;
        return cell.dataset.value === "" ? null : parseFloat(cell.dataset.value);
      };
      const rows = Array.from(table.tBodies[0].rows);
      rows.sort((a, b) => {
        const x = key(a), y = key(b);
        if (x === null || y === null) return (x === null) - (y === null);
        return (typeof x === "number" ? x - y : x.localeCompare(y)) * (ascending ? 1 : -1);
      });
      rows.forEach(row => table.tBodies[0].appendChild(row));
    };
    th.addEventListener("click", sort);
    th.addEventListener("keydown", event => { if (event.key === "Enter") sort(); });
  });
}
"""

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; }
td[data-value] { text-align: right; font-variant-numeric: tabular-nums; }
table.board th { cursor: pointer; background: #f0f0f0; }
th[data-order="asc"]::after { content: " \\25B2"; } th[data-order="desc"]::after { content: " \\25BC"; }
img { max-width: 100%; } .wide { overflow-x: auto; } .figures { display: flex; flex-wrap: wrap; gap: 0.5em; }
details { margin: 0.3em 0; } pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; }
"""


def render(results_dir, sections: list[Section], board: pd.DataFrame, excluded: list) -> tuple[str, dict]:
    """The page and every figure of it, keyed by its PNG file name."""
    runs_dir = Path(results_dir) / "runs"
    figures: dict[str, Figure] = {}
    body = [f"<h1>cl-bench report: {escape(results_dir)}</h1>",
            f"<p>{sum(len(g.runs) for s in sections for g in s.groups)} finished runs in {len(board)} settings, "
            f"{len(excluded)} runs excluded. Tables: mean ± sample std over seeds (percent points); click a "
            f"column header to sort.</p>"]
    for section in sections:
        shown = leaderboard.MARKDOWN_METRICS + [m for m in leaderboard.OPTIONAL_MARKDOWN
                                                if any(pd.notna(g.row[f"{m}_mean"]) for g in section.groups)]
        name = f"{slug(section.scenario)}-{slug(section.model)}"
        body.append(f"<h2>{escape(section.scenario)} on {escape(section.model)}</h2>")
        body.append(board_table(section, shown))
        body.append(protocol_table(section))
        body.append('<div class="figures">')
        for kind, (figure, _) in section_figures(section, runs_dir).items():
            figures[unique(figures, f"{name}-{kind}.png")] = figure
            body.append(image(figure, f"{section.scenario} on {section.model}: {kind}"))
        body.append("</div><details><summary>runs: score matrices, metrics, protocol cards, config and "
                    "provenance</summary>")
        for group in section.groups:
            for run in group.runs:
                heatmap = run_heatmap(run)
                body.append(run_details(run, runs_dir, heatmap))
                figures[unique(figures, f"{slug(run['run_id'])}-heatmap.png")] = heatmap
        body.append("</details>")
    definitions = "".join(f"<dt><code>{escape(name)}</code></dt><dd>{escape(text)}</dd>"
                          for name, text in {**metrics.DEFINITIONS, **leaderboard.COLUMN_DEFINITIONS}.items())
    body.append(f"<h2>Definitions</h2><details><summary>metric definitions (results/README.md has the full "
                f"table)</summary><dl>{definitions}</dl></details>")
    body.append("<h2>Excluded runs</h2>" + (
        "<ul>" + "".join(f"<li><code>{escape(n)}</code>: {escape(r)}</li>" for n, r in excluded) + "</ul>"
        if excluded else "<p>none</p>"))
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>cl-bench report</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f'<body>{"".join(body)}<script>{SORT_SCRIPT}</script></body></html>\n')
    return page, figures


def write(results_dir, out_dir=None, with_png: bool = False) -> list[Path]:
    """Write ``index.html`` (and every figure as PNG with ``with_png``) into ``out_dir``
    (default ``results_dir/report``); returns the written paths, the page first."""
    sections, board, excluded = load(results_dir)
    page, figures = render(results_dir, sections, board, excluded)
    out = Path(out_dir) if out_dir else Path(results_dir) / "report"
    written = [out / "index.html"]
    atomic_write_text(written[0], page)
    if with_png:
        for name, figure in figures.items():
            data = png(figure, PNG_DPI)
            _atomic(out / name, lambda file: file.write(data))
            written.append(out / name)
    return written

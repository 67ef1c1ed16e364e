"""cl-bench command line: run | bench | list | show | leaderboard | report.

Bad input, or a run stopped by its own settings (a diverging loss), ends with one line on stderr and exit
code 2; an internal error (a bug) with one line and exit 1; Ctrl-C with 130. ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import unicodedata
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cl_bench.errors import PeerLost, UserError

GROUP_NAMES = {"strategies": "strategy", "scenarios": "scenario", "models": "model"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one line
        raise UserError(f"{message} (see `cl-bench --help`)")


def make_parser() -> Parser:
    parser = Parser(prog="cl-bench", description="Continual-learning benchmark harness.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = commands.add_parser("run", help="train and score one configuration", add_help=False)
    run.add_argument("overrides", nargs="*", help="key=value, e.g. strategy=er scenario=fmnist strategy.lr=0.05")
    run.add_argument("-m", "--multirun", action="store_true",
                     help="run the product of comma lists (seed=0,1,2 strategy=er,finetune) as a bench; it takes "
                          "the bench's executor=, jobs=, ray.* keys")
    run.add_argument("-h", "--help", action="store_true",
                     help="list the keys of the strategy=, scenario=, model= given (type, default, preset, about)")
    run.add_argument("--cfg", action="store_true", help="print the composed configuration and exit")
    run.set_defaults(run_help=run.format_help)
    bench = commands.add_parser("bench", help="run every line of a suite file for every seed")
    bench.add_argument("suite", help="suite YAML (e.g. benchmarks/default.yaml)")
    bench.add_argument("overrides", nargs="*", help="key=value applied to every run (e.g. results_dir=DIR), or "
                       "the bench's own executor=local|ray, jobs=N, ray.address=HOST:PORT, ray.cpus=C, ray.gpus=G")
    listing = commands.add_parser("list", help="list strategies, scenarios or models")
    listing.add_argument("group", nargs="?", choices=list(GROUP_NAMES), help="which registry (default: all)")
    show = commands.add_parser("show", help="print a run's score matrix and metrics")
    show.add_argument("run", help="run directory or run id")
    show.add_argument("--results-dir", default="results")
    show.add_argument("--plot", action="store_true", help="write the run's figures to <run>/figures/*.png")
    board = commands.add_parser("leaderboard", help="aggregate runs over seeds into CSV and Markdown")
    board.add_argument("results_dir", nargs="?", default="results")
    board.add_argument("--format", choices=["markdown", "latex"], default="markdown",
                       help="what to print; latex also writes leaderboard.tex (booktabs, best per column in bold)")
    report = commands.add_parser("report", help="write a static HTML report (index.html) of a results directory")
    report.add_argument("results_dir", nargs="?", default="results")
    report.add_argument("--out", help="output folder (default: RESULTS_DIR/report)")
    report.add_argument("--png", action="store_true", help="also write every figure as a PNG file into --out")
    return parser


def command_run(args, console: Console) -> int:
    from cl_bench import distributed
    from cl_bench.config import compose
    from cl_bench.runner import run

    if args.help:
        from cl_bench.discover import print_keys
        print_keys(args.overrides, Console(), args.run_help())
        return 0
    if args.multirun:
        from cl_bench import sweep
        options, overrides = sweep.split_overrides(args.overrides)
        lines = sweep.multirun_lines(overrides)
        jobs = sweep.expand(lines, None, [])
        console.print(f"[bold]{len(jobs)} runs[/bold] (multirun: {len(lines)} lines) on executor="
                      f"{options.executor}" + (f", jobs={options.jobs}" if options.executor == "local" else ""))
        return run_jobs(jobs, options, console)
    if args.cfg:
        from omegaconf import OmegaConf
        print(OmegaConf.to_yaml(compose(args.overrides)), end="")
        return 0
    notes: list[str] = []  # the backbone chosen for the user, and why
    try:
        cfg = compose(args.overrides, say=notes.append)
    except UserError as error:
        from cl_bench import sweep
        if len(sweep.multirun_lines(args.overrides)) > 1:
            raise UserError(f"{error} (to run every value of a comma list, use cl-bench run -m)") from None
        raise
    if cfg.nproc > 1 and distributed.launched_world() == 1:
        from cl_bench.registry import STRATEGIES
        distributed.check_strategy(cfg.strategy.name, STRATEGIES.get(cfg.strategy.type))  # before any rank starts
        return distributed.launch(args.overrides, cfg.nproc)  # its rank 0 prints what a single run prints
    if distributed.launched_rank() != 0:  # a data-parallel rank other than 0: rank 0 speaks for the run
        run(cfg)
        return 0
    for note in notes:
        console.print(note, highlight=False, soft_wrap=True)
    summary = run(cfg, console=console)
    print_metrics(summary, Console())
    return 0


def load_suite(path: str) -> tuple[list[list[str]], list[int]]:
    from cl_bench.config import safe_yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"suite file {path} does not exist")
    try:
        text = file.read_text()
    except UnicodeDecodeError:
        raise UserError(f"suite {path} is refused: it is not UTF-8 text") from None
    suite = safe_yaml(text, f"suite {path}")
    if not isinstance(suite, dict) or not isinstance(suite.get("runs"), list) or not suite["runs"]:
        raise UserError(f"suite {path} needs a non-empty 'runs' list of argument lines")
    seeds = suite.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserError(f"suite {path}: 'seeds' must be a non-empty list of integers")
    budget = suite.get("budget")
    if budget is not None and (not isinstance(budget, dict) or len(budget) != 1 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in budget.values())):
        raise UserError(f"suite {path}: 'budget' must be one of {{steps_per_task: N}} or {{samples_per_task: N}} "
                        f"with N a positive integer, got {budget!r}"[:300])
    shared = [f"budget.{key}={value}" for key, value in (budget or {}).items()]  # every line honours it
    lines = []
    for line in suite["runs"]:
        if not isinstance(line, str):
            raise UserError(f"suite {path}: every run must be a line of key=value arguments, got {line!r}")
        lines.append(line.split() + shared)
    return lines, seeds


def command_bench(args, console: Console) -> int:
    from cl_bench import sweep

    lines, seeds = load_suite(args.suite)
    options, overrides = sweep.split_overrides(args.overrides)
    jobs = sweep.expand(lines, seeds, overrides, f"suite {args.suite}")  # every line is checked before any runs
    console.print(f"[bold]{len(jobs)} runs[/bold] ({len(lines)} lines x {len(seeds)} seeds) on executor="
                  f"{options.executor}" + (f", jobs={options.jobs}" if options.executor == "local" else ""))
    return run_jobs(jobs, options, console)


def run_jobs(jobs, options, console: Console) -> int:
    """Run a bench's or a multirun's jobs, print the leaderboard and the failures; the exit code."""
    from cl_bench import leaderboard, sweep

    tally = sweep.run_suite(jobs, options, console)
    board, excluded, out = leaderboard.build(jobs[0].results_dir)
    print_leaderboard(out / "LEADERBOARD.md")
    for label, kind, message in tally.failed:
        console.print(f"[red]failed{' (internal error)' if kind == 'internal' else ''}:[/red] {escape(label)}: "
                      f"{escape(message)}", highlight=False, soft_wrap=True)
    if tally.failed:
        console.print(f"[red]error:[/red] {len(tally.failed)} of {len(jobs)} runs failed (listed above)",
                      highlight=False)
        return 1 if any(kind == "internal" for _, kind, _ in tally.failed) else 2
    return 0


def command_list(args, console: Console) -> int:
    from cl_bench.config import GROUPS, load_preset, preset_description, preset_names

    out = Console()
    for plural in [args.group] if args.group else list(GROUP_NAMES):
        group = GROUP_NAMES[plural]
        registry = GROUPS[group][1]
        table = Table(title=plural, show_header=True)
        table.add_column("name")
        table.add_column("description")
        for name in sorted(set(registry.names()) | set(preset_names(group))):
            preset = load_preset(group, name)
            type_name = preset.get("type", name)
            try:
                text = preset_description(group, name) or registry.describe(type_name)
            except UserError as error:
                text = f"unavailable: {error}"
            table.add_row(escape(name if type_name == name else f"{name} ({type_name})"), escape(text))
        for pattern, text in registry.fallback_help.items():
            table.add_row(escape(pattern), escape(text))
        out.print(table)
    return 0


def find_run(run: str, results_dir: str) -> Path:
    for candidate in (Path(run), Path(results_dir) / "runs" / run):
        if (candidate / "summary.json").is_file():
            return candidate
    raise UserError(f"no run '{run}': give a run directory or an id under {results_dir}/runs")


def command_show(args, console: Console) -> int:
    from cl_bench.leaderboard import read_checked_summary, read_scores

    directory = find_run(args.run, args.results_dir)
    try:
        summary = read_checked_summary(directory / "summary.json")
    except ValueError as error:
        raise UserError(f"{directory} is corrupt: {error}") from None
    try:
        sums, counts = read_scores(directory / "scores.csv", summary["tasks_total"])
    except Exception as error:
        raise UserError(f"{directory}/scores.csv is unreadable: {' '.join(str(error).split())[:200]}") from None
    out = Console()
    table = Table(title=escape(f"{summary.get('run_id')} [{summary.get('status')}]: score R[i][j] (%)"))
    names = summary.get("provenance", {}).get("stream", {}).get("task_order") or []
    general = summary.get("general") or {"suites": [], "scores": [[] for _ in range(sums.shape[0])]}
    table.add_column("after task")
    for j in range(sums.shape[1]):
        table.add_column(escape(f"{j + 1} {names[j]}" if j < len(names) else f"task {j + 1}"), justify="right")
    for suite in general["suites"]:
        table.add_column(escape(f"general: {suite}"), justify="right")
    for i in range(sums.shape[0]):
        extra = ["" if v is None else f"{v:.2f}" for v in general["scores"][i]] if i < len(general["scores"]) else []
        if all(math.isnan(c) for c in counts[i]) and not any(extra):
            continue
        table.add_row("before" if i == 0 else str(i),
                      *["" if math.isnan(c) or not c else f"{100 * s / c:.2f}" for s, c in zip(sums[i], counts[i])],
                      *extra)
    out.print(table)
    print_metrics(summary, out)
    print_protocol(summary, out)
    if args.plot:
        from cl_bench.report import plot_run
        for path in plot_run(directory, summary, sums, counts):
            print(path)
    return 0


def print_metrics(summary: dict, out: Console) -> None:
    table = Table(title=f"{summary.get('run_id')}: metrics", show_header=False)
    for name, value in {**summary.get("metrics", {}), **{k: v for k, v in summary.get("cost", {}).items()
                                                          if not isinstance(v, list)}}.items():
        table.add_row(name, "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value)))
    out.print(table)


def print_protocol(summary: dict, out: Console) -> None:
    """The run's protocol card: what it trained on, stored and could see (results/README.md defines it)."""
    if "protocol" not in summary:
        out.print(f"{summary.get('run_id')}: no protocol card (written before protocol cards; rerun it)")
        return
    table = Table(title=f"{summary.get('run_id')}: protocol card", show_header=False)
    for name, value in summary["protocol"].items():
        table.add_row(name, escape(value if isinstance(value, str) else json.dumps(value)))
    out.print(table)


def print_leaderboard(path: Path) -> None:
    print(path.read_text())


def command_leaderboard(args, console: Console) -> int:
    from cl_bench import leaderboard

    board, excluded, out = leaderboard.build(args.results_dir, formats=("markdown", args.format))
    written = [out / "leaderboard.csv", out / "LEADERBOARD.md"] + ([out / "leaderboard.tex"] * (args.format == "latex"))
    print_leaderboard(written[-1])
    console.print(f"wrote {', '.join(map(str, written))} ({len(board)} groups, {len(excluded)} runs excluded)")
    return 0


def command_report(args, console: Console) -> int:
    from cl_bench.report import write

    for path in write(args.results_dir, args.out, with_png=args.png):  # the page first, then any PNG
        print(path)
    return 0


COMMANDS = {"run": command_run, "bench": command_bench, "list": command_list, "show": command_show,
            "leaderboard": command_leaderboard, "report": command_report}


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters (which user input may carry into a message)
    written as escapes, so an error stays one line and cannot steer the terminal."""
    return "".join(ch if ch == " " or unicodedata.category(ch) not in ("Cc", "Zl", "Zp") else
                   ascii(ch)[1:-1] for ch in text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    console = Console(stderr=True)
    try:
        args = make_parser().parse_args(argv)
        return COMMANDS[args.command](args, console)
    except UserError as error:
        if debug:
            raise
        console.print(f"[red]error:[/red] {escape(one_line(str(error)))}", highlight=False, soft_wrap=True)
        return 2
    except OSError as error:  # unreadable or unwritable files: the user's to fix
        if debug:
            raise
        console.print(f"[red]error:[/red] {escape(one_line(str(error)))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        console.print("interrupted; rerun the same command to resume")
        return 130
    except PeerLost:  # a data-parallel rank whose peer failed: the launcher reports the peer's error
        if debug:
            raise
        from cl_bench.distributed import PEER_LOST
        return PEER_LOST
    except Exception as error:  # a run that failed (non-finite loss) or a bug: one line, no traceback
        if debug:
            raise
        from cl_bench.runner import RunFailed
        if isinstance(error, RunFailed):  # the run's settings made it stop (e.g. a diverging loss)
            console.print(f"[red]error:[/red] {escape(one_line(str(error)))}", highlight=False, soft_wrap=True)
            return 2
        console.print(f"[red]internal error ({type(error).__name__}):[/red] {escape(one_line(str(error)))} "
                      f"(rerun with --debug for details)", highlight=False, soft_wrap=True)
        return 1


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()

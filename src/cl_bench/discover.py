"""``cl-bench run strategy=NAME [scenario=NAME] [model=NAME] --help``: every key a run accepts, with its type,
the class default, the preset's value and the sentence of the docstrings that mentions it.

A group's keys are its class's keyword-only constructor parameters (what ``compose`` checks overrides
against); "about" is the first sentence naming the key as ````key```` in the class's docstrings, its parents'
or their modules'. The top-level keys are ``config.BASE`` with the comment on their line.
"""
from __future__ import annotations

import inspect
import re
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cl_bench import config
from cl_bench.config import BASE, GROUPS, check_value, group_config, load_preset, parse_overrides
from cl_bench.errors import UserError
from cl_bench.registry import import_plugins

PLUGINS = inspect.Parameter("plugins", inspect.Parameter.KEYWORD_ONLY, default=[])

ABOUT_LENGTH = 160


def type_name(parameter: inspect.Parameter) -> str:
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return "" if parameter.default in (None, inspect.Parameter.empty) else type(parameter.default).__name__
    return annotation if isinstance(annotation, str) else re.sub(r"\btyping\.|<class '(\w+)'>", r"\1",
                                                                  str(getattr(annotation, "__name__", annotation)))


def docstrings(target) -> list[str]:
    """The class's docstrings up its hierarchy, each followed by its module's."""
    owners = [k for k in target.__mro__ if k is not object] if isinstance(target, type) else [target]
    texts = []
    for owner in owners:
        texts += [owner.__doc__ or "", getattr(sys.modules.get(owner.__module__), "__doc__", None) or ""]
    return texts


def about(key: str, texts: list[str]) -> str:
    """The first sentence that names ``key`` in double backticks, on one line."""
    pattern = re.compile(rf"``{re.escape(key)}(?:=[^`]*)?``")
    for text in texts:
        flat = " ".join(text.split())
        for sentence in re.split(r"(?<=[.;])\s+(?=[A-Z`(])", flat):
            if pattern.search(sentence):
                return sentence if len(sentence) <= ABOUT_LENGTH else sentence[:ABOUT_LENGTH - 1] + "…"
    return ""


def base_comments() -> dict[str, str]:
    """The comment on each ``BASE`` key's line of config.py, or on the line above it."""
    comments, above = {}, ""
    source = inspect.getsource(config)
    block = source[source.index("\nBASE = {"):]
    for line in block[:block.index("\n}")].splitlines():
        found = re.match(r'\s+"(\w+)": [^#]*(?:#\s*(.+))?$', line)
        if found and found.group(1) in BASE and found.group(1) not in comments:
            comments[found.group(1)] = found.group(2) or above
        above = line.strip()[1:].strip() if line.strip().startswith("#") else ""
    return comments


def group_table(group: str, selection: str) -> Table:
    values, parameters = group_config(group, selection)  # checks the name and the preset, with suggestions
    registry, kind = GROUPS[group][1], values["type"]
    preset = {key: value for key, value in load_preset(group, selection).items() if key != "type"}
    texts = docstrings(registry.get(kind))
    title = f"{group}={selection}" + (f" (type {kind})" if kind != selection else "")
    table = Table(title=f"{title}: {registry.describe(kind)}", show_header=True, title_justify="left")
    for column in ("key", "type", "default", "preset", "about"):
        table.add_column(column, overflow="fold")
    for key, parameter in parameters.items():
        default = "(required)" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
        table.add_row(escape(f"{group}.{key}"), escape(type_name(parameter)), escape(default),
                      escape(repr(preset[key]) if key in preset else ""), escape(about(key, texts)))
    return table


def top_table() -> Table:
    comments = base_comments()
    table = Table(title="run keys", show_header=True, title_justify="left")
    for column in ("key", "default", "about"):
        table.add_column(column, overflow="fold")
    for key, default in BASE.items():
        table.add_row(escape(key), escape(repr(default)), escape(comments.get(key, "")))
    return table


def print_keys(overrides: list[str], out: Console, usage: str) -> None:
    """The run's usage, its top-level keys, and the keys of every group named among ``overrides``."""
    pairs = parse_overrides(overrides)
    for key, value in pairs:
        if key == "plugins":  # their strategies, scenarios and models register first, as in a run
            import_plugins([value] if isinstance(value, str) else check_value("plugins", value, PLUGINS))
    named = {key: value for key, value in pairs if key in GROUPS}
    for key, value in named.items():
        if not isinstance(value, str) or not value:
            raise UserError(f"{key}= expects a name, got {value!r}")
    tables = [group_table(group, selection) for group, selection in named.items()]  # errors before any output
    out.print(escape(usage), highlight=False)
    out.print(top_table())
    for table in tables:
        out.print(table)
    if not named:
        out.print("Name strategy=NAME, scenario=NAME or model=NAME with --help to list its keys "
                  "(cl-bench list shows the names).", highlight=False)

"""Helpers of the published instruction benchmarks (``trace``, ``standard_cl``/``long_sequence``,
``superni``): where the data folder is, reading its JSON files with one-line errors, the
natural-instructions task format, and templates with an ``{input}`` field.

The data folder is ``scenario.root`` when given; else, with ``scenario.hf_repo=OWNER/NAME``, a
snapshot of that Hugging Face *dataset* repository holding the same files (only the files the
stream needs are fetched; needs a network); else ``~/.cache/cl_bench/data/<benchmark>``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from cl_bench._io import loads_json
from cl_bench.errors import UserError

CACHE_DIR = Path("~/.cache/cl_bench/data")
FIELD = "{input}"


def render(template: str, text: str) -> str:
    """``template`` with its ``{input}`` field replaced by ``text`` (no ``str.format``: definitions and
    inputs may hold braces)."""
    return template.replace(FIELD, text)


def snapshot(repo: str, revision: str | None, patterns: list[str]) -> Path:
    """A local snapshot of the files matching ``patterns`` in the dataset repository ``repo``."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo, repo_type="dataset", revision=revision,
                                      allow_patterns=patterns))
    except Exception as error:  # offline, unknown repo, no access: one line for the user
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"cannot fetch the Hugging Face dataset repo '{repo}' ({type(error).__name__}: {reason}); "
                        "pass scenario.root=DIR with the files instead") from None


def locate(root: str | None, hf_repo: str | None, hf_revision: str | None, *, cache_name: str,
           subfolders: Iterable[str], holds: Callable[[Path], bool], patterns: list[str],
           missing: str) -> tuple[Path, str]:
    """(data folder, where it came from): the first of ``base/sub`` for ``sub`` in ``subfolders`` (""
    is ``base`` itself) that ``holds`` the benchmark's files, or a UserError "``missing`` ... in base"."""
    if root is not None:
        base, source = Path(root).expanduser(), f"scenario.root={root}"
    elif hf_repo:
        base = snapshot(hf_repo, hf_revision, patterns)
        source = f"Hugging Face dataset {hf_repo}@{hf_revision or 'main'}"
    else:
        base = CACHE_DIR.expanduser() / cache_name
        source = str(base)
    for sub in subfolders:
        folder = base / sub if sub else base
        if folder.is_dir() and holds(folder):
            return folder, source
    raise UserError(f"{missing} not found in {base}; pass scenario.root=DIR")


def read_json(path: Path, hint: str):
    """The content of a JSON file, or of a JSON-lines file as a list (both load in ``datasets``' json)."""
    if not path.is_file():
        raise UserError(f"{path} is missing ({hint})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start}); {hint}") from None
    try:
        return loads_json(text, str(path))
    except json.JSONDecodeError as error:
        try:
            return [loads_json(line, str(path)) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise UserError(f"{path} is neither JSON nor JSON lines: {error.msg} at line {error.lineno}") from None


def records(path: Path, fields: tuple[str, ...], hint: str) -> list[dict]:
    """A JSON list of objects that all have ``fields`` (string values)."""
    data = read_json(path, hint)
    if not isinstance(data, list):
        raise UserError(f"{path} should hold a list of records, found {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, dict) or any(not isinstance(item.get(f), str) for f in fields):
            raise UserError(f"{path}: record {i} lacks a string {' / '.join(repr(f) for f in fields)}")
    return data


def ni_task(path: Path, hint: str) -> tuple[str, list[tuple[str, tuple[str, ...]]]]:
    """(definition, [(input, outputs)]) of a natural-instructions task file: a JSON object with a
    ``Definition`` (list of strings, possibly empty, or a string) and ``Instances`` of {input, output},
    output a string or a list of strings."""
    data = read_json(path, hint)
    if not isinstance(data, dict) or not isinstance(data.get("Instances"), list):
        raise UserError(f"{path} is not a natural-instructions task file (no 'Instances' list)")
    definition = data.get("Definition") or ""
    if isinstance(definition, list):
        definition = definition[0] if definition else ""
    if not isinstance(definition, str):
        raise UserError(f"{path}: 'Definition' should be a string or a list of strings")
    instances = []
    for i, item in enumerate(data["Instances"]):
        output = item.get("output") if isinstance(item, dict) else None
        outputs = (output,) if isinstance(output, str) else tuple(output) if isinstance(output, list) else ()
        if not isinstance(item.get("input") if isinstance(item, dict) else None, str) or not outputs \
                or not all(isinstance(o, str) for o in outputs):
            raise UserError(f"{path}: instance {i} needs a string 'input' and a non-empty 'output'")
        instances.append((item["input"], outputs))
    return definition, instances


def check_max_new_tokens(value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"scenario.max_new_tokens must be >= 1 (or null for the per-task defaults), got {value}")

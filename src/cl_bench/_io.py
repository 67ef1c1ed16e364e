"""Atomic file writes, run summaries and provenance."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cl_bench.errors import UserError

TRACKED_PACKAGES = ("cl-bench", "torch", "torchvision", "timm", "transformers", "numpy", "omegaconf",
                    "avalanche-lib", "peft", "datasets", "pandas")


def _atomic(path: Path, write) -> None:
    """Write through a temporary file renamed over ``path``: a failed write (a full disk, a folder made
    read-only) leaves the old file as it was and raises OSError naming ``path``."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``."""
    _atomic(Path(path), lambda file: file.write(text.encode()))


def atomic_torch_save(path, obj) -> None:
    import torch
    _atomic(Path(path), lambda file: torch.save(obj, file))


# Deeper than anything cl-bench writes or reads as settings; a deeper file is refused before its parser
# (json and PyYAML's composer recurse once per level) could hit Python's recursion limit.
MAX_NESTING = 100
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_nesting(text: str) -> int:
    """How deep the arrays and objects of JSON ``text`` nest (brackets inside strings do not count)."""
    depth = deepest = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def yaml_nesting(text: str, limit: int = MAX_NESTING) -> int:
    """How deep YAML ``text`` nests (block and flow collections), counted on PyYAML's scanner, which
    does not recurse; stops counting past ``limit``. Scanning errors propagate as ``yaml.YAMLError``."""
    import yaml

    opening = (yaml.BlockSequenceStartToken, yaml.BlockMappingStartToken, yaml.FlowSequenceStartToken,
               yaml.FlowMappingStartToken)
    closing = (yaml.BlockEndToken, yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken)
    depth = deepest = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        depth += isinstance(token, opening) - isinstance(token, closing)
        deepest = max(deepest, depth)
        if deepest > limit:
            break
    return deepest


def nesting_refused(where: str) -> UserError:
    """The one-line refusal of a file or value that nests past MAX_NESTING."""
    return UserError(f"{where} is refused: nested deeper than {MAX_NESTING} levels")


def loads_json(text: str, where: str):
    """``json.loads`` for a file cl-bench reads, refusing (UserError) nesting past MAX_NESTING."""
    if json_nesting(text) > MAX_NESTING:
        raise nesting_refused(where)
    return json.loads(text)


def read_summary(path) -> dict:
    """A run's summary.json, or UserError saying why it cannot be used."""
    try:
        data = loads_json(Path(path).read_text(), str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is unreadable: {type(error).__name__}") from error
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def package_versions() -> dict:
    found = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def git_state() -> dict:
    """Commit and dirtiness of the source checkout cl_bench runs from, when it is one."""
    source = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return {"git_sha": None}
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"git_sha": sha.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None}


def provenance() -> dict:
    import time
    return {"versions": package_versions(), **git_state(), "platform": platform.platform(),
            "command": " ".join(sys.argv), "started_at": time.time()}

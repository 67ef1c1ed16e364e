"""Data from outside the stream that the runner lends a strategy, and the guard that refuses to lend
the stream itself.

A strategy class declares in ``outside_data_keys`` which of its config keys name a scenario (built
like ``scenario=NAME``) and which key holds that scenario's settings, e.g. DKVB's
``{"key_init_data": "key_init_args"}``. The runner composes each named scenario, hands the train data
of all its tasks to the strategy as ``context.outside[key]`` and, before anything is trained or
written, refuses data that overlaps the stream: the same data hash, or any sample whose raw input
(the tensor of an image or vector, the text of a string, the prompt of an instruction) is identical
to an input of the stream's train or test data. ``allow_stream_data=true`` lends it anyway; the
protocol card records that and the leaderboard flags it.

A key set to ``auto`` names no scenario itself: the runner picks the first scenario of
``OFFLINE_BY_INPUT_KIND`` with the stream's input kind that is not the stream's own scenario (a
different dataset of the same modality, as DKVB's authors fit CIFAR-10 keys on CIFAR-100), so one
default fits image and text streams; the protocol card lists the scenario it picked.
"""
from __future__ import annotations

import hashlib

import torch

from cl_bench.config import check_value, group_config
from cl_bench.errors import UserError
from cl_bench.registry import SCENARIOS, suggest
from cl_bench.scenarios.base import Stream
from cl_bench.strategies.base import OutsideData

AUTO = "auto"
# registered scenarios whose data installs offline (scikit-learn, Debian packages, PyPI), by input
# kind, in the order ``auto`` tries them
OFFLINE_BY_INPUT_KIND = {"image": ("digits", "fmnist"), "text": ("chatterbot", "wordnet")}


def compose_scenario(key: str, name: str, settings_key: str | None, settings: dict):
    """The scenario ``name`` of the strategy's config key ``key``, built like ``scenario=NAME`` with the
    ``settings`` of config key ``settings_key``."""
    try:
        values, parameters = group_config("scenario", name)
    except UserError as error:
        raise UserError(f"strategy.{key}: {error}") from None
    for setting, value in settings.items():
        if setting not in parameters or setting in ("name", "type"):
            raise UserError(f"strategy.{settings_key}: scenario '{name}' has no key '{setting}'"
                            f"{suggest(setting, parameters)}")
        values[setting] = check_value(f"strategy.{settings_key}.{setting}", value, parameters[setting])
    kind = values.pop("type")
    values.pop("name")
    return SCENARIOS.get(kind)(**values)


def resolve_auto(strategy_class, settings: dict, stream: Stream) -> dict:
    """``settings`` (the strategy's config values) with every outside-data key set to ``auto`` replaced by
    an offline scenario of the stream's input kind other than the stream's own scenario."""
    resolved = dict(settings)
    for key in strategy_class.outside_data_keys:
        if settings.get(key) != AUTO:
            continue
        others = [name for name in OFFLINE_BY_INPUT_KIND.get(stream.input_kind, ()) if name != stream.name]
        if not others:
            raise UserError(f"strategy.{key}=auto knows no offline scenario of {stream.input_kind} inputs other than "
                            f"'{stream.name}'; name one, e.g. strategy.{key}=NAME")
        resolved[key] = others[0]
    return resolved


def load(strategy_class, settings: dict) -> dict[str, OutsideData]:
    """The outside data named by ``settings`` (the strategy's config values), one entry per declared key
    whose value names a scenario: the train data of all its tasks, its source and its data hash."""
    lent = {}
    for key, settings_key in strategy_class.outside_data_keys.items():
        name = settings.get(key)
        if not name:
            continue
        scenario_settings = dict(settings.get(settings_key) or {}) if settings_key else {}
        stream = compose_scenario(key, name, settings_key, scenario_settings).stream()
        samples = stream.tasks[0].train
        for task in stream.tasks[1:]:
            samples = samples.concat(task.train)
        source = f"scenario {name}" + (f" {scenario_settings}" if scenario_settings else "")
        lent[key] = OutsideData(source, stream.provenance["data_hash"], samples)
    return lent


def input_digests(data) -> list[bytes]:
    """A digest of every raw input of ``data`` (Samples or Examples): tensor rows with their dtype and
    shape, strings as UTF-8, instructions by their prompt. Targets are left out (streams relabel classes)."""
    if hasattr(data, "prompts"):
        items = [prompt.encode() for prompt in data.prompts]
    elif isinstance(data.inputs, torch.Tensor):
        rows = data.inputs.detach().cpu().contiguous()
        header = str((rows.dtype, tuple(rows.shape[1:]))).encode()
        items = [header + row.numpy().tobytes() for row in rows]
    else:
        items = [str(text).encode() for text in data.inputs]
    return [hashlib.blake2b(item, digest_size=16).digest() for item in items]


def stream_overlap(lent: OutsideData, stream: Stream) -> str:
    """Why ``lent`` overlaps ``stream`` (same data hash, identical inputs), or '' when it does not."""
    if lent.data_hash == stream.provenance.get("data_hash"):
        return f"it is the stream's own data (data hash {lent.data_hash})"
    stream_inputs = set()
    for task in stream.tasks:
        stream_inputs.update(input_digests(task.train) + input_digests(task.test))
    shared = sum(digest in stream_inputs for digest in input_digests(lent.samples))
    return f"{shared} of its {len(lent.samples)} inputs are identical to inputs of the stream" if shared else ""


def refuse_stream_data(lent: dict[str, OutsideData], stream: Stream, allowed: bool) -> None:
    """UserError (one line) when lent data overlaps the stream, unless ``allow_stream_data`` is set."""
    if allowed:
        return
    for key, data in lent.items():
        reason = stream_overlap(data, stream)
        if reason:
            raise UserError(f"strategy.{key} ({data.source}) overlaps scenario '{stream.name}': {reason}; choose "
                            f"outside data, or set allow_stream_data=true (recorded in the protocol card and "
                            f"flagged on the leaderboard)")

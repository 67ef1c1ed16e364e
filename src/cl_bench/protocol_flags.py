"""Protocol cards on the leaderboard: check a card, reduce a row's seeds to its protocol columns, and
flag the rows whose protocol differs from the others in their table.

Pure functions of ``summary["protocol"]`` dicts (see ``protocol.card``); no torch import. A table is
the rows of one (scenario, model, eval_mode); ``results/README.md`` defines every column and flag.
"""
from __future__ import annotations

import statistics

NUMBER = (int, float)
# the card's fields with the JSON types they may have (None where a field may be null)
CARD_FIELDS = {
    "samples_trained": NUMBER, "samples_trained_per_task": list, "optimizer_steps": NUMBER,
    "optimizer_steps_per_task": list, "epochs": (*NUMBER, type(None)), "budget": (dict, type(None)),
    "examples_stored": NUMBER, "examples_stored_kind": (str, type(None)), "task_identity_train": str,
    "task_identity_test": str, "eval_batches": str, "extra_data": list, "allow_stream_data": bool,
    "switches": dict, "trainable_params_per_stage": list, "trainable_params_max_stage": NUMBER,
    "peak_memory_mb": NUMBER, "peak_memory_kind": str,
}
# leaderboard columns from the cards: counts are means over seeds, the others the value every seed shares
COUNT_COLUMNS = ["samples_trained", "optimizer_steps", "examples_stored", "trainable_params_max_stage"]
TEXT_COLUMNS = ["examples_stored_kind", "task_identity_train", "task_identity_test", "eval_batches", "budget",
                "extra_data", "allow_stream_data", "switches", "peak_memory_kind"]
PROTOCOL_COLUMNS = COUNT_COLUMNS + TEXT_COLUMNS + ["protocol_flags"]
# between the flags of one row in the protocol_flags column
SEPARATOR = "; "
# a row's samples or steps differ from its table's median by more than this fraction: flagged
BUDGET_TOLERANCE = 0.10
# flag -> the rule that sets it (the per-table legend and results/README.md)
FLAG_RULES = {
    "budget xR": "samples trained = R x the table's median (off by more than 10%)",
    "steps xR": "optimizer steps = R x the table's median (off by more than 10%)",
    "stores N ex": "keeps N past examples (raw inputs; 'features' when it stores cached features)",
    "extra data": "uses outside data that not every row of the table uses (pretrained weights all share are not flagged)",
    "task id at test": "evaluated with the task identity given (eval_mode=til)",
    "allow_stream_data": "its outside data was allowed to overlap the stream",
    "validation split": "scored on data held out of the training set (scenario.validation_fraction), not the test set",
    "key=value": "a setting away from the paper's value (the strategy's protocol_switches)",
    "seeds differ": "its seeds' protocol cards disagree on the columns named",
}


def validate_card(card) -> None:
    """ValueError naming the first field of a protocol card that is missing or of the wrong type."""
    if not isinstance(card, dict):
        raise ValueError(f"summary.json: protocol should be an object, got {type(card).__name__}")
    for key, kinds in CARD_FIELDS.items():
        if key not in card:
            raise ValueError(f"summary.json: protocol lacks {key}")
        value = card[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
            raise ValueError(f"summary.json: protocol.{key} is a {type(value).__name__}")
    for entry in card["extra_data"]:
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("role", "source", "data_hash"))):
            raise ValueError("summary.json: protocol.extra_data should hold {role, source, data_hash} strings")
    for key, switch in card["switches"].items():
        if not (isinstance(switch, dict) and {"value", "paper"} <= set(switch)):
            raise ValueError(f"summary.json: protocol.switches.{key} should be {{value, paper}}")
    if card["budget"] and not all(isinstance(v, int) and not isinstance(v, bool) for v in card["budget"].values()):
        raise ValueError("summary.json: protocol.budget should hold integers")


def text_value(card: dict, column: str) -> str:
    """One card's value of a text column, as the leaderboard shows it."""
    value = card[column]
    if column == "budget":
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items())) if value else "none"
    if column == "extra_data":
        return "; ".join(f"{e['role']}={e['source']}" for e in value) or "none"
    if column == "switches":
        return ", ".join(f"{k}={s['value']}" for k, s in sorted(value.items())) or "none"
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def protocol_columns(cards: list[dict]) -> dict:
    """A leaderboard row's protocol columns from its seeds' cards (without ``protocol_flags``): counts
    averaged over seeds; text columns the value all seeds share, else ``varies: a | b``."""
    row = {column: statistics.fmean(card[column] for card in cards) for column in COUNT_COLUMNS}
    for column in TEXT_COLUMNS:
        values = sorted({text_value(card, column) for card in cards})
        row[column] = values[0] if len(values) == 1 else "varies: " + " | ".join(values)
    return row


def display(value) -> str:
    """A protocol column's value as a table shows it: whole counts without decimals."""
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() else f"{value:.1f}"
    return str(value)


def _ratio_flag(name: str, values: list[float], index: int) -> list[str]:
    median = statistics.median(values)
    if median <= 0:
        return []
    ratio = values[index] / median
    return [f"{name} x{ratio:.2g}"] if abs(ratio - 1) > BUDGET_TOLERANCE else []


def table_flags(rows: list[list[dict]]) -> list[list[str]]:
    """The flags of every row of one table; ``rows[i]`` holds row i's protocol cards (one per seed)."""
    samples = [statistics.fmean(c["samples_trained"] for c in cards) for cards in rows]
    steps = [statistics.fmean(c["optimizer_steps"] for c in cards) for cards in rows]
    extra = [{(e["role"], e["source"], e["data_hash"]) for c in cards for e in c["extra_data"]} for cards in rows]
    shared = set.intersection(*extra) if extra else set()
    flagged = []
    for index, cards in enumerate(rows):
        flags = _ratio_flag("budget", samples, index) + _ratio_flag("steps", steps, index)
        stored = max(c["examples_stored"] for c in cards)
        if stored > 0:
            kinds = {c["examples_stored_kind"] for c in cards if c["examples_stored"]}
            flags.append(f"stores {stored:g} {'features' if kinds == {'features'} else 'ex'}")
        beyond = sorted(extra[index] - shared)
        if beyond:
            flags.append("extra data: " + ", ".join(f"{role}={source}" for role, source, _ in beyond))
        if any(c["task_identity_test"] == "given" for c in cards):
            flags.append("task id at test")
        if any(c["allow_stream_data"] for c in cards):
            flags.append("allow_stream_data")
        if any(c.get("scored_split", "test") != "test" for c in cards):
            flags.append("validation split")
        flags += sorted({f"{key}={s['value']}" for c in cards for key, s in c["switches"].items()
                         if s["paper"] is not None and s["value"] != s["paper"]})
        differ = [column for column in TEXT_COLUMNS if len({text_value(c, column) for c in cards}) > 1]
        if differ:
            flags.append("seeds differ: " + ", ".join(differ))
        flagged.append(flags)
    return flagged


# how each kind of flag begins (a flag that begins with none of these is a switch, ``key=value``)
FLAG_PREFIXES = {"budget x": "budget xR", "steps x": "steps xR", "stores ": "stores N ex", "extra data:": "extra data",
                 "task id at test": "task id at test", "allow_stream_data": "allow_stream_data",
                 "validation split": "validation split",
                 "seeds differ:": "seeds differ"}


def legend(column: list[str]) -> list[str]:
    """``flag: rule`` for each kind of flag in a table's ``protocol_flags`` cells, in FLAG_RULES order."""
    flags = [flag for cell in column for flag in cell.split(SEPARATOR) if flag]
    present = {next((kind for prefix, kind in FLAG_PREFIXES.items() if flag.startswith(prefix)), "key=value")
               for flag in flags}
    return [f"`{name}`: {rule}" for name, rule in FLAG_RULES.items() if name in present]

"""The one exception type the CLI turns into a one-line message and exit code 2, the range check that
names the offending setting by its dotted key, and the quiet exit of a rank whose peer went away."""
import operator
import re

# ends the one-line error of any asset a run cannot fetch: both ways to supply assets without a network
OFFLINE_HINT = ("without a network, supply local copies: scenario.root=DIR for the data, "
                "model.pretrained_path=FILE for the weights (or model.pretrained=false for random ones)")
COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
INTERVAL = re.compile(r"in ([\[(])(\S+), (\S+)([\])])")


class UserError(Exception):
    """Bad input from the user (config, data, files): reported in one line, no traceback."""


class PeerLost(RuntimeError):
    """Another rank of a data-parallel run went away during a collective; the launcher reports why."""


def satisfies(value: float, rule: str) -> bool:
    """Whether ``value`` meets ``rule``: '>= 1', '> 0', or an interval such as 'in [0, 1)'. NaN meets none."""
    if (interval := INTERVAL.fullmatch(rule)) is not None:
        left, low, high, right = interval.groups()
        return (satisfies(value, f"{'>=' if left == '[' else '>'} {low}")
                and satisfies(value, f"{'<=' if right == ']' else '<'} {high}"))
    op, bound = rule.split()
    return value == value and COMPARISONS[op](value, float(bound))  # NaN != NaN; a huge int compares exactly


def check_ranges(section: str, **settings: tuple[float, str]) -> None:
    """Refuse the first of ``settings`` (name -> (value, rule)) that breaks its rule, in one line naming
    its key ``section.name``: ``check_ranges("strategy", epochs=(epochs, ">= 0"))``."""
    for name, (value, rule) in settings.items():
        if not satisfies(value, rule):
            raise UserError(f"{section}.{name} must be {rule}, got {value}")

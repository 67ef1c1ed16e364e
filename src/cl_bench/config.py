"""compose(argv) -> a frozen, validated, hashed run configuration (plain omegaconf, Hydra-style syntax).

Precedence, lowest first:
1. ``BASE`` below;
2. ``strategy=NAME`` / ``scenario=NAME`` / ``model=NAME`` load the preset ``<group>/NAME.yaml`` when
   one exists (its ``type`` names the registered class; it defaults to NAME); without ``model=`` the
   scenario's default model, or the strategy's paper backbone where that default does not fit it;
3. the class's keyword-only constructor defaults fill every key the preset leaves out;
4. dotted overrides (``strategy.lr=0.01``) apply last; an unknown key fails with close matches and a
   value of the wrong type fails naming the expected type.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Callable

import yaml
from omegaconf import DictConfig, OmegaConf

from cl_bench._io import MAX_NESTING, nesting_refused, yaml_nesting
from cl_bench.errors import UserError
from cl_bench.registry import MODELS, SCENARIOS, STRATEGIES, hyperparameters, import_plugins, suggest
from cl_bench.train_log import check_loggers

GROUPS = {"strategy": ("strategies", STRATEGIES), "scenario": ("scenarios", SCENARIOS),
          "model": ("models", MODELS)}

BASE = {
    "strategy": "finetune",  # a registered strategy or a preset in strategies/ (cl-bench list strategies)
    "scenario": "fmnist",  # a registered scenario or a preset in scenarios/ (cl-bench list scenarios)
    "model": None,  # None: the scenario's default_model, or the strategy's paper_backbone where it does not fit
    "seed": 0,  # seeds weights, data order and sampling; the class order has its own scenario key
    "eval_mode": "cil",  # cil: predict among all seen classes; til: mask logits to the task's classes
    "eval_unseen": False,  # also score unseen tasks (and before training) for forward transfer
    "eval_batch_size": 256,  # samples per evaluation batch (cil batches mix the seen tasks)
    "device": "auto",  # auto (cuda when available), cpu, cuda, cuda:N
    "results_dir": "results",  # runs go to RESULTS_DIR/runs/<run_id>
    "resume": True,  # a finished run is skipped, an interrupted one resumes; false starts it again
    "keep_checkpoints": 1,  # checkpoints kept per run (newest first); more survive a damaged newest one
    "progress": True,  # the live progress bar
    "nproc": 1,  # data-parallel processes for this one run (language-model strategies; see cl_bench.distributed)
    "plugins": [],  # modules imported first, so their strategies, scenarios and models register
    "cache_dir": str(Path.home() / ".cache" / "cl_bench"),  # frozen-backbone features and converted weights
    # a training budget per task every strategy honours (set at most one; see strategies.base.Budget)
    "budget": {"steps_per_task": None, "samples_per_task": None},
    # true: outside data (e.g. DKVB's key-initialisation set) may overlap the stream; recorded in the protocol
    "allow_stream_data": False,
    "train_log_every": 10,  # optimizer steps per row of train_log.csv (and per point sent to the loggers)
    "loggers": [],  # also stream the training log and scores to: tensorboard, wandb, mlflow
}
# Keys that say where or how a run executes, not what it computes: left out of the config hashes.
NOT_HASHED = ("results_dir", "resume", "progress", "plugins", "cache_dir", "device", "keep_checkpoints",
              "train_log_every", "loggers", "nproc")
CHOICES = {"eval_mode": ("cil", "til"), "device": None}
# Keys added after runs were first published: hashed only when they differ from these defaults, so
# the run ids of configurations that do not use them stay what they were.
HASHED_WHEN_SET = {"budget": BASE["budget"], "allow_stream_data": False,
                   "scenario.validation_fraction": None, "scenario.validation_seed": 0}
BUDGET_KEYS = tuple(BASE["budget"])


class ConfigLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s reading, except that YAML 1.1's base-60 numbers stay strings: ``heads=3:1`` is the
    head '3:1', not the integer 181 (YAML 1.2 dropped base 60 too)."""


BASE_60 = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
ConfigLoader.yaml_implicit_resolvers = {first: list(rules)
                                        for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for first in "-+0123456789":
    ConfigLoader.yaml_implicit_resolvers.setdefault(first, []).insert(0, ("tag:yaml.org,2002:str", BASE_60))


def load_yaml(text: str):
    return yaml.load(text, Loader=ConfigLoader)


def yaml_problem(error: yaml.YAMLError) -> str:
    """One line on why YAML was refused; Python tags get a plain statement that they are never run."""
    if isinstance(error, yaml.constructor.ConstructorError) and "python/" in str(error):
        return "it uses a Python tag (!!python/...), and YAML here is data, never code"
    return f"it is not valid YAML: {str(error).splitlines()[0]}"


def safe_yaml(text: str, where: str):
    """``load_yaml`` (plain data only, at most MAX_NESTING levels deep) with a one-line UserError naming
    ``where``."""
    try:
        if yaml_nesting(text) > MAX_NESTING:
            raise nesting_refused(where)
        return load_yaml(text)
    except yaml.YAMLError as error:
        raise UserError(f"{where} is refused: {yaml_problem(error)}") from None


def preset_dirs(folder: str) -> list[Path]:
    """The source checkout's top-level config group first, then the copy packaged in the wheel."""
    package = Path(__file__).resolve().parent
    return [d for d in (package.parents[1] / folder, package / "presets" / folder) if d.is_dir()]


def preset_names(group: str) -> list[str]:
    folder = GROUPS[group][0]
    return sorted({p.stem for d in preset_dirs(folder) for p in d.glob("*.yaml")})


def preset_description(group: str, name: str) -> str:
    """The first comment line of a preset file ('' when it has none)."""
    for directory in preset_dirs(GROUPS[group][0]):
        path = directory / f"{name}.yaml"
        if path.is_file():
            first = path.read_text().lstrip().splitlines()[:1]
            return first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return ""


def load_preset(group: str, name: str) -> dict:
    for directory in preset_dirs(GROUPS[group][0]):
        path = directory / f"{name}.yaml"
        if path.is_file():
            data = safe_yaml(path.read_text(), f"preset {path}") or {}
            if not isinstance(data, dict):
                raise UserError(f"preset {path} must be a mapping of keys to values")
            return data
    return {}


def parse_overrides(argv: list[str]) -> list[tuple[str, object]]:
    pairs = []
    for item in argv:
        key, sep, text = item.partition("=")
        if not sep or not key or key.startswith(("-", ".")) or key.endswith("."):
            raise UserError(f"expected key=value, got '{item}'")
        if "!!python" in text:
            raise UserError(f"{key}= is refused: it uses a Python tag (!!python/...), and values are data, never code")
        try:
            if yaml_nesting(text) > MAX_NESTING:
                raise nesting_refused(f"{key}=")
            value = load_yaml(text) if text else ""
        except yaml.YAMLError:
            value = text
        pairs.append((key.strip(), value))
    return pairs


def _annotation_types(annotation) -> tuple[type, ...] | None:
    """The plain types a value may have, or None when anything goes."""
    if annotation is inspect.Parameter.empty or annotation is typing.Any:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        found = [_annotation_types(arg) for arg in typing.get_args(annotation)]
        return None if any(f is None for f in found) else tuple(t for f in found for t in f)
    if origin is typing.Literal:
        return tuple({type(arg) for arg in typing.get_args(annotation)})
    if origin is not None:
        return (origin,)
    if annotation is None or annotation is type(None):
        return (type(None),)
    return (annotation,) if isinstance(annotation, type) else None


def check_value(key: str, value, parameter: inspect.Parameter):
    """``value`` converted to the parameter's type, or a UserError naming the expected type."""
    allowed = _annotation_types(parameter.annotation)
    if allowed is None and parameter.default not in (None, inspect.Parameter.empty):
        allowed = (type(parameter.default),)
    if allowed is None:
        return value
    if isinstance(value, float) and value != value:
        raise UserError(f"{key} must be a number, got nan")  # NaN is never a setting; it would surface as a NaN loss
    if isinstance(value, bool) and bool not in allowed:
        pass  # YAML's true/false is not an int or float here
    elif isinstance(value, allowed):
        return value
    elif float in allowed and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise UserError(f"{key} expects a float, got an integer too large for one ({len(str(value))} digits)") \
                from None
    elif list in allowed and isinstance(value, tuple):
        return list(value)
    elif str in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise UserError(f"{key} expects {names}, got {value!r}")


def group_config(group: str, selection: str) -> tuple[dict, dict[str, inspect.Parameter]]:
    """Preset values filled with the class defaults, plus the parameters used to check overrides."""
    folder, registry = GROUPS[group]
    preset = load_preset(group, selection)
    type_name = preset.pop("type", selection)
    try:
        target = registry.get(type_name)
    except UserError as error:
        if not str(error).startswith("unknown"):
            raise
        if type_name != selection:
            raise UserError(f"preset {folder}/{selection}.yaml names unknown {group} type '{type_name}'"
                            f"{suggest(type_name, registry.names())}") from None
        known = sorted(set(registry.names()) | set(preset_names(group)))
        raise UserError(f"unknown {group} '{selection}'{suggest(selection, known)}") from None
    parameters = hyperparameters(target)
    values = {"name": selection, "type": type_name}
    for key, value in preset.items():
        if key not in parameters:
            raise UserError(f"preset {folder}/{selection}.yaml sets unknown key '{key}' for "
                            f"{group} type '{type_name}'{suggest(key, parameters)}")
        values[key] = check_value(f"{group}.{key}", value, parameters[key])
    for key, parameter in parameters.items():
        if key not in values:
            if parameter.default is inspect.Parameter.empty:
                raise UserError(f"{group} type '{type_name}' has a required argument '{key}' without a default")
            values[key] = parameter.default
    return values, parameters


def model_fits(pattern: str, model: str) -> bool:
    """Whether the model ``model`` (its name, or the type its preset names) fully matches ``pattern``."""
    names = {model, str(load_preset("model", model).get("type", model))}
    return any(re.fullmatch(pattern, name) for name in names)


def default_model(scenario_type: str, strategy_type: str) -> tuple[str, str]:
    """The model a run uses when ``model=`` is not given, and a line saying why when it is not the
    scenario's default: the strategy's paper backbone, where the scenario's default does not fit it."""
    scenario_model = SCENARIOS.get(scenario_type).default_model
    strategy = STRATEGIES.get(strategy_type)
    if scenario_model is None:  # the data decides (e.g. scenario=hf: images or text)
        if strategy.paper_backbone:
            return strategy.paper_backbone, f"model={strategy.paper_backbone}: the backbone of {strategy_type}'s paper"
        raise UserError(f"scenario {scenario_type} has no default model: pass model=NAME (e.g. efficientnet_lite0 "
                        f"for images, minilm for text, mlp for feature vectors, smollm2_135m for instructions)")
    fits = not strategy.backbone_pattern or model_fits(strategy.backbone_pattern, scenario_model)
    if fits or not strategy.paper_backbone:
        return scenario_model, ""
    return strategy.paper_backbone, (
        f"model={strategy.paper_backbone}: the backbone of {strategy_type}'s paper, chosen because the "
        f"scenario's default model {scenario_model} does not fit it ({strategy.backbone_need}); "
        f"pass model=NAME to choose another")


def compose(argv: list[str] | tuple[str, ...] = (), say: Callable[[str], None] | None = None) -> DictConfig:
    """Build the run configuration from ``key=value`` arguments (see module docstring); ``say`` hears
    choices made on the user's behalf (the paper backbone chosen when ``model=`` is not given)."""
    overrides = parse_overrides(list(argv))
    top = dict(BASE)
    for key, value in overrides:
        if key in top and key not in GROUPS:
            top[key] = value
    if isinstance(top["plugins"], str):
        top["plugins"] = [top["plugins"]]
    top["plugins"] = check_value("plugins", top["plugins"], inspect.Parameter(
        "plugins", inspect.Parameter.KEYWORD_ONLY, default=[]))
    import_plugins(top["plugins"])
    for key, value in overrides:
        if key in GROUPS:
            if not isinstance(value, str) or not value:
                raise UserError(f"{key}= expects a name, got {value!r}")
            top[key] = value

    sections = {group: group_config(group, top[group]) for group in ("scenario", "strategy")}
    if top["model"] is None:
        top["model"], reason = default_model(sections["scenario"][0]["type"], sections["strategy"][0]["type"])
        if reason and say is not None:
            say(reason)
    sections["model"] = group_config("model", top["model"])

    config = {key: value for key, value in top.items() if key not in GROUPS}
    config["budget"] = dict(BASE["budget"])
    for key, value in overrides:
        head, _, rest = key.partition(".")
        if head == "budget":
            config["budget"] = budget_settings(key, value, config["budget"])
        elif head in GROUPS and rest:
            values, parameters = sections[head]
            if "." in rest or rest not in parameters:
                raise UserError(f"unknown key '{key}'{suggest(key, [f'{head}.{p}' for p in parameters])}")
            values[rest] = check_value(key, value, parameters[rest])
        elif head not in GROUPS and head not in BASE:
            raise UserError(f"unknown key '{key}'{suggest(key, list(BASE) + list(GROUPS))}")
        elif head not in GROUPS and rest:
            raise UserError(f"'{head}' has no sub-keys (got '{key}')")
    if isinstance(config["loggers"], str):
        config["loggers"] = [config["loggers"]]
    for key, default in BASE.items():
        if key in GROUPS or default is None or key == "budget":
            continue
        config[key] = check_value(key, config[key], inspect.Parameter(
            key, inspect.Parameter.KEYWORD_ONLY, default=default))
    if config["keep_checkpoints"] < 1:
        raise UserError(f"keep_checkpoints must be at least 1, got {config['keep_checkpoints']}")
    if config["eval_batch_size"] < 1:
        raise UserError(f"eval_batch_size must be at least 1, got {config['eval_batch_size']}")
    if config["nproc"] < 1:
        raise UserError(f"nproc must be at least 1, got {config['nproc']}")
    if config["train_log_every"] < 1:
        raise UserError(f"train_log_every must be at least 1, got {config['train_log_every']}")
    config["loggers"] = check_loggers(config["loggers"])
    if config["eval_mode"] not in CHOICES["eval_mode"]:
        raise UserError(f"eval_mode must be one of {', '.join(CHOICES['eval_mode'])}, got {config['eval_mode']!r}")
    for group in GROUPS:
        config[group] = sections[group][0]
    cfg = OmegaConf.create(config)
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def budget_settings(key: str, value, budget: dict) -> dict:
    """``budget`` after the override ``key=value`` (``budget.steps_per_task=N``, ``budget.samples_per_task=N``
    or ``budget={...}``): at most one positive integer, the other null."""
    updates = {key.partition(".")[2]: value} if "." in key else value
    if value is None and "." not in key:
        updates = {}
    if not isinstance(updates, dict):
        raise UserError(f"budget expects a mapping such as {{steps_per_task: 100}}, got {value!r}")
    budget = dict(budget)
    for name, number in updates.items():
        if name not in BUDGET_KEYS:
            raise UserError(f"unknown key 'budget.{name}'{suggest(f'budget.{name}', [f'budget.{k}' for k in BUDGET_KEYS])}")
        if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 1):
            raise UserError(f"budget.{name} expects a positive integer, got {number!r}")
        budget[name] = number
    if all(budget[k] is not None for k in BUDGET_KEYS):
        raise UserError("budget: set steps_per_task or samples_per_task, not both")
    return budget


def config_hash(cfg: DictConfig, with_seed: bool = True, with_strategy: bool = True) -> str:
    """sha256 (16 hex) of the resolved config, minus execution-only keys (and the seed or the
    strategy if asked: without the strategy it identifies the setting a joint reference shares)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_HASHED + (() if with_seed else ("seed",)) + (() if with_strategy else ("strategy",)):
        data.pop(key, None)
    for key, default in HASHED_WHEN_SET.items():
        group, _, name = key.rpartition(".")
        section = data.get(group, {}) if group else data
        if name in section and section[name] == default:
            section.pop(name)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_id(cfg: DictConfig) -> str:
    return f"{cfg.scenario.name}-{cfg.model.name}-{cfg.strategy.name}-seed{cfg.seed}-{config_hash(cfg)[:8]}"

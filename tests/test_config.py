"""compose(argv): precedence, close-match errors, type checks, presets, hashes, the default model."""
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cl_bench import config
from cl_bench.config import BASE, GROUPS, compose, config_hash, run_id
from cl_bench.errors import UserError
from cl_bench.registry import SCENARIOS, hyperparameters
from cl_bench.strategies.base import ClassifierStrategy


def fake_presets(monkeypatch, root: Path, files: dict[str, dict]) -> None:
    """Make ``root`` the only preset folder; ``files`` maps 'strategies/NAME.yaml' to its content."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(content))
    monkeypatch.setattr(config, "preset_dirs", lambda folder: [d for d in [root / folder] if d.is_dir()])


# --- precedence: base < preset < class defaults fill the rest < overrides --------------------------

def test_base_defaults_apply_without_arguments():
    cfg = compose([])
    for key, value in BASE.items():
        if key not in GROUPS:
            assert cfg[key] == value, key
    assert cfg.strategy.name == BASE["strategy"] and cfg.scenario.name == BASE["scenario"]


def test_class_defaults_fill_the_group():
    cfg = compose(["scenario=toy"])
    assert cfg.strategy.type == "finetune"
    assert cfg.strategy.lr == 0.01 and cfg.strategy.epochs == 1 and cfg.strategy.optimizer == "sgd"
    assert cfg.scenario.num_classes == 6 and cfg.scenario.increment == 2


def test_preset_overrides_class_defaults_and_overrides_win(tmp_path, monkeypatch):
    fake_presets(monkeypatch, tmp_path, {
        "strategies/fast_ft.yaml": {"type": "finetune", "lr": 0.5, "epochs": 4},
        "scenarios/toy.yaml": {"per_class": 7},  # no type: the preset's name is the class's name
    })
    cfg = compose(["strategy=fast_ft", "scenario=toy"])
    assert (cfg.strategy.name, cfg.strategy.type) == ("fast_ft", "finetune")
    assert cfg.strategy.lr == 0.5 and cfg.strategy.epochs == 4  # preset over class defaults
    assert cfg.strategy.batch_size == 32  # class default fills what the preset leaves out
    assert cfg.scenario.per_class == 7 and cfg.scenario.type == "toy"

    cfg = compose(["strategy=fast_ft", "scenario=toy", "strategy.lr=0.2", "scenario.per_class=3", "seed=5"])
    assert cfg.strategy.lr == 0.2 and cfg.strategy.epochs == 4
    assert cfg.scenario.per_class == 3 and cfg.seed == 5


def test_later_override_wins_and_order_of_selection_does_not_matter():
    a = compose(["strategy.lr=0.3", "strategy=er", "scenario=toy", "seed=1", "seed=2", "strategy.lr=0.4"])
    assert a.strategy.name == "er" and a.strategy.lr == 0.4 and a.seed == 2
    b = compose(["scenario=toy", "strategy=er", "seed=2", "strategy.lr=0.4"])
    assert config_hash(a) == config_hash(b)


def test_a_layer_head_pair_stays_a_string_not_a_base_60_number():
    """YAML 1.1 reads 3:1 as 3 x 60 + 1 = 181; IV-guided's heads would then name no head at all."""
    cfg = compose(["strategy=iv_guided", "scenario=instruct_toy", "model=tiny_llama", "strategy.heads=3:1"])
    assert cfg.strategy.heads == "3:1"
    assert config.safe_yaml("runs: [x]\nheads: 14:1\nat: 1:30:00\nn: 12\nx: 0.5", "suite") == {
        "runs": ["x"], "heads": "14:1", "at": "1:30:00", "n": 12, "x": 0.5}


def test_config_is_frozen():
    cfg = compose(["scenario=toy"])
    with pytest.raises(Exception):
        cfg.seed = 3
    with pytest.raises(Exception):
        cfg.strategy.new_key = 1


# --- typos and wrong values ---------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["strategy.lrr=1"], "strategy.lr"),
    (["strategy=finetun"], "finetune"),
    (["scenario=toyy"], "toy"),
    (["scenario=toy", "scenario.incremnt=3"], "scenario.increment"),
    (["sede=1"], "seed"),
    (["eval_mod=til"], "eval_mode"),
])
def test_typos_fail_with_close_matches(argv, expected):
    with pytest.raises(UserError, match="did you mean") as error:
        compose(argv)
    assert expected in str(error.value)


@pytest.mark.parametrize("argv, expected", [
    (["strategy.lr=abc"], "float"),
    (["seed=1.5"], "int"),
    (["strategy.epochs=true"], "int"),
    (["strategy.epochs=2.5"], "int"),
    (["progress=maybe"], "bool"),
    (["scenario=toy", "scenario.order_seed=x"], "int or null"),
])
def test_wrong_value_type_names_the_expected_type(argv, expected):
    with pytest.raises(UserError, match="expects") as error:
        compose(argv)
    assert expected in str(error.value)


def test_int_is_accepted_for_float():
    cfg = compose(["scenario=toy", "strategy.lr=1", "scenario.noise=0"])
    assert cfg.strategy.lr == 1.0 and isinstance(cfg.strategy.lr, float)
    assert isinstance(cfg.scenario.noise, float)


def test_nullable_and_literal_values():
    cfg = compose(["scenario=toy", "scenario.order_seed=null", "eval_mode=til"])
    assert cfg.scenario.order_seed is None and cfg.eval_mode == "til"
    with pytest.raises(UserError, match="eval_mode"):
        compose(["eval_mode=both"])


@pytest.mark.parametrize("argv, expected", [
    (["seed"], "key=value"),
    (["=3"], "key=value"),
    (["strategy.=3"], "key=value"),
    (["seed.x=1"], "no sub-keys"),
    (["strategy.lr.x=1"], "unknown key"),
    (["strategy=1"], "expects a name"),
])
def test_malformed_arguments(argv, expected):
    with pytest.raises(UserError, match=expected):
        compose(argv)


# --- presets ------------------------------------------------------------------------------------

PRESETS = [(group, path) for group, (folder, _) in GROUPS.items()
           for directory in config.preset_dirs(folder) for path in sorted(directory.glob("*.yaml"))]


@pytest.mark.parametrize("group, path", PRESETS, ids=[f"{g}:{p.stem}" for g, p in PRESETS])
def test_every_preset_composes(group, path):
    preset = yaml.safe_load(path.read_text()) or {}
    cfg = compose([f"{group}={path.stem}"] + (["scenario=toy"] if group == "strategy" else []))
    section = cfg[group]
    assert section.name == path.stem
    assert section.type == preset.get("type", path.stem)
    for key, value in preset.items():
        if key not in ("type", "description"):
            assert section[key] == value, key


def test_preset_with_unknown_key_fails_clearly(tmp_path, monkeypatch):
    fake_presets(monkeypatch, tmp_path, {"strategies/bad.yaml": {"type": "finetune", "lrr": 0.1}})
    with pytest.raises(UserError) as error:
        compose(["strategy=bad"])
    message = str(error.value)
    assert "bad.yaml" in message and "'lrr'" in message and "lr" in message


def test_preset_with_wrong_type_or_unknown_class_fails_clearly(tmp_path, monkeypatch):
    fake_presets(monkeypatch, tmp_path, {"strategies/slow.yaml": {"type": "finetune", "epochs": "many"},
                                         "strategies/ghost.yaml": {"type": "finetunee"}})
    with pytest.raises(UserError, match="strategy.epochs expects int"):
        compose(["strategy=slow"])
    with pytest.raises(UserError, match="unknown strategy"):
        compose(["strategy=ghost"])


def test_invalid_preset_yaml_fails_clearly(tmp_path, monkeypatch):
    fake_presets(monkeypatch, tmp_path, {})
    (tmp_path / "strategies").mkdir()
    (tmp_path / "strategies" / "broken.yaml").write_text("lr: [0.1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        compose(["strategy=broken"])
    (tmp_path / "strategies" / "listy.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        compose(["strategy=listy"])


def test_unknown_name_suggests_presets_too(tmp_path, monkeypatch):
    fake_presets(monkeypatch, tmp_path, {"strategies/fast_ft.yaml": {"type": "finetune"}})
    with pytest.raises(UserError, match="fast_ft"):
        compose(["strategy=fast_f"])


# --- the default model --------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", ["toy", "fmnist", "digits", "wordnet"])
def test_model_defaults_to_the_scenarios_default_model(scenario):
    cfg = compose([f"scenario={scenario}"])
    assert cfg.model.name == SCENARIOS.get(scenario).default_model


def test_explicit_model_wins_over_the_default():
    cfg = compose(["scenario=toy", "model=small_cnn"])
    assert cfg.model.name == "small_cnn"


@pytest.mark.parametrize("strategy, scenario, model", [
    ("mos", "cifar100", "vit_b16_in21k"), ("mos_cifar224", "cifar100", "vit_b16_in21k"),
    ("contracon", "cifar100", "cct"), ("avalanche.l2p", "fmnist", "vit_b16_in1k")])
def test_a_strategy_gets_its_paper_backbone_where_the_scenarios_default_does_not_fit(strategy, scenario, model):
    said = []
    cfg = compose([f"strategy={strategy}", f"scenario={scenario}"], say=said.append)
    assert cfg.model.name == model
    assert len(said) == 1 and said[0].startswith(f"model={model}: the backbone of ")
    assert SCENARIOS.get(scenario).default_model in said[0] and "model=NAME" in said[0]


@pytest.mark.parametrize("args", [["strategy=mos", "scenario=wordnet"],  # minilm takes adapters too
                                  ["strategy=simplecil", "scenario=cifar100"],  # any backbone fits
                                  ["strategy=mos", "scenario=cifar100", "model=resnet18"]])
def test_a_fitting_default_or_an_explicit_model_is_kept_silently(args):
    said = []
    cfg = compose(args, say=said.append)
    expected = args[2].partition("=")[2] if len(args) > 2 else SCENARIOS.get(args[1].partition("=")[2]).default_model
    assert cfg.model.name == expected and said == []


# --- hashes -------------------------------------------------------------------------------------

def test_config_hash_is_stable_and_follows_the_seed():
    args = ["scenario=toy", "strategy=er"]
    a, b = compose(args + ["seed=1"]), compose(args + ["seed=1"])
    c = compose(args + ["seed=2"])
    assert config_hash(a) == config_hash(b) and run_id(a) == run_id(b)
    assert config_hash(a) != config_hash(c) and run_id(a) != run_id(c)
    assert config_hash(a, with_seed=False) == config_hash(c, with_seed=False)
    assert config_hash(a, with_seed=False) != config_hash(a)
    assert config_hash(compose(args + ["seed=1", "strategy.lr=0.5"]), with_seed=False) != \
        config_hash(a, with_seed=False)


@pytest.mark.parametrize("extra", [["results_dir=/elsewhere"], ["progress=false"], ["resume=false"],
                                   ["cache_dir=/tmp/other"], ["device=cpu"]])
def test_execution_only_keys_do_not_change_the_hash(extra):
    base = compose(["scenario=toy"])
    other = compose(["scenario=toy"] + extra)
    assert OmegaConf.to_container(base) != OmegaConf.to_container(other)
    assert config_hash(other) == config_hash(base)
    assert config_hash(other, with_seed=False) == config_hash(base, with_seed=False)


@pytest.mark.parametrize("extra", [["eval_mode=til"], ["eval_unseen=true"], ["strategy.lr=0.5"],
                                   ["scenario.noise=1"], ["model.hidden=8"], ["model=small_cnn"]])
def test_what_a_run_computes_changes_the_hash(extra):
    assert config_hash(compose(["scenario=toy"] + extra)) != config_hash(compose(["scenario=toy"]))


def test_setting_hash_ignores_only_the_strategy():
    a, b = compose(["scenario=toy", "strategy=finetune"]), compose(["scenario=toy", "strategy=joint"])
    assert config_hash(a) != config_hash(b)
    assert config_hash(a, with_strategy=False) == config_hash(b, with_strategy=False)


def test_every_keyword_only_constructor_argument_is_a_config_key():
    cfg = compose(["scenario=toy"])
    assert set(cfg.strategy) - {"name", "type"} == set(hyperparameters(ClassifierStrategy))
    assert set(cfg.model) - {"name", "type"} == {"hidden", "depth", "frozen"}

"""Plugins: the example package installed with pip and found through its entry point, and local
modules loaded with ``plugins=[module]``.

Whatever registers a plugin runs the real console script in a subprocess, so those entry points
and registrations never leak into the registries of the test process. The example package is installed with
``pip install --target`` into a temporary folder put on PYTHONPATH: the same pip build and the same
entry-point discovery as an install into the venv, without changing the venv that other tests (or
other people's test runs) use at the same time.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "plugin"
SCRIPT = Path(sys.executable).parent / "cl-bench"
PLUGIN_NAME = "label_smoothing_finetune"


def cl_bench(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """The installed console script in a subprocess (with ``pythonpath`` in front of PYTHONPATH)."""
    if not SCRIPT.exists():
        pytest.skip(f"no cl-bench console script next to {sys.executable}")
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr + result.stdout
    return [line for line in result.stderr.splitlines() if line.strip()]


def summary_and_config(results: Path) -> tuple[dict, dict]:
    (directory,) = (results / "runs").iterdir()
    return (json.loads((directory / "summary.json").read_text()),
            yaml.safe_load((directory / "config.yaml").read_text()))


# --- the example package, installed through pip -------------------------------------------------

@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """The example package built by pip offline (with the venv's setuptools) and installed into a
    temporary site folder, which is returned; removed at teardown."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment (pip cannot build offline)")
    root = tmp_path_factory.mktemp("plugin")
    source, site = root / "source", root / "site"
    # build from a copy: setuptools writes build/ and *.egg-info/ next to the sources
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(site.glob("cl_bench_example_plugin-*.dist-info"))
    yield site
    shutil.rmtree(root, ignore_errors=True)


def test_installed_plugin_is_listed(installed_plugin):
    result = cl_bench("list", "strategies", pythonpath=installed_plugin)
    assert result.returncode == 0, result.stderr
    assert PLUGIN_NAME in result.stdout
    assert "label-smoothed" in result.stdout  # its description


def test_installed_plugin_runs(installed_plugin, tmp_path):
    results = tmp_path / "results"
    result = cl_bench("run", f"strategy={PLUGIN_NAME}", "scenario=toy", "strategy.smoothing=0.2",
                      "strategy.epochs=2", "progress=false", f"results_dir={results}",
                      f"cache_dir={tmp_path}/cache", pythonpath=installed_plugin)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary, config = summary_and_config(results)
    assert summary["status"] == "finished" and summary["tasks_completed"] == 3
    assert summary["strategy"] == PLUGIN_NAME
    assert config["strategy"]["smoothing"] == 0.2
    assert config["strategy"]["epochs"] == 2  # the parent's hyperparameters stay config keys
    assert summary["metrics"]["acc_final_task_mean"] > 0


def write_csv(path: Path, classes: int = 6, rows_per_class: int = 20) -> Path:
    """Rows of 4 numeric features around a per-class centre, the label column second (any position works)."""
    import numpy as np
    rng = np.random.default_rng(0)
    lines = ["f0,label,f1,f2,f3"]
    for c in range(classes):
        for _ in range(rows_per_class):
            x = rng.normal(3.0 * c, 0.5, size=4)
            lines.append(f"{x[0]:.4f},class_{c},{x[1]:.4f},{x[2]:.4f},{x[3]:.4f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_installed_plugin_scenario_runs_with_its_strategy(installed_plugin, tmp_path):
    data = write_csv(tmp_path / "mine.csv")
    listed = cl_bench("list", "scenarios", pythonpath=installed_plugin)
    assert listed.returncode == 0 and "csv_classes" in listed.stdout and "rows of a CSV file" in listed.stdout
    results = tmp_path / "results"
    result = cl_bench("run", f"strategy={PLUGIN_NAME}", "scenario=csv_classes", f"scenario.path={data}",
                      "scenario.increment=2", "strategy.epochs=3", "progress=false", f"results_dir={results}",
                      f"cache_dir={tmp_path}/cache", pythonpath=installed_plugin)
    assert result.returncode == 0, result.stderr
    summary, config = summary_and_config(results)
    assert summary["status"] == "finished" and summary["scenario"] == "csv_classes"
    assert summary["tasks_total"] == 3 and config["scenario"]["path"] == str(data)
    assert summary["provenance"]["stream"]["source"] == str(data)
    assert sum(p["samples_evaluated"] for p in summary["per_task"][-1:]) == 6 * 5  # a quarter of 20 rows held out
    bad = cl_bench("run", "scenario=csv_classes", f"scenario.path={tmp_path / 'none.csv'}",
                   f"results_dir={tmp_path / 'bad'}", pythonpath=installed_plugin)
    assert bad.returncode == 2
    (line,) = error_lines(bad)
    assert "scenario.path=" in line and "none.csv" in line


def test_installed_plugin_hyperparameter_is_checked(installed_plugin, tmp_path):
    result = cl_bench("run", f"strategy={PLUGIN_NAME}", "scenario=toy", "strategy.smoothin=0.2",
                      f"results_dir={tmp_path}", pythonpath=installed_plugin)
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "strategy.smoothing" in line


@pytest.fixture
def example_strategy(monkeypatch):
    """The example strategy class imported from the source tree (importing registers nothing)."""
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    from cl_bench_example_plugin.label_smoothing import LabelSmoothingFinetune
    return LabelSmoothingFinetune


def test_example_strategy_hyperparameters(example_strategy):
    from cl_bench.registry import hyperparameters
    from cl_bench.strategies.base import ClassifierStrategy

    found = hyperparameters(example_strategy)
    assert found["smoothing"].default == 0.1
    assert set(hyperparameters(ClassifierStrategy)) < set(found)


def test_example_strategy_loss_is_label_smoothed(example_strategy):
    import torch
    import torch.nn.functional as F

    from cl_bench.errors import UserError
    from cl_bench.models.factory import mlp
    from cl_bench.strategies.base import Context

    torch.manual_seed(0)
    inputs, targets = torch.randn(8, 5), torch.randint(0, 4, (8,))
    losses = {}
    for smoothing in (0.0, 0.3):
        strategy = example_strategy(mlp("vector", (5,), hidden=6), Context(), smoothing=smoothing, lr=0.1)
        torch.manual_seed(1)
        strategy.head.grow(4)
        logits = strategy(inputs)
        losses[smoothing] = strategy.loss(inputs, targets)
        expected = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        assert torch.allclose(losses[smoothing], expected)
    assert not torch.allclose(losses[0.0], losses[0.3])
    with pytest.raises(UserError, match="smoothing"):
        example_strategy(mlp("vector", (5,)), Context(), smoothing=1.5)


# --- unpackaged modules: plugins=[module] -------------------------------------------------------

LOCAL_PLUGIN = '''
import torch.nn.functional as F

import cl_bench


@cl_bench.register_strategy("local_margin")
class LocalMargin(cl_bench.ClassifierStrategy):
    """Fine-tuning with a multi-class hinge loss (a local plugin for the tests)."""

    def __init__(self, backbone, context, *, margin: float = 1.0, **kwargs):
        super().__init__(backbone, context, **kwargs)
        self.margin = margin

    def loss(self, inputs, targets):
        return F.multi_margin_loss(self(inputs), targets, margin=self.margin)
'''

LOCAL_INSTRUCTIONS = '''
import cl_bench


@cl_bench.register_scenario("local_arithmetic")
class LocalArithmetic(cl_bench.InstructionScenario):
    """Two instruction tasks from plain Python data (a local plugin for the tests)."""

    description = "add and double small numbers"
    default_model = "tiny_llama"

    def build(self):
        def examples(template, answer, numbers):
            return cl_bench.Examples([template.format(n=n) for n in numbers], [answer(n) for n in numbers])

        tasks = [cl_bench.Task(i, name, examples(template, answer, range(40)),
                               examples(template, answer, range(40, 50)),
                               instruction=template, scorer=scorer, max_new_tokens=4)
                 for i, (name, template, answer, scorer) in enumerate([
                     ("plus_one", "{n} plus one:", lambda n: str(n + 1), "exact_match"),
                     ("double", "Twice {n}:", lambda n: str(2 * n), "exact_string")])]
        return tasks, [], {"source": "local_arithmetic"}
'''

DUPLICATE_PLUGIN = '''
import cl_bench


@cl_bench.register_strategy("finetune")
class MyFinetune(cl_bench.ClassifierStrategy):
    pass
'''


@pytest.fixture
def local_modules(tmp_path) -> Path:
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "local_margin_plugin.py").write_text(LOCAL_PLUGIN)
    (folder / "duplicate_plugin.py").write_text(DUPLICATE_PLUGIN)
    (folder / "local_instructions.py").write_text(LOCAL_INSTRUCTIONS)
    return folder


def test_local_module_plugin_runs(local_modules, tmp_path):
    results = tmp_path / "results"
    result = cl_bench("run", "plugins=[local_margin_plugin]", "strategy=local_margin", "scenario=toy",
                      "strategy.margin=0.5", "progress=false", f"results_dir={results}",
                      f"cache_dir={tmp_path}/cache", pythonpath=local_modules)
    assert result.returncode == 0, result.stderr
    summary, config = summary_and_config(results)
    assert summary["status"] == "finished" and summary["strategy"] == "local_margin"
    assert config["strategy"]["margin"] == 0.5
    assert config["plugins"] == ["local_margin_plugin"]


def test_local_instruction_scenario_runs(local_modules, tmp_path):
    results = tmp_path / "results"
    result = cl_bench("run", "plugins=[local_instructions]", "scenario=local_arithmetic", "strategy=seqlora",
                      "strategy.batch_size=8", "scenario.max_train_per_task=16", "progress=false",
                      f"results_dir={results}", f"cache_dir={tmp_path}/cache", pythonpath=local_modules)
    assert result.returncode == 0, result.stderr
    summary, config = summary_and_config(results)
    assert summary["status"] == "finished" and config["model"]["name"] == "tiny_llama"  # the scenario's default
    stream = summary["provenance"]["stream"]
    assert stream["task_order"] == ["plus_one", "double"] and stream["examples"]["double"] == [16, 10]
    assert stream["scorers"] == {"plus_one": "exact_match", "double": "exact_string"}


def test_missing_plugin_module(capsys, tmp_path):
    from cl_bench.cli import main

    assert main(["run", "plugins=[no_such_plugin_module]", "scenario=toy", f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    assert "no_such_plugin_module" in err and "Traceback" not in err


def test_duplicate_name_names_both_origins(local_modules, tmp_path):
    result = cl_bench("run", "plugins=[duplicate_plugin]", "strategy=finetune", "scenario=toy",
                      "progress=false", f"results_dir={tmp_path}/results", pythonpath=local_modules)
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "'finetune'" in line and "registered twice" in line
    assert "duplicate_plugin.MyFinetune" in line  # the plugin's origin
    assert "cl_bench.strategies.finetune.Finetune" in line  # the built-in's origin
    assert not (tmp_path / "results" / "runs").exists()

"""Shared fixtures. Tests never touch the network: the Hugging Face libraries are set offline here,
at import, before any test module imports them. ``CL_BENCH_TEST_ORDER=random:SEED`` runs the modules in a
seeded random order and each module's tests in a random order (a module's tests stay together, so its
module-scoped fixtures are built once): tests must not depend on each other's order."""
import os
import random

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


def pytest_collection_modifyitems(config, items):
    order = os.environ.get("CL_BENCH_TEST_ORDER", "")
    if not order.startswith("random"):
        return
    rng = random.Random(order.partition(":")[2] or "0")
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    groups = list(modules.values())
    rng.shuffle(groups)
    for group in groups:
        rng.shuffle(group)
    items[:] = [item for group in groups for item in group]


@pytest.fixture
def tmp_results(tmp_path):
    """A fresh results_dir for one test."""
    path = tmp_path / "results"
    path.mkdir()
    return path


@pytest.fixture
def fast_args(tmp_results):
    """Overrides for a quiet run whose results and feature cache stay in the test's tmp dir."""
    return ["progress=false", f"results_dir={tmp_results}", f"cache_dir={tmp_results}/cache"]


@pytest.fixture
def interrupt_and_resume(monkeypatch):
    """``go(cfg, strategy_class, at_task)``: run ``cfg`` until ``strategy_class.learn`` reaches the task
    with index ``at_task``, stop it there as Ctrl-C would, then rerun the same config (which resumes)
    and return the resumed summary."""
    from cl_bench.runner import run

    def go(cfg, strategy_class, at_task: int) -> dict:
        original = strategy_class.learn

        def interrupt(self, task):
            if task.index == at_task:
                raise KeyboardInterrupt
            return original(self, task)

        monkeypatch.setattr(strategy_class, "learn", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
        monkeypatch.setattr(strategy_class, "learn", original)
        return run(cfg)

    return go

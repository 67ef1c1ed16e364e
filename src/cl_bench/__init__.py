"""cl-bench: continual-learning strategies on the same streams, under the same metrics.

The public names load on first use, so ``import cl_bench.metrics`` stays free of torch.
"""
import importlib

_EXPORTS = {
    "compose": "cl_bench.config", "run": "cl_bench.runner",
    "register_strategy": "cl_bench.registry", "register_scenario": "cl_bench.registry",
    "register_model": "cl_bench.registry",
    "Samples": "cl_bench.scenarios.base", "Examples": "cl_bench.scenarios.base", "Stream": "cl_bench.scenarios.base",
    "Task": "cl_bench.scenarios.base", "Scenario": "cl_bench.scenarios._scenario",
    "ClassIncrementalScenario": "cl_bench.scenarios._scenario", "HeldOutScenario": "cl_bench.scenarios._scenario",
    "InstructionScenario": "cl_bench.scenarios._scenario", "UserError": "cl_bench.errors",
    "Strategy": "cl_bench.strategies.base", "ClassifierStrategy": "cl_bench.strategies.base",
    "Context": "cl_bench.strategies.base", "to_avalanche": "cl_bench.avalanche_interop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cl_bench' has no attribute {name!r}")

"""An example cl-bench plugin: a strategy and a scenario, exposed through the ``cl_bench.strategies`` and
``cl_bench.scenarios`` entry points."""

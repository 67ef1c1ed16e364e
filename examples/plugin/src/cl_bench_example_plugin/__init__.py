"""An example cl-bench plugin: one strategy, exposed through the ``cl_bench.strategies`` entry point."""

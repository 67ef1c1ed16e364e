"""Hostile-input fuzzing at scale: the property tests of tests/test_hostile_input.py (fuzzed CLI overrides,
suite files and damaged results files) with many more examples than the test suite runs.

    .venv/bin/python benchmarks/fuzz_inputs.py [--examples 5000]

Prints the inputs tried per family, their exit codes, and the tracebacks seen (the run fails on any).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("overrides", "suites", "results files", "checkpoints", "plugin names")  # tests/test_hostile_input.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="examples per family")
    args = parser.parse_args()
    env = {**os.environ, "CL_BENCH_FUZZ_EXAMPLES": str(args.examples), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                             str(ROOT / "tests" / "test_hostile_input.py")], capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if "fuzzed inputs tried" in line or "passed" in line
             or "failed" in line]
    print("\n".join(line.lstrip(".") for line in lines))
    counted = "".join(line for line in lines if "fuzzed inputs tried" in line)
    missing = [family for family in FAMILIES if f"'{family}': " not in counted]
    if missing:
        print(f"families not exercised: {', '.join(missing)}")
    if result.returncode or missing:
        print(result.stdout[-3000:])
    sys.exit(result.returncode or int(bool(missing)))


if __name__ == "__main__":
    main()

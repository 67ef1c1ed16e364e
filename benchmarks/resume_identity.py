"""Resume identity under ``kill -9``: one run uninterrupted, the same run SIGKILLed K times at random
moments (each time just after a task finished, plus a random delay into its writes or the next task) and
rerun until it finishes. Prints the kills and whether the final score matrices are byte-identical.

    .venv/bin/python benchmarks/resume_identity.py [--kills 7] [--seed 0] [--strategy er]

Exit status 1 when the matrices differ.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = 10


def command(results: Path, strategy: str) -> list[str]:
    return [sys.executable, "-m", "cl_bench.cli", "run", f"strategy={strategy}", "scenario=digits",
            "scenario.increment=1", "model=mlp", "strategy.epochs=40", "progress=false", "device=cpu",
            f"results_dir={results}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategy", default="er")
    args = parser.parse_args()
    chance = random.Random(args.seed)
    env = {**os.environ, "COLUMNS": "200"}
    with tempfile.TemporaryDirectory() as scratch:
        reference, killed = Path(scratch, "reference"), Path(scratch, "killed")
        subprocess.run(command(reference, args.strategy), check=True, capture_output=True, env=env)
        kills = []
        while len(kills) < args.kills:
            process = subprocess.Popen(command(killed, args.strategy), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, env=env)
            summaries = list(killed.glob("runs/*/summary.json"))
            done = json.loads(summaries[0].read_text())["tasks_completed"] if summaries else 0
            target = done + 1 if done < TASKS - 1 else None
            reached = target is not None and any(f"task {target}/{TASKS} done" in line for line in process.stdout)
            if not reached:  # the run finished: start the next round of kills from scratch
                process.wait()
                if len(kills) < args.kills:
                    print(f"run finished after {len(kills)} kills; more kills need another run")
                break
            time.sleep(chance.uniform(0.0, 0.15))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills.append(target)
            process.wait()
        final = subprocess.run(command(killed, args.strategy), capture_output=True, text=True, env=env)
        same = [p.read_bytes() for p in sorted(reference.glob("runs/*/scores.csv"))] == \
               [p.read_bytes() for p in sorted(killed.glob("runs/*/scores.csv"))]
        print(f"strategy {args.strategy}, {TASKS} tasks: {len(kills)} kill -9s, each just after task "
              f"{', '.join(map(str, kills))} (+0-150 ms); final rerun exit {final.returncode}; "
              f"score matrix identical to the uninterrupted run: {same}")
        sys.exit(0 if same and final.returncode == 0 else 1)


if __name__ == "__main__":
    main()

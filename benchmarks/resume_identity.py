"""Resume identity under ``kill -9``, per strategy family: one uninterrupted run, then K rounds of the same
run SIGKILLed at a random optimizer step (``cl_bench.kill_switch``: the process kills itself at that step,
so the moment is exact, never a timer) and rerun to the end. Prints, per kill, the step and whether the
resumed ``scores.csv`` is byte-identical to the uninterrupted one.

Families: class (``er`` on 10 one-class digit tasks), instruction (``seqlora`` on ``instruct_toy`` with
``tiny_llama``) and Avalanche (``avalanche.replay``: its buffer, optimizer moments and clock come back from
the checkpoint).

    .venv/bin/python benchmarks/resume_identity.py [--kills 20] [--seed 0] [--family class instruction avalanche]

Exit status 1 when any kill gave a different matrix.
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
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAMILIES = {
    "class": ["strategy=er", "scenario=digits", "scenario.increment=1", "model=mlp", "strategy.epochs=5"],
    "instruction": ["strategy=seqlora", "scenario=instruct_toy", "model=tiny_llama", "strategy.lr=0.01",
                    "strategy.batch_size=4", "strategy.epochs=2"],
    "avalanche": ["strategy=avalanche.replay", "scenario=digits", "model=mlp", "strategy.epochs=2"],
}


def run(results: Path, family: str, kill_at: str | None = None, device: str = "cpu") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    plugins = []
    if kill_at:
        env["CL_BENCH_KILL_AT"] = kill_at
        plugins = ["plugins=[cl_bench.kill_switch]"]
    return subprocess.run([sys.executable, "-m", "cl_bench.cli", "run", *FAMILIES[family], "progress=false",
                           f"device={device}", f"results_dir={results}", f"cache_dir={results.parent}/cache", *plugins],
                          capture_output=True, text=True, env=env)


def scores(results: Path) -> bytes:
    (path,) = results.glob("runs/*/scores.csv")
    return path.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the CUDA RNG resume check")
    args = parser.parse_args()
    chance = random.Random(args.seed)
    failures = 0
    for family in args.family:
        with tempfile.TemporaryDirectory() as scratch:
            reference = Path(scratch, "reference")
            done = run(reference, family, device=args.device)
            if done.returncode:
                sys.exit(f"{family}: the uninterrupted run failed: {done.stderr.strip().splitlines()[-1:]}")
            (summary,) = reference.glob("runs/*/summary.json")
            steps = json.loads(summary.read_text())["protocol"]["optimizer_steps"]
            identical = 0
            for kill in range(1, args.kills + 1):
                results, step = Path(scratch, f"kill-{kill}"), chance.randint(1, steps)
                killed = run(results, family, f"step:{step}", args.device)
                resumed = run(results, family, device=args.device)
                same = killed.returncode == -signal.SIGKILL and resumed.returncode == 0 and \
                    scores(results) == scores(reference)
                identical += same
                print(f"{family} kill {kill:>2}: SIGKILL at step {step:>4} of {steps}, "
                      f"{'identical' if same else 'DIFFERENT'} (killed exit {killed.returncode}, "
                      f"rerun exit {resumed.returncode})", flush=True)
            print(f"{family}: {identical}/{args.kills} identical", flush=True)
            failures += args.kills - identical
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

"""Cost as tasks grow: trainable parameters per task and inference time per test sample, tasks 1..10.

Each strategy runs through the normal runner on scikit-learn's digits split into 10 one-class
tasks, on the tiny timm ViT (MOS, ConTraCon, SimpleCIL, finetune) or on frozen MLP features (DKVB),
with one short epoch per task: the point is how costs scale with the number of tasks, not accuracy
(so DKVB even fits its keys on digits itself, allow_stream_data=true, which a real comparison must not
do; the frozen MLP cannot encode the 28x28 images that its default, key_init_data=auto, would pick).
Inference time per sample after task t is the runner's evaluation time after t divided by the test
samples it scored (all seen tasks). MOS's retrieval should stay bounded by its iteration limit
(at most 1 + max_iterations adapter passes per sample), so its time per sample must flatten rather
than grow with the number of stored adapters; the last column prints the ratio of the time per
sample after task 10 to that after task 2.

Usage: .venv/bin/python benchmarks/ptm_cost.py [--tasks 10]
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VIT = ["model=vit_tiny_test", "model.image_size=8", "model.patch_size=8"]
STRATEGIES = {
    "finetune": VIT + ["strategy.epochs=1"],
    "simplecil": VIT,
    "mos": VIT + ["strategy.epochs=1", "strategy.crct_epochs=1", "strategy.augment=false"],
    "contracon": ["model=cct", "model.image_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                  "strategy.kernel_size=3", "strategy.epochs=1"],
    "dkvb": ["model=mlp", "model.frozen=true", "strategy.epochs=1", "strategy.num_codebooks=32",
             "strategy.keys_per_codebook=256", "strategy.key_init_data=digits", "allow_stream_data=true"],
}


def main() -> None:
    from cl_bench.config import compose
    from cl_bench.runner import run

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10, help="one class per task, at most 10")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as results:
        print(f"{'strategy':<10} {'task':>4} {'trainable':>10} {'total params':>12} {'ms/sample':>10}")
        for name, extra in STRATEGIES.items():
            increment = 10 // args.tasks
            summary = run(compose([f"strategy={name}", "scenario=digits", f"scenario.increment={increment}",
                                   "progress=false", f"results_dir={results}", f"cache_dir={results}/cache",
                                   *extra]))
            tested, per_sample = 0, []
            for row in summary["per_task"]:
                tested_now = row["samples_evaluated"]
                per_sample.append(1000 * row["eval_seconds"] / tested_now)
                print(f"{name:<10} {row['task']:>4} {row['trainable_params']:>10} {row['total_params']:>12} "
                      f"{per_sample[-1]:>10.3f}")
                tested = tested_now
            growth = per_sample[-1] / per_sample[1] if len(per_sample) > 1 else float("nan")
            print(f"{name:<10} time per sample after task {len(per_sample)} / after task 2: {growth:.2f}x "
                  f"({tested} test samples scored after the last task)\n")


if __name__ == "__main__":
    main()

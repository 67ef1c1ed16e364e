"""IV-guided training's function vector on SmolLM2-135M and instruct_offline ``category`` (issue 14).

Prints, for each head selection (``aie``: average indirect effect; ``output_norm``: largest mean outputs)
and each ``vector_scale`` (``none``: the raw vector; ``residual_norm``): the heads, ||v_t||, the mean
residual-stream norm r̄ at (ℓ_edit, last prompt token), and, on training examples, the reference model's
probability of the gold first answer token with and without v_t added (pass A of the objective), and K1
at step 0 (fresh LoRA: the new model is the model without v_t). No training; forward passes only (the
AIE sweep is L·H single-token passes after one prefix pass).

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/iv_vector_check.py [--examples 32]
"""
from __future__ import annotations

import argparse
import time

import torch

from cl_bench.models.lm import IGNORE_INDEX, smollm2_135m
from cl_bench.registry import SCENARIOS
from cl_bench.strategies.base import Context
from cl_bench.strategies.iv_guided import IVGuided, kd_loss


@torch.no_grad()
def gold_probability_and_k1(strategy: IVGuided, examples, vector: torch.Tensor, batch_size: int = 8):
    """Mean gold-first-token probability without / with ``vector`` at (ℓ_edit, p_b), and K1 between them."""
    plain, edited, k1, count = 0.0, 0.0, 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples.select(range(start, min(start + batch_size, len(examples))))
        encoded = strategy.encode(batch)
        inputs = {k: encoded[k] for k in ("input_ids", "attention_mask")}
        rows = torch.arange(len(batch))
        first_answer = (encoded["labels"] != IGNORE_INDEX).int().argmax(1)
        positions, gold = first_answer - 1, encoded["labels"][rows, first_answer]
        with strategy.reference_pass():
            without = strategy.lm(**inputs).logits[rows, positions]
            with strategy.added_vector(vector, rows, positions):
                with_vector = strategy.lm(**inputs).logits[rows, positions]
        plain += float(without.softmax(-1)[rows, gold].sum())
        edited += float(with_vector.softmax(-1)[rows, gold].sum())
        k1 += float(kd_loss(without, with_vector, strategy.temperature)) * len(batch)
        count += len(batch)
    return plain / count, edited / count, k1 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32, help="training examples scored (default 32)")
    args = parser.parse_args()
    torch.manual_seed(0)
    task = SCENARIOS.get("instruct_offline")().stream().tasks[0]
    assert task.name == "category", task.name
    strategy = IVGuided(smollm2_135m("text", ()), Context(generator=torch.Generator().manual_seed(0)))
    strategy.eval()
    means, residual_norm = strategy.mean_head_activations(task)
    examples = task.train.select(range(min(args.examples, len(task.train))))
    print(f"SmolLM2-135M, task {task.name}: {strategy.num_layers} layers, edit layer {strategy.edit_layer}, "
          f"N = {min(strategy.n_trials, len(task.train))} prompts, {len(examples)} examples scored")
    started = time.perf_counter()
    effects = strategy.indirect_effects(task, means)
    print(f"AIE sweep ({strategy.aie_trials} corrupted prompts, {strategy.aie_shots} shots): "
          f"{time.perf_counter() - started:.1f} s; largest AIE {float(effects.max()):.2e}")
    for selection, heads in (("aie", strategy.top(effects)), ("output_norm", strategy.largest_output_heads(means))):
        strategy.heads = heads
        raw = strategy.vector_from_means(means)
        print(f"head_selection={selection}: heads {heads}")
        for setting in IVGuided.vector_scales[::-1]:
            strategy.vector_scale = setting
            vector = strategy.scaled(raw, residual_norm)
            plain, edited, k1 = gold_probability_and_k1(strategy, examples, vector)
            print(f"  vector_scale={setting:13s} |v_t| {float(vector.norm()):7.1f}  residual norm "
                  f"{residual_norm:6.1f}  P(gold first token) without {plain:.2e} with {edited:.2e} "
                  f"(ratio {edited / plain:.2e})  K1 at step 0 {k1:.3f}")


if __name__ == "__main__":
    main()

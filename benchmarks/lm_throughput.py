"""Language-model throughput side by side: cl-bench's training step and generation against a plain
transformers (+ peft) loop doing the same work, on identical batches, in one process.

What is measured
    * Training: tokens per second (prompt and answer tokens, no padding) of ``strategy.learn`` over a task of
      ``steps x batch`` copies of one example of ``--length`` tokens (every batch is identical, so no
      padding and no length bucketing differ between the two), against a plain loop that encodes that batch
      once and runs forward, backward, gradient clip (1.0) and AdamW on the same model: full fine-tuning for
      seqft and HFT, and for the LoRA methods a peft LoRA with the strategy's own LoRA configuration
      (LoRAMoE, whose experts are its own modules: seqlora's r=8 LoRA on q/v). The
      method's ``before_task`` (IV-guided's head sweep, CoIN's group choice) is not timed.
    * Generation: new tokens per second of ``seqft``'s ``predict`` against ``model.generate`` (greedy, KV
      cache, the same left-padded prompt ids, the same batch size and ``max_new_tokens``) on the same weights.

Contenders alternate within each round (plain first on even rounds); the table reports medians over rounds
and the ratio cl-bench / plain. Targets (issue 17): >= 0.95 for seqft, seqlora and generation. Methods that
do more than the plain step print the bound their extra work allows: HFT updates half the weights (a plain
full step is more work, so its bound is >= 1), IV-guided adds two no-grad reference forwards of the previous
model per step (its passes A and B: the bound, measured in the same rounds, is the plain step's time over the
step plus two no-grad forwards of the same batch), LoRAMoE runs its experts and router (no plain equivalent: no bound),
CoIN adds its DEMA average of the LoRA tensors and ConPET its answer-only loss (bound ~1).

Usage
    .venv/bin/python benchmarks/lm_throughput.py [--model smollm2_135m] [--steps 3] [--rounds 3]
        [--batch 8] [--length 128] [--new-tokens 32] [--threads 2] [--strategies seqft seqlora ...]

Measure with nothing else running and say the load with the numbers. The script always exits 0.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from cl_bench.config import compose  # noqa: E402
from cl_bench.models.factory import create_backbone  # noqa: E402
from cl_bench.registry import STRATEGIES  # noqa: E402
from cl_bench.runner import seed_everything  # noqa: E402
from cl_bench.scenarios.base import Examples, Task  # noqa: E402
from cl_bench.strategies.base import Context  # noqa: E402

STRATEGY_NAMES = ["seqft", "seqlora", "hft", "loramoe", "coin_ema", "conpet_static", "iv_guided"]
BOUNDS = {"hft": ">= 1 (half the weights update)",
          "loramoe": "n/a (experts and router)", "coin_ema": "~1 (DEMA average of the LoRA tensors)",
          "conpet_static": "~1"}
FULL_WEIGHTS = ("seqft", "hft")
# no-grad forwards of the previous model per step (IV-guided's A and B; B stops at the deepest selected head,
# so with heads well before the last layer the method can pass this bound)
REFERENCE_PASSES = {"iv_guided": 2}


def example(backbone, length: int) -> tuple[str, str]:
    """One prompt and answer whose training row is ``length`` tokens (answer: a quarter of it)."""
    answer = " ".join(["pear"] * max(1, length // 4 - 1))
    words = 1
    while True:
        prompt = " ".join(["apple"] * words)
        row = backbone.training_batch([prompt], [answer], "cpu")["input_ids"].shape[1]
        if row >= length:
            return prompt, answer
        words += max(1, (length - row) // 2)


def build(name: str, model: str, batch: int, device: str):
    """(strategy, its base model before the method touched it) with the suite's LM settings."""
    cfg = compose([f"strategy={name}", "scenario=instruct_toy", f"model={model}", f"strategy.batch_size={batch}",
                   "strategy.epochs=1", "strategy.lr=0.0001", "progress=false", f"device={device}"])
    seed_everything(0)
    backbone = create_backbone(cfg.model, "text", ())
    base = copy.deepcopy(backbone.model)
    settings = {k: v for k, v in dict(cfg.strategy).items() if k not in ("name", "type")}
    context = Context(device=torch.device(device), generator=torch.Generator().manual_seed(0))
    return STRATEGIES.get(name)(backbone, context, **settings).to(device), base.to(device), backbone


def plain_model(name: str, strategy, base):
    """The plain contender's model: full weights, or a peft LoRA with the strategy's LoRA configuration."""
    if name in FULL_WEIGHTS:
        return copy.deepcopy(base)
    from peft import get_peft_model

    from peft import LoraConfig

    configs = getattr(strategy.lm, "peft_config", None)
    config = copy.deepcopy(next(iter(configs.values()))) if configs else LoraConfig(  # LoRAMoE: its own experts
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    return get_peft_model(model, config)


def synchronise() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_plain_training(model, encoded: dict, steps: int) -> float:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    began = time.perf_counter()
    for _ in range(steps):
        loss = model(**encoded).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
    synchronise()
    return time.perf_counter() - began


@torch.no_grad()
def time_no_grad_forward(model, encoded: dict, steps: int) -> float:
    model.eval()
    began = time.perf_counter()
    for _ in range(steps):
        model(**encoded)
    synchronise()
    return time.perf_counter() - began


def time_strategy_training(strategy, task: Task) -> tuple[float, int]:
    strategy.before_task(task)
    tokens = strategy.tokens_trained
    began = time.perf_counter()
    strategy.learn(task)
    synchronise()
    seconds = time.perf_counter() - began
    strategy.after_task(task)
    return seconds, strategy.tokens_trained - tokens


def training_row(name: str, args) -> tuple[float, float, float | None]:
    """Median tokens/s of cl-bench and of the plain loop, and for methods with reference passes the bound
    they allow (plain step time / (step + its no-grad forwards)), measured in the same rounds."""
    strategy, base, backbone = build(name, args.model, args.batch, args.device)
    prompt, answer = example(backbone, args.length)
    task = Task(0, "bench", Examples([prompt] * (args.steps * args.batch), [answer] * (args.steps * args.batch)),
                Examples([prompt], [answer]), instruction="Say pear.", scorer="rouge_l", max_new_tokens=8)
    plain = plain_model(name, strategy, base)
    encoded = backbone.training_batch([prompt] * args.batch, [answer] * args.batch, args.device)
    plain_tokens = int(encoded["attention_mask"].sum()) * args.steps
    ours, theirs, bounds = [], [], []
    passes = REFERENCE_PASSES.get(name, 0)
    time_plain_training(plain, encoded, 1)  # warm-up, untimed
    for round_index in range(args.rounds):
        for contender in (("plain", "ours") if round_index % 2 == 0 else ("ours", "plain")):
            if contender == "plain":
                step = time_plain_training(plain, encoded, args.steps)
                theirs.append(plain_tokens / step)
                if passes:
                    bounds.append(step / (step + passes * time_no_grad_forward(plain, encoded, args.steps)))
            else:
                seconds, tokens = time_strategy_training(strategy, task)
                ours.append(tokens / seconds)
    return statistics.median(ours), statistics.median(theirs), statistics.median(bounds) if bounds else None


def generation_row(args) -> tuple[float, float]:
    strategy, base, backbone = build("seqft", args.model, args.batch, args.device)
    prompt, _ = example(backbone, args.length // 2)
    prompts = [prompt] * args.generation_prompts
    ids = backbone.prompt_ids(prompts)
    input_ids, attention_mask = backbone.left_padded(ids, args.device)
    tokenizer = backbone.tokenizer
    model = strategy.lm
    model.eval()
    ours, theirs = [], []
    size = strategy.generation_batch_size
    for round_index in range(args.rounds):
        for contender in (("plain", "ours") if round_index % 2 == 0 else ("ours", "plain")):
            if contender == "plain":
                began, generated = time.perf_counter(), 0
                with torch.no_grad():
                    for start in range(0, len(prompts), size):
                        out = model.generate(input_ids=input_ids[start:start + size],
                                             attention_mask=attention_mask[start:start + size], do_sample=False,
                                             max_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id,
                                             eos_token_id=tokenizer.eos_token_id, use_cache=True, num_beams=1,
                                             temperature=None, top_p=None, top_k=None)
                        for row in out[:, input_ids.shape[1]:].tolist():
                            generated += row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row \
                                else len(row)
                theirs.append(generated / (time.perf_counter() - began))
            else:
                before, began = strategy.tokens_generated, time.perf_counter()
                strategy.predict(prompts, args.new_tokens)
                ours.append((strategy.tokens_generated - before) / (time.perf_counter() - began))
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round and contender")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128, help="tokens per training example")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--generation-prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA, times are synchronised)")
    parser.add_argument("--strategies", nargs="+", default=STRATEGY_NAMES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"model {args.model}, batch {args.batch} x {args.length} tokens, {args.steps} steps x {args.rounds} rounds, "
          f"{args.threads} threads, fp32 on {args.device}")
    print(f"{'what':<20} {'cl-bench tok/s':>15} {'plain tok/s':>12} {'ratio':>7}  target or bound")
    for name in args.strategies:
        ours, theirs, bound = training_row(name, args)
        target = ">= 0.95" if name in ("seqft", "seqlora") else BOUNDS.get(name, "")
        if bound is not None:
            target = f"{bound:.3f} (measured: {REFERENCE_PASSES[name]} no-grad forwards per step)"
        print(f"{'train ' + name:<20} {ours:>15.1f} {theirs:>12.1f} {ours / theirs:>7.3f}  {target}")
    ours, theirs = generation_row(args)
    print(f"{'generate':<20} {ours:>15.1f} {theirs:>12.1f} {ours / theirs:>7.3f}  >= 0.95")


if __name__ == "__main__":
    main()

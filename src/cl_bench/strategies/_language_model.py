"""The language-model family: strategies that train a causal LM on instruction tasks and answer by
greedy generation.

A training step is ``loss(batch, task)`` (next-token cross-entropy on the answer tokens), a gradient
clip over the trainable tensors, an AdamW step, then ``after_optimizer_step()``; methods override
the piece they change. ``grad_accum=N`` makes a step's batch N x ``batch_size`` examples, forwarded in N
micro-batches of ``batch_size`` whose losses are weighted by their share of the batch's answer tokens: the
same gradient as the whole batch at once for a token-mean loss (the auxiliary terms of LoRAMoE and IV-guided
training are averaged over micro-batches by the same weights). Batches are grouped by length (shuffled, then sorted inside windows of 32
batches) so padding stays small without a per-example loop. ``predict(prompts, max_new_tokens)``
returns generated strings, one limit for all prompts or one per prompt (an evaluation batch mixes
tasks with different limits); the runner scores them with each task's scorer. Under
``gradient_checkpointing`` the backward runs each layer's forward again, so a loss that hooks into the
forward enters its hooks into ``backward_hooks``: they stay registered until that backward is done.
"""
from __future__ import annotations

import time
from contextlib import ExitStack

import torch

from cl_bench import distributed
from cl_bench.errors import UserError, check_ranges
from cl_bench.models.lm import IGNORE_INDEX, LanguageModel
from cl_bench.scenarios.base import Examples, Task
from cl_bench.strategies.base import Context, Strategy

LENGTH_WINDOW = 32  # batches per window sorted by length


class LanguageModelStrategy(Strategy):
    """Sequential training of a causal LM on each task's examples; every weight of the LM trains
    unless a subclass freezes it."""

    stream_kinds = ("instructions",)
    data_parallel = True
    smoke_args = ("scenario=instruct_toy", "model=tiny_llama", "strategy.lr=0.01", "strategy.batch_size=4")

    def __init__(self, backbone: LanguageModel, context: Context, *, epochs: int = 1, batch_size: int = 8,
                 lr: float = 1e-4, weight_decay: float = 0.0, grad_clip: float = 1.0,
                 generation_batch_size: int = 16, bf16: bool = False, gradient_checkpointing: bool = False,
                 grad_accum: int = 1):
        super().__init__(backbone, context)
        if not isinstance(backbone, LanguageModel):
            raise UserError(f"strategy {type(self).__name__} needs a language model (e.g. model=smollm2_135m), "
                            f"got {type(backbone).__name__}")
        check_ranges("strategy", epochs=(epochs, ">= 0"), batch_size=(batch_size, ">= 1"), lr=(lr, ">= 0"),
                     generation_batch_size=(generation_batch_size, ">= 1"), grad_accum=(grad_accum, ">= 1"))
        self.use_precision(bf16=bf16)
        self.epochs, self.batch_size, self.lr, self.grad_accum = epochs, batch_size, lr, grad_accum
        self._encoded: dict[int, tuple] = {}  # id(batch) -> (batch, its encoding) until the step ends
        self.weight_decay, self.grad_clip = weight_decay, grad_clip
        self.generation_batch_size = generation_batch_size
        if gradient_checkpointing:
            backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            backbone.model.config.use_cache = False
        self.tokens_trained = self.tokens_generated = 0
        self.generation_seconds = 0.0
        self.backward_hooks: ExitStack | None = None  # open while a step's loss and backward run

    @property
    def lm(self):
        return self.backbone.model

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the trainable tensors only (frozen ones get no optimizer state)."""
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def training_data(self, task: Task) -> Examples:
        return task.train

    @property
    def step_batch_size(self) -> int:
        """Examples per optimizer step: ``batch_size`` x ``grad_accum``."""
        return self.batch_size * self.grad_accum

    def example_batches(self, examples: Examples, *, description: str = ""):
        """Shuffled batches of ``step_batch_size`` examples, grouped by prompt+answer length inside windows."""
        count, batch_size = len(examples), self.step_batch_size
        order = torch.randperm(count, generator=self.context.generator).tolist()
        size = [len(examples.prompts[i]) + len(examples.answers[i]) for i in range(count)]
        window = LENGTH_WINDOW * batch_size
        batches = []
        for start in range(0, count, window):
            part = sorted(order[start:start + window], key=size.__getitem__)
            batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
        shuffled = torch.randperm(len(batches), generator=self.context.generator).tolist()
        for index in self.context.progress(shuffled, description, total=len(batches)):
            yield examples.select(batches[index])

    def encode(self, batch: Examples) -> dict[str, torch.Tensor]:
        """The batch's training encoding, tokenised once per step: kept (with the batch, so its id stays
        unique) until ``count_step`` ends the step."""
        kept = self._encoded.get(id(batch))
        if kept is None:
            kept = self._encoded[id(batch)] = (batch, self.backbone.training_batch(batch.prompts, batch.answers,
                                                                                   self.device))
        return kept[1]

    def lm_loss(self, encoded: dict[str, torch.Tensor], **forward) -> torch.Tensor:
        with self.autocast():
            return self.lm(**encoded, **forward).loss

    def loss(self, batch: Examples, task: Task) -> torch.Tensor:
        return self.lm_loss(self.encode(batch))

    def after_optimizer_step(self) -> None:
        pass

    def epoch_optimizer(self, epoch: int, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer for ``epoch`` of the task (0-based): the task's one optimizer, unless a method
        changes what trains between epochs."""
        return optimizer

    def learn(self, task: Task) -> None:
        data = self.training_data(task)
        self.train()
        optimizer = self.make_optimizer()
        for epoch in self.training_epochs(self.epochs):
            optimizer = self.epoch_optimizer(epoch, optimizer)
            trainable = self.trainable_parameters()
            description = f"{task.name} epoch {epoch + 1}"
            for batch in self.example_batches(data, description=description):
                if self.budget_spent():
                    break
                optimizer.zero_grad(set_to_none=True)
                loss, tokens = self.accumulate(batch, task, description)
                if self.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, self.grad_clip)
                optimizer.step()
                self.after_optimizer_step()
                self.tokens_trained += tokens
                self.count_step(len(batch), loss, optimizer)

    def accumulate(self, batch: Examples, task: Task, description: str) -> tuple[torch.Tensor, int]:
        """Forward and backward of one step's batch (in ``grad_accum`` micro-batches; under ``nproc=K``, of
        this rank's share, gradients then summed over ranks): the batch's loss and its token count."""
        if self.grad_accum == 1 and distributed.world_size() == 1:
            return self.loss_and_backward(batch, task, description), self.count_tokens(batch)
        mine = distributed.share(len(batch))
        micro = [batch.select(range(start, min(start + self.batch_size, mine.stop)))
                 for start in range(mine.start, mine.stop, self.batch_size)]
        targets = [int((self.encode(part)["labels"][:, 1:] != IGNORE_INDEX).sum()) for part in micro]
        total, summed = max(distributed.total(sum(targets)), 1), torch.zeros(())
        for part, count in zip(micro, targets):
            summed = summed + self.loss_and_backward(part, task, description, count / total).cpu()
        distributed.sum_gradients(self.trainable_parameters())
        tokens = distributed.total(sum(self.count_tokens(part) for part in micro))
        return torch.tensor(distributed.total(float(summed))), int(tokens)

    def loss_and_backward(self, batch: Examples, task: Task, description: str, weight: float = 1.0) -> torch.Tensor:
        """weight x loss(batch), after its backward; hooks the loss entered into ``backward_hooks`` are removed
        once the backward is done."""
        try:
            with ExitStack() as self.backward_hooks:
                loss = self.loss(batch, task)
                if weight != 1.0:
                    loss = loss * weight
                self.check_finite(loss, description)
                loss.backward()
        finally:
            self.backward_hooks = None
        return loss.detach()

    def count_tokens(self, batch: Examples) -> int:
        """Tokens trained on in ``batch`` (prompt, answer and end-of-sequence; no padding), read off the
        step's encoding rather than tokenising the batch again."""
        return int(self.encode(batch)["attention_mask"].sum())

    def count_step(self, samples: int, loss, optimizer) -> None:
        super().count_step(samples, loss, optimizer)
        self._encoded = {}  # the step is over: its encodings are not needed again

    @torch.no_grad()
    def predict(self, prompts: list[str], max_new_tokens: int | list[int]) -> list[str]:
        """Greedy answers; under ``nproc=K`` each rank generates its share and every rank gets all."""
        self.eval()
        began = time.perf_counter()
        mine = distributed.share(len(prompts))
        limits = max_new_tokens if isinstance(max_new_tokens, int) else list(max_new_tokens)[mine.start:mine.stop]
        with self.autocast():
            texts, generated = self.backbone.generate(list(prompts)[mine.start:mine.stop], max_new_tokens=limits,
                                                      batch_size=self.generation_batch_size, device=self.device)
        if distributed.world_size() > 1:
            texts = [text for part in distributed.gather(texts) for text in part]
            generated = int(distributed.total(generated))
        self.tokens_generated += generated
        self.generation_seconds += time.perf_counter() - began
        return texts

    def get_extra_state(self):
        return {**super().get_extra_state(), "tokens_trained": self.tokens_trained,
                "tokens_generated": self.tokens_generated, "generation_seconds": self.generation_seconds}

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.tokens_trained, self.tokens_generated = state["tokens_trained"], state["tokens_generated"]
        self.generation_seconds = state["generation_seconds"]


class LoRAStrategy(LanguageModelStrategy):
    """The base LM frozen, one peft LoRA adapter (Hu et al., 2022) trained through the stream."""

    def __init__(self, backbone: LanguageModel, context: Context, *, lora_r: int = 8, lora_alpha: int = 16,
                 lora_dropout: float = 0.05, lora_targets: str = "q_proj,v_proj", **kwargs):
        super().__init__(backbone, context, **kwargs)
        self.lora_r, self.lora_alpha, self.lora_dropout = lora_r, lora_alpha, lora_dropout
        self.lora_targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
        backbone.model = add_lora(backbone.model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                                  targets=self.lora_targets)


def add_lora(model, *, r: int, alpha: float, dropout: float, targets: list[str], adapter_name: str = "default"):
    """Freeze ``model`` and wrap it in a peft LoRA model (B initialised to zero: identical outputs)."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise UserError(f"strategy.lora_r must be >= 1, got {r}")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing or not targets:
        raise UserError(f"strategy.lora_targets names modules this model lacks: {missing or targets}; "
                        f"its linear layers include {sorted(n for n in present if n.endswith('proj'))}")
    model.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config, adapter_name=adapter_name)

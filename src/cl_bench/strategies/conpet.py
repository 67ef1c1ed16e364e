"""ConPET: Continual Parameter-Efficient Tuning of large language models (Song et al., 2023,
arXiv:2309.14763), Static and Dynamic ConPET, adapted from class-incremental classification to
instruction streams answered by greedy generation. Registered as ``conpet_static`` and
``conpet_dynamic``; behaviour follows the authors' code (Raincleared-Song/ConPET) as the spec reads it.

**Dynamic replay** (both variants; the authors' ``CustomLoader``). At task t >= 2 every batch of size
B holds ``n_new = floor(B*rho/(rho+1))`` examples of the new task D_t, drawn uniformly without
replacement within the batch, and ``n_old = B - n_new`` old examples, each drawn as ``j ~ U{1..t-1}``
then ``x ~ U(O_j)`` from task j's stored pool O_j; the batch is shuffled and every batch is drawn
afresh. An epoch has ``S = floor(0.8*batch_limit)`` steps (``batch_limit_policy=constant``, the
authors' policy 2: training cost independent of t), ``floor(0.8*t*batch_limit)`` (``linear``, policy 1)
or is an ordinary shuffled epoch over D_t and all pools (``none``, policy 0, the "limitless"
ablation). The 0.8 stays because the authors' ``batch_limit`` includes a 20% validation budget, so
their per-dataset values carry over unchanged. Task 1 is an ordinary epoch over D_1. Pools:
``memory=full_history`` keeps every training example of every past task (the authors' ConPET runs);
``memory=random_exemplars`` keeps ``memory_per_task`` uniform examples per task.

**Static ConPET** (``conpet_static``): one LoRA on the frozen LM (r=4 on q_proj and k_proj only,
``lora_alpha=1`` so the scaling is 1/r as in loralib, no dropout) trained on dynamic-replay batches.
The paper's loss is the cross-entropy of a linear head over all classes on the mask-token state; its
generative analogue here is the per-example mean answer NLL averaged over the batch,
``L = -(1/B) sum_b (1/|a_b|) sum_k log p(a_b,k | prompt_b, a_b,<k)`` (one term per example, like the
head CE). Of the CL methods Static ConPET wraps (EMR, EA-EMR, CRL) this is EMR, plain rehearsal with the
task loss; EA-EMR's embedding alignment and CRL's contrastive terms are not implemented.

**Dynamic ConPET** (``conpet_dynamic``): one LoRA expert P_t per task (peft adapter ``expert_t``)
and a PET-module selector: a LoRA (adapter ``selector``) plus a linear head H_sel: R^d -> R^t over
task ids, reading the last-layer hidden state (after the final norm) at the last prompt token, the
generative analogue of the paper's mask token. Task 1 trains P_1 with the answer NLL. Task t >= 2,
as the authors' LLaMA path does it: one working LoRA (``expert_t``; fresh at t=2, a copy of P_{t-1}
at t >= 3 with ``selector_init=previous_expert``, or fresh every task with ``fresh``) and H_sel,
grown from t-1 to t rows with the old rows and biases copied bit for bit (two fresh rows at t=2),
are trained first with ``CE(H_sel(h(x)), task(x))`` on dynamic-replay batches, with a grad-norm clip
of 1.0 (``selector_grad_clip``); the LoRA is then copied into the frozen ``selector`` adapter, H_sel is
frozen, and the same LoRA tensors train on as expert t with the same AdamW (its moments carry over;
no clipping in this loop, like the authors' expert loop). Old experts are never in an optimizer and
stay bit-identical; the base LM stays frozen. Inference: the selector's top-1 task of each prompt,
on its own, picks the expert that generates it (expert 1 while it is the only one), so each prompt
costs one selector pass plus one expert's generation whatever t, whatever else shares its batch.

Budget (equal-budget policy). Under a declared budget (``budget.steps_per_task`` or ``samples_per_task``)
every task trains exactly that many optimizer steps (examples) whatever t, in as many epochs as it
takes; ``batch_limit_policy`` then only shapes the batches (dynamic replay, or plain epochs with
``none``), not how long a task trains. Without one, ``epochs`` x S steps per task as above; ``linear``
(policy 1, cost growing with t) is a labelled alternative (``protocol_switches``). Dynamic ConPET
splits a task t >= 2's budget: the selector phase gets half (rounded down), the expert phase the rest;
task 1 (no selector yet) spends it all on the expert. Samples count what entered a loss: whole batches
for the static LoRA and the selector, the new-task examples for an expert. ``examples_stored`` is the
size of the pools (everything seen under ``full_history``).

Optimiser (both variants, the authors' ``init_optimizer``): one AdamW per task (betas 0.9/0.999,
weight decay 0.01, eps 1e-4), no scheduler, no clipping outside the selector loop (``grad_clip=0``);
``late_lr``/``late_lr_from`` give their per-task learning rates (FewNERD: 5e-4 for tasks 1-2, then 1e-4).

Deviations, all forced by generation or by the harness:
* No per-task heads H_t, no logit assembly with -100 filling and no cached old-expert logits: an
  expert's answer comes from the frozen LM head. ``expert_topk`` must be 1: with k > 1 the paper
  concatenates k experts' logits over disjoint class sets into one softmax, and k generated texts
  have no such shared output space.
* Teacher forcing is built in. The authors' runs use k=1 with teacher forcing, so every training
  example reaches its own task's expert: old examples pass through frozen experts (loss terms
  without gradient) and the new expert learns only from new-task examples. What carries over is
  exactly that gradient: the expert-phase loss is ``(1/B) sum_{b in new} l_b``; old slots are drawn
  (same batch composition) but not forwarded, and the selector is not consulted while training experts.
* No model selection: the harness has no validation split, so each phase ends with its last weights
  (the authors keep the best epoch/step on a re-drawn replay subsample of their validation files).
* ``random_exemplars`` stands in for EMR's k-means exemplars of classifier-head outputs, which a
  generative model does not have.
* Every random draw (batches, LoRA A by kaiming-uniform with a=sqrt(5) as loralib and peft, new head
  rows as nn.Linear) uses the context's generator.
"""
from __future__ import annotations

import copy
import math
import re
import time

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.errors import UserError, check_ranges
from cl_bench.models.lm import IGNORE_INDEX, token_limits
from cl_bench.scenarios.base import Examples, Task
from cl_bench.strategies._helpers import IncrementalLinear
from cl_bench.strategies._language_model import LanguageModelStrategy, add_lora
from cl_bench.strategies.base import Budget

POLICIES = ("constant", "linear", "none")
MEMORIES = ("full_history", "random_exemplars")
ADAPTER_KEY = re.compile(r"\.lora_A\.([^.]+)\.weight$")


class _ConPET(LanguageModelStrategy):
    """What both variants share: the frozen LM with LoRA, the old-task pools, dynamic replay, the
    answer NLL and the authors' AdamW (weight decay 0.01, eps 1e-4, no scheduler)."""

    # constant: the authors' README runs (policy 2, cost independent of t); full_history: their pools
    protocol_switches = {"batch_limit_policy": "constant", "memory": "full_history"}
    data_parallel = False
    no_data_parallel = "its own loops draw each step's batch from the task pools"

    # the random tiny LLaMA barely learns through q/k LoRA at scaling 1/r: the smoke run raises lora_alpha
    smoke_args = ("scenario=instruct_toy", "model=tiny_llama", "strategy.lr=0.005", "strategy.batch_size=2",
                  "strategy.lora_alpha=16", "strategy.batch_limit=20")

    def __init__(self, backbone, context, *, epochs: int = 10, batch_size: int = 8, lr: float = 2e-4,
                 late_lr: float = 0.0, late_lr_from: int = 0, weight_decay: float = 0.01, adam_eps: float = 1e-4,
                 grad_clip: float = 0.0, batch_new_old_ratio: float = 1.0, batch_limit: int = 100,
                 batch_limit_policy: str = "constant", memory: str = "full_history", memory_per_task: int = 50,
                 lora_r: int = 4, lora_alpha: float = 1.0, lora_dropout: float = 0.0,
                 lora_targets: str = "q_proj,k_proj", **kwargs):
        super().__init__(backbone, context, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         grad_clip=grad_clip, **kwargs)
        if self.grad_accum != 1:
            raise UserError("ConPET does not support strategy.grad_accum: its own loops draw each step's batch from "
                            "the replay pools; raise strategy.batch_size instead")
        if batch_new_old_ratio <= 0 or int(batch_size * batch_new_old_ratio / (batch_new_old_ratio + 1)) < 1:
            raise UserError(f"strategy.batch_new_old_ratio must be > 0 and leave at least one new example per "
                            f"batch of {batch_size} (got {batch_new_old_ratio})")
        if batch_limit_policy not in POLICIES:
            raise UserError(f"strategy.batch_limit_policy must be one of {', '.join(POLICIES)}, "
                            f"got '{batch_limit_policy}'")
        if batch_limit_policy != "none" and int(0.8 * batch_limit) < 1:
            raise UserError(f"strategy.batch_limit must be >= 2 (0.8*batch_limit steps per epoch), got {batch_limit}")
        if memory not in MEMORIES:
            raise UserError(f"strategy.memory must be one of {', '.join(MEMORIES)}, got '{memory}'")
        if memory == "random_exemplars" and memory_per_task < 1:
            raise UserError(f"strategy.memory_per_task must be >= 1, got {memory_per_task}")
        check_ranges("strategy", late_lr=(late_lr, ">= 0"), adam_eps=(adam_eps, "> 0"),
                     weight_decay=(weight_decay, ">= 0"), grad_clip=(grad_clip, ">= 0"))
        if late_lr and late_lr_from < 1:
            raise UserError(f"strategy.late_lr needs strategy.late_lr_from >= 1 (the first task using it), "
                            f"got {late_lr_from}")
        self.late_lr, self.late_lr_from, self.adam_eps = late_lr, late_lr_from, adam_eps
        self.ratio, self.batch_limit, self.policy = batch_new_old_ratio, batch_limit, batch_limit_policy
        self.memory, self.memory_per_task = memory, memory_per_task
        self.n_new = int(batch_size * batch_new_old_ratio / (batch_new_old_ratio + 1))
        self.n_old = batch_size - self.n_new
        self.lora_targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
        self.lora_options = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=self.lora_targets)
        self.pools: list[Examples] = []  # training examples kept of each past task, in stream order

    # --- optimisation --------------------------------------------------------------------------

    def task_lr(self, t: int) -> float:
        """The authors' per-task learning rate: ``late_lr`` from task ``late_lr_from`` on (1-based)."""
        return self.late_lr if self.late_lr and self.late_lr_from and t >= self.late_lr_from else self.lr

    def make_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.lr if lr is None else lr,
                                 weight_decay=self.weight_decay, eps=self.adam_eps, betas=(0.9, 0.999))

    def step(self, optimizer, loss: torch.Tensor, description: str, clip: float) -> None:
        self.check_finite(loss, description)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), clip)
        optimizer.step()

    # --- dynamic replay --------------------------------------------------------------------------

    def steps_per_epoch(self, t: int) -> int:
        """S for task t >= 2 under the constant or linear policy."""
        return int(0.8 * (t if self.policy == "linear" else 1) * self.batch_limit)

    def replay_batch(self, new_size: int, pool_sizes: list[int]) -> list[tuple[int, int]]:
        """One dynamic-replay batch as (source, index) pairs; sources 0..t-2 are the old pools, t-1 the new task."""
        g = self.context.generator
        new_task = len(pool_sizes)
        draws = torch.randperm(new_size, generator=g)
        while len(draws) < self.n_new:  # a task smaller than n_new: repeat it (the authors' loader would fail)
            draws = torch.cat([draws, torch.randperm(new_size, generator=g)])
        batch = [(new_task, int(i)) for i in draws[: self.n_new]]
        for _ in range(self.n_old):
            j = int(torch.randint(len(pool_sizes), (1,), generator=g))
            batch.append((j, int(torch.randint(pool_sizes[j], (1,), generator=g))))
        return [batch[i] for i in torch.randperm(len(batch), generator=g).tolist()]

    def epoch_plan(self, sizes: list[int]) -> list[list[tuple[int, int]]]:
        """The batches of one epoch over sources of ``sizes`` (old pools first, the new task last)."""
        if len(sizes) == 1 or self.policy == "none":
            pairs = [(s, i) for s, size in enumerate(sizes) for i in range(size)]
            order = torch.randperm(len(pairs), generator=self.context.generator).tolist()
            return [[pairs[k] for k in order[i:i + self.batch_size]] for i in range(0, len(order), self.batch_size)]
        return [self.replay_batch(sizes[-1], sizes[:-1]) for _ in range(self.steps_per_epoch(len(sizes)))]

    def epochs_of(self, task: Task, phase: str = "", budget: Budget | None = None):
        """(description, batch as (source, index) pairs, sources) over all epochs of ``task``, or until
        ``budget`` (default: the context's) is spent; the sources are the old pools, then the task's own
        training examples."""
        sources = self.pools + [task.train]
        for epoch in self.training_epochs(self.epochs, budget):
            description = f"{task.name}{phase} epoch {epoch + 1}"
            plan = self.epoch_plan([len(s) for s in sources])
            for batch in self.context.progress(plan, description, total=len(plan)):
                if self.budget_spent():
                    break
                yield description, batch, sources

    @staticmethod
    def gather(sources: list[Examples], batch: list[tuple[int, int]]) -> Examples:
        return Examples([sources[s].prompts[i] for s, i in batch], [sources[s].answers[i] for s, i in batch],
                        tuple(sources[s].references[i] for s, i in batch))

    def after_task(self, task: Task) -> None:
        kept = task.train
        if self.memory == "random_exemplars":
            chosen = torch.randperm(len(kept), generator=self.context.generator)[: self.memory_per_task]
            kept = kept.select(chosen.sort().values)
        self.pools.append(kept)

    # --- the answer NLL ----------------------------------------------------------------------------

    def answer_nll(self, batch: Examples) -> torch.Tensor:
        """Per-example mean negative log-likelihood of the answer tokens (and end-of-sequence), shape (B,)."""
        encoded = self.encode(batch)
        with self.autocast():
            logits = self.lm(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
        labels = encoded["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                              reduction="none")
        answer = labels != IGNORE_INDEX
        return (nll * answer).sum(1) / answer.sum(1).clamp(min=1)

    def examples_stored(self) -> int:
        return sum(len(pool) for pool in self.pools)

    def get_extra_state(self):
        return {**super().get_extra_state(), "pools": [pool.state() for pool in self.pools]}

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.pools = [Examples.from_state(pool) for pool in state["pools"]]


class ConPETStatic(_ConPET):
    """Static ConPET: one shared LoRA trained with dynamic replay over all past tasks' data."""

    description = "ConPET static: one shared LoRA (r=4 on q,k) trained with dynamic replay of past tasks"

    def __init__(self, backbone, context, **kwargs):
        super().__init__(backbone, context, **kwargs)
        backbone.model = add_lora(backbone.model, **self.lora_options)

    def learn(self, task: Task) -> None:
        self.train()
        optimizer = self.make_optimizer(self.task_lr(len(self.pools) + 1))
        for description, batch, sources in self.epochs_of(task):
            examples = self.gather(sources, batch)
            loss = self.answer_nll(examples).mean()
            self.step(optimizer, loss, description, self.grad_clip)
            self.tokens_trained += self.count_tokens(examples)
            self.count_step(len(examples), loss, optimizer)


class ConPETDynamic(_ConPET):
    """Dynamic ConPET: a LoRA expert per task and a selector (LoRA + task-id head) that picks one."""

    description = "ConPET dynamic: one LoRA expert per task, a LoRA+head selector picks the expert that answers"

    def __init__(self, backbone, context, *, expert_topk: int = 1, selector_grad_clip: float = 1.0,
                 selector_init: str = "previous_expert", **kwargs):
        super().__init__(backbone, context, **kwargs)
        if expert_topk != 1:
            raise UserError(f"strategy.expert_topk must be 1 for generated answers: the paper's top-k mixes k experts' "
                            f"class logits in one softmax, which k generated texts do not have (got {expert_topk})")
        if selector_init not in ("previous_expert", "fresh"):
            raise UserError(f"strategy.selector_init must be previous_expert or fresh, got '{selector_init}'")
        if selector_grad_clip < 0:
            raise UserError(f"strategy.selector_grad_clip must be >= 0, got {selector_grad_clip}")
        self.expert_topk, self.selector_grad_clip, self.selector_init = expert_topk, selector_grad_clip, selector_init
        backbone.model = add_lora(backbone.model, adapter_name="expert_1", **self.lora_options)
        self.lora_config = self.lm.peft_config["expert_1"]
        self.selector_head = IncrementalLinear(backbone.out_dim)
        self.selector_head.requires_grad_(False)

    # --- adapters ------------------------------------------------------------------------------

    @property
    def experts(self) -> int:
        return sum(name.startswith("expert_") for name in self.lm.peft_config)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for n, p in self.lm.named_parameters() if f".{name}." in n]

    def ensure_adapter(self, name: str) -> None:
        if name not in self.lm.peft_config:
            self.lm.add_adapter(name, copy.deepcopy(self.lora_config))
            for p in self.adapter_parameters(name):
                p.requires_grad_(False)

    @torch.no_grad()
    def init_adapter(self, name: str, copy_from: str | None = None) -> None:
        """A fresh LoRA (A kaiming-uniform with a=sqrt(5), B zero) or a copy of adapter ``copy_from``."""
        for (key, p), (_, q) in zip(self.named_adapter(name), self.named_adapter(copy_from or name)):
            if copy_from:
                p.copy_(q)
            elif ".lora_A." in key:
                fresh = torch.empty(p.shape)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=self.context.generator)
                p.copy_(fresh)
            else:
                p.zero_()

    def named_adapter(self, name: str) -> list[tuple[str, nn.Parameter]]:
        pairs = [(n.replace(f".{name}.", ".*."), (n, p)) for n, p in self.lm.named_parameters() if f".{name}." in n]
        return [pair for _, pair in sorted(pairs, key=lambda item: item[0])]

    @torch.no_grad()
    def grow_head(self, rows: int) -> None:
        """H_sel to ``rows`` outputs: old rows and biases copied, new ones drawn like nn.Linear's."""
        head, added = self.selector_head, rows - self.selector_head.out_features
        if added <= 0:
            return
        bound = 1.0 / math.sqrt(head.in_features)
        fresh = torch.rand(added, head.in_features + 1, generator=self.context.generator) * 2 * bound - bound
        fresh = fresh.to(head.weight.device)
        head.weight = nn.Parameter(torch.cat([head.weight.data, fresh[:, :-1]]))
        head.bias = nn.Parameter(torch.cat([head.bias.data, fresh[:, -1]]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # experts and the selector created after construction come back before their tensors load
        for key in sorted(state_dict):
            match = ADAPTER_KEY.search(key) if key.startswith(prefix) else None
            if match:
                self.ensure_adapter(match.group(1))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- training ------------------------------------------------------------------------------

    def before_task(self, task: Task) -> None:
        t = len(self.pools) + 1
        name = f"expert_{t}"
        self.ensure_adapter(name)
        self.init_adapter(name, f"expert_{t - 1}" if t >= 3 and self.selector_init == "previous_expert" else None)
        self.requires_grad_(False)
        for p in self.adapter_parameters(name):
            p.requires_grad_(True)
        if t >= 2:
            self.grow_head(t)
            self.selector_head.requires_grad_(True)

    def learn(self, task: Task) -> None:
        t = len(self.pools) + 1
        name = f"expert_{t}"
        self.train()
        self.lm.set_adapter(name)  # trainable; peft freezes every other adapter
        optimizer = self.make_optimizer(self.task_lr(t))  # one AdamW per task, shared by both phases
        selector_budget, expert_budget = self.phase_budgets() if t >= 2 else (None, None)
        if t >= 2:
            for description, batch, sources in self.epochs_of(task, " selector", selector_budget):
                examples = self.gather(sources, batch)
                logits = self.selector_head(self.prompt_features(examples.prompts))
                labels = torch.tensor([s for s, _ in batch], device=logits.device)
                loss = F.cross_entropy(logits, labels)
                self.step(optimizer, loss, description, self.selector_grad_clip)
                self.count_step(len(examples), loss, optimizer)
            self.ensure_adapter("selector")
            self.init_adapter("selector", name)
            self.selector_head.requires_grad_(False)
        for description, batch, sources in self.epochs_of(task, " expert" if t >= 2 else "", expert_budget):
            # top-1 with teacher forcing: only new-task examples reach the trainable expert
            new = [pair for pair in batch if pair[0] == t - 1]
            if not new:
                continue
            examples = self.gather(sources, new)
            loss = self.answer_nll(examples).sum() / len(batch)
            self.step(optimizer, loss, description, self.grad_clip)
            self.tokens_trained += self.count_tokens(examples)
            self.count_step(len(examples), loss, optimizer)  # the old slots are drawn but never forwarded

    def phase_budgets(self) -> tuple[Budget | None, Budget | None]:
        """(selector, expert) parts of a task's budget at t >= 2: the selector gets half, rounded down."""
        budget = self.context.budget
        if budget is None:
            return None, None
        if budget.steps_per_task is not None:
            half = budget.steps_per_task // 2
            return Budget(steps_per_task=half), Budget(steps_per_task=budget.steps_per_task - half)
        half = budget.samples_per_task // 2
        return Budget(samples_per_task=half), Budget(samples_per_task=budget.samples_per_task - half)

    def prompt_features(self, prompts: list[str]) -> torch.Tensor:
        """Last-layer hidden state (after the final norm) at each prompt's last token, through the active adapter."""
        ids = [p[-self.backbone.max_length:] for p in self.backbone.prompt_ids(prompts)]
        width, pad = max(len(p) for p in ids), self.backbone.tokenizer.pad_token_id
        input_ids = torch.tensor([p + [pad] * (width - len(p)) for p in ids], device=self.device)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in ids], device=self.device)
        with self.autocast():
            hidden = self.lm.get_base_model().get_decoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
        self.tokens_trained += int(mask.sum()) if self.training else 0
        return hidden[torch.arange(len(ids), device=self.device), mask.sum(1) - 1].float()

    # --- inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def select_experts(self, prompts: list[str]) -> list[int]:
        """The selector's top-1 task (0-based) for each prompt; task 0 while only one expert exists."""
        if "selector" not in self.lm.peft_config:
            return [0] * len(prompts)
        self.eval()
        self.lm.set_adapter("selector", inference_mode=True)
        chosen = []
        for start in range(0, len(prompts), self.generation_batch_size):
            features = self.prompt_features(prompts[start:start + self.generation_batch_size])
            chosen += self.selector_head(features).argmax(1).tolist()
        return chosen

    def predict(self, prompts: list[str], max_new_tokens: int | list[int]) -> list[str]:
        began = time.perf_counter()
        chosen = self.select_experts(list(prompts))
        self.generation_seconds += time.perf_counter() - began  # routing is part of the inference cost
        limits = token_limits(max_new_tokens, len(chosen))
        outputs = [""] * len(chosen)
        for expert in sorted(set(chosen)):
            rows = [i for i, c in enumerate(chosen) if c == expert]
            self.lm.set_adapter(f"expert_{expert + 1}", inference_mode=True)
            texts = super().predict([prompts[i] for i in rows], [limits[i] for i in rows])
            for row, text in zip(rows, texts):
                outputs[row] = text
        return outputs

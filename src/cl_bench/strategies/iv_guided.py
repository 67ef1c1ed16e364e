"""IV/FV-guided training: Jiang et al., "Interpretable Catastrophic Forgetting of LLM Fine-tuning via
Instruction Vector" (arXiv:2406.12227; ICLR 2025 version "Unlocking the Power of Function Vectors for
Characterizing and Mitigating Catastrophic Forgetting in Continual Instruction Tuning"), following the
released code (GangweiJiang/FvForgetting), where the instruction vector (IV) is the function vector (FV).

Function vector of task t, from the ORIGINAL base model (before any continual training):
    ā_{l,h} = mean over N = min(n_trials, |train|) training prompts of head h's slice (size d_head) of the
              input of o_proj in layer l, at the last prompt token (zero-shot prompts);
    v_t     = Σ_{(l,h)∈S} o_proj_l(pad_h(ā_{l,h}))  ∈ R^{d_model}  (pad_h: zeros except head h's slice).
Training on task t: the LoRAs of tasks < t are merged into the base weights, so the model with adapters
disabled is θ_{t−1}; a fresh LoRA (r=8, α=16, dropout 0.1 on q_proj, v_proj) trains with, per batch
(p_b = last prompt token = first answer position − 1):
    A: no grad, adapters disabled, v_t added to o_proj's output of layer ℓ_edit at p_b only -> z^ref
    B: no grad, adapters disabled, no hook -> head outputs a^ref_{l,h} at p_b (stopped once the deepest
       head in S is read: no later layer and no logits, the same values for less compute)
    main pass -> L_CE, logits z, head outputs a_{l,h} at p_b
    L = L_CE + λ1·1[K1>0.1]·K1 + λ2·1[K2>0.1]·K2 + Σ_{(l,h)∈S} λ_pr·1[M_{l,h}>0.01]·M_{l,h}
    K1 = KL(softmax(z_{b,p_b}/T) ‖ softmax(z^ref_{b,p_b}/T)) summed over the vocabulary, / B   (T = 2, no T²)
    K2 = the same over all positions, padding included, / B   (``F.kl_div(..., reduction="batchmean")``)
    M_{l,h} = mean over batch and d_head of (a_{l,h}[b,p_b] − a^ref_{l,h}[b,p_b])²
KL direction as the released ``KD_loss``: ``kl_div(log_softmax(z_ref/T), softmax(z/T))`` = KL(new ‖ ref),
the gradient flowing through the new model's distribution.

Choices and deviations, all deliberate:
* Original weights: merges change only the LoRA target linears (q_proj, v_proj by default), so the
  strategy keeps a copy of just those weights as non-persistent buffers (2·L·d² values for q, v) and
  extracts each task's vector with them substituted (``torch.func.functional_call``) and adapters off,
  instead of a second full model. The copy is rebuilt from the model factory on resume.
* Head set S (``heads``, "layer:head,..."): empty means the authors' published universal list when the
  model's source names Llama-2-7b, Llama-3.1-8B or Mistral-7B. Otherwise ``head_selection`` picks the
  ``top_heads`` (default 10) heads:
  - ``aie`` (default, the paper's Sec. 3 rule as in the authors' ``compute_indirect_effect.py``): the
    average indirect effect. Corrupted prompts are ``aie_trials`` training queries, each after
    ``aie_shots`` training demonstrations whose answers are shuffled among them; for each (l, h) the
    query's last-token input of o_proj_l gets head h's slice replaced by ā_{l,h} (the original model,
    as for the vector), and the effect is the rise of the gold first answer token's probability over
    the unpatched corrupted prompt, averaged over the queries. Their universal list averages the
    effect over all tasks; a stream cannot see its later tasks, so S_t is the top of the average over
    tasks 1..t (recomputed at each task, kept in checkpoints). The authors' trials are 25 with 10
    shots; the defaults here (16 trials, 4 shots) are CPU-sized. A patch at the last token changes no
    earlier position, so the prefix runs once with a KV cache and each head costs one single-token
    pass (L·H of them per task).
  - ``output_norm``: the heads whose mean output o_proj_l(pad_h(ā_{l,h})) has the largest L2 norm,
    chosen once on the first task (a cheap harness fallback, no causal test). It favours heads with
    large outputs, often late layers: on SmolLM2-135M it picks layers 23-29 and |v| is in the hundreds.
* Vector scale (``vector_scale``): ``none`` (default) is the raw vector, as the paper and code use it.
  ``residual_norm``, a harness option for the ``output_norm`` heads, rescales v_t to ||v_t|| = r̄, the
  mean over the same N prompts of the residual-stream norm that v_t joins (the input of layer ℓ_edit plus
  its attention output, at the last prompt token). Measured on SmolLM2-135M, instruct_offline
  ``category`` (benchmarks/iv_vector_check.py; r̄ ≈ 86): with the AIE heads the raw ||v_t|| ≈ 71 and
  pass A's probability of the gold first answer token rises from 0.015 to 0.041 (K1 at step 0: 0.22);
  with the ``output_norm`` heads ||v_t|| ≈ 258 and it falls to 1e-5 (K1 1.1, which pulls the model away
  from the task: the leaderboard's failed rows before AIE), or to 0.0025 scaled to r̄.
* The N prompts (drawn with the context's generator) are the task's training prompts as the harness
  renders them (the model's chat template when it has one), not the authors' "N"-prefix format.
* ℓ_edit (``edit_layer``): the released runs use 9 of Llama-2's 32 layers; ``edit_layer=-1`` (default)
  takes round(9·L/32) for an L-layer model.
* ``progressive_intervention=true`` (the default, as in the papers) adds γ_s·v_t at (ℓ_edit, p_b) in the
  main pass, γ_s falling linearly from 1 to 0 over the task's steps (a declared budget's steps when there
  is one): the v1/v3 papers' "progressive IV intervention". It is absent from the released code
  (``false`` reproduces the code, flagged on the leaderboard) and its schedule is an assumption.
* KL terms are computed in float32; a prompt cut away entirely (answer fills max_length) uses p_b = 0.
* Constant learning rate, plain PyTorch with gradient clipping (theirs: DeepSpeed ZeRO-2, bf16).
"""
from __future__ import annotations

import math
import re
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.errors import UserError, check_ranges
from cl_bench.models.lm import IGNORE_INDEX
from cl_bench.scenarios.base import Task
from cl_bench.strategies._language_model import LanguageModelStrategy, add_lora

KL_GATE, MSE_GATE = 0.1, 0.01
O_PROJ = re.compile(r"layers\.(\d+)\.self_attn\.o_proj$")
# the authors' universal heads (layer, head), from their trainer, matched on the model's name
PUBLISHED_HEADS = {
    "llama-2-7b": [(14, 1), (11, 2), (9, 25), (12, 15), (12, 28), (13, 7), (11, 18), (12, 18), (16, 10), (14, 16)],
    "llama-3.1-8b": [(27, 28), (13, 27), (15, 28), (17, 8), (21, 2), (10, 12), (15, 16), (15, 2), (15, 1), (31, 24)],
    "mistral-7b": [(14, 31), (26, 29), (12, 4), (12, 7), (30, 4), (30, 9), (22, 30), (14, 19), (11, 10), (18, 1)],
}


class HeadsCaptured(Exception):
    """Ends reference pass B at the deepest selected head: nothing after it is needed."""


def kd_loss(new_logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(new/T) ‖ softmax(ref/T)) summed over the rest, divided by the batch size (dim 0).

    The released KD_loss passes softmax(new/T) as the target; here both sides are log-probabilities
    (``log_target=True``): the same value without taking the log of a softmax again, 2.1-2.5x faster forward and
    backward over an 8 x 128 x 49,152 batch of logits on the CPU (K2 over every position was ~18% of a step)."""
    return F.kl_div(F.log_softmax(ref_logits.float() / temperature, dim=-1),
                    F.log_softmax(new_logits.float() / temperature, dim=-1), reduction="batchmean", log_target=True)


def gated(weight: float, value: torch.Tensor, gate: float) -> torch.Tensor:
    """weight·value when value > gate, else 0 (the term is switched off once it is small)."""
    return weight * value if weight and bool(value > gate) else value.new_zeros(())


def parse_heads(text: str) -> list[tuple[int, int]]:
    try:
        heads = [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item.strip()]
    except ValueError:
        heads = [()]
    if not heads or any(len(h) != 2 for h in heads):
        raise UserError(f"strategy.heads must look like 'layer:head,layer:head', got '{text}'")
    return heads


class IVGuided(LanguageModelStrategy):
    description = "IV/FV-guided training: per-task LoRA merged afterwards, FV-intervened KL + head consistency"
    # the papers' values: progressive intervention (off = the released code), AIE heads, the raw vector
    protocol_switches = {"progressive_intervention": True, "head_selection": "aie", "vector_scale": "none"}
    vector_scales = ("residual_norm", "none")
    head_selections = ("aie", "output_norm")

    def __init__(self, backbone, context, *, lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.1,
                 lora_targets: str = "q_proj,v_proj", kl_alpha1: float = 20.0, kl_alpha2: float = 0.1,
                 pr_alpha: float = 1.0, temperature: float = 2.0, edit_layer: int = -1, heads: str = "",
                 top_heads: int = 10, n_trials: int = 100, progressive_intervention: bool = True,
                 vector_scale: str = "none", head_selection: str = "aie", aie_trials: int = 16,
                 aie_shots: int = 4, **kwargs):
        super().__init__(backbone, context, **kwargs)
        check_ranges("strategy", kl_alpha1=(kl_alpha1, ">= 0"), kl_alpha2=(kl_alpha2, ">= 0"),
                     pr_alpha=(pr_alpha, ">= 0"), temperature=(temperature, "> 0"), n_trials=(n_trials, ">= 1"),
                     top_heads=(top_heads, ">= 1"), aie_trials=(aie_trials, ">= 1"), aie_shots=(aie_shots, ">= 0"))
        if vector_scale not in self.vector_scales:
            raise UserError(f"strategy.vector_scale must be one of {', '.join(self.vector_scales)}, "
                            f"got '{vector_scale}'")
        if head_selection not in self.head_selections:
            raise UserError(f"strategy.head_selection must be one of {', '.join(self.head_selections)}, "
                            f"got '{head_selection}'")
        self.vector_scale, self.head_selection = vector_scale, head_selection
        self.aie_trials, self.aie_shots = aie_trials, aie_shots
        self.kl_alpha1, self.kl_alpha2, self.pr_alpha = kl_alpha1, kl_alpha2, pr_alpha
        self.temperature, self.n_trials, self.top_heads = temperature, n_trials, top_heads
        self.progressive_intervention = progressive_intervention
        model = backbone.model
        found = self.find_o_projs(model)
        self.num_layers, config = len(found), model.config
        self.num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.edit_layer = round(9 * self.num_layers / 32) if edit_layer == -1 else edit_layer
        if not 0 <= self.edit_layer < self.num_layers:
            raise UserError(f"strategy.edit_layer must be -1 (auto) or in [0, {self.num_layers}), got {edit_layer}")
        self.heads = parse_heads(heads) if heads.strip() else self.published_heads()
        self.heads_given = self.heads is not None
        self.effect_total = torch.zeros(self.num_layers, self.num_heads, dtype=torch.float64)  # Σ_t AIE_t
        self.effect_tasks = 0
        for layer, head in self.heads or ():
            if not (0 <= layer < self.num_layers and 0 <= head < self.num_heads):
                raise UserError(f"strategy.heads: ({layer}, {head}) is outside this model's "
                                f"{self.num_layers} layers x {self.num_heads} heads")
        targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
        backbone.model = add_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=targets)
        self.o_projs = self.find_o_projs(self.lm)  # a plain list: the modules stay where they are
        self.lora_layers = [m for m in self.lm.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
        # the original weights of everything a merge changes (the LoRA targets' base weights)
        self.original = nn.Module()
        for index, layer in enumerate(self.lora_layers):
            self.original.register_buffer(f"w{index}", layer.get_base_layer().weight.detach().clone(),
                                          persistent=False)
        base = {id(p): n for n, p in self.lm.named_parameters()}
        self.original_names = [base[id(layer.get_base_layer().weight)] for layer in self.lora_layers]
        self.function_vector: torch.Tensor | None = None
        self.function_vectors: list[torch.Tensor] = []  # one per task, for inspection
        self.last_terms: dict[str, float] = {}
        self._step = self._steps_total = 0

    @staticmethod
    def find_o_projs(model) -> list:
        found = {int(m.group(1)): module for name, module in model.named_modules() if (m := O_PROJ.search(name))}
        if not found or sorted(found) != list(range(len(found))):
            raise UserError("strategy iv_guided needs a LLaMA-style model (layers.N.self_attn.o_proj)")
        return [found[i] for i in range(len(found))]

    def published_heads(self) -> list[tuple[int, int]] | None:
        source = str(self.backbone.preprocessing.get("source", "")).lower()
        return next((list(h) for key, h in PUBLISHED_HEADS.items() if key in source), None)

    # --- hooks ---------------------------------------------------------------------------------
    @contextmanager
    def captured_heads(self, layers, rows: torch.Tensor, positions: torch.Tensor, *, stop: bool = False):
        """{layer: o_proj input (B, H·d_head) at (rows, positions)} for the forward passes inside; with
        ``stop`` the deepest layer's hook raises HeadsCaptured once it has stored its heads."""
        store, handles = {}, []
        deepest = max(layers, default=None)
        for layer in sorted(set(layers)):
            def hook(module, args, layer=layer):
                store[layer] = args[0][rows, positions]
                if stop and layer == deepest:
                    raise HeadsCaptured
            handles.append(self.o_projs[layer].register_forward_pre_hook(hook))
        try:
            yield store
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def captured_attention_output(self, rows: torch.Tensor, positions: torch.Tensor):
        """{"output": o_proj's output in layer ``edit_layer`` (B, d_model) at (rows, positions)}."""
        store = {}
        handle = self.o_projs[self.edit_layer].register_forward_hook(
            lambda module, args, output: store.__setitem__("output", output[rows, positions]))
        try:
            yield store
        finally:
            handle.remove()

    @contextmanager
    def added_vector(self, vector: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, scale: float = 1.0):
        """Adds scale·vector to the output of o_proj in layer ``edit_layer`` at (rows, positions) only."""
        def hook(module, args, output):
            added = (scale * vector).to(output.dtype).expand(len(rows), -1)
            return output.index_put((rows, positions), added, accumulate=True)
        handle = self.o_projs[self.edit_layer].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    # --- the function vector -------------------------------------------------------------------
    def original_weights(self) -> dict[str, torch.Tensor]:
        """{parameter name in the LM: its value before any merge}, for the weights merges change."""
        return {name: getattr(self.original, f"w{i}") for i, name in enumerate(self.original_names)}

    def original_forward(self, **inputs):
        """The original base model (adapters off, target weights before any merge)."""
        with self.lm.disable_adapter():
            return torch.func.functional_call(self.lm, self.original_weights(), args=(), kwargs=inputs)

    @torch.no_grad()
    def mean_head_activations(self, task: Task) -> tuple[torch.Tensor, float]:
        """ā of every (layer, head): (L, H, d_head), at the last prompt token of N training prompts, and
        r̄, the mean norm there of the residual stream that v_t joins (layer ℓ_edit's input + attention)."""
        count = min(self.n_trials, len(task.train))
        chosen = torch.randperm(len(task.train), generator=self.context.generator)[:count].sort().values
        prompts = [task.train.prompts[i] for i in chosen.tolist()]
        total = torch.zeros(self.num_layers, self.num_heads * self.head_dim, dtype=torch.float64, device=self.device)
        residual_norms = 0.0
        was_training = self.training
        self.eval()
        for start in range(0, count, self.generation_batch_size):
            chunk = prompts[start:start + self.generation_batch_size]
            ids = [p[-self.backbone.max_length:] for p in self.backbone.prompt_ids(chunk)]
            width, pad = max(len(i) for i in ids), self.backbone.tokenizer.pad_token_id
            input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=self.device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=self.device)
            rows = torch.arange(len(ids), device=self.device)
            last = torch.tensor([len(i) - 1 for i in ids], device=self.device)
            with self.captured_heads(range(self.num_layers), rows, last) as store, \
                    self.captured_attention_output(rows, last) as attention, self.autocast():
                output = self.original_forward(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            for layer in range(self.num_layers):
                total[layer] += store[layer].double().sum(0)
            residual = output.hidden_states[self.edit_layer][rows, last] + attention["output"]
            residual_norms += float(residual.double().norm(dim=-1).sum())
        self.train(was_training)
        return (total / count).float().view(self.num_layers, self.num_heads, self.head_dim), residual_norms / count

    def head_outputs(self, means: torch.Tensor) -> torch.Tensor:
        """o_proj_l(pad_h(ā_{l,h})) for every (l, h): (L, H, d_model), with the original o_proj weights."""
        originals = self.original_weights()
        names = {id(m): n for n, m in self.lm.named_modules()}
        outputs = []
        for layer, o_proj in enumerate(self.o_projs):
            base = o_proj.get_base_layer() if hasattr(o_proj, "get_base_layer") else o_proj
            weight = originals.get(names[id(base)] + ".weight", base.weight)
            padded = weight.new_zeros(self.num_heads, self.num_heads, self.head_dim)  # row h: pad_h(ā_{l,h})
            padded[range(self.num_heads), range(self.num_heads)] = means[layer].to(weight)
            outputs.append(F.linear(padded.view(self.num_heads, -1), weight, base.bias))
        return torch.stack(outputs)

    def largest_output_heads(self, means: torch.Tensor) -> list[tuple[int, int]]:
        """The ``output_norm`` head set: the top_heads heads with the largest mean output norm."""
        return self.top(self.head_outputs(means).norm(dim=-1))

    def top(self, scores: torch.Tensor) -> list[tuple[int, int]]:
        top = scores.flatten().topk(min(self.top_heads, scores.numel())).indices.tolist()
        return [(i // self.num_heads, i % self.num_heads) for i in top]

    @contextmanager
    def patched_head(self, layer: int, head: int, value: torch.Tensor):
        """Replaces head ``head``'s slice of o_proj's input in ``layer`` by ``value`` at the last position."""
        part = slice(head * self.head_dim, (head + 1) * self.head_dim)

        def hook(module, args):
            patched = args[0].clone()
            patched[:, -1, part] = value.to(patched.dtype)
            return (patched, *args[1:])
        handle = self.o_projs[layer].register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def corrupted_prompts(self, task: Task) -> tuple[list[list[int]], list[int]]:
        """``aie_trials`` training queries, each after ``aie_shots`` demonstrations (prompt, answer, eos)
        whose answers are shuffled among them, as token ids; and each query's gold first answer token."""
        train, generator = task.train, self.context.generator
        tokenizer, eos = self.backbone.tokenizer, self.backbone.tokenizer.eos_token_id
        queries = torch.randperm(len(train), generator=generator)[:min(self.aie_trials, len(train))].tolist()
        prompts, golds = [], []
        for query in queries:
            others = [i for i in torch.randperm(len(train), generator=generator).tolist() if i != query]
            demos = others[:self.aie_shots]
            answers = [train.answers[demos[i]] for i in torch.randperm(len(demos), generator=generator).tolist()]
            ids = []
            for demo, answer in zip(demos, answers):
                ids += self.backbone.prompt_ids([train.prompts[demo]])[0]
                ids += tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
            ids += self.backbone.prompt_ids([train.prompts[query]])[0]
            gold = tokenizer(train.answers[query], add_special_tokens=False)["input_ids"]
            prompts.append(ids[-self.backbone.max_length:])
            golds.append(gold[0] if gold else eos)
        return prompts, golds

    @torch.no_grad()
    def indirect_effects(self, task: Task, means: torch.Tensor) -> torch.Tensor:
        """AIE of every head (L, H) on ``task``: mean over the corrupted prompts of
        P(gold | head (l, h)'s last-token output replaced by ā_{l,h}) − P(gold | corrupted)."""
        prompts, golds = self.corrupted_prompts(task)
        input_ids, mask = self.backbone.left_padded(prompts, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rows, gold = torch.arange(len(prompts), device=self.device), torch.tensor(golds, device=self.device)
        was_training = self.training
        self.eval()
        with self.autocast():
            cache = self.original_forward(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1],
                                          position_ids=positions[:, :-1], use_cache=True,
                                          logits_to_keep=1).cache

            def gold_probability() -> torch.Tensor:
                logits = self.original_forward(input_ids=input_ids[:, -1:], attention_mask=mask,
                                               position_ids=positions[:, -1:], cache=cache,
                                               use_cache=True).logits[:, -1]
                cache.crop(-1)  # back to the prefix for the next head
                return logits.float().softmax(-1)[rows, gold].double()
            corrupted = gold_probability()
            effects = torch.zeros(self.num_layers, self.num_heads, dtype=torch.float64)
            for layer in range(self.num_layers):
                for head in range(self.num_heads):
                    with self.patched_head(layer, head, means[layer, head]):
                        effects[layer, head] = float((gold_probability() - corrupted).mean())
        self.train(was_training)
        return effects

    def vector_from_means(self, means: torch.Tensor) -> torch.Tensor:
        """The raw v_t = Σ_{(l,h)∈S} o_proj_l(pad_h(ā_{l,h})) (paper Sec. 3)."""
        outputs = self.head_outputs(means)
        return torch.stack([outputs[layer, head] for layer, head in self.heads]).sum(0)

    def scaled(self, vector: torch.Tensor, residual_norm: float) -> torch.Tensor:
        """v_t as used: raw (``none``) or rescaled to the residual norm r̄ (``residual_norm``)."""
        norm = float(vector.norm())
        if self.vector_scale == "none" or norm == 0:
            return vector
        return vector * (residual_norm / norm)

    # --- task loop -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge_and_reset(self) -> None:
        """Merge the current LoRA into the base weights, then start a fresh one (A ~ Kaiming, B = 0)."""
        for layer in self.lora_layers:
            base = layer.get_base_layer()
            base.weight += layer.get_delta_weight("default").to(base.weight.dtype)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            fresh = torch.empty(a.shape, dtype=a.dtype)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=self.context.generator)
            a.copy_(fresh)
            b.zero_()

    def before_task(self, task: Task) -> None:
        self.merge_and_reset()
        means, residual_norm = self.mean_head_activations(task)
        if not self.heads_given and self.head_selection == "aie":
            self.effect_total += self.indirect_effects(task, means).cpu()
            self.effect_tasks += 1
            self.heads = self.top(self.effect_total / self.effect_tasks)
        elif self.heads is None:
            self.heads = self.largest_output_heads(means)
        self.function_vector = self.scaled(self.vector_from_means(means), residual_norm).detach()
        self.function_vectors.append(self.function_vector.cpu())

    def learn(self, task: Task) -> None:
        count, size = len(self.training_data(task)), self.step_batch_size
        window = 32 * size
        steps_per_epoch = sum(math.ceil(min(window, count - s) / size) for s in range(0, count, window))
        self._steps_total = self.planned_steps(self.epochs, steps_per_epoch, size)
        self._step = 0
        super().learn(task)

    def after_optimizer_step(self) -> None:
        self._step += 1

    @contextmanager
    def reference_pass(self):
        """No gradient, adapters disabled (the model after task t-1); adapters come back on exit."""
        with torch.no_grad(), self.lm.disable_adapter(), self.autocast():
            yield

    def loss(self, batch, task: Task) -> torch.Tensor:
        encoded = self.encode(batch)
        inputs = {k: encoded[k] for k in ("input_ids", "attention_mask")}
        rows = torch.arange(len(batch), device=self.device)
        positions = ((encoded["labels"] != IGNORE_INDEX).int().argmax(1) - 1).clamp(min=0)
        vector, layers = self.function_vector, [layer for layer, _ in self.heads]
        ref_logits = ref_heads = None
        if self.kl_alpha1 or self.kl_alpha2:  # A: θ_{t-1} with v_t added at (ℓ_edit, p_b)
            with self.reference_pass(), self.added_vector(vector, rows, positions):
                ref_logits = self.lm(**inputs).logits
        if self.pr_alpha:  # B: θ_{t-1}'s head outputs at p_b; no layer after the deepest head, no logits
            with self.reference_pass(), self.captured_heads(layers, rows, positions, stop=True) as ref_heads:
                try:
                    self.lm(**inputs)
                except HeadsCaptured:
                    pass
        gamma = max(0.0, 1 - self._step / max(1, self._steps_total))
        with ExitStack() as this_call:  # in a training step the hooks stay for the backward's recomputation
            hooks = self.backward_hooks or this_call
            heads = hooks.enter_context(self.captured_heads(layers, rows, positions))
            if self.progressive_intervention:
                hooks.enter_context(self.added_vector(vector, rows, positions, gamma))
            with self.autocast():
                output = self.lm(**encoded)
        return self.objective(output.loss, output.logits, ref_logits, heads, ref_heads, rows, positions)

    def objective(self, ce, logits, ref_logits, heads, ref_heads, rows, positions) -> torch.Tensor:
        """L_CE plus the gated KL and head-consistency terms; ``last_terms`` keeps the values."""
        terms = {"ce": ce}
        total = ce
        if ref_logits is not None:
            terms["k1"] = kd_loss(logits[rows, positions], ref_logits[rows, positions], self.temperature)
            terms["k2"] = kd_loss(logits, ref_logits, self.temperature)
            total = total + gated(self.kl_alpha1, terms["k1"], KL_GATE) + gated(self.kl_alpha2, terms["k2"], KL_GATE)
        if ref_heads is not None:
            for layer, head in self.heads:
                part = slice(head * self.head_dim, (head + 1) * self.head_dim)
                value = F.mse_loss(heads[layer][:, part].float(), ref_heads[layer][:, part].float())
                terms[f"m{layer}:{head}"] = value
                total = total + gated(self.pr_alpha, value, MSE_GATE)
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return total

    # --- checkpoints: merged base weights and the LoRA are tensors; the head set and vectors here
    def get_extra_state(self):
        return {**super().get_extra_state(), "heads": [list(h) for h in self.heads or ()],
                "function_vectors": [v.clone() for v in self.function_vectors],
                "effect_total": self.effect_total.clone(), "effect_tasks": self.effect_tasks}

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.heads = [tuple(h) for h in state["heads"]] or self.heads
        self.function_vectors = list(state["function_vectors"])
        self.effect_total, self.effect_tasks = state["effect_total"], int(state["effect_tasks"])

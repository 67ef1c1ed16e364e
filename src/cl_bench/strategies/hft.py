"""HFT, Half Fine-Tuning (Hui et al., 2024, arXiv:2404.18466; ACL 2025): full fine-tuning in which,
at every stage (here: every task of the stream), a fresh random half of the decoder's parameters is
frozen and only the other half trains.

With θ = (ϑ, ψ) split by the stage's mask M (ϑ selected, ψ frozen), one stage of training is

    ϑ^t ← ϑ^{t-1} − η ∇_ϑ L_t(θ^{t-1}),    ψ^t ← ψ^{t-1}

i.e. ordinary next-token cross-entropy on the task's answers, with AdamW over ϑ only. The paper reads
this as full fine-tuning with the regulariser λ‖(I − M)(θ − θ_0)‖² in a min-max form. Tensors frozen in
one stage and selected in the next keep their current values (nothing is ever reset).

The category-level mask (``granularity=category``, the method), for a LLaMA-style decoder of L layers:

* attention: in every layer 2 of the 4 matrices {W_Q, W_K, W_V, W_O} freeze, chosen uniformly;
* FFN: a uniform random set of ⌊L/2⌋ layers freezes 2 of {W_gate, W_up, W_down}, every other layer
  freezes 1 (which ones uniformly), so exactly half of the FFN parameters freeze when L is even;
* norms: 1 of the 2 RMSNorms of every layer (input_layernorm, post_attention_layernorm);
* token embeddings, lm_head and the final norm always train ("updated by default");
* a bias follows its matrix (LLaMA has none).

With multi-head attention (q, k, v, o of equal shape) this freezes exactly 50% of the attention+FFN
parameters; with grouped-query attention k/v are smaller and "half of the matrices" is not "half of
the parameters", so ``mask_report`` gives both fractions (plus the frozen counts). On LLaMA-2-7B the
mask freezes 3,238,133,760 of 6,738,415,616 parameters (51.9% stay trainable).

Ablation patterns (``granularity``), each freezing half of the matrices at a coarser level and one of
two norms per layer on average:

* ``layer``: inside every layer, a uniform choice among its 7 matrices regardless of category:
  ⌊L/2⌋ random layers freeze 4, the others 3 (so a layer may freeze 0 to 4 attention matrices);
  1 of 2 norms per layer;
* ``model``: ⌊7L/2⌋ of all 7L matrices of the decoder, uniformly, with no per-layer balance, and L of
  the 2L norms likewise.
The paper's ablation (SeqFT on TRACE: model-level, layer-level, category-level) names these levels
without a text we could check; the two coarser patterns above are this harness's reading of them.

Deliberate deviations and harness choices:
* The mask of stage t is drawn from a local generator seeded ``mask_seed + t`` (t = the task's index;
  ``mask_seed`` defaults to the run's seed), not from the shared training generator, so it is a pure
  function of (seed, stage) and is the same after a resume; it is also kept in the extra state.
* ``resample=epoch`` (one third-party note describes per-epoch resampling) draws mask e of the stage as
  the e-th draw of that stage's generator (epoch 0 uses the stage mask) and builds a fresh AdamW each
  epoch; ``resample=stage`` (default) keeps one mask and one optimizer for the whole task. Either way a
  declared budget (``budget.steps_per_task``/``samples_per_task``) covers the whole task, all its epochs.
* The protocol card's trainable parameters of a stage are those of the stage's (first) mask: about half
  of the decoder plus embeddings, lm_head and final norm, never the union of the stages.
* The family trains with a constant learning rate and one ``epochs`` value for every task; TRACE's
  recipe (cosine schedule, per-task epochs 5,3,7,5,3,5,5,7) is approximated by the preset.
* The ratio is fixed at 0.5: other ratios are not HFT (the re-implementation's ratio search is its own).
"""
from __future__ import annotations

import torch

from cl_bench.errors import UserError
from cl_bench.scenarios.base import Task
from cl_bench.strategies.seqft import SeqFT

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
MATRICES = ATTENTION + FFN
NORMS = ("input_layernorm", "post_attention_layernorm")
GRANULARITIES = ("category", "layer", "model")


def decoder_layers(model: torch.nn.Module) -> list[dict[str, torch.nn.Module]]:
    """The maskable modules of every LLaMA-style decoder layer, by short name, in model order."""
    layers = []
    for name, module in model.named_modules():
        attention, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if attention is None or mlp is None:
            continue
        parts = {**{k: getattr(attention, k, None) for k in ATTENTION}, **{k: getattr(mlp, k, None) for k in FFN},
                 **{k: getattr(module, k, None) for k in NORMS}}
        missing = [k for k, v in parts.items() if v is None]
        if missing:
            raise UserError(f"strategy hft needs LLaMA-style decoder layers; layer '{name}' lacks {missing}")
        layers.append(parts)
    if not layers:
        raise UserError("strategy hft needs a LLaMA-style decoder (self_attn.{q,k,v,o}_proj, "
                        "mlp.{gate,up,down}_proj and two norms per layer), e.g. model=tiny_llama or smollm2_135m")
    return layers


def draw_mask(num_layers: int, granularity: str, generator: torch.Generator) -> list[list[str]]:
    """For every layer, the short names of the modules to freeze (see the module docstring)."""
    def pick(n: int, k: int) -> list[int]:
        return torch.randperm(n, generator=generator)[:k].tolist()

    L = num_layers
    if granularity == "category":
        frozen = [[ATTENTION[i] for i in pick(4, 2)] for _ in range(L)]
        two = set(pick(L, L // 2))
        for layer in range(L):
            frozen[layer] += [FFN[i] for i in pick(3, 2 if layer in two else 1)]
    elif granularity == "layer":
        four = set(pick(L, L // 2))
        frozen = [[MATRICES[i] for i in pick(7, 4 if layer in four else 3)] for layer in range(L)]
    elif granularity == "model":
        frozen = [[] for _ in range(L)]
        for i in pick(7 * L, 7 * L // 2):
            frozen[i // 7].append(MATRICES[i % 7])
    else:
        raise UserError(f"strategy.granularity must be one of {', '.join(GRANULARITIES)}, got '{granularity}'")
    if granularity == "model":
        for i in pick(2 * L, L):
            frozen[i // 2].append(NORMS[i % 2])
    else:
        for layer in range(L):
            frozen[layer].append(NORMS[pick(2, 1)[0]])
    order = {name: i for i, name in enumerate(MATRICES + NORMS)}
    return [sorted(names, key=order.__getitem__) for names in frozen]


class HFT(SeqFT):
    description = "Half Fine-Tuning: full fine-tuning of a fresh random half of the decoder per task"
    # the paper's mask (category level) and one mask per stage (per-epoch masks: a third-party reading)
    protocol_switches = {"granularity": "category", "resample": "stage"}

    def __init__(self, backbone, context, *, mask_seed: int | None = None, resample: str = "stage",
                 granularity: str = "category", **kwargs):
        super().__init__(backbone, context, **kwargs)
        if resample not in ("stage", "epoch"):
            raise UserError(f"strategy.resample must be stage or epoch, got '{resample}'")
        if granularity not in GRANULARITIES:
            raise UserError(f"strategy.granularity must be one of {', '.join(GRANULARITIES)}, got '{granularity}'")
        self.resample, self.granularity = resample, granularity
        # None: the run's seed (the training generator's seed, read before any resume restores its state)
        self.mask_seed = context.generator.initial_seed() if mask_seed is None else mask_seed
        self.layers = decoder_layers(self.lm)
        self.mask: list[list[str]] | None = None
        self.mask_stage, self.mask_epoch = -1, 0
        self.mask_report: dict = {}

    def stage_mask(self, stage: int, epoch: int = 0) -> list[list[str]]:
        """The mask of ``stage`` (and ``epoch`` with resample=epoch): the (epoch+1)-th draw of a generator
        seeded ``mask_seed + stage``."""
        generator = torch.Generator().manual_seed(self.mask_seed + stage)
        for _ in range(epoch + 1):
            mask = draw_mask(len(self.layers), self.granularity, generator)
        return mask

    def apply_mask(self, mask: list[list[str]], stage: int, epoch: int = 0) -> None:
        """Everything trains (as in SeqFT) except the modules named in ``mask``."""
        for parameter in self.parameters():
            parameter.requires_grad_(True)
        for parts, names in zip(self.layers, mask):
            for name in names:
                parts[name].requires_grad_(False)
        self.mask, self.mask_stage, self.mask_epoch = mask, stage, epoch
        self.mask_report = self.count(mask)
        self.mask_report.update(stage=stage, epoch=epoch, granularity=self.granularity)

    def count(self, mask: list[list[str]]) -> dict:
        def size(module):
            return sum(p.numel() for p in module.parameters())

        matrix_params = sum(size(parts[m]) for parts in self.layers for m in MATRICES)
        frozen_matrices = sum(1 for names in mask for n in names if n in MATRICES)
        frozen_matrix_params = sum(size(parts[n]) for parts, names in zip(self.layers, mask)
                                   for n in names if n in MATRICES)
        frozen_norm_params = sum(size(parts[n]) for parts, names in zip(self.layers, mask) for n in names if n in NORMS)
        total = sum(p.numel() for p in self.parameters())
        frozen = frozen_matrix_params + frozen_norm_params
        return {"frozen_params": frozen, "trainable_params": total - frozen, "total_params": total,
                "frozen_matrices": frozen_matrices, "matrices": len(MATRICES) * len(self.layers),
                "frozen_matrix_params": frozen_matrix_params, "matrix_params": matrix_params,
                "frozen_norms": sum(1 for names in mask for n in names if n in NORMS),
                "frozen_fraction_of_matrices": frozen_matrices / (len(MATRICES) * len(self.layers)),
                "frozen_fraction_of_parameters": frozen_matrix_params / matrix_params}

    def begin_stage(self, stage: int) -> None:
        self.apply_mask(self.stage_mask(stage), stage)

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.begin_stage(task.index)  # before the runner reads which tensors train

    def learn(self, task: Task) -> None:
        if self.mask_stage != task.index or self.mask_epoch != 0:
            self.begin_stage(task.index)
        super().learn(task)  # one AdamW over the trainable half, built after the mask

    def epoch_optimizer(self, epoch: int, optimizer):
        """With ``resample=epoch``, from the second epoch on: a new mask and a fresh AdamW over its half."""
        if self.resample == "stage" or epoch == 0:
            return optimizer
        self.apply_mask(self.stage_mask(self.mask_stage, epoch), self.mask_stage, epoch)
        return self.make_optimizer()

    def get_extra_state(self):
        state = super().get_extra_state()
        if self.mask is not None:
            state.update(hft_mask=[list(names) for names in self.mask], hft_stage=self.mask_stage,
                         hft_epoch=self.mask_epoch)
        return state

    def set_extra_state(self, state):
        super().set_extra_state(state)
        if "hft_mask" in state:
            self.apply_mask([list(names) for names in state["hft_mask"]], state["hft_stage"], state["hft_epoch"])

"""Discrete Key-Value Bottleneck (Träuble, Goyal, Rahaman, Mozer, Kawaguchi, Bengio and Schölkopf,
"Discrete Key-Value Bottleneck", ICML 2023, arXiv:2207.11240).

A frozen encoder's features e (B x D) are projected into C heads h_c = e P_c (P_c: a fixed Gaussian
D x d_k matrix, columns L2-normalised over D; or, splitter "chunk", C contiguous pieces of e). Each
codebook c holds M frozen keys and M learnable values; a head fetches the values of its top-k
nearest keys (squared Euclidean distance) and the decoder averages them over codebooks, summing over
the k fetched pairs: logits = (1/C) sum_c sum_i V[c, j_ci]. The values are the class logits.

Value size (``values``). Default ``fixed``, the paper's: d_v is the number of classes of the whole
dataset from the start (the voting decoder needs d_v = number of classes; the authors' sweeps
``icml2023/*`` set 10 for CIFAR-10 and 100 for CIFAR-100 before the first stage), so the model is
never told where a task begins, as the paper claims ("without any task boundaries", abstract; its
text beyond the abstract was not reachable when this was written, hence no section number). The
runner lends the class count (``context.num_classes``, no data). The softmax and label smoothing
cover every class, seen or not, and prediction masks no class: the authors' evaluation (experiments
``utils/eval.py: evaluate_accuracy``) takes the argmax over all d_v outputs, so a class not yet
trained competes with its (label-smoothed) values. ``growing``: one value column per class seen so
far, a task's new classes append columns (at ``before_task``, from the task's class list) initialised
like the first ones; softmax, smoothing and prediction cover the seen classes only.
The protocol card records ``values`` (``protocol_switches``; the paper's value is ``fixed``).
``task_identity_train`` is a class attribute that the runner reads from the class, so it cannot follow
``values``: it says ``none``, true for ``fixed`` (with the default plain SGD); a ``growing`` run reads
task boundaries for its column count and is told apart on the card by its ``values=growing`` switch.

The keys are fitted once, when training on the first task starts, on encoder features of data from
OUTSIDE the stream (``key_init_data``: a registered scenario or scenario preset, or ``auto``; settings in
``key_init_args``, whose train data of all tasks, subsampled to ``key_init_samples``, is used
without labels; ``context.featurize`` maps it to cached features when the backbone is frozen), by
EMA vector quantisation: per batch and codebook, assign each head to its nearest key;
N <- g N + (1-g) n, A <- g A + (1-g) S (counts and sums of the assigned heads); keys = A / N~ with
N~ the Laplace-smoothed counts; keys whose N falls below ``dead_key_threshold * batch_size / M``
are replaced by random heads of the batch. Start: keys ~ N(0, 1), A = keys, N = 0. Afterwards keys,
projection and encoder never change; only values are trained (plain SGD, global gradient-norm
clipping, cross-entropy with label smoothing), so a step changes only the values some sample of the
batch fetched. Training counts how often each pair is fetched; at evaluation pairs never fetched are
excluded from the search.

The runner builds the ``key_init_data`` scenario and lends its train data as
``context.outside["key_init_data"]`` (``outside_data_keys``); it refuses data that overlaps the stream
(same data hash or identical inputs) unless ``allow_stream_data=true`` (the authors fit CIFAR-10 keys
on CIFAR-100 and vice versa). The default, ``auto``, has the runner pick another dataset of the
stream's modality, never the stream itself (``outside_data.OFFLINE_BY_INPUT_KIND``: image streams get
digits, or fmnist on digits; text streams chatterbot, or wordnet on chatterbot); the card lists it.
A backbone that does not resize images (``mlp``) cannot encode images of another size: name key-init
data of the stream's shape then. Vector streams (toy) have no other offline scenario: name one.

Follows the authors' code (ftraeuble/discrete_key_value_bottleneck@1987958 ``core.py``, ``utils.py``,
``splitters.py``; ftraeuble/experiments_discrete_key_value_bottleneck@abd0c7a ``scripts/train.py``,
sweeps ``icml2023/*``); the defaults are the main sweeps' (C=256, M=4096, d_k=14, top-1, decay 0.95,
10 key-init epochs, dead-key factor 0.1, zero values, SGD lr 0.3, clip 1.0, batch 256, smoothing 0.1).

Deliberate deviations:
- ``values=growing`` (not the default) sizes the values by the classes seen so far (see above).
- A fresh optimizer per task (the authors keep one for the stream): the same for plain SGD, which is
  stateless; with ``optimizer=adam`` the moments restart at every task, a use of task boundaries that
  ``task_identity_train`` does not show.
- ``epochs`` defaults to 10 passes per task (the authors: 2000 for CIFAR-10, 500 for CIFAR-100; the
  presets ``dkvb_cifar10``/``dkvb_cifar100`` set those).
- The distance leaves out |h|^2 (the same for every key, so the ranking is unchanged) and unused pairs
  get an infinite distance at evaluation instead of the batch's largest one.
- Only the splitters "random_projection" (the sweeps') and "chunk" (the toy experiment's), the
  "random" key start and the voting decoder are implemented; no learned projection, k-means start,
  Gumbel sampling or parametric decoders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.errors import UserError, check_ranges
from cl_bench.strategies.base import Strategy

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
SPLITTERS = ("random_projection", "chunk")
VALUE_SIZES = ("fixed", "growing")
DISTANCE_BUDGET = 2**24  # floats per distance block (codebooks x queries x keys): 64 MiB
EPS = 1e-5  # Laplace smoothing of the EMA counts


class DKVB(Strategy):
    description = "discrete key-value bottleneck: frozen keys fitted on outside data, sparse learnable values"
    outside_data_keys = {"key_init_data": "key_init_args"}
    protocol_switches = {"values": "fixed"}
    task_identity_train = "none"  # true for values=fixed; see the module docstring for values=growing
    smoke_args = ("scenario=toy", "strategy.key_init_data=toy", "strategy.key_init_args={data_seed: 1}",
                  "strategy.num_codebooks=32", "strategy.keys_per_codebook=256")

    def __init__(self, backbone, context, *, key_init_data: str = "auto", key_init_args: dict | None = None,
                 key_init_samples: int = 50000, key_init_epochs: int = 10, num_codebooks: int = 256,
                 keys_per_codebook: int = 4096, key_dim: int = 14, top_k: int = 1,
                 splitter: str = "random_projection", decay: float = 0.95, dead_key_threshold: float = 0.1,
                 values: str = "fixed", value_init_std: float = 0.0, epochs: int = 10, batch_size: int = 256,
                 lr: float = 0.3, optimizer: str = "sgd", label_smoothing: float = 0.1, grad_clip: float = 1.0,
                 bf16: bool = False, compile: bool = False):
        super().__init__(backbone, context)
        self.use_precision(bf16=bf16, compile=compile)
        C, M, k, D = num_codebooks, keys_per_codebook, key_dim, backbone.out_dim
        check_ranges("strategy", num_codebooks=(C, ">= 1"), keys_per_codebook=(M, ">= 1"), key_dim=(k, ">= 1"),
                     top_k=(top_k, ">= 1"), batch_size=(batch_size, ">= 1"), key_init_samples=(key_init_samples, ">= 1"),
                     epochs=(epochs, ">= 0"), key_init_epochs=(key_init_epochs, ">= 1"))
        if top_k > M:
            raise UserError(f"strategy.top_k ({top_k}) exceeds keys_per_codebook ({M})")
        if splitter not in SPLITTERS:
            raise UserError(f"strategy.splitter must be one of {', '.join(SPLITTERS)}, got '{splitter}'")
        if splitter == "chunk" and C * k != D:
            raise UserError(f"splitter 'chunk' needs num_codebooks * key_dim = feature size {D}, got {C} * {k}")
        if values not in VALUE_SIZES:
            raise UserError(f"strategy.values must be one of {', '.join(VALUE_SIZES)}, got '{values}'")
        if values == "fixed" and not context.num_classes:
            raise UserError("strategy.values=fixed sizes the values for every class of the stream, but no class "
                            "count was lent (context.num_classes); use values=growing")
        if optimizer not in OPTIMIZERS:
            raise UserError(f"strategy.optimizer must be one of {', '.join(OPTIMIZERS)}, got '{optimizer}'")
        if not 0 <= decay < 1 or dead_key_threshold < 0 or value_init_std < 0 or lr < 0 or grad_clip < 0 \
                or not 0 <= label_smoothing < 1:
            raise UserError("need 0 <= decay < 1, 0 <= label_smoothing < 1 and dead_key_threshold, value_init_std, "
                            "lr, grad_clip >= 0")
        self.key_init_data = key_init_data  # key_init_args: settings of that scenario, read by the runner
        self.key_init_samples, self.key_init_epochs = key_init_samples, key_init_epochs
        self.top_k, self.splitter, self.decay = top_k, splitter, decay
        self.dead_key_threshold, self.value_init_std, self.value_size = dead_key_threshold, value_init_std, values
        self.epochs, self.batch_size, self.lr, self.optimizer_name = epochs, batch_size, lr, optimizer
        self.label_smoothing, self.grad_clip = label_smoothing, grad_clip
        self.backbone.requires_grad_(False)
        generator = context.generator
        if splitter == "random_projection":
            projection = F.normalize(torch.randn(C, D, k, generator=generator), dim=1)
            self.register_buffer("projection", projection)
        self.register_buffer("keys", torch.randn(C, M, k, generator=generator))
        self.register_buffer("usage", torch.zeros(C, M, dtype=torch.long))
        self.register_buffer("keys_fitted", torch.tensor(False))
        self.values = nn.Parameter(self.new_values(context.num_classes if values == "fixed" else 0))

    # --- model ----------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """The encoder stays in eval mode: DKVB never changes it."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def embed(self, inputs) -> torch.Tensor:
        with self.autocast():
            return self.backbone(self.backbone.prepare(inputs, self.device)).float()

    def heads(self, features: torch.Tensor) -> torch.Tensor:
        """(C, B, d_k) queries of the codebooks for (B, D) features."""
        if self.splitter == "chunk":
            num_codebooks, _, key_dim = self.keys.shape
            return features.reshape(len(features), num_codebooks, key_dim).transpose(0, 1)
        return torch.einsum("bd,cdk->cbk", features, self.projection)

    def nearest(self, heads: torch.Tensor, top_k: int, excluded: torch.Tensor | None = None) -> torch.Tensor:
        """(C, B, top_k) indices of the nearest keys, never one marked in ``excluded`` (C, M) unless a
        codebook has too few others; computed in blocks of codebooks to bound memory."""
        C, B, _ = heads.shape
        M = self.keys.shape[1]
        step = max(1, DISTANCE_BUDGET // max(1, B * M))
        found = []
        for start in range(0, C, step):
            keys = self.keys[start:start + step]
            squared_norms = (keys * keys).sum(-1)
            if excluded is not None:
                squared_norms = squared_norms.masked_fill(excluded[start:start + step], float("inf"))
            # |h - K|^2 - |h|^2: the per-query term |h|^2 does not change which keys are nearest
            distance = torch.baddbmm(squared_norms.unsqueeze(1), heads[start:start + step], keys.transpose(1, 2),
                                     alpha=-2)
            found.append(distance.topk(top_k, dim=-1, largest=False).indices)
        return torch.cat(found)

    def forward(self, inputs) -> torch.Tensor:
        """Logits (B, value columns) = mean over codebooks of the summed top-k fetched values.
        In training mode every fetch is counted; in eval mode never-fetched pairs are skipped."""
        heads = self.heads(self.embed(inputs))
        index = self.nearest(heads, self.top_k, excluded=None if self.training else self.usage == 0)
        if self.training:
            flat = index.flatten(1)
            self.usage.scatter_add_(1, flat, torch.ones_like(flat))
        codebook = torch.arange(len(index), device=index.device).view(-1, 1, 1)
        return self.values[codebook, index].sum(2).mean(0)

    # --- key initialisation -----------------------------------------------------------------------
    def key_init_features(self) -> torch.Tensor:
        """Encoder features (N, D) of the key-init scenario's train data (all tasks, lent by the runner)."""
        if "key_init_data" not in self.context.outside:
            raise UserError(f"no key-initialisation data lent: the runner lends key_init_data "
                            f"'{self.key_init_data}' as context.outside['key_init_data']")
        lent = self.context.outside["key_init_data"].samples
        try:
            samples = self.context.featurize(lent)
            if len(samples) > self.key_init_samples:
                keep = torch.randperm(len(samples), generator=self.context.generator)[: self.key_init_samples]
                samples = samples.select(keep.sort().values)
            batches = self.batches(samples, self.batch_size, shuffle=False, description="key-init features")
            return torch.cat([self.embed(inputs).cpu() for inputs, _ in batches])
        except (TypeError, ValueError, RuntimeError) as error:
            if isinstance(error, torch.OutOfMemoryError):
                raise
            shape = tuple(lent.inputs.shape[1:]) if isinstance(lent.inputs, torch.Tensor) else "text"
            raise UserError(f"the backbone cannot encode key_init_data '{self.key_init_data}' (inputs of shape "
                            f"{shape}): {' '.join(str(error).split())[:200]}") from error

    def feature_batches(self, features: torch.Tensor):
        """``key_init_epochs`` shuffled passes over ``features`` in batches of ``batch_size``."""
        for epoch in range(self.key_init_epochs):
            order = torch.randperm(len(features), generator=self.context.generator)
            starts = range(0, len(features), self.batch_size)
            description = f"key init epoch {epoch + 1}/{self.key_init_epochs}"
            for start in self.context.progress(starts, description, total=len(starts)):
                yield features[order[start:start + self.batch_size]].to(self.device)

    @torch.no_grad()
    def fit_keys(self, feature_batches) -> None:
        """EMA k-means of the keys over batches of encoder features, then freeze them for good."""
        C, M, k = self.keys.shape
        keys_sum, counts = self.keys.clone(), torch.zeros(C, M, device=self.keys.device)
        dead_below = self.dead_key_threshold * self.batch_size / M  # the authors' h*w = 1 (pooled features)
        for features in feature_batches:
            heads = self.heads(features.float())
            assigned = self.nearest(heads, 1)[..., 0]  # (C, B)
            batch_counts = torch.zeros_like(counts).scatter_add_(1, assigned, torch.ones_like(heads[..., 0]))
            batch_sums = torch.zeros_like(keys_sum).scatter_add_(1, assigned.unsqueeze(-1).expand_as(heads), heads)
            counts.mul_(self.decay).add_(batch_counts, alpha=1 - self.decay)
            keys_sum.mul_(self.decay).add_(batch_sums, alpha=1 - self.decay)
            total = counts.sum(-1, keepdim=True)
            smoothed = (counts + EPS) / (total + M * EPS) * total
            self.keys.copy_(keys_sum / smoothed.unsqueeze(-1))
            if dead_below > 0:
                dead = counts < dead_below
                pick = torch.randint(heads.shape[1], (C, M), generator=self.context.generator).to(heads.device)
                replacement = heads.gather(1, pick.unsqueeze(-1).expand(C, M, k))
                self.keys.copy_(torch.where(dead.unsqueeze(-1), replacement, self.keys))
        self.usage.zero_()
        self.keys_fitted.fill_(True)

    # --- continual learning -------------------------------------------------------------------------
    def before_task(self, task) -> None:
        if self.value_size == "growing":
            self.grow_values(max(task.classes) + 1)

    def new_values(self, columns: int) -> torch.Tensor:
        """(C, M, columns) values: zeros, or ``value_init_std`` * N(0, 1)."""
        C, M, _ = self.keys.shape
        if self.value_init_std > 0:
            return torch.randn(C, M, columns, generator=self.context.generator) * self.value_init_std
        return torch.zeros(C, M, columns)

    def grow_values(self, num_classes: int) -> None:
        seen = self.values.shape[2]
        if num_classes <= seen:
            return
        new = self.new_values(num_classes - seen).to(self.values.device)
        self.values = nn.Parameter(torch.cat([self.values.detach(), new], dim=2))

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Plain SGD (no momentum, no weight decay) or Adam on the values, as in the authors' code."""
        return OPTIMIZERS[self.optimizer_name]([self.values], lr=self.lr)

    def learn(self, task) -> None:
        if not self.keys_fitted:  # here rather than in before_task, so the runner counts it as training time
            self.fit_keys(self.feature_batches(self.key_init_features()))
        self.train()
        optimizer = self.make_optimizer()
        for epoch in self.training_epochs(self.epochs):  # key fitting above is no optimizer step
            description = f"{task.name} epoch {epoch + 1}"
            for inputs, targets in self.batches(task.train, self.batch_size, shuffle=True, description=description):
                if self.budget_spent():
                    break
                loss = F.cross_entropy(self(inputs), targets, label_smoothing=self.label_smoothing)
                self.check_finite(loss, description)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip > 0:
                    nn.utils.clip_grad_norm_([self.values], self.grad_clip)
                optimizer.step()
                self.count_step(len(targets), loss, optimizer)

    @torch.no_grad()
    def predict(self, inputs) -> torch.Tensor:
        return self(inputs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "values")
        if saved is not None and saved.shape != self.values.shape:
            self.values = nn.Parameter(torch.empty(saved.shape, device=self.values.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

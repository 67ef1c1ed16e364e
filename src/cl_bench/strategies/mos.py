"""MOS (Sun, Zhou, Zhao, Gan, Zhan, Ye, "MOS: Model Surgery for Pre-Trained Model-Based
Class-Incremental Learning", AAAI 2025, arXiv:2412.09441; authors' code sun-hailong/AAAI25-MOS).

A frozen pretrained transformer gets one bottleneck adapter set per task, parallel to the MLP of
every block (``models/adapters.py``, zero up-projection: an untrained set changes nothing). Per task:
1. Train the current adapter set and a linear head: cross-entropy over the current task's classes
   (logits of earlier classes set to -inf) + ``sim_weight`` * L_sim, where L_sim asks every row of
   [stored class means; batch features] to be most similar to itself (softmax of R R^T /
   ``sim_temperature``). SGD, adapter lr ``lr``, head lr ``head_lr_scale * lr``, cosine per epoch.
   Adapter merging (task t >= 1) pulls the current set toward the mean M_t of the stored sets.
2. Store a snapshot of the set; store each new class's feature mean and covariance (or variance)
   + 1e-4 I from its training images (no augmentation).
3. From task 1 on, classifier alignment: ``crct_epochs`` epochs of head-only SGD on features sampled
   from the class Gaussians (5 * batch_size per class and epoch; SLCA's recipe, the paper's appendix).
4. Cosine prototypes of the new classes from the *first* task's adapter set.
Prediction (training-free self-refined retrieval): the prototype classifier o guesses a task; the
head on that task's adapter features predicts a class, whose task names the next adapter; stop at a
fixed point or after ``max_iter`` head evaluations and keep the last logits z. With ``ensemble`` the
score is softmax(z) + softmax((T+1) o) after T+1 tasks.

``adapter_merge`` (recorded in config.yaml and the config hash) says which merging ran:
- ``paper``: one pull theta <- (1 - alpha) theta + alpha M_t after every optimizer step on the
  current set; snapshots never change; statistics come from the stored snapshot; evaluation has no
  side effects.
- ``legacy``: the authors' code (spec 1.4 points 1-4, 1.5.4): the pull is also applied to all blocks
  before every block of every training forward (in place, so backward uses the pulled weights), to
  the current set during the statistics pass, and to stored snapshot i >= 1 (toward the mean of
  snapshots < i) before every block of every evaluation forward, cumulatively, so scores depend on
  how many test batches came before; prototypes of tasks >= 1 are averaged with adapter dropout on.

Protocol: the task's optimizer steps and samples are those of step 1 (adapter and head on the task's
examples); a declared budget (``budget.steps_per_task``/``samples_per_task``) governs that training
and the cosine schedule spans it. The classifier alignment of step 3 (``crct_epochs`` x C_seen
head-only steps on sampled features, no example) is fixed post-processing: neither counted nor
budgeted. ``legacy`` scores depend on the evaluation batches (``eval_batch_dependent``: the card
records ``eval_batch_size``).

Cost: evaluation computes adapter features only as needed. ``paper`` runs the first adapter on the
batch (prototype branch), then runs an adapter only on the samples the retrieval routes to it, each
(sample, adapter) feature at most once: at most ``max_iter`` head evaluations and one feature pass
per adapter, however much data is stored. ``legacy`` runs every adapter on the whole batch (T+1
passes), as the authors do, because its side effects depend on it. Trainable per task: one adapter
set + the head; stored: T+1 adapter sets, their prefix sums, C prototypes, C Gaussians.

Deviations: the head grows per task (the authors allocate all classes up front; with masking the
logits are the same, but rows of future classes here are not shrunk by weight decay before their
task); new head rows get trunc-normal(0.02) weights and zero bias, as timm initialised the authors'
head. The harness feeds the backbone's ``prepare`` output: resized and normalised with the
backbone's mean/std (the authors feed [0, 1] pixels: ``normalize_inputs=false``); ``augment`` is a
batched random-resized-crop (scale 0.05-1, ratio 3/4-4/3) + horizontal flip of the prepared tensor
(images only; the authors crop the raw image, then resize). The backbone itself stays in eval mode
(the authors' ViT has no dropout; MiniLM's 0.1 dropouts stay off). Features are the backbone's own
(a timm ViT's CLS token after the final norm as in the paper; mean pooling for text encoders).
Retrieval is per sample (``paper``: nothing depends on the rest of the batch). Evaluation batches
follow the runner (under ``eval_mode=cil`` they mix the seen tasks, ``eval_batch_size`` each; the
authors evaluate one task's test set at a time), which changes the amount of ``legacy`` drift. Gaussian sampling draws from the run's generator, with
Cholesky factors computed in float64. ``predict`` returns the ensemble score (a sum of two
softmaxes), not logits, when ``ensemble`` is on.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.errors import UserError, check_ranges
from cl_bench.models.adapters import adapter_set, inject_parallel_adapters
from cl_bench.models.backbone import ImageBackbone
from cl_bench.strategies.base import OPTIMIZERS, ClassifierStrategy


@dataclass
class Retrieval:
    """Per sample: last head logits, prototype logits, the adapter that produced the logits, head evaluations."""

    logits: torch.Tensor
    prototype_logits: torch.Tensor
    adapter: torch.Tensor
    iterations: torch.Tensor


def random_resized_crop_flip(images: torch.Tensor, generator: torch.Generator, scale=(0.05, 1.0),
                             ratio=(3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop + RandomHorizontalFlip, batched, output size = input size."""
    count, _, height, width = images.shape
    area = torch.empty(count, tries).uniform_(*scale, generator=generator) * height * width
    aspect = torch.exp(torch.empty(count, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    full_w = min(width, round(height * ratio[1])) if width / height > ratio[1] else width
    full_h = min(height, round(width / ratio[0])) if width / height < ratio[0] else height
    w, h = torch.where(fits.any(1), w, float(full_w)), torch.where(fits.any(1), h, float(full_h))
    top = (torch.rand(count, generator=generator) * (height - h + 1)).floor()
    left = (torch.rand(count, generator=generator) * (width - w + 1)).floor()
    flip = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = flip * w / width, h / height
    theta[:, 0, 2], theta[:, 1, 2] = (2 * left + w) / width - 1, (2 * top + h) / height - 1
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _rows(prepared, index: torch.Tensor):
    """The samples ``index`` of a prepared batch (a tensor, or a dict of tensors for text)."""
    if isinstance(prepared, dict):
        return {key: value[index] for key, value in prepared.items()}
    return prepared[index]


class MOS(ClassifierStrategy):
    description = ("MOS (AAAI'25): per-task adapters with merging (adapter_merge=paper|legacy), Gaussian "
                   "classifier alignment, self-refined adapter retrieval")
    paper_backbone = "vit_b16_in21k"
    backbone_pattern = r"(vit|deit)_.*|minilm"
    backbone_need = "its adapters go into the blocks of a ViT or of a BERT-style text encoder"
    protocol_switches = {"adapter_merge": "paper"}  # legacy: the authors' code behind the published numbers
    eval_batch_dependent = True  # adapter_merge=legacy drifts the stored adapters with every test batch
    # one 8x8 patch per digit: a random-init ViT's CLS token then sees the whole image
    smoke_args = ("scenario=digits", "model=vit_tiny_test", "model.image_size=8", "model.patch_size=8",
                  "strategy.augment=false", "strategy.batch_size=16", "strategy.lr=0.1", "strategy.crct_epochs=3")

    def __init__(self, backbone, context, *, epochs: int = 20, batch_size: int = 48, lr: float = 0.03,
                 optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4,
                 head_lr_scale: float = 0.1, min_lr: float = 0.0, bottleneck: int = 16,
                 adapter_scale: float = 0.1, adapter_dropout: float = 0.1, adapter_momentum: float = 0.1,
                 adapter_merge: str = "paper", sim_weight: float = 0.1, sim_temperature: float = 0.8,
                 crct_epochs: int = 30, ca_lr: float = 0.005, ca_statistics: str = "covariance",
                 max_iter: int = 4, ensemble: bool = True, augment: bool = True, normalize_inputs: bool = True,
                 bf16: bool = False, compile: bool = False):
        super().__init__(backbone, context, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                         momentum=momentum, weight_decay=weight_decay, bf16=bf16, compile=compile)
        if adapter_merge not in ("paper", "legacy"):
            raise UserError(f"strategy.adapter_merge must be paper or legacy, got '{adapter_merge}'")
        if ca_statistics not in ("covariance", "variance"):
            raise UserError(f"strategy.ca_statistics must be covariance or variance, got '{ca_statistics}'")
        check_ranges("strategy", bottleneck=(bottleneck, ">= 1"), max_iter=(max_iter, ">= 1"),
                     crct_epochs=(crct_epochs, ">= 0"), adapter_momentum=(adapter_momentum, "in [0, 1]"))
        if not normalize_inputs and not isinstance(backbone, ImageBackbone):
            raise UserError("strategy.normalize_inputs=false only applies to image backbones")
        self.head_lr_scale, self.min_lr, self.adapter_momentum = head_lr_scale, min_lr, adapter_momentum
        self.adapter_merge, self.sim_weight, self.sim_temperature = adapter_merge, sim_weight, sim_temperature
        self.crct_epochs, self.ca_lr, self.ca_statistics = crct_epochs, ca_lr, ca_statistics
        self.max_iter, self.ensemble = max_iter, ensemble
        self.augment, self.normalize_inputs = augment, normalize_inputs
        self.backbone.requires_grad_(False)
        self.router = inject_parallel_adapters(backbone.net)
        self.adapter_options = dict(bottleneck=bottleneck, scale=adapter_scale, dropout=adapter_dropout)
        self.current = self._new_adapter_set()
        self.snapshots = nn.ModuleList()  # A_k after task k (frozen)
        self.prefix_sums = nn.ModuleList()  # sum of the original A_0..A_k, for the merge targets
        dim = backbone.out_dim
        self.register_buffer("class_task", torch.empty(0, dtype=torch.long))
        self.register_buffer("prototypes", torch.empty(0, dim))
        self.register_buffer("class_means", torch.empty(0, dim))
        self.register_buffer("class_spread", torch.empty(0, dim, dim) if ca_statistics == "covariance"
                             else torch.empty(0, dim))  # covariance (C, D, D) or variance (C, D), + 1e-4

    def _new_adapter_set(self, frozen: bool = False) -> nn.ModuleList:
        options = self.adapter_options
        adapters = adapter_set(self.router.num_layers, self.router.dim, options["bottleneck"],
                               scale=options["scale"], dropout=options["dropout"])
        return adapters.requires_grad_(not frozen).to(self.device)

    # --- adapters: selection, merging ------------------------------------------------------------
    @contextmanager
    def _routed(self, adapters, pull_toward=None):
        self.router.adapters = adapters
        if pull_toward is not None:
            self.router.before_layer = lambda layer: self._pull(adapters, pull_toward)
        try:
            yield
        finally:
            self.router.adapters = self.router.before_layer = None

    def _features(self, prepared, adapters, pull_toward=None) -> torch.Tensor:
        with self._routed(adapters, pull_toward), self.autocast():
            return self.backbone(prepared).float()

    def _snapshot_mean(self, count: int) -> list[torch.Tensor] | None:
        """M = mean of the original snapshots A_0..A_{count-1} (None when count is 0)."""
        if count == 0:
            return None
        return [total / count for total in self.prefix_sums[count - 1].parameters()]

    def _pull(self, adapters, target) -> None:
        """theta <- (1 - alpha) theta + alpha M, rebinding .data as the authors do (no autograd trace)."""
        alpha = self.adapter_momentum
        for parameter, mean in zip(adapters.parameters(), target):
            parameter.data = (1 - alpha) * parameter.data + alpha * mean

    def _prepare(self, inputs, augment: bool = False):
        prepared = self.backbone.prepare(inputs, self.device)
        if isinstance(prepared, torch.Tensor) and prepared.dim() == 4:
            if not self.normalize_inputs:
                prepared = prepared * self.backbone.std + self.backbone.mean
            if augment and self.augment:
                prepared = random_resized_crop_flip(prepared, self.context.generator)
        return prepared

    # --- per task -----------------------------------------------------------------------------------
    def before_task(self, task):
        seen = self.head.out_features
        super().before_task(task)
        with torch.no_grad():
            nn.init.trunc_normal_(self.head.weight[seen:], std=0.02)
            self.head.bias[seen:] = 0.0
        class_task = torch.full((self.head.out_features,), -1, dtype=torch.long, device=self.device)
        class_task[: len(self.class_task)] = self.class_task
        class_task[list(task.classes)] = len(self.snapshots)
        self.class_task = class_task

    def make_optimizer(self):
        groups = [{"params": list(self.current.parameters()), "lr": self.lr},
                  {"params": list(self.head.parameters()), "lr": self.lr * self.head_lr_scale}]
        options = {"weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            options["momentum"] = self.momentum
        return OPTIMIZERS[self.optimizer_name](groups, **options)

    def learn(self, task):
        t = len(self.snapshots)
        merge_target = self._snapshot_mean(t)
        self._train_current(task, merge_target)
        snapshot, total = copy.deepcopy(self.current).requires_grad_(False), copy.deepcopy(self.current)
        if t > 0:
            for parameter, previous in zip(total.parameters(), self.prefix_sums[-1].parameters()):
                parameter.data = parameter.data + previous.data
        self.snapshots.append(snapshot)
        self.prefix_sums.append(total.requires_grad_(False))
        self._store_statistics(task, merge_target)
        if t > 0:
            self._align_classifier()
        self._store_prototypes(task, dropout=self.adapter_merge == "legacy" and t > 0)

    def similarity_loss(self, features: torch.Tensor) -> torch.Tensor:
        """L_sim: each row of [class means; features] must be most similar to itself."""
        rows = torch.cat([self.class_means.to(features.dtype), features])
        similarity = rows @ rows.T / self.sim_temperature
        return F.cross_entropy(similarity, torch.arange(len(rows), device=rows.device))

    def _train_current(self, task, merge_target) -> None:
        legacy_pull = merge_target if self.adapter_merge == "legacy" else None
        old_classes = self.class_task != len(self.snapshots)
        optimizer = self.make_optimizer()
        epochs = self.planned_epochs(self.epochs, len(task.train), self.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=self.min_lr)
        for epoch in self.training_epochs(self.epochs):
            self.train()
            self.backbone.eval()
            description = f"{task.name} epoch {epoch + 1}"
            for inputs, targets in self.batches(task.train, self.batch_size, shuffle=True, description=description):
                if self.budget_spent():
                    break
                features = self._features(self._prepare(inputs, augment=True), self.current, legacy_pull)
                logits = self.head(features).masked_fill(old_classes, -math.inf)
                loss = F.cross_entropy(logits, targets) + self.sim_weight * self.similarity_loss(features)
                self.check_finite(loss, description)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if merge_target is not None:
                    self._pull(self.current, merge_target)
                self.count_step(len(targets), loss, optimizer)
            scheduler.step()

    @torch.no_grad()
    def _store_statistics(self, task, merge_target) -> None:
        """Mean and covariance (+1e-4 I; diagonal only for ``variance``) of each new class's features."""
        self.eval()
        legacy = self.adapter_merge == "legacy"
        adapters, pull = (self.current, merge_target) if legacy else (self.snapshots[-1], None)
        size = self.head.out_features
        means = torch.zeros(size, *self.class_means.shape[1:], device=self.device)
        spread = torch.zeros(size, *self.class_spread.shape[1:], device=self.device)
        means[: len(self.class_means)], spread[: len(self.class_spread)] = self.class_means, self.class_spread
        for label in sorted(task.classes):  # class by class in chunks of 3 * batch_size, like the authors
            members = torch.nonzero(task.train.targets == label).flatten()
            if len(members) < 2:
                raise UserError(f"MOS needs at least 2 training samples per class (class {label} has {len(members)})")
            features = torch.cat([
                self._features(self._prepare(task.train.select(part).inputs), adapters, pull)
                for part in members.split(3 * self.batch_size)])
            covariance = torch.cov(features.T) + 1e-4 * torch.eye(features.shape[1], device=self.device)
            means[label] = features.mean(0)
            spread[label] = covariance if self.ca_statistics == "covariance" else covariance.diagonal()
        self.class_means, self.class_spread = means, spread

    def _align_classifier(self) -> None:
        """Head-only SGD on features drawn from every seen class's Gaussian, fresh draws each epoch."""
        count, dim = self.class_means.shape
        per_class = 5 * self.batch_size
        if self.ca_statistics == "covariance":
            factor = torch.linalg.cholesky(self.class_spread.double()).float().transpose(1, 2)
        else:
            factor = self.class_spread.sqrt().unsqueeze(1)
        labels = torch.arange(count, device=self.device).repeat_interleave(per_class)
        optimizer = torch.optim.SGD(self.head.parameters(), lr=self.ca_lr, momentum=0.9, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.crct_epochs, 1))
        for _ in self.context.progress(range(self.crct_epochs), "classifier alignment"):
            noise = torch.randn(count, per_class, dim, generator=self.context.generator).to(self.device)
            shaped = noise @ factor if self.ca_statistics == "covariance" else noise * factor
            samples = (self.class_means.unsqueeze(1) + shaped).reshape(-1, dim)
            order = torch.randperm(len(samples), generator=self.context.generator).to(self.device)
            for batch in order.split(per_class):
                loss = F.cross_entropy(self.head(samples[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()

    @torch.no_grad()
    def _store_prototypes(self, task, dropout: bool) -> None:
        """Class means of first-adapter features (adapter dropout on only for the legacy quirk)."""
        self.train(dropout)
        self.backbone.eval()
        size = self.head.out_features
        sums = torch.zeros(size, self.backbone.out_dim, device=self.device)
        counts = torch.zeros(size, device=self.device)
        for inputs, targets in self.batches(task.train, self.batch_size, shuffle=False, description="prototypes"):
            sums.index_add_(0, targets, self._features(self._prepare(inputs), self.snapshots[0]))
            counts.index_add_(0, targets, torch.ones_like(targets, dtype=torch.float))
        prototypes = torch.zeros_like(sums)
        prototypes[: len(self.prototypes)] = self.prototypes
        new = torch.tensor(task.classes, device=self.device)
        prototypes[new] = sums[new] / counts[new].clamp(min=1).unsqueeze(1)
        self.prototypes = prototypes
        self.eval()

    # --- prediction ------------------------------------------------------------------------------
    @torch.no_grad()
    def retrieve(self, inputs) -> Retrieval:
        """Self-refined adapter retrieval (spec 1.6), computing adapter features only where needed."""
        self.eval()
        prepared = self._prepare(inputs)
        tasks, classes = len(self.snapshots), len(self.prototypes)
        size = len(inputs)
        features = torch.zeros(size, tasks, self.backbone.out_dim, device=self.device)
        have = torch.zeros(size, tasks, dtype=torch.bool, device=self.device)

        def fill(adapter: int, needed: torch.Tensor) -> None:
            index = torch.nonzero(needed & ~have[:, adapter]).flatten()
            if len(index):
                pull = self._snapshot_mean(adapter) if self.adapter_merge == "legacy" else None
                features[index, adapter] = self._features(_rows(prepared, index), self.snapshots[adapter], pull)
                have[index, adapter] = True

        everyone = torch.ones(size, dtype=torch.bool, device=self.device)
        for adapter in range(tasks if self.adapter_merge == "legacy" else 1):
            fill(adapter, everyone)
        prototype_logits = F.normalize(features[:, 0], dim=1) @ F.normalize(self.prototypes, dim=1).T
        current = self.class_task[prototype_logits.argmax(1)]
        logits = torch.zeros(size, classes, device=self.device)
        used, iterations = current.clone(), torch.zeros(size, dtype=torch.long, device=self.device)
        active = everyone.clone()
        for _ in range(self.max_iter):
            for adapter in current[active].unique().tolist():
                fill(adapter, active & (current == adapter))
            index = torch.nonzero(active).flatten()
            step = self.head(features[index, current[index]])[:, :classes]
            logits[index], used[index] = step, current[index]
            iterations[index] += 1
            proposed = self.class_task[step.argmax(1)]
            settled = proposed == current[index]
            active[index[settled]] = False
            current[index] = proposed
            if not active.any():
                break
        return Retrieval(logits, prototype_logits, used, iterations)

    def predict(self, inputs) -> torch.Tensor:
        if not len(self.snapshots):
            return torch.zeros(len(inputs), 0, device=self.device)
        found = self.retrieve(inputs)
        if not self.ensemble:
            return found.logits
        return found.logits.softmax(1) + (len(self.snapshots) * found.prototype_logits).softmax(1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = {key[len(prefix):].split(".")[1] for key in state_dict if key.startswith(prefix + "snapshots.")}
        while len(self.snapshots) < len(stored):
            self.snapshots.append(self._new_adapter_set(frozen=True))
            self.prefix_sums.append(self._new_adapter_set(frozen=True))
        for name in ("class_task", "prototypes", "class_means", "class_spread"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

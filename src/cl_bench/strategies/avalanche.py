"""Avalanche's strategies inside the cl-bench runner: ``strategy=avalanche.<Name>``.

Implements no method of its own: it runs the strategies of avalanche-lib 0.6 (Lomonaco et al., "Avalanche:
an End-to-End Library for Continual Learning", CVPR-W 2021, arXiv:2104.00405) unchanged, with their own
training loops, plugins and losses, on cl-bench's class-incremental streams and backbones, so that they are
scored by cl-bench's runner and land on the same leaderboard. One generic adapter serves every strategy;
``avalanche.<Name>`` resolves (registry fallback, see ``_builtins.py``) to a subclass made on the fly whose
keyword-only constructor arguments are the Avalanche class's own hyperparameters with Avalanche's defaults,
plus the common training keys ``epochs, batch_size, lr, optimizer, momentum, weight_decay``
(``train_epochs``, ``train_mb_size`` and the optimizer Avalanche is given). Names: the class name
(``avalanche.ER_ACE``), its lower case (``avalanche.er_ace``), or ``avalanche.si`` / ``avalanche.l2p``.

How a run goes
    * Model: the cl-bench backbone (its input preprocessing inside ``forward``; the identity on cached
      features when the backbone is frozen) followed by Avalanche's ``IncrementalClassifier`` (Avalanche's
      defaults: 2 initial units, masking of units not trained yet), wrapped as an Avalanche ``BaseModel``
      (``get_features`` for LFL). iCaRL gets the backbone as ``feature_extractor`` and the classifier
      separately (it builds its own nearest-mean model); ER-AML gets the backbone as ``feature_extractor``;
      DER gets a fixed head (see deviations). L2P builds its own prompted ViT and frozen query ViT: the
      adapter hands it the backbone's architecture, weights and preprocessing (a timm VisionTransformer)
      instead of a timm download.
    * Data: ``learn(task)`` builds ``nc_benchmark`` over the tasks seen so far (``benchmark_of``, the same
      construction as ``cl_bench.to_avalanche``) and calls ``strategy.train(last_experience,
      eval_streams=[])``. Experience indices, ``classes_in_this_experience``, ``previous_classes``, replay
      buffers and regularisers behave as in an Avalanche loop, and future classes are never visible.
    * Randomness: before building the strategy and before each experience, Avalanche's
      ``RNGManager.set_random_seeds`` (torch, numpy, random) gets a seed drawn from the context's generator.
      Avalanche's own loop seeded the same way gives the same accuracies (tests/test_avalanche.py).
    * Prediction: Avalanche's own ``forward()`` on the batch in evaluation mode, followed by its plugins'
      ``after_eval_forward`` hooks, sliced to the classes seen so far.

Defaults for Avalanche arguments that have none (``REQUIRED_DEFAULTS``), from ContinualAI's reproduction
repository continual-learning-baselines (``experiments/<benchmark>/<strategy>.py``), which runs exactly
these classes: EWC ewc_lambda=1 (permuted_mnist/ewc.py); SI si_lambda=1 (split_mnist/
synaptic_intelligence.py); LwF alpha=1, temperature=1 (split_mnist/lwf.py, class-incremental Split-MNIST);
GEM patterns_per_exp=256 (split_cifar100/gem.py); A-GEM patterns_per_exp=65 (split_cifar100/agem.py);
iCaRL memory_size=2000, fixed_memory=true (split_cifar100/icarl.py and the iCaRL paper, K=2000); MIR
mem_size=500, subsample=50 (split_mnist/mir.py); LFL lambda_e=0.0001 (permuted_mnist/lfl.py).

Deliberate deviations (all but the last are needed to run at all)
    * DER stores logits in its buffer and compares them with later ones, and L2P's head is fixed, so both
      get one output per class of the stream from the start (``Context.num_classes``, the class count
      the runner lends; no data of later tasks), as in Avalanche's own tests and examples. DER's head is
      then a plain linear layer; L2P's is as wide as the ViT instead of the hard-coded 768.
    * iCaRL's loss reloads its old model from the current one after every experience, which fails once
      the classifier or the class means have grown (Avalanche's example uses a fixed 100-unit head and sees
      the whole benchmark): the classifier and the nearest-mean classifier here also load a state dict
      of a larger copy of themselves.
    * L2P's prompted ViT is Avalanche's ``ViTWithPrompt``, built directly because Avalanche 0.6's
      ``create_model`` does not run with timm 1.0.
    * LaMAML is ``avalanche.training.supervised.lamaml_v2`` (torch.func; the first version needs the
      ``higher`` package).
    * Predictions are restricted to the classes seen so far (cl-bench's contract for ``predict``), so a
      fixed head's untrained units never win, unlike in Avalanche's own evaluation.

Protocol card: an optimizer step is one Avalanche training iteration (one mini-batch; MER and LaMAML
update the weights several times inside one), its samples the mini-batch's targets (Replay's and DER's
include the replayed ones) plus the buffer batch ER-ACE and ER-AML draw beside it and the
``batch_size_mem`` samples MIR adds to the loss (fewer only when its subsample batch is smaller);
GEM's and A-GEM's memory only constrains the gradient and is not counted. A declared budget
(``budget.steps_per_task``/``samples_per_task``) is honoured by a plugin that calls Avalanche's
``stop_training()`` once the task has spent it, with ``train_epochs`` raised so that enough epochs
remain. ``examples_stored``: every storage policy's buffer (Replay, GDumb, MIR, ER-ACE, ER-AML, DER,
MER, LaMAML), GEM's and iCaRL's memories, A-GEM's buffers and Cumulative's concatenated data.

Resume: the common strategies (``_avalanche_state.RESUMABLE``: Naive, Cumulative, Replay, EWC, SI, MAS,
LwF, GEM, A-GEM, DER, ER-ACE) resume after the last completed task like cl-bench's own: the checkpoint
holds, besides the model, what the strategy and its plugins carry to the next experience (buffers,
importances, old model, GEM's memory, optimizer moments, the clock) as tensors and plain data that load
with ``weights_only=True`` (never dill; see ``_avalanche_state``), and the experiences are rebuilt from
the tasks learnt. The others keep state not encoded yet (``not_resumable`` says which): the runner
writes no checkpoint for them and restarts an interrupted run from task 1, saying so; the restarted
run's results equal an uninterrupted run's.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
import typing
import warnings
from contextlib import contextmanager
from unittest import mock

import avalanche
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import IncrementalClassifier, NCMClassifier
from avalanche.models.base_model import BaseModel
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from cl_bench.avalanche_interop import benchmark_of
from cl_bench.errors import UserError, check_ranges
from cl_bench.models.backbone import Backbone, TextBackbone
from cl_bench.scenarios.base import Task
from cl_bench.strategies import _avalanche_state
from cl_bench.strategies.base import OPTIMIZERS, Budget, Context, NonFiniteLoss, Strategy

# Avalanche class name -> module that defines it
SUPPORTED = {name: "avalanche.training" for name in (
    "Naive", "Cumulative", "Replay", "GDumb", "EWC", "SynapticIntelligence", "MAS", "LwF", "GEM", "AGEM",
    "ICaRL", "DER", "ER_ACE", "ER_AML", "MER", "MIR", "LFL", "FromScratchTraining", "LearningToPrompt")}
SUPPORTED["LaMAML"] = "avalanche.training.supervised.lamaml_v2"
ALIASES = {"si": "SynapticIntelligence", "l2p": "LearningToPrompt"}
# the backbones of the papers, for strategies that cannot run on any backbone (see Strategy.paper_backbone):
# L2P's prompted ViT-B/16 (ImageNet-21k, fine-tuned on 1k: Avalanche's default vit_base_patch16_224)
PAPER_BACKBONES = {"LearningToPrompt": dict(
    paper_backbone="vit_b16_in1k", backbone_pattern=r"(vit|deit)_.*",
    backbone_need="it inserts prompts among a timm ViT's input tokens")}
REQUIRED_DEFAULTS = {  # sources in the module docstring
    "EWC": {"ewc_lambda": 1.0}, "SynapticIntelligence": {"si_lambda": 1.0},
    "LwF": {"alpha": 1.0, "temperature": 1.0}, "GEM": {"patterns_per_exp": 256},
    "AGEM": {"patterns_per_exp": 65}, "ICaRL": {"memory_size": 2000, "fixed_memory": True},
    "MIR": {"mem_size": 500, "subsample": 50}, "LFL": {"lambda_e": 0.0001},
}
# what the strategies that do not resume keep beyond the model (see the module docstring)
NOT_ENCODED = {
    "GDumb": "its own class-balanced buffer, from which it retrains a re-initialised model",
    "ICaRL": "its exemplar sets, class means and old model", "ER_AML": "its buffer and the AML criterion",
    "MER": "its reservoir buffer", "MIR": "its reservoir buffer", "LFL": "its old model",
    "FromScratchTraining": "a re-initialised model", "LearningToPrompt": "its prompt pool and frozen query ViT",
    "LaMAML": "its learnt per-parameter learning rates and buffer",
}
UNSUPPORTED = {
    "PNNStrategy": "it is task-incremental (a column per task), but cl-bench scores without task labels",
    "PackNet": "it is task-incremental (a pruned subnetwork per task), but cl-bench scores without task labels",
    "ExpertGateStrategy": "it is task-incremental (an expert per task)",
    "JointTraining": "it trains on the whole stream at once; use strategy=joint",
    "AR1": "it needs its own MobileNetV1 with batch renormalisation, not a cl-bench backbone",
    "StreamingLDA": "it needs a separate SLDA feature model and a fixed class count",
    "GenerativeReplay": "it needs a generator model", "VAETraining": "it trains a VAE, not a classifier",
    "AETraining": "it trains an autoencoder, not a classifier",
    "SCR": "it needs its own projection-head model and augmentations",
    "CoPE": "not wired: it needs a normalised embedding model and its own prototype loss",
    "GSS_greedy": "not wired: it needs the raw input size of a fixed model",
    "CWRStar": "not wired: it needs a fixed output layer to consolidate",
    "BiC": "not wired: its 'lr' (second stage) clashes with the training learning rate key",
    "FeatureReplay": "not wired: it retrains a named last layer on stored features",
}
# arguments the adapter supplies itself
RUNTIME = {"model", "optimizer", "criterion", "device", "plugins", "evaluator", "eval_every", "peval_mode",
           "train_mb_size", "train_epochs", "eval_mb_size", "feature_extractor", "classifier",
           "buffer_transform", "model_name", "num_classes", "pretrained", "use_vit"}
COMMON = {"epochs": (int, 1), "batch_size": (int, 32), "lr": (float, 0.01), "optimizer": (str, "sgd"),
          "momentum": (float, 0.9), "weight_decay": (float, 0.0)}
PLAIN = (int, float, bool, str, type(None), list, tuple)
# DER stores logits in its buffer and compares them with the current ones: its head has one unit per class of
# the stream from the start (a plain linear layer, as in Avalanche's tests and DER's paper)
FIXED_HEAD = {"DER"}
_CLASSES: dict[str, type] = {}


def canonical_name(short: str) -> str:
    """The Avalanche class name for ``short`` (class name, lower case or alias), or a UserError."""
    if short in SUPPORTED:
        return short
    known = {name.lower(): name for name in SUPPORTED} | ALIASES
    if short.lower() in known:
        return known[short.lower()]
    for name, reason in UNSUPPORTED.items():
        if short.lower() == name.lower():
            raise UserError(f"strategy avalanche.{name} is not supported by the adapter: {reason}")
    close = difflib.get_close_matches(short.lower(), sorted(known), n=3, cutoff=0.6)
    hint = f" (did you mean: {', '.join('avalanche.' + c for c in close)}?)" if close else ""
    raise UserError(f"avalanche.{short} is not an Avalanche strategy the adapter knows{hint}; "
                    f"supported: {', '.join(sorted(known))}")


def strategy_class(short: str) -> type:
    """The adapter subclass for one Avalanche strategy, its signature listing the hyperparameters."""
    name = canonical_name(short)
    if name in _CLASSES:
        return _CLASSES[name]
    with _quiet():
        avalanche_class = getattr(importlib.import_module(SUPPORTED[name]), name)
    parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for n in ("self", "backbone", "context")]
    hyper = _hyperparameters(name, avalanche_class)
    own_optimizer = "optimizer" not in inspect.signature(avalanche_class.__init__).parameters
    for key, (kind, default) in COMMON.items():
        if own_optimizer and key in ("optimizer", "momentum", "weight_decay"):
            continue  # L2P builds its own Adam
        if key not in hyper:
            parameters.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind))
    parameters += hyper.values()
    signature = inspect.Signature(parameters)

    def __init__(self, backbone: Backbone, context: Context, **settings):
        try:
            bound = signature.bind(self, backbone, context, **settings)
        except TypeError as error:
            raise UserError(f"avalanche.{name}: {error}") from None
        bound.apply_defaults()
        AvalancheStrategy.__init__(self, backbone, context, {k: v for k, v in bound.arguments.items()
                                                              if k not in ("self", "backbone", "context")})

    __init__.__signature__ = signature
    cls = type(f"Avalanche{name}", (AvalancheStrategy,), {
        "__init__": __init__, "__module__": __name__, "avalanche_name": name, "avalanche_class": avalanche_class,
        "hyperparameter_names": tuple(hyper), "own_optimizer": own_optimizer, **PAPER_BACKBONES.get(name, {}),
        "resumable": name in _avalanche_state.RESUMABLE,
        "not_resumable": "" if name in _avalanche_state.RESUMABLE else (
            f"Avalanche's {name} keeps {NOT_ENCODED[name]}, which cl-bench checkpoints do not hold yet"),
        "description": f"Avalanche {avalanche.__version__} {name} through cl-bench's generic adapter",
        "__doc__": f"Avalanche's {name} ({SUPPORTED[name]}) in the cl-bench runner; see the module docstring."})
    _CLASSES[name] = cls
    return cls


def _hyperparameters(name: str, avalanche_class) -> dict[str, inspect.Parameter]:
    """The Avalanche class's own keyword arguments with plain-valued defaults, as keyword-only parameters."""
    from cl_bench.config import _annotation_types

    try:
        signature = inspect.signature(avalanche_class.__init__, eval_str=True)
    except Exception:
        signature = inspect.signature(avalanche_class.__init__)
    found = {}
    for parameter in list(signature.parameters.values())[1:]:
        if parameter.name in RUNTIME or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        default = REQUIRED_DEFAULTS.get(name, {}).get(parameter.name, parameter.default)
        if default is parameter.empty:
            raise UserError(f"avalanche.{name} requires '{parameter.name}', which the adapter has no default for")
        if not isinstance(default, PLAIN):
            continue  # an object default (e.g. a transform) stays Avalanche's
        annotation = parameter.empty  # unless Avalanche's is plain: the type of the default is checked
        if parameter.annotation is not parameter.empty:
            try:
                types = _annotation_types(parameter.annotation) or ()
            except Exception:
                types = ()
            types = tuple(list if getattr(t, "__name__", "") == "Sequence" else t for t in types)  # not str
            if types and all(t in PLAIN for t in types):
                annotation = types[0] if len(types) == 1 else typing.Union[types]
        found[parameter.name] = inspect.Parameter(parameter.name, inspect.Parameter.KEYWORD_ONLY,
                                                  default=list(default) if isinstance(default, tuple) else default,
                                                  annotation=annotation)
    return found


@contextmanager
def _quiet():
    """Avalanche warns a lot about things that do not apply here (no loggers, its deprecated internals and
    timm imports, ...): its warnings and deprecation notices are dropped, any other warning is passed on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        if not ("avalanche" in str(warning.filename) or "No loggers" in str(warning.message)
                or issubclass(warning.category, (DeprecationWarning, FutureWarning))):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


class AvalancheStrategy(Strategy):
    """Runs one Avalanche strategy (``avalanche_class``) on cl-bench tasks; see the module docstring."""

    avalanche_name = ""
    avalanche_class = None
    hyperparameter_names: tuple[str, ...] = ()
    own_optimizer = False

    def __init__(self, backbone: Backbone, context: Context, settings: dict):
        super().__init__(backbone, context)
        name = f"avalanche.{self.avalanche_name}"
        self.epochs, self.batch_size, self.lr = settings["epochs"], settings["batch_size"], settings["lr"]
        check_ranges("strategy", epochs=(self.epochs, ">= 0"), batch_size=(self.batch_size, ">= 1"),
                     lr=(self.lr, ">= 0"))
        if not self.own_optimizer and settings["optimizer"] not in OPTIMIZERS:
            raise UserError(f"{name}: strategy.optimizer must be one of {', '.join(OPTIMIZERS)}, "
                            f"got '{settings['optimizer']}'")
        if isinstance(backbone, TextBackbone):
            raise UserError(f"{name} needs tensor inputs, but backbone '{type(backbone.net).__name__}' takes text: "
                            f"use it frozen (model.frozen=true), so the strategy trains on its cached features")
        self.settings = dict(settings)
        self.tasks: list[Task] = []
        self.classes_seen = 0
        self.experience = None  # the last Avalanche training experience
        self.counter = _Bookkeeping(name, self.lr, context.budget,
                                    on_step=self.count_step)
        with _quiet():
            self._seed()
            try:
                self.avalanche = self._build({k: settings[k] for k in self.hyperparameter_names})
            except (ValueError, AssertionError, TypeError) as error:
                raise UserError(f"{name} rejected its settings: {type(error).__name__}: {error}") from error
        self.model = self.avalanche.model  # registered, so .to(), .eval() and parameter counts see it
        self._carried: dict | None = None  # from a checkpoint, until ``resumed`` puts it in place

    def _seed(self) -> None:
        RNGManager.set_random_seeds(int(torch.randint(0, 2**31 - 1, (1,), generator=self.context.generator)))

    def _build(self, hyper: dict):
        cls = self.avalanche_class
        accepts = inspect.signature(cls.__init__).parameters
        kwargs = dict(hyper, train_mb_size=self.batch_size, train_epochs=self.epochs, eval_mb_size=self.batch_size,
                      device=self.device, evaluator=EvaluationPlugin(loggers=[]), plugins=[self.counter])
        if cls.__name__ == "LearningToPrompt":
            return self._build_l2p(kwargs)
        features = _Features(self.backbone)
        if self.avalanche_name in FIXED_HEAD:
            head = nn.Linear(self.backbone.out_dim, self._num_classes())
        else:
            head = GrowingClassifier(self.backbone.out_dim)
        if "model" in accepts:
            model = Network(features, head)
            kwargs["model"] = model
            if "feature_extractor" in accepts:  # ER-AML
                kwargs["feature_extractor"] = features
        else:  # iCaRL builds its model from the two parts
            model = nn.ModuleList([features, head])
            kwargs.update(feature_extractor=features, classifier=head, buffer_transform=None)
        if "criterion" in accepts:
            kwargs["criterion"] = nn.CrossEntropyLoss()
        options = dict(lr=self.lr, weight_decay=self.settings["weight_decay"])
        if self.settings["optimizer"] == "sgd":
            options["momentum"] = self.settings["momentum"]
        kwargs["optimizer"] = OPTIMIZERS[self.settings["optimizer"]](model.parameters(), **options)
        strategy = cls(**kwargs)
        if self.avalanche_name == "ICaRL":
            strategy.model.eval_classifier = GrowingNCM(normalize=strategy.model.eval_classifier.normalize)
        return strategy

    def _num_classes(self) -> int:
        if not self.context.num_classes:
            raise UserError(f"avalanche.{self.avalanche_name} sizes its output layer once and needs the stream's "
                            f"class count (context.num_classes, set by the runner)")
        return self.context.num_classes

    def _build_l2p(self, kwargs: dict):
        import avalanche.models.vit as avalanche_vit
        from timm.models.vision_transformer import VisionTransformer

        if self.backbone.preprocessing.get("cached_features"):
            raise UserError("avalanche.LearningToPrompt inserts prompts among the ViT's input tokens, so it needs the "
                            "images, not cached features: set model.frozen=false (L2P freezes the ViT itself)")
        if not isinstance(self.backbone.net, VisionTransformer):
            raise UserError(f"avalanche.LearningToPrompt needs a ViT backbone (a timm VisionTransformer, e.g. "
                            f"model=vit_tiny_test or model=vit_base_patch16_224), "
                            f"got {type(self.backbone.net).__name__}")
        self.backbone.requires_grad_(False)  # L2P trains prompts and head of its own copy
        builder = "_cl_bench_backbone_vit"
        num_classes = self._num_classes()
        with mock.patch.dict(avalanche_vit.__dict__, {builder: _vit_builder(self.backbone)}):
            strategy = self.avalanche_class(model_name=builder, pretrained=False, num_classes=num_classes, **kwargs)
        if strategy.model.embed_dim != 768:  # L2P's head is hard-coded for ViT-B's width
            strategy.model.head = nn.Linear(strategy.model.embed_dim, num_classes).to(self.device)
        return strategy

    def learn(self, task: Task) -> None:
        self.tasks.append(task)
        with _quiet():
            self.experience = benchmark_of(self.tasks).train_stream[len(self.tasks) - 1]
            self._seed()
            self.counter.start(task.name)
            budget = self.context.budget
            if budget is not None:  # every iteration takes a step on >= 1 sample: this many epochs suffice
                self.avalanche.train_epochs = budget.steps_per_task or budget.samples_per_task
            self.avalanche.train(self.experience, eval_streams=[])
            self.avalanche._stop_training = False  # set on the task's very last iteration, it would stop the next
        if budget is not None and not self.counter.spent():
            raise UserError(f"avalanche.{self.avalanche_name} could not spend the budget of {budget} on "
                            f"{task.name}: it took {self.counter.steps} steps on {self.counter.samples} samples")
        self.model = self.avalanche.model  # GDumb and FromScratchTraining replace it
        self.classes_seen = max(self.classes_seen, max(task.classes) + 1)

    def examples_stored(self) -> int:
        return stored_examples(self.avalanche)

    def get_extra_state(self):
        state = super().get_extra_state()
        return {**state, "avalanche": _avalanche_state.capture(self.avalanche)} if self.resumable else state

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self._carried = state.get("avalanche")

    def resumed(self, learnt: list[Task]) -> None:
        self.tasks = list(learnt)
        with _quiet():
            experiences = list(benchmark_of(self.tasks).train_stream)
            _avalanche_state.restore(self.avalanche, self._carried, experiences)
        self.experience = experiences[-1]
        self.classes_seen = max(max(task.classes) for task in learnt) + 1
        self._carried = None

    @torch.no_grad()
    def predict(self, inputs) -> torch.Tensor:
        if self.experience is None:  # nothing learnt yet: no class has a logit
            return torch.zeros(len(inputs), 0, device=self.device)
        strategy = self.avalanche
        x = inputs.to(self.device)
        zeros = torch.zeros(len(x), dtype=torch.long, device=self.device)
        saved = strategy.experience, strategy.mbatch, strategy.is_training
        strategy.experience, strategy.mbatch, strategy.is_training = self.experience, [x, zeros, zeros], False
        try:
            strategy.model.eval()
            strategy._before_eval_forward()
            strategy.mb_output = strategy.forward()
            strategy._after_eval_forward()
            logits = strategy.mb_output
        finally:
            strategy.experience, strategy.mbatch, strategy.is_training = saved
            strategy.mb_output = None
        return logits[:, : self.classes_seen]


class _Features(nn.Module):
    """The backbone with its input preprocessing: raw batch (as Avalanche collates it) -> features."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(self.backbone.prepare(x, x.device))


class Network(nn.Module, BaseModel):
    """features -> classifier; ``get_features`` is Avalanche's BaseModel API (used by LFL)."""

    def __init__(self, features: nn.Module, classifier: nn.Module):
        super().__init__()
        self.features, self.classifier = features, classifier

    def get_features(self, x):
        return self.features(x)

    def forward(self, x, task_labels=None):  # LaMAML calls model(x, t)
        return self.classifier(self.features(x))


class GrowingClassifier(IncrementalClassifier):
    """Avalanche's IncrementalClassifier that also loads the state dict of a grown copy of itself."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        weight = state_dict.get(prefix + "classifier.weight")
        if weight is not None and weight.shape[0] != self.classifier.out_features:
            device = self.classifier.weight.device
            self.classifier = nn.Linear(self.classifier.in_features, weight.shape[0]).to(device)
            self.active_units = torch.zeros(weight.shape[0], dtype=torch.int8, device=device)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GrowingNCM(NCMClassifier):
    """Avalanche's NCMClassifier that also loads the state dict of a copy with more class means (iCaRL's
    loss reloads its old model from the current one every experience)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        means = state_dict.get(prefix + "class_means")
        if means is not None and (self.class_means is None or self.class_means.shape != means.shape):
            self.class_means = torch.zeros_like(means)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _vit_architecture(net) -> dict:
    block = net.blocks[0]
    return dict(img_size=tuple(net.patch_embed.img_size), patch_size=tuple(net.patch_embed.patch_size),
                in_chans=net.patch_embed.proj.in_channels, embed_dim=net.embed_dim, depth=len(net.blocks),
                num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / net.embed_dim,
                qkv_bias=block.attn.qkv.bias is not None, class_token=net.cls_token is not None,
                no_embed_class=net.no_embed_class, global_pool=net.global_pool,
                pre_norm=not isinstance(net.norm_pre, nn.Identity), fc_norm=not isinstance(net.fc_norm, nn.Identity),
                init_values=1e-5 if not isinstance(block.ls1, nn.Identity) else None)


def _vit_builder(backbone: Backbone):
    """What Avalanche's ``create_model`` calls for L2P: its ViTWithPrompt with the backbone's architecture,
    weights and input preprocessing."""
    from avalanche.models.timm_vit import ViTWithPrompt, checkpoint_filter_fn

    class PreparedViT(ViTWithPrompt):
        def forward_features(self, x, task_id=-1, cls_features=None, train=False):
            x = backbone.prepare(x, x.device)
            return super().forward_features(x, task_id=task_id, cls_features=cls_features, train=train)

    def build(pretrained=False, **options):
        model = PreparedViT(**_vit_architecture(backbone.net), **options)
        try:
            missing, unexpected = model.load_state_dict(checkpoint_filter_fn(backbone.net.state_dict(), model),
                                                        strict=False)
        except RuntimeError as error:
            raise UserError(f"avalanche.LearningToPrompt could not copy the backbone's weights into its ViT: "
                            f"{' '.join(str(error).split())[:200]}") from error
        missing = [k for k in missing if not k.startswith(("head.", "prompt."))]
        if missing or unexpected:
            raise UserError(f"avalanche.LearningToPrompt's ViT does not match the backbone "
                            f"(first difference: {(missing + unexpected)[0]})")
        return model

    return build


def stored_examples(strategy) -> int:
    """Past examples an Avalanche strategy holds (see the module docstring for where each keeps them)."""
    total = 0
    for holder in (strategy, getattr(strategy, "buffer", None), *strategy.plugins):
        policy = getattr(holder, "storage_policy", None)
        total += len(policy.buffer) if policy is not None else 0
        total += sum(len(x) for x in getattr(holder, "memory_x", {}).values())  # GEM
        total += sum(len(x) for x in getattr(holder, "x_memory", []))  # iCaRL
        total += sum(len(d) for d in getattr(holder, "buffers", []))  # A-GEM
    if type(strategy).__name__ == "Cumulative" and strategy.dataset is not None:
        total += len(strategy.dataset)
    return total


class _Bookkeeping(SupervisedPlugin):
    """Counts each training iteration (an optimizer step) through ``on_step(samples, loss, optimizer)`` (the cl-bench
    strategy's ``count_step``) and per task, stops the run on a non-finite loss and stops training once
    the task has spent ``budget``."""

    def __init__(self, name: str, lr: float, budget: Budget | None, on_step):
        super().__init__()
        self.name, self.lr, self.budget, self.on_step = name, lr, budget, on_step
        self.task, self.steps, self.samples = "", 0, 0

    def start(self, task: str) -> None:
        self.task, self.steps, self.samples = task, 0, 0

    def spent(self) -> bool:
        if self.budget.steps_per_task is not None:
            return self.steps >= self.budget.steps_per_task
        return self.samples >= self.budget.samples_per_task

    def after_training_iteration(self, strategy, **kwargs):
        loss = strategy.loss
        if isinstance(loss, torch.Tensor) and not math.isfinite(float(loss.detach().float().sum())):
            raise NonFiniteLoss(f"loss became {float(loss.detach().sum())} in {self.task} with {self.name}; "
                                f"try a smaller strategy.lr (now {self.lr})")
        replayed = getattr(strategy, "mb_buffer_y", None)  # ER-ACE, ER-AML: a buffer batch beside the mini-batch
        replayed = len(replayed) if replayed is not None else 0
        for plugin in strategy.plugins:  # MIR: its most interfered buffer samples join the loss
            if type(plugin).__name__ == "MIRPlugin" and plugin.replay_loader is not None:
                replayed += plugin.batch_size_mem
        self.steps += 1
        self.samples += len(strategy.mb_y) + replayed
        self.on_step(len(strategy.mb_y) + replayed, loss, strategy.optimizer)
        if self.budget is not None and self.spent():
            strategy.stop_training()

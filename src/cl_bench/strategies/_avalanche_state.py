"""An Avalanche strategy's state between experiences, as data that ``torch.load(weights_only=True)`` reads.

Avalanche saves a strategy with dill, which cl-bench checkpoints never load. What a strategy carries from
one experience to the next lives in a few attributes of the strategy and its plugins (``HELD``); they are
encoded here as tensors, numbers, strings, lists and dicts, with a tag for what those cannot say (a set, a
tuple, a dict with integer keys, Avalanche's ``ParamData``, a replay buffer, a dataset, a model), and
decoded into the freshly built strategy of the resumed run. Besides those: the optimizer's per-parameter
state (Avalanche keeps one optimizer for the whole stream, so SGD's momentum crosses experiences) keyed by
parameter name, and the clock's counters (EWC and SI read the experience counter).

Datasets are stored as their items (inputs, targets, task labels and any extra attribute, such as DER's
logits) and rebuilt as Avalanche classification datasets holding the same items; Cumulative's concatenated
dataset is not stored but rebuilt from the experiences of the tasks learnt (``restore``'s ``experiences``).
"""
from __future__ import annotations

import copy
from collections import defaultdict

import torch
from avalanche.benchmarks.utils import AvalancheDataset, concat_datasets
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_classification_dataset
from avalanche.benchmarks.utils.data import make_avalanche_dataset
from avalanche.benchmarks.utils.data_attribute import TensorDataAttribute
from avalanche.benchmarks.utils.flat_data import FlatData
from avalanche.benchmarks.utils.data_loader import GroupBalancedInfiniteDataLoader
from avalanche.models.dynamic_optimizers import reset_optimizer
from avalanche.training import storage_policy
from avalanche.training.supervised.der import ClassBalancedBufferWithLogits
from avalanche.training.utils import ParamData
from torch import nn

from cl_bench.avalanche_interop import LabelledData
from cl_bench.scenarios.base import Samples

# holder class name -> the attributes it carries across experiences (the holder: the strategy, one of its
# plugins, or LwF's helper object)
HELD = {
    "ReplayPlugin": ("storage_policy",),
    "EWCPlugin": ("saved_params", "importances"),
    "SynapticIntelligencePlugin": ("ewc_data", "syn_data"),
    "MASPlugin": ("params", "importance"),
    "LearningWithoutForgetting": ("prev_model", "expcount", "prev_classes_by_task"),
    "GEMPlugin": ("memory_x", "memory_y", "memory_tid"),
    "AGEMPlugin": ("buffers",),
    "DER": ("storage_policy",),
    "ER_ACE": ("storage_policy",),
    "Clock": ("train_iterations", "train_exp_counter", "train_exp_epochs", "train_exp_iterations",
              "train_epoch_iterations", "total_iterations"),
}
# the strategies whose whole carried state is above (plus the model, the optimizer and the clock)
RESUMABLE = ("Naive", "Cumulative", "Replay", "EWC", "SynapticIntelligence", "MAS", "LwF", "GEM", "AGEM", "DER",
             "ER_ACE")
# replay buffers rebuilt from their attributes (no references to the strategy or to functions)
BUFFERS = {cls.__name__: cls for cls in (storage_policy.ReservoirSamplingBuffer, storage_policy.ExperienceBalancedBuffer,
                                         storage_policy.ClassBalancedBuffer, ClassBalancedBufferWithLogits)}
TAG = "__avalanche__"


def holders(strategy) -> dict[str, object]:
    """The objects of ``strategy`` that carry state, by class name."""
    found = {type(strategy).__name__: strategy}
    for plugin in strategy.plugins:
        found[type(plugin).__name__] = plugin
        if hasattr(plugin, "lwf"):
            found[type(plugin.lwf).__name__] = plugin.lwf
    return {name: holder for name, holder in found.items() if name in HELD}


def capture(strategy) -> dict:
    """The state ``strategy`` carries into its next experience, as plain data and tensors."""
    optimizer_state = {}
    parameters = strategy.optimized_param_id or {}
    for name, parameter in parameters.items():
        if strategy.optimizer.state.get(parameter):
            optimizer_state[name] = encode(dict(strategy.optimizer.state[parameter]))
    return {"optimizer": {"started": strategy.optimized_param_id is not None, "state": optimizer_state},
            "held": {name: {attribute: encode(getattr(holder, attribute)) for attribute in HELD[name]}
                     for name, holder in holders(strategy).items()}}


def restore(strategy, state: dict, experiences: list) -> None:
    """Put ``state`` (from ``capture``) into a freshly built ``strategy`` whose model already holds the
    checkpoint's weights; ``experiences`` are the training experiences of the tasks learnt so far."""
    device = strategy.device
    found = holders(strategy)
    for name, attributes in state["held"].items():
        for attribute, value in attributes.items():
            setattr(found[name], attribute, decode(value, strategy.model, device))
    if type(strategy).__name__ == "Cumulative":  # the concatenation of every experience's data, in order
        strategy.dataset = experiences[0].dataset
        for experience in experiences[1:]:
            strategy.dataset = concat_datasets([strategy.dataset, experience.dataset])
    agem = found.get("AGEMPlugin")
    if agem is not None and agem.buffers:  # what its update_memory builds after each experience
        agem.buffer_dataloader = GroupBalancedInfiniteDataLoader(
            agem.buffers, batch_size=agem.sample_size // len(agem.buffers), num_workers=0, pin_memory=False,
            persistent_workers=False)
        agem.buffer_dliter = iter(agem.buffer_dataloader)
    if state["optimizer"]["started"]:  # the optimizer Avalanche keeps, over the parameters by name
        strategy.optimized_param_id = reset_optimizer(strategy.optimizer, strategy.model)
        for name, values in state["optimizer"]["state"].items():
            strategy.optimizer.state[strategy.optimized_param_id[name]] = decode(values, None, device)


def encode(value):
    """``value`` in types ``torch.load(weights_only=True)`` accepts; see ``decode``."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [encode(item) for item in value]
    if isinstance(value, tuple):
        return {TAG: "tuple", "items": [encode(item) for item in value]}
    if isinstance(value, (set, frozenset)):
        return {TAG: "set", "items": sorted(value)}
    if isinstance(value, dict):
        factory = getattr(value, "default_factory", None)
        return {TAG: "dict", "default": factory.__name__ if factory else None,
                "items": [[encode(key), encode(item)] for key, item in value.items()]}
    if isinstance(value, ParamData):
        return {TAG: "ParamData", "name": value.name, "data": encode(value.data)}
    if type(value).__name__ in BUFFERS:
        return {TAG: "buffer", "type": type(value).__name__,
                "attributes": {key: encode(item) for key, item in vars(value).items()}}
    if isinstance(value, AvalancheDataset):
        return {TAG: "dataset", **dataset_items(value)} if len(value) else {TAG: "empty dataset"}
    if isinstance(value, nn.Module):
        return {TAG: "module", "state": {key: encode(item) for key, item in value.state_dict().items()}}
    raise TypeError(f"cannot checkpoint a {type(value).__name__}")


def decode(value, model: nn.Module, device: torch.device):
    """The value ``encode`` wrote (a dict with its default factory); ``model`` is the strategy's model (a
    stored model is a copy of it with the stored weights)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [decode(item, model, device) for item in value]
    if not isinstance(value, dict) or TAG not in value:
        return value
    kind = value[TAG]
    if kind == "tuple":
        return tuple(decode(item, model, device) for item in value["items"])
    if kind == "set":
        return set(value["items"])
    if kind == "dict":
        factory = {"dict": dict, "set": set, "list": list}.get(value["default"])
        result = defaultdict(factory) if factory else {}
        for key, item in value["items"]:
            result[decode(key, model, device)] = decode(item, model, device)
        return result
    if kind == "ParamData":
        data = value["data"].to(device)
        return ParamData(value["name"], init_tensor=data, device=device)
    if kind == "buffer":
        buffer = BUFFERS[value["type"]].__new__(BUFFERS[value["type"]])
        vars(buffer).update({key: decode(item, model, device) for key, item in value["attributes"].items()})
        return buffer
    if kind == "dataset":
        return dataset_of(value)
    if kind == "empty dataset":
        return concat_datasets([])
    if kind == "module":
        copied = copy.deepcopy(model)
        copied.load_state_dict({key: item.to(device) for key, item in value["state"].items()})
        return copied
    raise ValueError(f"unknown stored kind {kind!r}")


def dataset_items(dataset: AvalancheDataset) -> dict:
    """A classification dataset's items: inputs, targets, task labels and the extra attributes its items
    carry after those (DER's logits), each stacked."""
    items = [dataset[i] for i in range(len(dataset))]
    extra = [name for name, attribute in dataset._data_attributes.items()
             if attribute.use_in_getitem and name != "targets_task_labels"]
    return {"inputs": torch.stack([item[0] for item in items]),
            "targets": torch.tensor([int(item[1]) for item in items], dtype=torch.long),
            "task_labels": [int(item[2]) for item in items],
            "extra": {name: torch.stack([item[3 + k] for item in items]) for k, name in enumerate(extra)}}


def dataset_of(stored: dict) -> AvalancheDataset:
    """The classification dataset whose items are ``stored`` (from ``dataset_items``)."""
    labels = stored["task_labels"]  # one label for all is held as Avalanche holds it (a ConstantSequence, which
    # concatenates only with its own kind first)
    dataset = _make_taskaware_classification_dataset(LabelledData([Samples(stored["inputs"], stored["targets"])]),
                                                     task_labels=labels[0] if len(set(labels)) == 1 else labels)
    if stored["extra"]:
        dataset = make_avalanche_dataset(dataset, data_attributes=[
            TensorDataAttribute(FlatData([values], discard_elements_not_in_indices=True), name=name,
                                use_in_getitem=True) for name, values in stored["extra"].items()])
    return dataset

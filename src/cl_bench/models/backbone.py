"""Backbones: a feature extractor plus the preprocessing its inputs need.

``features = backbone(backbone.prepare(inputs, device))``. ``prepare`` turns raw stream inputs
(uint8 images, float vectors or strings) into what the network expects; strategies never
preprocess themselves. A frozen backbone's features are computed once and cached on disk
(``FeatureCache``), keyed by the backbone's weights, the data and the preprocessing.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench._io import atomic_torch_save


def weights_fingerprint(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class Backbone(nn.Module):
    """Wraps ``net`` (inputs -> (B, out_dim) features) with its input preprocessing."""

    def __init__(self, net: nn.Module, out_dim: int, *, frozen: bool = False, preprocessing: dict | None = None):
        super().__init__()
        self.net, self.out_dim, self.frozen = net, out_dim, frozen
        self.preprocessing = dict(preprocessing or {})
        if frozen:
            self.net.requires_grad_(False)

    def prepare(self, inputs, device):
        return inputs.to(device).float()

    def forward(self, prepared):
        return self.net(prepared)

    def train(self, mode: bool = True):
        """A frozen backbone stays in eval mode (batch-norm statistics and dropout stay fixed)."""
        return super().train(mode and not self.frozen)

    def describe(self) -> dict:
        return {"class": type(self).__name__, "out_dim": self.out_dim, **self.preprocessing}


class ImageBackbone(Backbone):
    """uint8 (B, C, H, W) images -> floats in [0, 1], channels matched, resized, normalised."""

    def __init__(self, net, out_dim, *, in_chans: int, image_size: int | None, mean, std, frozen=False):
        super().__init__(net, out_dim, frozen=frozen, preprocessing=dict(
            in_chans=in_chans, image_size=image_size, mean=list(mean), std=list(std)))
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def prepare(self, inputs, device):
        x = inputs.to(device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        in_chans, size = self.preprocessing["in_chans"], self.preprocessing["image_size"]
        grey = x.shape[1] != in_chans and in_chans in (1, 3)
        if grey:  # resized as one channel, then copied: resizing acts on each channel alone
            x = x.mean(1, keepdim=True)
        if size and tuple(x.shape[-2:]) != (size, size):
            # antialiasing only acts when shrinking (enlarging, its weights are plain bilinear's)
            shrinks = x.shape[-2] > size or x.shape[-1] > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinks)
        if grey:
            x = x.expand(-1, in_chans, -1, -1)
        return (x - self.mean) / self.std


class VectorBackbone(Backbone):
    """Float vectors (or images, flattened) -> an MLP or the identity."""

    def prepare(self, inputs, device):
        x = inputs.to(device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return x.flatten(1)


class TextBackbone(Backbone):
    """Strings -> tokenised batch -> mean-pooled last hidden states of a transformer encoder."""

    def __init__(self, net, tokenizer, out_dim, *, max_length: int, frozen=False, source=""):
        super().__init__(net, out_dim, frozen=frozen, preprocessing=dict(max_length=max_length, tokenizer=source))
        self.tokenizer = tokenizer

    def prepare(self, inputs, device):
        batch = self.tokenizer(list(inputs), padding=True, truncation=True,
                               max_length=self.preprocessing["max_length"], return_tensors="pt")
        return {key: value.to(device) for key, value in batch.items()}

    def forward(self, prepared):
        hidden = self.net(**prepared).last_hidden_state
        mask = prepared["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class FeatureCache:
    """Features of a frozen backbone, computed once per (weights, data, preprocessing) and kept on disk."""

    def __init__(self, directory: str | Path, *, batch_size: int = 256, device="cpu", progress=None):
        self.directory = Path(directory).expanduser() / "features"
        self.batch_size, self.device, self.progress = batch_size, device, progress

    def key(self, backbone: Backbone, samples) -> str:
        description = json.dumps(backbone.describe(), sort_keys=True, default=str)
        text = f"{weights_fingerprint(backbone)}|{samples.fingerprint()}|{description}"
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    @torch.no_grad()
    def encode(self, backbone: Backbone, samples) -> torch.Tensor:
        path = self.directory / f"{self.key(backbone, samples)}.pt"
        if path.is_file():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(stored, torch.Tensor) and stored.dim() == 2 and len(stored) == len(samples):
                    return stored
            except Exception:
                pass
            path.unlink(missing_ok=True)  # a damaged or foreign cache entry is recomputed
        backbone.eval().to(self.device)
        chunks = []
        starts = range(0, len(samples), self.batch_size)
        if self.progress is not None:
            starts = self.progress(starts, "features")
        for start in starts:
            inputs = samples.inputs[start:start + self.batch_size]
            chunks.append(backbone(backbone.prepare(inputs, self.device)).float().cpu())
        features = torch.cat(chunks) if chunks else torch.empty(0, backbone.out_dim)
        atomic_torch_save(path, features)  # parallel runs may write the same entry: each renames a whole file
        return features

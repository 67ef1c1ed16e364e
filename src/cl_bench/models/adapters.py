"""Bottleneck adapters added in parallel to the feed-forward part of every transformer block.

``inject_parallel_adapters(net)`` rewires a timm Vision Transformer or a Hugging Face BERT-style
encoder in place, without forking its code: in every block, with ``h`` the hidden state that enters
the feed-forward part (after the attention residual), the block computes ``FFN(h) + a(h)`` instead
of ``FFN(h)`` (AdaptFormer's "parallel" placement; the adapter reads ``h`` itself, not its
LayerNorm). Which adapter ``a`` each block adds is chosen at run time through the returned
``AdapterRouter``; with no adapters selected the network computes exactly what it computed before.
The injected sites own no parameters: adapters live with whoever owns the router (a strategy).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench.errors import UserError


class BottleneckAdapter(nn.Module):
    """a(h) = scale * (W_up Dropout(ReLU(W_down h + b_down)) + b_up).

    W_down keeps nn.Linear's kaiming-uniform initialisation; b_down, W_up and b_up start at zero,
    so a fresh adapter adds exactly zero."""

    def __init__(self, dim: int, bottleneck: int, *, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.down, self.up = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        self.scale, self.dropout = scale, nn.Dropout(dropout)
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(F.relu(self.down(hidden))))


def adapter_set(num_layers: int, dim: int, bottleneck: int, **options) -> nn.ModuleList:
    """One adapter per transformer block: num_layers * (2 * dim * bottleneck + bottleneck + dim) parameters."""
    return nn.ModuleList(BottleneckAdapter(dim, bottleneck, **options) for _ in range(num_layers))


class AdapterRouter:
    """Tells every injected block which adapter to add. ``adapters`` is None (plain backbone) or a
    sequence with one adapter per block; ``before_layer(index)``, when set, runs before block
    ``index`` reads its adapter (used to reproduce code that edits adapters during a forward)."""

    def __init__(self, num_layers: int, dim: int):
        self.num_layers, self.dim = num_layers, dim
        self.adapters = None
        self.before_layer: Callable[[int], None] | None = None

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.adapters is None:
            return None
        if self.before_layer is not None:
            self.before_layer(layer)
        return self.adapters[layer](hidden)


class _TimmFeedForwardSite(nn.Module):
    """Replaces ``block.mlp`` (with ``block.norm2`` moved inside): h -> mlp(norm(h)) + a(h)."""

    def __init__(self, norm: nn.Module, mlp: nn.Module, layer: int, router: AdapterRouter):
        super().__init__()
        self.norm, self.mlp, self.layer, self.router = norm, mlp, layer, router

    def forward(self, hidden):
        out = self.mlp(self.norm(hidden))
        added = self.router(self.layer, hidden)
        return out if added is None else out + added


class _BertOutputSite(nn.Module):
    """Replaces a BERT layer's ``output`` (LayerNorm(dropout(dense(x)) + h)) by
    LayerNorm(dropout(dense(x)) + a(h) + h), h being the attention output."""

    def __init__(self, output: nn.Module, layer: int, router: AdapterRouter):
        super().__init__()
        self.output, self.layer, self.router = output, layer, router

    def forward(self, hidden_states, input_tensor):
        added = self.router(self.layer, input_tensor)
        return self.output(hidden_states, input_tensor if added is None else input_tensor + added)


SITES = (_TimmFeedForwardSite, _BertOutputSite)


def inject_parallel_adapters(net: nn.Module) -> AdapterRouter:
    """Rewire ``net`` (timm ViT with ``blocks``, or an HF encoder with ``encoder.layer``) in place."""
    if any(isinstance(module, SITES) for module in net.modules()):
        raise UserError("this backbone already has adapters injected")
    blocks = getattr(net, "blocks", None)
    layers = getattr(getattr(net, "encoder", None), "layer", None)
    if blocks is not None and all(hasattr(b, "mlp") and hasattr(b, "norm2") for b in blocks):
        for block in blocks:
            if not all(isinstance(getattr(block, name, nn.Identity()), nn.Identity) for name in ("ls2", "drop_path2")):
                raise UserError("parallel adapters need ViT blocks without layer scale or drop path "
                                "after the MLP (build the model with init_values=None, drop_path_rate=0)")
        router = AdapterRouter(len(blocks), net.embed_dim)
        for index, block in enumerate(blocks):
            block.mlp = _TimmFeedForwardSite(block.norm2, block.mlp, index, router)
            block.norm2 = nn.Identity()
        return router
    if layers is not None and all(hasattr(getattr(l, "output", None), "LayerNorm") for l in layers):
        router = AdapterRouter(len(layers), net.config.hidden_size)
        for index, layer in enumerate(layers):
            layer.output = _BertOutputSite(layer.output, index, router)
        return router
    raise UserError(f"cannot inject adapters into {type(net).__name__}: need a timm Vision Transformer "
                    "(blocks with mlp and norm2) or a BERT-style encoder (encoder.layer[i].output); "
                    "a frozen backbone is replaced by cached features, so set model.frozen=false")

"""Compact Convolutional Transformer (Hassani et al., 2021, "Escaping the Big Data Paradigm with
Compact Transformers", arXiv:2104.05704), in the variant ConTraCon trains from scratch.

A convolutional tokenizer (conv without bias -> ReLU -> max-pool, repeated) turns the image into
tokens; a fixed sinusoidal position embedding is added; each encoder layer computes
``u = LN1(x + DropPath(MHSA(LN_pre(x))))`` then ``u + DropPath(MLP(u))`` (CCT's placement of the
second norm); sequence pooling weights the tokens by a softmax over ``Linear(D, 1)`` scores.
Attention and MLP are timm's modules (bias-free Q/K/V and output projection, fused ``qkv``), so
methods inject into it exactly as into a timm ViT. ``forward`` returns the pooled (B, D) features.
"""
from __future__ import annotations

import torch
from timm.layers import DropPath, Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from cl_bench.errors import UserError, check_ranges
from cl_bench.models.backbone import Backbone, ImageBackbone


class Tokenizer(nn.Sequential):
    """``layers`` x (Conv k x k, no bias -> ReLU -> MaxPool 3/2/1); channels in -> 64 -> ... -> dim."""

    def __init__(self, in_chans: int, dim: int, layers: int, kernel_size: int):
        stride, padding = max(1, kernel_size // 2 - 1), max(1, kernel_size // 2)
        widths = [in_chans] + [64] * (layers - 1) + [dim]
        blocks = []
        for a, b in zip(widths, widths[1:]):
            blocks += [nn.Conv2d(a, b, kernel_size, stride, padding, bias=False), nn.ReLU(),
                       nn.MaxPool2d(3, 2, 1)]
        super().__init__(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images).flatten(2).transpose(1, 2)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, attn_drop: float):
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=False, proj_bias=False, attn_drop=attn_drop)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop_path(self.attn(self.pre_norm(x))))
        return x + self.drop_path(self.mlp(x))


class SequencePool(nn.Module):
    """Softmax-over-tokens weighted mean of the tokens; the weights come from ``scorer``."""

    def __init__(self, dim: int):
        super().__init__()
        self.scorer = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weights = self.scorer(tokens).softmax(dim=1)
        return (weights * tokens).sum(dim=1)


def sinusoidal_embedding(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    frequency = 10000.0 ** (-2 * (torch.arange(dim) // 2) / dim)
    angles = position * frequency
    angles[:, 0::2], angles[:, 1::2] = angles[:, 0::2].sin(), angles[:, 1::2].cos()
    return angles.float().unsqueeze(0)


class CCT(nn.Module):
    def __init__(self, *, image_size: int, in_chans: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, conv_layers: int, conv_kernel: int, drop_path: float = 0.1,
                 attn_drop: float = 0.1):
        super().__init__()
        self.num_features = dim
        self.tokenizer = Tokenizer(in_chans, dim, conv_layers, conv_kernel)
        with torch.no_grad():
            length = self.tokenizer(torch.zeros(1, in_chans, image_size, image_size)).shape[1]
        self.register_buffer("pos_embed", sinusoidal_embedding(length, dim), persistent=False)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.Sequential(*[EncoderLayer(dim, num_heads, mlp_ratio, rate, attn_drop) for rate in rates])
        self.pool = SequencePool(dim)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens after the last encoder layer."""
        return self.blocks(self.tokenizer(images) + self.pos_embed)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(images))


def cct(input_kind: str, input_shape: tuple, *, image_size: int = 32, embed_dim: int = 256, depth: int = 6,
        num_heads: int = 4, mlp_ratio: float = 2.0, conv_layers: int = 1, conv_kernel: int = 3,
        mean: list[float] | None = None, std: list[float] | None = None, frozen: bool = False) -> Backbone:
    """CCT trained from scratch; the defaults are CCT-6/3x1 for 32 px images (ConTraCon's CIFAR-100
    model, 3.2 M parameters). ``mean``/``std`` default to 0.5 per channel."""
    if input_kind != "image" or len(input_shape) != 3:
        raise UserError(f"model 'cct' takes images, but this scenario gives {input_kind} inputs")
    check_ranges("model", num_heads=(num_heads, ">= 1"), conv_layers=(conv_layers, ">= 1"),
                 conv_kernel=(conv_kernel, ">= 1"))
    if embed_dim % num_heads:
        raise UserError(f"model.embed_dim must be divisible by model.num_heads, got {embed_dim} and {num_heads}")
    in_chans = input_shape[0]
    mean, std = list(mean or [0.5] * in_chans), list(std or [0.5] * in_chans)
    if len(mean) != in_chans or len(std) != in_chans:
        raise UserError(f"model.mean and model.std need {in_chans} values (one per input channel)")
    net = CCT(image_size=image_size, in_chans=in_chans, dim=embed_dim, depth=depth, num_heads=num_heads,
              mlp_ratio=mlp_ratio, conv_layers=conv_layers, conv_kernel=conv_kernel)
    return ImageBackbone(net, embed_dim, in_chans=in_chans, image_size=image_size, mean=mean, std=std, frozen=frozen)


cct.description = "Compact Convolutional Transformer trained from scratch (CCT-6/3x1, 32 px by default)"

"""ViT_C (Xiao et al., NeurIPS 2021, "Early Convolutions Help Transformers See Better"):
a plain ViT whose 16x16 patchify stem is replaced by a stack of 3x3 conv-BN-ReLU layers
(total stride 16) and a 1x1 conv to the width; one transformer block fewer than the
matching ViT_P keeps the FLOPs equal. Configurations follow the paper's tables.

No public checkpoint layout exists (the authors' pycls code was not released with weights in
a fixed key format), so mobilehv defines a timm-ViT-like key layout:

    stem.convs.{i}.conv.weight, stem.convs.{i}.bn.{weight,bias,running_mean,running_var}
    stem.proj.{weight,bias}                     1x1 conv to the width
    cls_token (1, 1, D), pos_embed (1, 1 + N, D)
    blocks.{i}.norm1, blocks.{i}.attn.qkv, blocks.{i}.attn.proj, blocks.{i}.norm2,
    blocks.{i}.mlp.fc1, blocks.{i}.mlp.fc2      (pre-norm blocks, fused qkv: [q | k | v])
    norm, head

Deploy form (`nchw`): the sequence is held as `(B, D, 1, 1 + N)`; one reshape turns the
stem's `(B, D, H/16, W/16)` map into it (the class token must join the spatial tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mobilehv.layers import Attention, ConvNormAct, Linear, Mlp, Norm, to_tokens
from mobilehv.registry import Family, InputRule, register_model


class ConvStem(nn.Module):
    """3x3 conv-BN-ReLU layers (strides multiply to 16), then a 1x1 conv with bias to the width."""

    def __init__(self, dims: tuple[int, ...], strides: tuple[int, ...], width: int):
        super().__init__()
        chs = (3,) + dims
        self.convs = nn.Sequential(*[ConvNormAct(chs[i], chs[i + 1], 3, s) for i, s in enumerate(strides)])
        self.proj = nn.Conv2d(dims[-1], width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, layout: str = "nchw"):
        super().__init__()
        self.norm1 = Norm(dim, 1e-5, layout)
        self.attn = Attention(dim, num_heads, qkv_bias=True, layout=layout)
        self.norm2 = Norm(dim, 1e-5, layout)
        self.mlp = Mlp(dim, mlp_hidden, layout=layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@dataclass(frozen=True)
class ViTCConfig:
    stem_dims: tuple[int, ...]
    stem_strides: tuple[int, ...]
    width: int
    depth: int
    heads: int
    mlp_hidden: int
    img_size: int = 224


class ViTC(nn.Module):
    def __init__(self, cfg: ViTCConfig, layout: str = "nchw", num_classes: int = 1000):
        super().__init__()
        self.layout = layout
        self.stem = ConvStem(cfg.stem_dims, cfg.stem_strides, cfg.width)
        num_tokens = (cfg.img_size // 16) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_tokens, cfg.width))
        self.blocks = nn.Sequential(*[Block(cfg.width, cfg.heads, cfg.mlp_hidden, layout)
                                      for _ in range(cfg.depth)])
        self.norm = Norm(cfg.width, 1e-5, layout)
        self.head = Linear(cfg.width, num_classes, True, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, d = x.shape[:2]
        if self.layout == "nchw":
            # Layout principle: a sequence is (B, D, 1, N); the class token and position embedding
            # are reshaped from their weights alone (constants after export).
            cls = self.cls_token.reshape(1, d, 1, 1).repeat(b, 1, 1, 1)
            pos = self.pos_embed.transpose(1, 2).unsqueeze(2)               # (1, D, 1, 1 + N)
            x = torch.cat([cls, x.reshape(b, d, 1, -1)], dim=-1) + pos      # (B, D, 1, 1 + N)
            x = self.blocks(x)
            # the final norm is per token: normalise only the class token that the head reads
            return self.head(self.norm(x[..., :1])).flatten(1)
        x = torch.cat([self.cls_token.expand(b, -1, -1), to_tokens(x)], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x)[:, 0])


FAMILY = Family("vit_c", "Xiao et al., Early Convolutions Help Transformers See Better, NeurIPS 2021")
# Learned absolute position embedding for the 14x14 grid of a 224x224 input (not interpolated).
_RULE = InputRule(fixed=224)
_SMALL_STEM = dict(stem_strides=(2, 2, 2, 2))
_LARGE_STEM = dict(stem_dims=(64, 128, 128, 256, 256, 512), stem_strides=(2, 1, 2, 1, 2, 2))


@register_model(FAMILY, 224, _RULE)
def vit_c_1gf(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return ViTC(ViTCConfig((24, 48, 96, 192), width=192, depth=11, heads=3, mlp_hidden=576, **_SMALL_STEM),
                layout, num_classes)


@register_model(FAMILY, 224, _RULE)
def vit_c_4gf(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return ViTC(ViTCConfig((48, 96, 192, 384), width=384, depth=11, heads=6, mlp_hidden=1152, **_SMALL_STEM),
                layout, num_classes)


@register_model(FAMILY, 224, _RULE)
def vit_c_18gf(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return ViTC(ViTCConfig(width=768, depth=11, heads=12, mlp_hidden=3072, **_LARGE_STEM), layout, num_classes)


@register_model(FAMILY, 224, _RULE)
def vit_c_36gf(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return ViTC(ViTCConfig(width=1024, depth=13, heads=16, mlp_hidden=4096, **_LARGE_STEM), layout, num_classes)

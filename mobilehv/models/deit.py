"""DeiT (Touvron et al., ICML 2021): the plain ViT with a class token, as a latency baseline.

Data-efficient image transformers: a 16x16 patch embedding, a class token, learned absolute
position embeddings and pre-norm transformer blocks. Parameter names are timm's
(`deit_*_patch16_224`), which are also the official DeiT checkpoint's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from mobilehv.layers import Attention, Linear, Mlp, Norm, to_tokens
from mobilehv.registry import Converter, Family, InputRule, register_model


@dataclass(frozen=True)
class DeiTCfg:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    img_size: int = 224
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float, layout: str):
        super().__init__()
        self.norm1 = Norm(dim, norm_eps, layout)
        self.attn = Attention(dim, num_heads, qkv_bias=True, layout=layout)
        self.norm2 = Norm(dim, norm_eps, layout)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), layout=layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch conv; tokens layout flattens to `(B, N, C)`."""

    def __init__(self, dim: int, patch_size: int, layout: str):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H/p, W/p)
        return x if self.layout == "nchw" else to_tokens(x)


class DeiT(nn.Module):
    """ViT/DeiT classifier; the logits are the head applied to the normalised class token."""

    def __init__(self, cfg: DeiTCfg, layout: str = "nchw", num_classes: int = 1000):
        super().__init__()
        dim = cfg.embed_dim
        num_patches = (cfg.img_size // cfg.patch_size) ** 2
        self.layout = layout
        self.patch_embed = PatchEmbed(dim, cfg.patch_size, layout)
        # cls_token (1, C, 1, 1) in nchw vs (1, 1, C): equal up to singleton dims, one checkpoint.
        self.cls_token = nn.Parameter(torch.zeros((1, dim, 1, 1) if layout == "nchw" else (1, 1, dim)))
        # pos_embed keeps the checkpoint's (1, N+1, C) in both layouts (a transpose is not a
        # singleton difference); nchw transposes the weight, which exporters constant-fold.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, layout)
                                      for _ in range(cfg.depth)])
        self.norm = Norm(dim, cfg.norm_eps, layout)
        self.head = Linear(dim, num_classes, True, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        b = x.shape[0]
        if self.layout == "nchw":
            # Layout principle: the sequence is held as (B, C, 1, N+1) so norms reduce over dim 1
            # and projections are 1x1 convs. The class token makes the sequence 1-D, so the math
            # needs exactly one flatten and one concat here, nothing per block.
            c, h, w = x.shape[1:]
            x = torch.cat((self.cls_token.expand(b, -1, -1, -1), x.reshape(b, c, 1, h * w)), dim=3)
            x = x + self.pos_embed.transpose(1, 2).unsqueeze(2)       # (1, C, 1, N+1), weight-only
            x = self.blocks(x)
            # The norm is per token, so normalising only the class token is the same function.
            return self.head(self.norm(x[..., :1])).flatten(1)         # (B, classes, 1, 1) -> (B, classes)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1) + self.pos_embed  # (B, N+1, C)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def _is_timm(sd: Mapping[str, torch.Tensor]) -> bool:
    return "cls_token" in sd and "blocks.0.attn.qkv.weight" in sd and "blocks_token_only.0.attn.q.weight" not in sd


def _from_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    # mobilehv's DeiT uses timm's (and the official DeiT code's) names; shapes bridge generically.
    return sd


FAMILY = Family("deit", "Touvron et al., Training data-efficient image transformers & distillation "
                "through attention, ICML 2021", converters=(Converter("timm", _is_timm, _from_timm),))

# Absolute position embeddings for a 14x14 grid, not interpolated: 224 px only.
_RULE = InputRule(fixed=224)


@register_model(FAMILY, 224, _RULE)
def deit_tiny(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return DeiT(DeiTCfg(embed_dim=192, depth=12, num_heads=3), layout, num_classes)


@register_model(FAMILY, 224, _RULE)
def deit_small(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return DeiT(DeiTCfg(embed_dim=384, depth=12, num_heads=6), layout, num_classes)

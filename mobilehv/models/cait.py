"""CaiT (Touvron et al., ICCV 2021): deeper ViTs with LayerScale and class attention.

Two things make CaiT deep and cheap at the end: every residual branch is scaled per channel
(LayerScale, learned, initialised near zero), and self-attention uses talking heads (a learned
mix across heads before and after the softmax). The class token joins only in the last
`depth_token_only` class-attention blocks, where it alone is updated. Checkpoint keys are
timm's `cait_*` (identical to the official DeiT repository's CaiT).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from mobilehv.layers import Linear, Mlp, Norm, to_tokens
from mobilehv.registry import Converter, Family, InputRule, register_model


@dataclass(frozen=True)
class CaitCfg:
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int = 224
    patch_size: int = 16
    mlp_ratio: float = 4.0
    depth_token_only: int = 2
    norm_eps: float = 1e-6


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch; `(C, 1, 1)` along dim 1 in nchw, `(C,)` in tokens."""

    def __init__(self, dim: int, layout: str):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if layout == "nchw" else (dim,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


@torch.no_grad()
def _absorb(proj: nn.Module, scale: LayerScale) -> None:
    """proj(x) * gamma == proj'(x) with rows of weight and bias scaled by gamma."""
    gamma = scale.gamma.reshape(-1)
    proj.weight.mul_(gamma.reshape((-1,) + (1,) * (proj.weight.dim() - 1)))
    proj.bias.mul_(gamma)


class TalkingHeadAttn(nn.Module):
    """Self-attention whose logits and weights are mixed across heads by two heads x heads maps.

    nchw: the logits `(B, heads, N, N)` already have heads along dim 1, so both mixes are 1x1
    convs, no permute (layout principle: heads along channels). tokens: timm's permutes.
    """

    def __init__(self, dim: int, num_heads: int, layout: str):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.layout = layout
        self.qkv = Linear(dim, 3 * dim, True, layout)
        self.proj = Linear(dim, dim, True, layout)
        self.proj_l = Linear(num_heads, num_heads, True, layout)
        self.proj_w = Linear(num_heads, num_heads, True, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "nchw":
            b, c, h, w = x.shape
            # (B, 3C, H, W) -> (B, 3*heads, d, N): heads split along channels
            q, k, v = self.qkv(x).reshape(b, 3 * self.num_heads, self.head_dim, h * w).chunk(3, dim=1)
            attn = self.proj_l((q.transpose(-2, -1) * self.scale) @ k)        # (B, heads, N, N)
            attn = self.proj_w(attn.softmax(dim=-1))
            return self.proj((v @ attn.transpose(-2, -1)).reshape(b, c, h, w))  # (B, heads, d, N) -> 4-D
        b, n, c = x.shape
        # (B, N, 3C) -> (3, B, heads, N, d)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)                          # (B, heads, N, N)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ClassAttn(nn.Module):
    """Attention of the class token (query) over [class token, patches] (keys, values).

    Input `u` = [cls, patches]: `(B, C, 1, 1+N)` in nchw, `(B, 1+N, C)` in tokens; output is
    the class token's update: `(B, C, 1, 1)` / `(B, 1, C)`.
    """

    def __init__(self, dim: int, num_heads: int, layout: str):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.layout = layout
        self.q = Linear(dim, dim, True, layout)
        self.k = Linear(dim, dim, True, layout)
        self.v = Linear(dim, dim, True, layout)
        self.proj = Linear(dim, dim, True, layout)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if self.layout == "nchw":
            b, c, _, n = u.shape
            q = self.q(u[..., :1]).reshape(b, self.num_heads, self.head_dim, 1)   # (B, heads, d, 1)
            k = self.k(u).reshape(b, self.num_heads, self.head_dim, n)            # (B, heads, d, 1+N)
            v = self.v(u).reshape(b, self.num_heads, self.head_dim, n)
            attn = ((q.transpose(-2, -1) * self.scale) @ k).softmax(dim=-1)       # (B, heads, 1, 1+N)
            return self.proj((v @ attn.transpose(-2, -1)).reshape(b, c, 1, 1))
        b, n, c = u.shape
        q = self.q(u[:, :1]).reshape(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(u).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(u).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)           # (B, heads, 1, 1+N)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, 1, c))


class LayerScaleBlock(nn.Module):
    """x + ls1(attn(norm1(x))), x + ls2(mlp(norm2(x))); the deploy form absorbs ls into proj/fc2."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float, layout: str,
                 attn_layer: type[nn.Module] = TalkingHeadAttn):
        super().__init__()
        self.norm1 = Norm(dim, norm_eps, layout)
        self.attn = attn_layer(dim, num_heads, layout)
        self.ls1 = LayerScale(dim, layout)
        self.norm2 = Norm(dim, norm_eps, layout)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), layout=layout)
        self.ls2 = LayerScale(dim, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def fold(self) -> nn.Module:
        if isinstance(self.ls1, LayerScale):
            _absorb(self.attn.proj, self.ls1)
            _absorb(self.mlp.fc2, self.ls2)
            self.ls1, self.ls2 = nn.Identity(), nn.Identity()
        return self


class ClassAttnBlock(LayerScaleBlock):
    """Updates only the class token: cls + ls1(ca(norm1([cls, x]))), cls + ls2(mlp(norm2(cls)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float, layout: str):
        super().__init__(dim, num_heads, mlp_ratio, norm_eps, layout, attn_layer=ClassAttn)
        # the sequence axis: (B, C, 1, N) -> concat on dim 3; (B, N, C) -> dim 1
        self.seq_dim = 3 if layout == "nchw" else 1

    def forward(self, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if cls.shape[0] != x.shape[0]:  # the first block gets the (1, ...) parameter itself
            cls = cls.expand((x.shape[0],) + cls.shape[1:])
        # Keys/values run over [cls, patches]: the one concat per block the math needs.
        u = torch.cat((cls, x), dim=self.seq_dim)
        cls = cls + self.ls1(self.attn(self.norm1(u)))
        return cls + self.ls2(self.mlp(self.norm2(cls)))


class Cait(nn.Module):
    """Patch embedding + position embedding, self-attention blocks on patches only, then
    class-attention blocks that read the patches into the class token, norm, linear head."""

    def __init__(self, cfg: CaitCfg, layout: str = "nchw", num_classes: int = 1000):
        super().__init__()
        dim = cfg.embed_dim
        self.grid = cfg.img_size // cfg.patch_size
        self.layout = layout
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, cfg.patch_size, cfg.patch_size)
        # cls_token (1, C, 1, 1) in nchw vs (1, 1, C): equal up to singleton dims, one checkpoint.
        self.cls_token = nn.Parameter(torch.zeros((1, dim, 1, 1) if layout == "nchw" else (1, 1, dim)))
        # pos_embed keeps the checkpoint's (1, N, C) in both layouts; nchw reshapes the weight
        # (constant-folded by every exporter).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, dim))
        self.blocks = nn.Sequential(*[LayerScaleBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, layout)
                                      for _ in range(cfg.depth)])
        self.blocks_token_only = nn.ModuleList(
            [ClassAttnBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, layout)
             for _ in range(cfg.depth_token_only)])
        self.norm = Norm(dim, cfg.norm_eps, layout)
        self.head = Linear(dim, num_classes, True, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x)                                            # (B, C, H, W)
        b, c, h, w = x.shape
        if self.layout == "nchw":
            # Layout principle: the self-attention blocks run on the 4-D map itself (tokens are
            # the H*W positions), no reshape until the class token joins.
            x = x + self.pos_embed.transpose(1, 2).reshape(1, c, h, w)
            x = self.blocks(x).reshape(b, c, 1, h * w)   # the one flatten: cls joins a 1-D sequence
            cls = self.cls_token                                                 # (1, C, 1, 1)
            for blk in self.blocks_token_only:
                cls = blk(x, cls)
            # The final norm is per token and only the class token is classified: norm(cls) is
            # the same function as timm's norm([cls, x])[:, 0], without the last concat.
            return self.head(self.norm(cls)).flatten(1)
        x = self.blocks(to_tokens(x) + self.pos_embed)                           # (B, N, C)
        cls = self.cls_token                                                     # (1, 1, C)
        for blk in self.blocks_token_only:
            cls = blk(x, cls)
        x = self.norm(torch.cat((cls, x), dim=1))
        return self.head(x[:, 0])


def _is_timm(sd: Mapping[str, torch.Tensor]) -> bool:
    return "blocks.0.gamma_1" in sd and "blocks_token_only.0.attn.q.weight" in sd


def _from_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    # timm/official: blocks.i.gamma_1 -> mobilehv blocks.i.ls1.gamma (a module, so fold can drop it)
    return {re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k): v for k, v in sd.items()}


FAMILY = Family("cait", "Touvron et al., Going deeper with Image Transformers, ICCV 2021",
                converters=(Converter("timm", _is_timm, _from_timm),))


@register_model(FAMILY, 224, InputRule(fixed=224))
def cait_xxs24(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return Cait(CaitCfg(embed_dim=192, depth=24, num_heads=4), layout, num_classes)


@register_model(FAMILY, 224, InputRule(fixed=224))
def cait_xxs36(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return Cait(CaitCfg(embed_dim=192, depth=36, num_heads=4), layout, num_classes)


@register_model(FAMILY, 384, InputRule(fixed=384))
def cait_xs24(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return Cait(CaitCfg(embed_dim=288, depth=24, num_heads=6, img_size=384), layout, num_classes)


@register_model(FAMILY, 224, InputRule(fixed=224))
def cait_s24(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return Cait(CaitCfg(embed_dim=384, depth=24, num_heads=8), layout, num_classes)

"""CvT (Wu et al., ICCV 2021): convolutional token embedding per stage, attention whose
q/k/v come from depthwise conv + BN projections (k/v strided), no position embedding,
a class token in the last stage only.

Checkpoints: the official code (microsoft/CvT, `lib/models/cls_cvt.py`, keys `stage0.`...).

Deploy form (`nchw`): the feature map stays `(B, C, H, W)`; the class token is carried
beside it as a `(B, C, 1, 1)` map and only joins the spatial tokens inside attention (one
concat per q/k/v, one split of the output), where the math needs the joint sequence.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from mobilehv.layers import ConvNormAct, Linear, Mlp, Norm, to_2d, to_tokens
from mobilehv.registry import Converter, Family, InputRule, register_model


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation the official CvT models were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ConvEmbed(nn.Module):
    """Overlapping strided conv, then LayerNorm over channels."""

    def __init__(self, in_chs: int, dim: int, kernel_size: int, stride: int, padding: int,
                 layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        self.proj = nn.Conv2d(in_chs, dim, kernel_size, stride, padding)
        self.norm = Norm(dim, 1e-5, layout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """-> (B, C, H, W) in nchw or (B, N, C) in tokens, and the grid size H, W."""
        x = self.proj(x)
        h, w = x.shape[-2:]
        return (self.norm(x) if self.layout == "nchw" else self.norm(to_tokens(x))), h, w


class ConvAttention(nn.Module):
    """Attention with depthwise conv-BN projections before the linear q/k/v projections.

    Scores are scaled by dim**-0.5 (the full width, as in the official code, not the head width).
    """

    def __init__(self, dim: int, num_heads: int, with_cls: bool, kernel_size: int = 3, stride_kv: int = 2,
                 layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        self.with_cls = with_cls
        self.num_heads = num_heads
        self.scale = dim ** -0.5
        self.conv_proj_q = ConvNormAct(dim, dim, kernel_size, 1, groups=dim, act_layer=None)
        self.conv_proj_k = ConvNormAct(dim, dim, kernel_size, stride_kv, groups=dim, act_layer=None)
        self.conv_proj_v = ConvNormAct(dim, dim, kernel_size, stride_kv, groups=dim, act_layer=None)
        self.proj_q = Linear(dim, dim, True, layout)
        self.proj_k = Linear(dim, dim, True, layout)
        self.proj_v = Linear(dim, dim, True, layout)
        self.proj = Linear(dim, dim, True, layout)

    def forward(self, x: torch.Tensor, cls: torch.Tensor | None = None, size: tuple[int, int] = (0, 0)):
        """nchw: (x (B, C, H, W), cls (B, C, 1, 1) or None) -> same; tokens: x (B, [1 +] H*W, C), size (H, W)."""
        if self.layout == "tokens":
            return self.forward_tokens(x, *size)
        b, c, h, w = x.shape
        heads, d = self.num_heads, c // self.num_heads
        # Layout principle: heads split along channels, (B, C, H, W) -> (B, heads, d, N); no permute
        q = self.proj_q(self.conv_proj_q(x)).reshape(b, heads, d, -1)
        k = self.proj_k(self.conv_proj_k(x)).reshape(b, heads, d, -1)
        v = self.proj_v(self.conv_proj_v(x)).reshape(b, heads, d, -1)
        if cls is not None:  # the class token bypasses the conv projections and leads each sequence
            q = torch.cat([self.proj_q(cls).reshape(b, heads, d, 1), q], dim=-1)
            k = torch.cat([self.proj_k(cls).reshape(b, heads, d, 1), k], dim=-1)
            v = torch.cat([self.proj_v(cls).reshape(b, heads, d, 1), v], dim=-1)
        attn = (q.transpose(-2, -1) @ k) * self.scale               # (B, heads, Nq, Nk)
        out = v @ attn.softmax(dim=-1).transpose(-2, -1)             # (B, heads, d, Nq)
        if cls is None:
            return self.proj(out.reshape(b, c, h, w)), None
        out_cls, out = out.split([1, h * w], dim=-1)
        return self.proj(out.reshape(b, c, h, w)), self.proj(out_cls.reshape(b, c, 1, 1))

    def forward_tokens(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        if self.with_cls:
            cls, x = x.split([1, h * w], dim=1)
        x = to_2d(x, h, w)
        q, k, v = (to_tokens(p(x)) for p in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v))
        if self.with_cls:
            q, k, v = (torch.cat([cls, t], dim=1) for t in (q, k, v))
        # (B, N, C) -> (B, heads, N, d)
        q = self.proj_q(q).reshape(b, -1, heads, d).transpose(1, 2)
        k = self.proj_k(k).reshape(b, -1, heads, d).transpose(1, 2)
        v = self.proj_v(v).reshape(b, -1, heads, d).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale               # (B, heads, Nq, Nk)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, with_cls: bool,
                 act_layer: Callable[[], nn.Module], layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        self.norm1 = Norm(dim, 1e-5, layout)
        self.attn = ConvAttention(dim, num_heads, with_cls, layout=layout)
        self.norm2 = Norm(dim, 1e-5, layout)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, layout=layout)

    def forward(self, x: torch.Tensor, cls: torch.Tensor | None = None, size: tuple[int, int] = (0, 0)):
        """Same signature as ConvAttention.forward."""
        if self.layout == "tokens":
            x = x + self.attn(self.norm1(x), size=size)
            return x + self.mlp(self.norm2(x))
        a, a_cls = self.attn(self.norm1(x), None if cls is None else self.norm1(cls))
        x = x + a
        x = x + self.mlp(self.norm2(x))
        if cls is not None:
            cls = cls + a_cls
            cls = cls + self.mlp(self.norm2(cls))
        return x, cls


class Stage(nn.Module):
    def __init__(self, in_chs: int, dim: int, depth: int, num_heads: int, patch: tuple[int, int, int],
                 cls_token: bool, act_layer: Callable[[], nn.Module], mlp_ratio: float = 4.0,
                 layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        self.patch_embed = ConvEmbed(in_chs, dim, *patch, layout=layout)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, cls_token, act_layer, layout)
                                     for _ in range(depth)])

    def forward(self, x: torch.Tensor):
        x, h, w = self.patch_embed(x)
        b = x.shape[0]
        if self.layout == "nchw":
            # (1, 1, C) -> (B, C, 1, 1); computed from the weight alone, so a constant after export
            cls = None if self.cls_token is None else self.cls_token.reshape(1, -1, 1, 1).repeat(b, 1, 1, 1)
            for blk in self.blocks:
                x, cls = blk(x, cls)
            return x, cls
        with_cls = self.cls_token is not None
        if with_cls:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x, size=(h, w))
        cls = None
        if with_cls:
            cls, x = x.split([1, h * w], dim=1)
        return to_2d(x, h, w), cls


@dataclass(frozen=True)
class CvTConfig:
    dims: tuple[int, int, int]
    depths: tuple[int, int, int]
    heads: tuple[int, int, int]
    patches: tuple[tuple[int, int, int], ...] = ((7, 4, 2), (3, 2, 1), (3, 2, 1))  # kernel, stride, padding


class CvT(nn.Module):
    def __init__(self, cfg: CvTConfig, layout: str = "nchw", num_classes: int = 1000,
                 act_layer: Callable[[], nn.Module] = QuickGELU):
        super().__init__()
        self.layout = layout
        in_chs, last = 3, len(cfg.dims) - 1
        stages = []
        for i, (dim, depth, heads, patch) in enumerate(zip(cfg.dims, cfg.depths, cfg.heads, cfg.patches)):
            stages.append(Stage(in_chs, dim, depth, heads, patch, i == last, act_layer, layout=layout))
            in_chs = dim
        self.stages = nn.ModuleList(stages)
        self.norm = Norm(in_chs, 1e-5, layout)
        self.head = Linear(in_chs, num_classes, True, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = None
        for stage in self.stages:
            x, cls = stage(x)
        if self.layout == "nchw":
            return self.head(self.norm(cls)).flatten(1)            # (B, C, 1, 1) -> (B, classes)
        return self.head(self.norm(cls)[:, 0])


def _is_official(sd: Mapping[str, torch.Tensor]) -> bool:
    return "stage0.patch_embed.proj.weight" in sd


def _from_official(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return {re.sub(r"^stage(\d+)\.", r"stages.\1.", k): v for k, v in sd.items()}


FAMILY = Family("cvt", "Wu et al., CvT: Introducing Convolutions to Vision Transformers, ICCV 2021",
                converters=(Converter("official", _is_official, _from_official),))
# Convolutions only (no position embedding): any size at least the 7x7/stride-4 embedding's 3 px.
_RULE = InputRule(multiple=1, minimum=3)


@register_model(FAMILY, 224, _RULE)
def cvt_13(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return CvT(CvTConfig((64, 192, 384), (1, 2, 10), (1, 3, 6)), layout, num_classes)


@register_model(FAMILY, 224, _RULE)
def cvt_21(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return CvT(CvTConfig((64, 192, 384), (1, 4, 16), (1, 3, 6)), layout, num_classes)


@register_model(FAMILY, 384, _RULE)
def cvt_w24(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return CvT(CvTConfig((192, 768, 1024), (2, 2, 20), (3, 12, 16)), layout, num_classes)

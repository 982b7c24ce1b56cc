"""EfficientViT (MIT, Cai et al. 2022, arXiv 2205.14756): MBConv stages + ReLU linear attention.

The network is 4-D `(B, C, H, W)` with Conv + BatchNorm from stem to head; its only token view
is inside LiteMLA, where the original (and timm) transpose each head to `(N, d)` rows to take
`ReLU(Q) (ReLU(K)^T V)`. There is no `(B, N, C)` stage with LayerNorm + Linear to keep as a
reference form, so the family has one layout, `nchw`: LiteMLA here contracts the same products
with heads split along channels (`(B, heads, d, N)`), which needs one transpose instead of the
original's three plus a pad. Checkpoints: timm's `efficientvit_b*` state dicts.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from mobilehv.layers import ConvNormAct
from mobilehv.registry import Converter, Family, InputRule, register_model

Act = Callable[[], nn.Module]


class ConvAct(nn.Module):
    """conv (+ bias) -> act with no norm: the 'fewer norm' convs of the attention stages."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, bias: bool = True, act_layer: Act | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2,
                              groups=groups, bias=bias)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class Residual(nn.Module):
    """`main(x) (+ x)`; `main` carries timm's attribute name so keys map 1:1."""

    def __init__(self, main: nn.Module, skip: bool = True):
        super().__init__()
        self.main = main
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + x if self.skip else self.main(x)


class DSConv(nn.Module):
    """Depthwise 3x3 (BN, act) -> pointwise (BN): the stem's residual blocks."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, act_layer: Act):
        super().__init__()
        self.depth_conv = ConvNormAct(in_chs, in_chs, 3, stride, groups=in_chs, act_layer=act_layer)
        self.point_conv = ConvNormAct(in_chs, out_chs, 1, act_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(x))


class MBConv(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 project. `fewer_norm` (attention stages): the first
    two convs carry a bias and no BatchNorm, as in the original."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: float, act_layer: Act,
                 fewer_norm: bool = False):
        super().__init__()
        mid = round(in_chs * expand_ratio)
        if fewer_norm:
            self.inverted_conv = ConvAct(in_chs, mid, 1, act_layer=act_layer)
            self.depth_conv = ConvAct(mid, mid, 3, stride, groups=mid, act_layer=act_layer)
        else:
            self.inverted_conv = ConvNormAct(in_chs, mid, 1, act_layer=act_layer)
            self.depth_conv = ConvNormAct(mid, mid, 3, stride, groups=mid, act_layer=act_layer)
        self.point_conv = ConvNormAct(mid, out_chs, 1, act_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class LiteMLA(nn.Module):
    """Lightweight multi-scale linear attention.

    q, k, v come from a 1x1 conv, plus a depthwise 5x5 -> grouped 1x1 aggregation of them (a
    second 'scale' of heads). Per head: out = ReLU(Q) (ReLU(K)^T V) / (ReLU(Q) sum_n ReLU(K_n) + eps).
    The original appends a row of ones to V so the denominator falls out of the same product;
    here it is the same sum written out, which converters take without a Pad.
    """

    def __init__(self, dim: int, head_dim: int, scales: tuple[int, ...] = (5,), eps: float = 1e-5):
        super().__init__()
        heads = dim // head_dim
        inner = 3 * heads * head_dim
        self.head_dim = head_dim
        self.eps = eps
        self.qkv = ConvAct(dim, inner, 1, bias=False)
        self.aggreg = nn.ModuleList(
            nn.Sequential(nn.Conv2d(inner, inner, s, padding=s // 2, groups=inner, bias=False),
                          nn.Conv2d(inner, inner, 1, groups=3 * heads, bias=False))
            for s in scales)
        self.kernel_func = nn.ReLU()
        self.proj = ConvNormAct(heads * head_dim * (1 + len(scales)), dim, 1, act_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [op(qkv) for op in self.aggreg], dim=1)
        # Layout principle: heads stay along channels. (B, G*3d, H, W) -> (B, G, 3d, N) is the one
        # reshape the matmuls need (they contract over N); each head's channels are [q | k | v].
        q, k, v = qkv.reshape(b, -1, 3 * self.head_dim, h * w).split(self.head_dim, dim=2)
        q, k = self.kernel_func(q), self.kernel_func(k)
        if v.dtype == torch.float32:
            out = self._attend(q, k, v)
        else:  # the original does this in float32: the sums over N overflow fp16
            out = self._attend(q.float(), k.float(), v.float()).to(v.dtype)
        return self.proj(out.reshape(b, -1, h, w))               # (B, G*d, H, W)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        vk = v @ k.transpose(-2, -1)                             # (B, G, d, d) = (K^T V)^T
        num = vk @ q                                             # (B, G, d, N)
        den = (q * k.sum(dim=-1, keepdim=True)).sum(dim=2, keepdim=True)  # (B, G, 1, N)
        return num / (den + self.eps)


class EfficientVitBlock(nn.Module):
    """Context (x + LiteMLA(x)) then local (x + MBConv(x))."""

    def __init__(self, dim: int, head_dim: int, expand_ratio: float, act_layer: Act):
        super().__init__()
        self.context_module = Residual(LiteMLA(dim, head_dim))
        self.local_module = Residual(MBConv(dim, dim, 1, expand_ratio, act_layer, fewer_norm=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


class Stage(nn.Module):
    """A stride-2 MBConv (no residual), then MBConvs (conv stages) or EfficientViT blocks."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, expand_ratio: float, head_dim: int,
                 act_layer: Act, vit_stage: bool):
        super().__init__()
        blocks: list[nn.Module] = [Residual(MBConv(in_chs, out_chs, 2, expand_ratio, act_layer,
                                                   fewer_norm=vit_stage), skip=False)]
        if vit_stage:
            blocks += [EfficientVitBlock(out_chs, head_dim, expand_ratio, act_layer) for _ in range(depth)]
        else:
            blocks += [Residual(MBConv(out_chs, out_chs, 1, expand_ratio, act_layer))
                       for _ in range(depth - 1)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ClassifierHead(nn.Module):
    """1x1 conv-BN-act, global average pool, then Linear -> LayerNorm -> act -> Linear.

    Pooling to `(B, C)` with a reduction leaves nothing to flatten; the classifier keeps
    timm's indices (3 was dropout, an identity at inference).
    """

    def __init__(self, in_chs: int, widths: tuple[int, int], num_classes: int, act_layer: Act):
        super().__init__()
        self.in_conv = ConvNormAct(in_chs, widths[0], 1, act_layer=act_layer)
        self.classifier = nn.Sequential(
            nn.Linear(widths[0], widths[1], bias=False), nn.LayerNorm(widths[1]), act_layer(),
            nn.Identity(), nn.Linear(widths[1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.in_conv(x).mean(dim=(2, 3)))  # (B, C, H, W) -> (B, C)


@dataclass(frozen=True)
class EfficientVitConfig:
    widths: tuple[int, ...]       # stem, then the four stages
    depths: tuple[int, ...]       # stem residual blocks, then blocks per stage
    head_dim: int
    head_widths: tuple[int, int]
    expand_ratio: float = 4.0


class EfficientVit(nn.Module):
    def __init__(self, cfg: EfficientVitConfig, num_classes: int = 1000, act_layer: Act = nn.Hardswish):
        super().__init__()
        w0 = cfg.widths[0]
        stem: OrderedDict[str, nn.Module] = OrderedDict(in_conv=ConvNormAct(3, w0, 3, 2, act_layer=act_layer))
        for i in range(cfg.depths[0]):
            stem[f"res{i}"] = Residual(DSConv(w0, w0, 1, act_layer))
        self.stem = nn.Sequential(stem)
        chs = cfg.widths[:-1]
        self.stages = nn.Sequential(*(
            Stage(cin, cout, d, cfg.expand_ratio, cfg.head_dim, act_layer, vit_stage=i >= 2)
            for i, (cin, cout, d) in enumerate(zip(chs, cfg.widths[1:], cfg.depths[1:]))))
        self.head = ClassifierHead(cfg.widths[-1], cfg.head_widths, num_classes, act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


# ---- checkpoints ----------------------------------------------------------------------------

def _is_timm(sd: Mapping[str, torch.Tensor]) -> bool:
    return "stem.in_conv.norm.weight" in sd and "head.classifier.4.weight" in sd


def _from_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    # timm's ConvNormAct names its BatchNorm `norm`; mobilehv's is `bn`. (The one LayerNorm,
    # head.classifier.1, has no `.norm.` in its key.)
    return {re.sub(r"\.norm\.", ".bn.", k): v for k, v in sd.items()}


FAMILY = Family("efficientvit", "Cai et al. 2022, EfficientViT: Enhanced Linear Attention for "
                "High-Resolution Low-Computation Visual Recognition (arXiv 2205.14756)",
                converters=(Converter("timm", _is_timm, _from_timm),), layouts=("nchw",))

# Every conv pads, so any size runs; below 32 px the stride-32 body would reduce the map to a
# single padded pixel before its last stage, so 32 is the smallest input taken.
RULE = InputRule(multiple=1, minimum=32)

CONFIGS = {
    "b0": EfficientVitConfig((8, 16, 32, 64, 128), (1, 2, 2, 2, 2), 16, (1024, 1280)),
    "b1": EfficientVitConfig((16, 32, 64, 128, 256), (1, 2, 3, 3, 4), 16, (1536, 1600)),
    "b2": EfficientVitConfig((24, 48, 96, 192, 384), (1, 3, 4, 4, 6), 32, (2304, 2560)),
    "b3": EfficientVitConfig((32, 64, 128, 256, 512), (1, 4, 6, 6, 9), 32, (2304, 2560)),
}


def _build(variant: str, layout: str, num_classes: int) -> EfficientVit:
    if layout != "nchw":
        raise ValueError(f"efficientvit has only the nchw layout, got {layout!r}")
    return EfficientVit(CONFIGS[variant], num_classes)


@register_model(FAMILY, 224, RULE)
def efficientvit_b0(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return _build("b0", layout, num_classes)


@register_model(FAMILY, 224, RULE)
def efficientvit_b1(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return _build("b1", layout, num_classes)


@register_model(FAMILY, 224, RULE)
def efficientvit_b2(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return _build("b2", layout, num_classes)


@register_model(FAMILY, 224, RULE)
def efficientvit_b3(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return _build("b3", layout, num_classes)

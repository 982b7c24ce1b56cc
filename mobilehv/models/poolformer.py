"""PoolFormer (Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022).

A MetaFormer whose token mixer is a 3x3 average pool: GroupNorm(1) -> pool(x) - x -> layer
scale, then GroupNorm(1) -> 1x1-conv MLP -> layer scale. Everything is 4-D already, so there
is one layout (`nchw`). `Pooling` and `LayerScale` are also EfficientFormer's Meta4D parts.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from mobilehv.layers import Mlp
from mobilehv.registry import Converter, Family, InputRule, register_model


class Pooling(nn.Module):
    """pool(x) - x: the block adds x back, so the mixer contributes only the neighbourhood
    average. Padding is left out of the average (count_include_pad=False), as in the paper."""

    def __init__(self, pool_size: int = 3):
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class LayerScale(nn.Module):
    """Per-channel `x * gamma`; the channel axis is 1 in `(B, C, H, W)`, -1 in `(B, N, C)`."""

    def __init__(self, dim: int, init_value: float = 1e-5, channel_dim: int = 1):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.gamma[:, None, None] if self.channel_dim == 1 else self.gamma)


@torch.no_grad()
def scale_output(layer: nn.Module, gamma: torch.Tensor) -> nn.Module:
    """Absorb a following per-channel scale into a conv/linear: (W x + b) * g = (g W) x + g b."""
    layer.weight.mul_(gamma.reshape((-1,) + (1,) * (layer.weight.dim() - 1)))
    if layer.bias is not None:
        layer.bias.mul_(gamma)
    return layer


class GroupNorm1(nn.Module):
    """GroupNorm with one group as explicit reductions over (C, H, W): the deploy form of
    `nn.GroupNorm(1, C)`. Layout principle: exporters lower GroupNorm through reshapes
    (ONNX: Reshape -> InstanceNormalization -> Reshape; TFLite: Reshape/Transpose/BroadcastTo);
    reducing over dims 1-3 in place keeps the graph free of data movement."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=(1, 2, 3), keepdim=True)
        var = (centred * centred).mean(dim=(1, 2, 3), keepdim=True)
        x = centred * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class PoolFormerBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, pool_size: int, layer_scale_init: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.token_mixer = Pooling(pool_size)
        self.ls1 = LayerScale(dim, layer_scale_init)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, layout="nchw")
        self.ls2 = LayerScale(dim, layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.token_mixer(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """Absorb both layer scales (exact: per-channel scales commuting with linear maps) and
        write the norms as explicit reductions.

        ls2 goes into mlp.fc2. ls1 goes into norm1's affine: the pool mixer is linear and acts
        per channel, so ls1 * mixer(norm1(x)) = mixer(ls1 * norm1(x)).
        """
        if isinstance(self.ls1, LayerScale):
            self.norm1.weight.mul_(self.ls1.gamma)
            self.norm1.bias.mul_(self.ls1.gamma)
            scale_output(self.mlp.fc2, self.ls2.gamma)
            self.ls1, self.ls2 = nn.Identity(), nn.Identity()
            self.norm1, self.norm2 = GroupNorm1(self.norm1), GroupNorm1(self.norm2)
        return self


class PoolFormerStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, cfg: PoolFormerConfig):
        super().__init__()
        # Stage 0 keeps the stem's resolution; the others halve it with a 3x3/2 conv.
        self.downsample = nn.Identity() if in_dim == dim else nn.Sequential(
            OrderedDict(conv=nn.Conv2d(in_dim, dim, 3, stride=2, padding=1)))
        self.blocks = nn.Sequential(*[PoolFormerBlock(dim, cfg.mlp_ratio, cfg.pool_size, cfg.layer_scale_init)
                                      for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ClassifierHead(nn.Module):
    """Global average pool -> LayerNorm -> Linear (timm's PoolFormer head).

    Pooling first leaves a `(B, C)` tensor, so the norm and classifier need no reshape.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.mean((2, 3))))  # (B, C, H, W) -> (B, C) -> (B, classes)


@dataclass(frozen=True)
class PoolFormerConfig:
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    layer_scale_init: float
    mlp_ratio: float = 4.0
    pool_size: int = 3


class PoolFormer(nn.Module):
    def __init__(self, cfg: PoolFormerConfig, num_classes: int = 1000, layout: str = "nchw"):
        super().__init__()
        if layout != "nchw":
            raise ValueError(f"PoolFormer is 4-D throughout and has only the nchw layout, got {layout!r}")
        self.stem = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, cfg.dims[0], 7, stride=4, padding=2)))
        dims = (cfg.dims[0],) + cfg.dims
        self.stages = nn.Sequential(*[PoolFormerStage(dims[i], dims[i + 1], d, cfg)
                                      for i, d in enumerate(cfg.depths)])
        self.head = ClassifierHead(cfg.dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def _is_timm(sd: Mapping[str, torch.Tensor]) -> bool:
    return "stem.conv.weight" in sd and any(k.endswith(".layer_scale1.scale") for k in sd)


def _from_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    # timm names the layer scales `layer_scale{1,2}.scale`; everything else matches.
    return {re.sub(r"\.layer_scale([12])\.scale$", r".ls\1.gamma", k): v for k, v in sd.items()}


POOLFORMER = Family(
    "poolformer", "Yu et al., MetaFormer Is Actually What You Need for Vision (CVPR 2022)",
    converters=(Converter("timm", _is_timm, _from_timm),), layouts=("nchw",))
# Convolutions and pools only: any size works; multiples of 32 keep every stage's grid whole.
_RULE = InputRule(multiple=32, minimum=32)

CONFIGS = {
    "s12": PoolFormerConfig((2, 2, 6, 2), (64, 128, 320, 512), 1e-5),
    "s24": PoolFormerConfig((4, 4, 12, 4), (64, 128, 320, 512), 1e-5),
    "s36": PoolFormerConfig((6, 6, 18, 6), (64, 128, 320, 512), 1e-6),
    "m36": PoolFormerConfig((6, 6, 18, 6), (96, 192, 384, 768), 1e-6),
    "m48": PoolFormerConfig((8, 8, 24, 8), (96, 192, 384, 768), 1e-6),
}


@register_model(POOLFORMER, 224, _RULE)
def poolformer_s12(layout: str = "nchw", num_classes: int = 1000) -> PoolFormer:
    return PoolFormer(CONFIGS["s12"], num_classes, layout)


@register_model(POOLFORMER, 224, _RULE)
def poolformer_s24(layout: str = "nchw", num_classes: int = 1000) -> PoolFormer:
    return PoolFormer(CONFIGS["s24"], num_classes, layout)


@register_model(POOLFORMER, 224, _RULE)
def poolformer_s36(layout: str = "nchw", num_classes: int = 1000) -> PoolFormer:
    return PoolFormer(CONFIGS["s36"], num_classes, layout)


@register_model(POOLFORMER, 224, _RULE)
def poolformer_m36(layout: str = "nchw", num_classes: int = 1000) -> PoolFormer:
    return PoolFormer(CONFIGS["m36"], num_classes, layout)


@register_model(POOLFORMER, 224, _RULE)
def poolformer_m48(layout: str = "nchw", num_classes: int = 1000) -> PoolFormer:
    return PoolFormer(CONFIGS["m48"], num_classes, layout)

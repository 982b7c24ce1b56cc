"""EfficientNet-B0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019).

A baseline of the EfficientFormer latency study. Built, like timm's `EfficientNet` class, from
a list of stages of depthwise-separable ("ds") and inverted-residual ("ir") blocks, each with an
optional squeeze-excite; MobileNetV2 (mobilenetv2.py) is the same network class with another
stage list, so the class and the timm key mapping live here. Pure CNN: one layout (`nchw`),
and the head pools straight to `(B, C)`, so the deploy graph has no data movement at all.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from mobilehv.layers import ConvNormAct, InvertedResidual, SqueezeExcite
from mobilehv.registry import Converter, Family, InputRule, register_model


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round channels to a multiple of `divisor`, never dropping below `round_limit` of `v`."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


@dataclass(frozen=True)
class StageConfig:
    block: str  # "ds": dw 3x3 -> (SE) -> pw 1x1;  "ir": pw expand -> dw kxk -> (SE) -> pw project
    depth: int
    kernel: int
    stride: int
    expand: float
    out_chs: int
    se_ratio: float = 0.0  # squeeze channels as a fraction of the block's *input* channels


@dataclass(frozen=True)
class EfficientNetConfig:
    stages: tuple[StageConfig, ...]
    stem_chs: int
    num_features: int
    act_layer: Callable[[], nn.Module]
    multiplier: float = 1.0  # channel width multiplier (stem, stages; head per `num_features`)


class EfficientNet(nn.Module):
    """conv_stem -> stages of blocks -> 1x1 conv_head -> global pool -> classifier."""

    def __init__(self, cfg: EfficientNetConfig, num_classes: int = 1000, layout: str = "nchw"):
        super().__init__()
        if layout != "nchw":
            raise ValueError(f"{type(self).__name__} is a pure CNN and has only the nchw layout, got {layout!r}")
        act = cfg.act_layer
        chs = make_divisible(cfg.stem_chs * cfg.multiplier)
        self.conv_stem = ConvNormAct(3, chs, 3, stride=2, act_layer=act)
        stages = []
        for s in cfg.stages:
            out = make_divisible(s.out_chs * cfg.multiplier)
            blocks = []
            for i in range(s.depth):
                se = _se_layer(chs, s.se_ratio, act) if s.se_ratio else None
                blocks.append(InvertedResidual(chs, out, s.stride if i == 0 else 1, s.expand, s.kernel,
                                               act_layer=act, se_layer=se))
                chs = out
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = ConvNormAct(chs, cfg.num_features, 1, act_layer=act)
        self.classifier = nn.Linear(cfg.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_head(self.blocks(self.conv_stem(x)))
        return self.classifier(x.mean((2, 3)))  # (B, C, H, W) -> (B, C): no flatten needed


def _se_layer(in_chs: int, ratio: float, act: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    # The squeeze width follows the block input (timm: se_ratio / exp_ratio of the mid channels).
    return lambda mid: SqueezeExcite(mid, round(in_chs * ratio), act_layer=act)


# timm names BatchNorms by position (bn1, bn2, bn3) next to bare convs; mobilehv's ConvNormAct
# keeps each conv with its norm. An "ir" block's convs are conv_pw/conv_dw/conv_pwl; a "ds"
# block has only conv_dw and conv_pw (which is our conv_pwl: the projection with no activation).
_IR = {"conv_pw": "conv_pw.conv", "bn1": "conv_pw.bn", "conv_dw": "conv_dw.conv",
       "bn2": "conv_dw.bn", "conv_pwl": "conv_pwl.conv", "bn3": "conv_pwl.bn"}
_DS = {"conv_dw": "conv_dw.conv", "bn1": "conv_dw.bn", "conv_pw": "conv_pwl.conv", "bn2": "conv_pwl.bn"}
_TOP = {"conv_stem": "conv_stem.conv", "bn1": "conv_stem.bn", "conv_head": "conv_head.conv",
        "bn2": "conv_head.bn"}
_BLOCK = re.compile(r"^(blocks\.\d+\.\d+)\.(\w+)\.(.+)$")


def is_timm_efficientnet(sd: Mapping[str, torch.Tensor]) -> bool:
    return "conv_stem.weight" in sd and "bn1.weight" in sd


def from_timm_efficientnet(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm `EfficientNet` keys (efficientnet_*, mobilenetv2_*) -> mobilehv keys."""
    ir_blocks = {m.group(1) for k in sd if (m := _BLOCK.match(k)) and m.group(2) == "conv_pwl"}
    out = {}
    for key, value in sd.items():
        if m := _BLOCK.match(key):
            block, part, rest = m.groups()
            names = _IR if block in ir_blocks else _DS
            out[f"{block}.{names.get(part, part)}.{rest}"] = value  # se.* keeps its name
        else:
            part, _, rest = key.partition(".")
            out[f"{_TOP.get(part, part)}.{rest}"] = value
    return out


TIMM_CONVERTER = Converter("timm", is_timm_efficientnet, from_timm_efficientnet)
EFFICIENTNET = Family("efficientnet", "Tan & Le, EfficientNet: Rethinking Model Scaling for "
                      "Convolutional Neural Networks (ICML 2019)",
                      converters=(TIMM_CONVERTER,), layouts=("nchw",))
# Convolutions only: any size works; multiples of 32 keep every stride-2 stage's grid whole.
CNN_RULE = InputRule(multiple=32, minimum=32)

B0 = EfficientNetConfig(
    stages=(
        StageConfig("ds", 1, 3, 1, 1.0, 16, 0.25),
        StageConfig("ir", 2, 3, 2, 6.0, 24, 0.25),
        StageConfig("ir", 2, 5, 2, 6.0, 40, 0.25),
        StageConfig("ir", 3, 3, 2, 6.0, 80, 0.25),
        StageConfig("ir", 3, 5, 1, 6.0, 112, 0.25),
        StageConfig("ir", 4, 5, 2, 6.0, 192, 0.25),
        StageConfig("ir", 1, 3, 1, 6.0, 320, 0.25),
    ),
    stem_chs=32, num_features=1280, act_layer=nn.SiLU)


@register_model(EFFICIENTNET, 224, CNN_RULE)
def efficientnet_b0(layout: str = "nchw", num_classes: int = 1000) -> EfficientNet:
    return EfficientNet(B0, num_classes, layout)

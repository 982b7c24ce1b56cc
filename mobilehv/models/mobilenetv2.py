"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

A baseline of the EfficientFormer latency study. The same network class as EfficientNet
(efficientnet.py) with ReLU6, no squeeze-excite and MobileNetV2's stage list; the width
multiplier scales stem, stages and (above 1.0) the 1280-channel head, as in timm.
"""
from __future__ import annotations

from torch import nn

from mobilehv.models.efficientnet import (CNN_RULE, TIMM_CONVERTER, EfficientNet, EfficientNetConfig,
                                          StageConfig, make_divisible)
from mobilehv.registry import Family, register_model

MOBILENETV2 = Family("mobilenetv2", "Sandler et al., MobileNetV2: Inverted Residuals and Linear "
                     "Bottlenecks (CVPR 2018)", converters=(TIMM_CONVERTER,), layouts=("nchw",))

_STAGES = (
    StageConfig("ds", 1, 3, 1, 1.0, 16),
    StageConfig("ir", 2, 3, 2, 6.0, 24),
    StageConfig("ir", 3, 3, 2, 6.0, 32),
    StageConfig("ir", 4, 3, 2, 6.0, 64),
    StageConfig("ir", 3, 3, 1, 6.0, 96),
    StageConfig("ir", 3, 3, 2, 6.0, 160),
    StageConfig("ir", 1, 3, 1, 6.0, 320),
)


def _config(multiplier: float) -> EfficientNetConfig:
    return EfficientNetConfig(_STAGES, stem_chs=32, act_layer=nn.ReLU6, multiplier=multiplier,
                              num_features=max(1280, make_divisible(1280 * multiplier)))


@register_model(MOBILENETV2, 224, CNN_RULE)
def mobilenetv2_100(layout: str = "nchw", num_classes: int = 1000) -> EfficientNet:
    return EfficientNet(_config(1.0), num_classes, layout)


@register_model(MOBILENETV2, 224, CNN_RULE)
def mobilenetv2_140(layout: str = "nchw", num_classes: int = 1000) -> EfficientNet:
    return EfficientNet(_config(1.4), num_classes, layout)

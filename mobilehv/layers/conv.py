"""Conv + BatchNorm (+ activation): the block every CNN part is built from, and its fold."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One conv computing bn(conv(x)) in eval mode: w' = w * g/s, b' = (b - mu) * g/s + beta."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      padding_mode=conv.padding_mode)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


class ConvNormAct(nn.Module):
    """conv -> bn -> act, with timm's attribute names (`conv`, `bn`) so checkpoints map 1:1."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1,
                 padding: int | None = None, groups: int = 1, bias: bool = False,
                 act_layer: Callable[[], nn.Module] | None = nn.ReLU):
        super().__init__()
        padding = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def fold(self) -> nn.Module:
        conv = fuse_conv_bn(self.conv, self.bn)
        return conv if isinstance(self.act, nn.Identity) else nn.Sequential(conv, self.act)

"""Conv + BatchNorm (+ activation): the block every CNN part is built from, and its fold."""
from __future__ import annotations

import copy
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


class DepthwiseSplit(nn.Module):
    """Deploy form of a depthwise conv with channel multiplier E (`groups == C_in`, E * C_in
    outputs): E plain depthwise convs on the same input, concatenated.

    XNNPACK has no fast kernel for a multiplier above 1: Mobile-Former-294m's first block
    (16 -> 32 channels at 112x112) took LiteRT 1.6 ms as one conv and 0.34 ms split, the concat
    included. The outputs come in `(E, C_in)` order, the conv's own is `(C_in, E)`:
    `order[j]` is the conv's channel that output `j` holds. Kept to stride 1: at stride 2
    litert-torch pads explicitly, and a pad shared by E convs is no longer fused into them.
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module | None = None):
        super().__init__()
        cin, mult = conv.in_channels, conv.out_channels // conv.in_channels
        if conv.groups != cin or mult < 2 or conv.out_channels != cin * mult:
            raise ValueError(f"not a depthwise conv with a channel multiplier: {conv}")
        order = torch.arange(conv.out_channels).reshape(cin, mult).t().flatten()  # conv's c * E + e -> e * C_in + c
        self.register_buffer("order", order, persistent=False)
        branches = []
        for e in range(mult):
            branch = nn.Conv2d(cin, cin, conv.kernel_size, conv.stride, conv.padding, conv.dilation, cin,
                               bias=True, padding_mode=conv.padding_mode)
            with torch.no_grad():
                branch.weight.copy_(conv.weight[e::mult])
                branch.bias.copy_(conv.bias[e::mult] if conv.bias is not None else torch.zeros(cin))
            # the activation goes in each branch, where the runtimes fuse it into the conv
            branches.append(branch if act is None else nn.Sequential(branch, copy.deepcopy(act)))
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)  # (B, E * C_in, H, W)

"""The two layouts of one set of weights.

`nchw` (deploy form) keeps activations 4-D `(B, C, H, W)`: projections are 1x1 convs and norms
reduce over dim 1, so no reshape/transpose is needed to move between conv and transformer parts.
`tokens` (reference form) is the papers' `(B, N, C)` with `nn.LayerNorm` + `nn.Linear`.
Parameters have the same names in both; a Linear weight `(O, I)` and a 1x1 conv weight
`(O, I, 1, 1)` differ only by singleton dimensions, which checkpoint loading bridges.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of a `(B, C, H, W)` tensor.

    Layout principle: normalise along dim 1 in place instead of permuting to channels-last
    and back, so the exported graph has reductions, not two Transposes per norm.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=1, keepdim=True)
        x = centred * torch.rsqrt(var + self.eps)
        # (1, C, 1, 1), not (C, 1, 1): a 3-D operand makes litert's NHWC pass wrap the op in transposes
        return x * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)


class Affine(nn.Module):
    """Per-channel `x * weight + bias` along dim 1: what a BatchNorm with no conv to fold into
    becomes in the deploy form (so no `BatchNorm*` module survives `fold`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # full rank: see LayerNorm2d
        return x * self.weight.reshape(shape) + self.bias.reshape(shape)


def Linear(in_features: int, out_features: int, bias: bool = True, layout: str = "nchw") -> nn.Module:
    """A projection in the given layout: `Conv2d(k=1)` on `(B, C, H, W)` or `Linear` on `(B, N, C)`."""
    if layout == "nchw":
        return nn.Conv2d(in_features, out_features, 1, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


def Norm(num_channels: int, eps: float = 1e-5, layout: str = "nchw") -> nn.Module:
    """LayerNorm over channels in the given layout."""
    return LayerNorm2d(num_channels, eps) if layout == "nchw" else nn.LayerNorm(num_channels, eps=eps)


def linear_layer(layout: str) -> Callable[..., nn.Module]:
    return lambda i, o, bias=True: Linear(i, o, bias, layout)


def norm_layer(layout: str) -> Callable[..., nn.Module]:
    return lambda c, eps=1e-5: Norm(c, eps, layout)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    # (B, C, H, W) -> (B, H*W, C): the reshape + transpose the tokens layout pays at a 4-D/3-D boundary
    return x.flatten(2).transpose(1, 2)


def to_2d(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # (B, H*W, C) -> (B, C, H, W)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)

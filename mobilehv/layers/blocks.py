"""Blocks shared by several families: MLP, multi-head self-attention, inverted residual, SE.

Each takes its layer types (or `layout`) as arguments; families rename checkpoint keys onto
these attribute names in their converters.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mobilehv.layers.conv import ConvNormAct
from mobilehv.layers.layout import Linear


class Mlp(nn.Module):
    """fc1 -> act -> fc2 on `(B, C, H, W)` (1x1 convs) or `(B, N, C)` (Linear)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, bias: bool = True, layout: str = "nchw"):
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias, layout)
        self.act = act_layer()
        self.fc2 = Linear(hidden, out_dim or dim, bias, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    nchw: input `(B, C, H, W)` (a token sequence is `(B, C, 1, N)`); heads are split along
    channels, so the only data movement is the head split and one transpose of q.
    tokens: input `(B, N, C)`, the paper's form.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, head_dim: int | None = None,
                 layout: str = "nchw"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.layout = layout
        self.qkv = Linear(dim, 3 * inner, qkv_bias, layout)
        self.proj = Linear(inner, dim, True, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "nchw":
            b, _, h, w = x.shape
            # (B, 3*heads*d, H, W) -> (B, 3*heads, d, N): heads split along channels, no permute
            q, k, v = self.qkv(x).reshape(b, 3 * self.num_heads, self.head_dim, h * w).chunk(3, dim=1)
            attn = (q.transpose(-2, -1) * self.scale) @ k            # (B, heads, N, N)
            out = v @ attn.softmax(dim=-1).transpose(-2, -1)         # (B, heads, d, N)
            return self.proj(out.reshape(b, -1, h, w))
        b, n, _ = x.shape
        # (B, N, 3*heads*d) -> (3, B, heads, N, d)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class SqueezeExcite(nn.Module):
    """x * gate(expand(act(reduce(mean(x))))), as in MobileNetV3/EfficientNet."""

    def __init__(self, chs: int, rd_chs: int, act_layer: Callable[[], nn.Module] = nn.ReLU,
                 gate_layer: Callable[[], nn.Module] = nn.Sigmoid):
        super().__init__()
        self.conv_reduce = nn.Conv2d(chs, rd_chs, 1)
        self.act = act_layer()
        self.conv_expand = nn.Conv2d(rd_chs, chs, 1)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.conv_expand(self.act(self.conv_reduce(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> kxk depthwise -> (SE) -> 1x1 project, residual when shapes allow."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expand: float = 4.0, kernel_size: int = 3,
                 act_layer: Callable[[], nn.Module] = nn.ReLU6,
                 se_layer: Callable[[int], nn.Module] | None = None, skip: bool = True):
        super().__init__()
        mid = int(round(in_chs * expand))
        self.conv_pw = ConvNormAct(in_chs, mid, 1, act_layer=act_layer) if mid != in_chs else nn.Identity()
        self.conv_dw = ConvNormAct(mid, mid, kernel_size, stride, groups=mid, act_layer=act_layer)
        self.se = se_layer(mid) if se_layer is not None else nn.Identity()
        self.conv_pwl = ConvNormAct(mid, out_chs, 1, act_layer=None)
        self.has_skip = skip and stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return x + y if self.has_skip else y

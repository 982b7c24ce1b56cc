"""DWNet (Han et al., ICLR 2022): the Swin-T/B layout with local attention replaced by a
(dynamic) depth-wise convolution, as in the first public DWNet code.

Block: x + [1x1 conv-BN-ReLU -> 7x7 depthwise conv-BN-ReLU -> 1x1 conv-BN](x), then
x + MLP(BN(x)). Stages are joined by Swin's patch merging (2x2 space-to-depth, LayerNorm,
Linear). The dynamic variant predicts each image's depthwise kernels from its pooled features.

Layouts: `tokens` is the original's `(B, N, C)` stream with LayerNorm/Linear, which pays a
3-D -> 4-D reshape + permute around every conv part and every BatchNorm; `nchw` keeps
`(B, C, H, W)` throughout (1x1 convs, LayerNorm2d), so only patch merging moves data.
Folding fuses every conv-BN pair and absorbs the pre-MLP BatchNorm into the MLP's first
projection.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mobilehv.layers import ConvNormAct, Linear, Mlp, Norm, to_2d, to_tokens
from mobilehv.registry import Converter, Family, InputRule, register_model

Size = tuple[int, int]


class DynamicDWConv(nn.Module):
    """Depthwise conv whose kxk kernels are predicted per image, then BN -> ReLU.

    kernels = expand(ReLU(BN(reduce(mean_HW(x))))), shape (B, C*k*k); a static per-channel bias
    is added. `fold` moves the BN after the conv into `expand` and the bias (same math).
    """

    def __init__(self, dim: int, kernel_size: int, reduction: int = 4):
        super().__init__()
        self.kernel_size = kernel_size
        self.reduce = ConvNormAct(dim, dim // reduction, 1, act_layer=nn.ReLU)
        self.expand = nn.Conv2d(dim // reduction, dim * kernel_size * kernel_size, 1)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.bn = nn.BatchNorm2d(dim)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.kernel_size
        weight = self.expand(self.reduce(x.mean(dim=(2, 3), keepdim=True)))  # (B, C*k*k, 1, 1)
        # Per-image kernels: fold the batch into the groups of one depthwise conv,
        # (B, C, H, W) -> (1, B*C, H, W); the reshapes are what a dynamic kernel needs.
        y = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(b * c, 1, k, k),
                     self.bias.repeat(b), padding=k // 2, groups=b * c)
        return self.act(self.bn(y.reshape(b, c, h, w)))

    @torch.no_grad()
    def fold(self) -> nn.Module:
        if isinstance(self.bn, nn.Identity):
            return self
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        shift = self.bn.bias - self.bn.running_mean * scale
        per_tap = scale.repeat_interleave(self.kernel_size * self.kernel_size)  # expand row c*k*k+i
        self.expand.weight.mul_(per_tap.reshape(-1, 1, 1, 1))
        self.expand.bias.mul_(per_tap)
        self.bias.copy_(self.bias * scale + shift)
        self.bn = nn.Identity()
        return self


class DWBlock(nn.Module):
    """The attention replacement: 1x1 conv-BN-ReLU, kxk (dynamic) depthwise conv-BN-ReLU, 1x1 conv-BN."""

    def __init__(self, dim: int, kernel_size: int, dynamic: bool):
        super().__init__()
        self.conv0 = ConvNormAct(dim, dim, 1, act_layer=nn.ReLU)
        self.conv1 = (DynamicDWConv(dim, kernel_size) if dynamic else
                      ConvNormAct(dim, dim, kernel_size, groups=dim, bias=True, act_layer=nn.ReLU))
        self.conv2 = ConvNormAct(dim, dim, 1, act_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(self.conv0(x)))


class SpatialBlock(nn.Module):
    """x + DWBlock(x); x + MLP(BN(x))."""

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: float, dynamic: bool, layout: str):
        super().__init__()
        self.layout = layout
        self.attn2conv = DWBlock(dim, kernel_size, dynamic)
        self.bn = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), layout=layout)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        if self.layout == "nchw":
            x = x + self.attn2conv(x)
            return x + self.mlp(self.bn(x))
        h, w = size
        # tokens: the conv part and the BatchNorm run on (B, C, H, W); the reference form
        # reshapes + transposes in and out of it each time, as the original does.
        x = x + to_tokens(self.attn2conv(to_2d(x, h, w)))
        y = x if isinstance(self.bn, nn.Identity) else to_tokens(self.bn(to_2d(x, h, w)))
        return x + self.mlp(y)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """Absorb the pre-MLP BatchNorm into fc1: fc1(s*x + t) = (W diag s) x + (W t + b)."""
        if isinstance(self.bn, nn.Identity):
            return self
        bn, fc1 = self.bn, self.mlp.fc1
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        w = fc1.weight.reshape(fc1.weight.shape[0], -1)                 # (O, I), Linear or 1x1 conv
        fc1.bias.add_(w @ shift)
        fc1.weight.mul_(scale.reshape((1, -1) + (1,) * (fc1.weight.dim() - 2)))
        self.bn = nn.Identity()
        return self


class PatchMerging(nn.Module):
    """2x2 space-to-depth (Swin's channel order), LayerNorm(4C), Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int, layout: str):
        super().__init__()
        self.layout = layout
        self.norm = Norm(4 * dim, layout=layout)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False, layout=layout)

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        h, w = size
        if self.layout == "nchw":
            # Layout principle: strided slices along H, W and one concat along channels, no
            # permute. Order [(even,even), (odd,even), (even,odd), (odd,odd)] (row, col) as in Swin.
            even, odd = x[:, :, 0::2], x[:, :, 1::2]
            x = torch.cat([even[..., 0::2], odd[..., 0::2], even[..., 1::2], odd[..., 1::2]], dim=1)
        else:
            b, _, c = x.shape
            x = x.reshape(b, h, w, c)
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
            x = x.reshape(b, -1, 4 * c)                                  # (B, N/4, 4C)
        return self.reduction(self.norm(x)), (h // 2, w // 2)


class Stage(nn.Module):
    def __init__(self, dim: int, depth: int, kernel_size: int, mlp_ratio: float, dynamic: bool,
                 downsample: bool, layout: str):
        super().__init__()
        self.blocks = nn.ModuleList(SpatialBlock(dim, kernel_size, mlp_ratio, dynamic, layout)
                                    for _ in range(depth))
        self.downsample = PatchMerging(dim, layout) if downsample else None

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        for block in self.blocks:
            x = block(x, size)
        return self.downsample(x, size) if self.downsample is not None else (x, size)


class PatchEmbed(nn.Module):
    """4x4 stride-4 conv, then LayerNorm."""

    def __init__(self, dim: int, patch_size: int, layout: str):
        super().__init__()
        self.layout = layout
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.norm = Norm(dim, layout=layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x if self.layout == "nchw" else to_tokens(x))


@dataclass(frozen=True)
class DWNetConfig:
    embed_dim: int
    depths: tuple[int, ...]
    dynamic: bool = False
    kernel_size: int = 7       # the 'window size' of the Swin configuration it replaces
    mlp_ratio: float = 4.0
    patch_size: int = 4


class DWNet(nn.Module):
    def __init__(self, cfg: DWNetConfig, num_classes: int = 1000, layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        self.patch_embed = PatchEmbed(cfg.embed_dim, cfg.patch_size, layout)
        n = len(cfg.depths)
        self.layers = nn.ModuleList(
            Stage(cfg.embed_dim * 2 ** i, d, cfg.kernel_size, cfg.mlp_ratio, cfg.dynamic,
                  downsample=i < n - 1, layout=layout)
            for i, d in enumerate(cfg.depths))
        features = cfg.embed_dim * 2 ** (n - 1)
        self.norm = Norm(features, layout=layout)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2] // 4, x.shape[-1] // 4)
        x = self.patch_embed(x)
        for layer in self.layers:
            x, size = layer(x, size)
        x = self.norm(x)
        # average over positions: (B, C, H, W) or (B, N, C) -> (B, C), a reduction, no reshape
        return self.head(x.mean(dim=(2, 3)) if self.layout == "nchw" else x.mean(dim=1))


# ---- checkpoints ----------------------------------------------------------------------------

_OFFICIAL_RENAMES = (
    (r"\.attn2conv\.conv0\.", ".attn2conv.conv0.conv."),
    (r"\.attn2conv\.bn0\.", ".attn2conv.conv0.bn."),
    (r"\.attn2conv\.conv2\.", ".attn2conv.conv2.conv."),
    (r"\.attn2conv\.bn2\.", ".attn2conv.conv2.bn."),
    # dynamic depthwise conv: kernel generator conv1/bn/conv2, its bias, and the BN after it
    (r"\.attn2conv\.conv\.conv1\.", ".attn2conv.conv1.reduce.conv."),
    (r"\.attn2conv\.conv\.bn\.", ".attn2conv.conv1.reduce.bn."),
    (r"\.attn2conv\.conv\.conv2\.", ".attn2conv.conv1.expand."),
    # the BN after the depthwise conv (either kind); the static conv's own weight and bias
    (r"\.attn2conv\.bn\.", ".attn2conv.conv1.bn."),
    (r"\.attn2conv\.conv\.(weight|bias)$", r".attn2conv.conv1.conv.\1"),
)


def _is_official(sd: Mapping[str, torch.Tensor]) -> bool:
    return "layers.0.blocks.0.attn2conv.conv0.weight" in sd


def _rename(key: str, dynamic: bool) -> str:
    if dynamic and key.endswith(".attn2conv.conv.bias"):  # the dynamic conv's static bias
        return key.replace(".attn2conv.conv.bias", ".attn2conv.conv1.bias")
    for pattern, repl in _OFFICIAL_RENAMES:
        key, hit = re.subn(pattern, repl, key)
        if hit:
            return key
    return key


def _from_official(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    # `attn2conv.conv.bias` is nn.Conv2d's bias (static) or DynamicDWConv's own bias (dynamic);
    # the checkpoint's kernel-generator keys say which
    dynamic = any(".attn2conv.conv.conv1." in k for k in sd)
    return {_rename(k, dynamic): v for k, v in sd.items()}


FAMILY = Family("dwnet", "Han et al. ICLR 2022, On the Connection between Local Attention and "
                "Dynamic Depth-wise Convolution", converters=(Converter("official", _is_official,
                                                                       _from_official),))

# Patch embedding divides by 4 and three patch mergings by 2 each, exactly (no padding).
RULE = InputRule(multiple=32, minimum=32)


@register_model(FAMILY, 224, RULE)
def dwnet_tiny(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return DWNet(DWNetConfig(96, (2, 2, 6, 2)), num_classes, layout)


@register_model(FAMILY, 224, RULE)
def dwnet_base(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return DWNet(DWNetConfig(128, (2, 2, 18, 2)), num_classes, layout)


@register_model(FAMILY, 224, RULE)
def dwnet_tiny_dynamic(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return DWNet(DWNetConfig(96, (2, 2, 6, 2), dynamic=True), num_classes, layout)


@register_model(FAMILY, 224, RULE)
def dwnet_base_dynamic(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return DWNet(DWNetConfig(128, (2, 2, 18, 2), dynamic=True), num_classes, layout)

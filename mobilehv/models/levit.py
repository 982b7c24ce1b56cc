"""LeViT (Graham et al., ICCV 2021): a ConvNet stem, then attention stages built from
Linear+BatchNorm projections with learned relative-position attention biases.

Baseline of the EfficientFormer latency study. Checkpoints: timm's `levit_128/192/256`
(distilled: eval logits are the mean of the class and distillation heads).

Deploy form (`nchw`): every Linear+BN is a 1x1 conv + BN that folds into one conv; the
query subsampling of the shrinking attention is a stride-2 1x1 conv instead of a 4-D
reshape and strided slice; attention biases are gathered into constants by `fold`; the two
heads merge into one linear.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from mobilehv.layers import ConvNormAct, fuse_conv_bn, to_tokens
from mobilehv.registry import Converter, Family, InputRule, register_model


class LinearNorm(nn.Module):
    """Linear (nchw: 1x1 conv, optionally strided) followed by BatchNorm over channels."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 1, layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        if layout == "nchw":
            self.linear = nn.Conv2d(in_dim, out_dim, 1, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(out_dim)
        else:
            self.linear = nn.Linear(in_dim, out_dim, bias=False)
            self.bn = nn.BatchNorm1d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if self.layout == "nchw":
            return self.bn(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)  # (B, N, C) -> (B*N, C) for BatchNorm1d

    @torch.no_grad()
    def fold(self) -> nn.Module:
        if self.layout == "nchw":
            return fuse_conv_bn(self.linear, self.bn)
        scale = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
        fused = nn.Linear(self.linear.in_features, self.linear.out_features)
        fused.weight.copy_(self.linear.weight * scale[:, None])
        fused.bias.copy_(self.bn.bias - self.bn.running_mean * scale)
        return fused


class NormLinear(nn.Module):
    """BatchNorm then Linear: LeViT's classifier head (on pooled `(B, C, 1, 1)` or `(B, C)`)."""

    def __init__(self, in_dim: int, out_dim: int, layout: str = "nchw"):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_dim) if layout == "nchw" else nn.BatchNorm1d(in_dim)
        self.linear = nn.Conv2d(in_dim, out_dim, 1) if layout == "nchw" else nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x))

    @torch.no_grad()
    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', b') of one linear equal to linear(bn(x)): W' = W*s, b' = b + W(beta - mu*s)."""
        scale = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
        shift = self.bn.bias - self.bn.running_mean * scale
        w = self.linear.weight.flatten(1)  # (O, I) for both layouts
        return w * scale[None, :], self.linear.bias + w @ shift


class DistilledHead(nn.Module):
    """Class head and distillation head on the same pooled features; eval output is their mean."""

    def __init__(self, dim: int, num_classes: int, layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        self.head = NormLinear(dim, num_classes, layout)
        self.head_dist = NormLinear(dim, num_classes, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.head(x) + self.head_dist(x)) / 2

    @torch.no_grad()
    def fold(self) -> nn.Module:
        (w1, b1), (w2, b2) = self.head.fused(), self.head_dist.fused()
        linear = self.head.linear
        merged = (nn.Conv2d(w1.shape[1], w1.shape[0], 1) if self.layout == "nchw"
                  else nn.Linear(w1.shape[1], w1.shape[0]))
        merged.weight.copy_(((w1 + w2) / 2).reshape(linear.weight.shape))
        merged.bias.copy_((b1 + b2) / 2)
        return merged


class AttentionBias(nn.Module):
    """Learned bias per head and |dy|,|dx| offset, gathered into a (heads, Nq, Nk) table.

    The table is tied to the grid it was trained for (`resolution`, query `stride`).
    """

    def __init__(self, num_heads: int, resolution: int, stride: int = 1):
        super().__init__()
        self.biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        k_pos = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution),
                                           indexing="ij")).flatten(1)                  # (2, Nk)
        q_pos = k_pos.reshape(2, resolution, resolution)[:, ::stride, ::stride].flatten(1)  # (2, Nq)
        rel = (q_pos[:, :, None] - k_pos[:, None, :]).abs()
        self.register_buffer("idxs", rel[0] * resolution + rel[1], persistent=False)

    def forward(self) -> torch.Tensor:
        return self.biases[:, self.idxs]

    def fold(self) -> nn.Module:
        return FixedBias(self())


class FixedBias(nn.Module):
    """The gathered attention-bias table as a constant (deploy form: no gather at run time)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.detach().clone())

    def forward(self) -> torch.Tensor:
        return self.table


class Attention(nn.Module):
    """LeViT attention: per-head [q | k | v] from one LinearNorm, biased scores, act -> proj."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: int,
                 act_layer: Callable[[], nn.Module], layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim ** -0.5
        self.qkv = LinearNorm(dim, num_heads * (2 * key_dim + self.val_dim), layout=layout)
        self.act = act_layer()
        self.proj = LinearNorm(num_heads * self.val_dim, dim, layout=layout)
        self.rel_bias = AttentionBias(num_heads, resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = [self.key_dim, self.key_dim, self.val_dim]
        if self.layout == "nchw":
            b, _, h, w = x.shape
            # Layout principle: heads split along channels, (B, heads*(2k+v), H, W) -> (B, heads, 2k+v, N)
            q, k, v = self.qkv(x).reshape(b, self.num_heads, -1, h * w).split(split, dim=2)
            attn = (q.transpose(-2, -1) @ k) * self.scale + self.rel_bias()   # (B, heads, N, N)
            x = (v @ attn.softmax(dim=-1).transpose(-2, -1)).reshape(b, -1, h, w)  # (B, heads*v, H, W)
        else:
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split(split, dim=3)
            q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
            attn = (q @ k) * self.scale + self.rel_bias()                        # (B, heads, N, N)
            x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)     # (B, N, heads*v)
        return self.proj(self.act(x))


class AttentionSubsample(nn.Module):
    """Shrinking attention between stages: queries on every 2nd position, keys/values on all."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: float,
                 resolution: int, act_layer: Callable[[], nn.Module], stride: int = 2,
                 layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim ** -0.5
        self.resolution = resolution
        self.stride = stride
        self.kv = LinearNorm(in_dim, num_heads * (key_dim + self.val_dim), layout=layout)
        # nchw: a strided 1x1 conv reads exactly the subsampled positions (no reshape + slice)
        self.q = LinearNorm(in_dim, num_heads * key_dim, stride=stride if layout == "nchw" else 1,
                            layout=layout)
        self.act = act_layer()
        self.proj = LinearNorm(num_heads * self.val_dim, out_dim, layout=layout)
        self.rel_bias = AttentionBias(num_heads, resolution, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = [self.key_dim, self.val_dim]
        if self.layout == "nchw":
            b, _, h, w = x.shape
            k, v = self.kv(x).reshape(b, self.num_heads, -1, h * w).split(split, dim=2)  # (B, heads, k|v, N)
            q = self.q(x)                                                               # (B, heads*k, H', W')
            hq, wq = q.shape[-2:]
            q = q.reshape(b, self.num_heads, self.key_dim, hq * wq)
            attn = (q.transpose(-2, -1) @ k) * self.scale + self.rel_bias()              # (B, heads, N', N)
            x = (v @ attn.softmax(dim=-1).transpose(-2, -1)).reshape(b, -1, hq, wq)
        else:
            b, n, c = x.shape
            k, v = self.kv(x).view(b, n, self.num_heads, -1).split(split, dim=3)
            k, v = k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
            r, s = self.resolution, self.stride
            xq = x.view(b, r, r, c)[:, ::s, ::s].reshape(b, -1, c)                       # (B, N', C)
            q = self.q(xq).view(b, -1, self.num_heads, self.key_dim).permute(0, 2, 1, 3)
            attn = (q @ k) * self.scale + self.rel_bias()                                # (B, heads, N', N)
            x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, -1, self.num_heads * self.val_dim)
        return self.proj(self.act(x))


class Mlp(nn.Module):
    """LinearNorm -> act -> LinearNorm."""

    def __init__(self, dim: int, hidden: int, act_layer: Callable[[], nn.Module], layout: str = "nchw"):
        super().__init__()
        self.fc1 = LinearNorm(dim, hidden, layout=layout)
        self.act = act_layer()
        self.fc2 = LinearNorm(hidden, dim, layout=layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, mlp_ratio: float,
                 resolution: int, act_layer: Callable[[], nn.Module], layout: str = "nchw"):
        super().__init__()
        self.attn = Attention(dim, key_dim, num_heads, attn_ratio, resolution, act_layer, layout)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class Downsample(nn.Module):
    """Shrinking attention (no residual) followed by a residual MLP."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, resolution: int,
                 act_layer: Callable[[], nn.Module], layout: str = "nchw"):
        super().__init__()
        self.attn_downsample = AttentionSubsample(in_dim, out_dim, key_dim, in_dim // key_dim, 4.0,
                                                  resolution, act_layer, layout=layout)
        self.mlp = Mlp(out_dim, out_dim * 2, act_layer, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_downsample(x)
        return x + self.mlp(x)


class Stage(nn.Module):
    def __init__(self, in_dim: int, dim: int, key_dim: int, depth: int, num_heads: int, attn_ratio: float,
                 mlp_ratio: float, resolution: int, downsample: bool, act_layer: Callable[[], nn.Module],
                 layout: str = "nchw"):
        super().__init__()
        self.downsample = (Downsample(in_dim, dim, key_dim, resolution, act_layer, layout)
                           if downsample else nn.Identity())
        resolution = (resolution - 1) // 2 + 1 if downsample else resolution
        self.blocks = nn.Sequential(*[
            Block(dim, key_dim, num_heads, attn_ratio, mlp_ratio, resolution, act_layer, layout)
            for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


@dataclass(frozen=True)
class LevitConfig:
    embed_dim: tuple[int, ...]
    key_dim: int
    num_heads: tuple[int, ...]
    depth: tuple[int, ...]
    attn_ratio: float = 2.0
    mlp_ratio: float = 2.0
    img_size: int = 224


class Levit(nn.Module):
    def __init__(self, cfg: LevitConfig, layout: str = "nchw", num_classes: int = 1000,
                 act_layer: Callable[[], nn.Module] = nn.Hardswish):
        super().__init__()
        self.layout = layout
        c = cfg.embed_dim[0]
        self.stem = nn.Sequential()  # four 3x3 stride-2 conv-BN, Hardswish between
        for i, (cin, cout) in enumerate(zip((3, c // 8, c // 4, c // 2), (c // 8, c // 4, c // 2, c))):
            self.stem.add_module(f"conv{i + 1}", ConvNormAct(cin, cout, 3, 2, act_layer=act_layer if i < 3 else None))
        resolution = cfg.img_size // 16
        stages, in_dim = [], c
        for i, dim in enumerate(cfg.embed_dim):
            stages.append(Stage(in_dim, dim, cfg.key_dim, cfg.depth[i], cfg.num_heads[i], cfg.attn_ratio,
                                cfg.mlp_ratio, resolution, i > 0, act_layer, layout))
            resolution = (resolution - 1) // 2 + 1 if i > 0 else resolution
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.head = DistilledHead(in_dim, num_classes, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.layout == "nchw":
            # Layout principle: stay 4-D to the head; pooling keeps (B, C, 1, 1) for the 1x1-conv head
            x = self.stages(x).mean((2, 3), keepdim=True)
            return self.head(x).flatten(1)
        x = self.stages(to_tokens(x))                        # (B, N, C)
        return self.head(x.mean(1))


_TIMM_RENAMES = (
    (r"^stem\.(conv\d)\.linear\.", r"stem.\1.conv."),
    (r"\.(proj|q)\.ln\.", r".\1."),
    (r"\.mlp\.ln1\.", ".mlp.fc1."),
    (r"\.mlp\.ln2\.", ".mlp.fc2."),
    (r"\.attention_biases$", ".rel_bias.biases"),
    (r"^(head|head_dist)\.", r"head.\1."),
)


def _is_timm(sd: Mapping[str, torch.Tensor]) -> bool:
    return "stem.conv1.linear.weight" in sd and any(k.endswith(".attn.proj.ln.linear.weight") for k in sd)


def _from_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key.endswith("attention_bias_idxs"):  # non-persistent in timm >= 0.9; old files kept it
            continue
        for pattern, repl in _TIMM_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


FAMILY = Family("levit", "Graham et al., LeViT: a Vision Transformer in ConvNet's Clothing, ICCV 2021",
                converters=(Converter("timm", _is_timm, _from_timm),))
# Attention-bias tables are built for the 14x14 grid of a 224x224 input (not interpolated).
_RULE = InputRule(fixed=224)


@register_model(FAMILY, 224, _RULE)
def levit_128(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return Levit(LevitConfig((128, 256, 384), 16, (4, 8, 12), (4, 4, 4)), layout, num_classes)


@register_model(FAMILY, 224, _RULE)
def levit_192(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return Levit(LevitConfig((192, 288, 384), 32, (3, 5, 6), (4, 4, 4)), layout, num_classes)


@register_model(FAMILY, 224, _RULE)
def levit_256(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return Levit(LevitConfig((256, 384, 512), 32, (4, 6, 8), (4, 4, 4)), layout, num_classes)

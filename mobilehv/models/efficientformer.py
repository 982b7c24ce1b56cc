"""EfficientFormer (Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed", NeurIPS 2022).

Dimension-consistent design: Meta4D blocks (pool mixer, Conv1x1-BN MLP) on `(B, C, H, W)` in
every stage, then a few Meta3D blocks (LayerNorm, MHSA with a learned attention bias, Linear
MLP) at the end of the last stage. In the `tokens` layout the Meta3D blocks run on `(B, N, C)`
after one flatten, as in the paper; in the `nchw` layout they stay 4-D (LayerNorm2d, 1x1
convs, heads split along channels), so the model has no 4-D/3-D boundary at all.
Eval output is the mean of the classifier and distillation heads, as in the original.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from mobilehv.layers import ConvNormAct, Linear, Mlp, Norm, fuse_conv_bn, to_tokens
from mobilehv.models.poolformer import LayerScale, Pooling, scale_output
from mobilehv.registry import Converter, Family, InputRule, register_model


@dataclass(frozen=True)
class EfficientFormerConfig:
    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_vit: int  # Meta3D blocks at the end of the last stage
    mlp_ratio: float = 4.0
    pool_size: int = 3
    key_dim: int = 32
    num_heads: int = 8
    attn_ratio: int = 4  # value dim = attn_ratio * key_dim
    attn_resolution: int = 7  # last-stage grid at 224 px: the attention-bias table covers only it
    layer_scale_init: float = 1e-5


def relative_index(resolution: int) -> torch.Tensor:
    """(N, N) index into the bias table: |dy| * R + |dx| for every pair of grid cells."""
    r = torch.arange(resolution)
    pos = torch.stack(torch.meshgrid(r, r, indexing="ij")).flatten(1)  # (2, N)
    rel = (pos[:, :, None] - pos[:, None, :]).abs()  # (2, N, N)
    return rel[0] * resolution + rel[1]


class Attention(nn.Module):
    """MHSA with per-head learned biases indexed by relative offset on a fixed grid.

    The fused qkv projection is laid out per head as [q (key_dim), k (key_dim), v (val_dim)].
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: int, resolution: int,
                 layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = attn_ratio * key_dim
        self.scale: float | None = key_dim ** -0.5
        self.qkv = Linear(dim, num_heads * (2 * key_dim + self.val_dim), True, layout)
        self.proj = Linear(num_heads * self.val_dim, dim, True, layout)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", relative_index(resolution), persistent=False)

    def attention_bias(self) -> torch.Tensor:
        return self.attention_biases[:, self.attention_bias_idxs]  # (heads, N, N), a gather

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x, self.attention_bias())

    def attend(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        split = [self.key_dim, self.key_dim, self.val_dim]
        if self.layout == "nchw":
            b, _, h, w = x.shape
            # Layout principle: heads split along channels. (B, heads*(2kd+vd), H, W) ->
            # (B, heads, 2kd+vd, N) is the one reshape the head split needs; no permute.
            q, k, v = self.qkv(x).reshape(b, self.num_heads, -1, h * w).split(split, dim=2)
            # q^T k and (v attn^T) need the two transposes; softmax stays on the last axis
            attn = q.transpose(-2, -1) @ k  # (B, heads, N, N)
            attn = (attn if self.scale is None else attn * self.scale) + bias
            out = v @ attn.softmax(dim=-1).transpose(-2, -1)  # (B, heads, vd, N)
            return self.proj(out.reshape(b, -1, h, w))  # heads back onto channels
        b, n, _ = x.shape
        # (B, N, heads*(2kd+vd)) -> (B, heads, N, 2kd+vd)
        q, k, v = self.qkv(x).reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3).split(split, dim=3)
        attn = q @ k.transpose(-2, -1)  # (B, heads, N, N)
        attn = (attn if self.scale is None else attn * self.scale) + bias
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1))

    @torch.no_grad()
    def fold(self) -> nn.Module:
        return FoldedAttention(self)


class FoldedAttention(Attention):
    """Deploy form: the bias gathered once into a constant `(heads, N, N)` buffer (no gather at
    run time) and the 1/sqrt(key_dim) scale absorbed into the q rows of qkv."""

    def __init__(self, src: Attention):
        nn.Module.__init__(self)  # built from a trained Attention: takes its layers, not new ones
        self.layout, self.num_heads = src.layout, src.num_heads
        self.key_dim, self.val_dim = src.key_dim, src.val_dim
        self.qkv, self.proj = src.qkv, src.proj
        per_head = 2 * self.key_dim + self.val_dim
        self.qkv.weight.view(self.num_heads, per_head, -1)[:, :self.key_dim] *= src.scale
        self.qkv.bias.view(self.num_heads, per_head)[:, :self.key_dim] *= src.scale
        self.scale = None
        self.register_buffer("attention_bias_const", src.attention_bias().detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x, self.attention_bias_const)

    def fold(self) -> nn.Module:
        return self


class Meta4D(nn.Module):
    """x + ls1 * (pool(x) - x); x + ls2 * BN(fc2(GELU(BN(fc1(x))))), all 4-D."""

    def __init__(self, dim: int, cfg: EfficientFormerConfig):
        super().__init__()
        hidden = int(dim * cfg.mlp_ratio)
        self.token_mixer = Pooling(cfg.pool_size)
        self.ls1 = LayerScale(dim, cfg.layer_scale_init)
        self.mlp = nn.Sequential(OrderedDict(
            fc1=ConvNormAct(dim, hidden, 1, bias=True, act_layer=nn.GELU),
            fc2=ConvNormAct(hidden, dim, 1, bias=True, act_layer=None)))
        self.ls2 = LayerScale(dim, cfg.layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.token_mixer(x))
        return x + self.ls2(self.mlp(x))

    def fold(self) -> nn.Module:
        # ls2 goes into the fused fc2 conv (exact). ls1 stays: no linear layer precedes the pool.
        if isinstance(self.ls2, LayerScale):
            self.mlp.fc2 = scale_output(fuse_conv_bn(self.mlp.fc2.conv, self.mlp.fc2.bn), self.ls2.gamma)
            self.ls2 = nn.Identity()
        return self


class Meta3D(nn.Module):
    """x + ls1 * MHSA(LN(x)); x + ls2 * MLP(LN(x)) on (B, N, C) (tokens) or (B, C, H, W) (nchw)."""

    def __init__(self, dim: int, cfg: EfficientFormerConfig, layout: str):
        super().__init__()
        channel_dim = 1 if layout == "nchw" else -1
        self.norm1 = Norm(dim, 1e-5, layout)
        self.token_mixer = Attention(dim, cfg.key_dim, cfg.num_heads, cfg.attn_ratio, cfg.attn_resolution, layout)
        self.ls1 = LayerScale(dim, cfg.layer_scale_init, channel_dim)
        self.norm2 = Norm(dim, 1e-5, layout)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), act_layer=nn.GELU, layout=layout)
        self.ls2 = LayerScale(dim, cfg.layer_scale_init, channel_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.token_mixer(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def fold(self) -> nn.Module:
        # Both layer scales follow a projection (attention proj, mlp fc2): absorbed exactly.
        if isinstance(self.ls1, LayerScale):
            scale_output(self.token_mixer.proj, self.ls1.gamma)
            scale_output(self.mlp.fc2, self.ls2.gamma)
            self.ls1, self.ls2 = nn.Identity(), nn.Identity()
        return self


class ToTokens(nn.Module):
    """The paper's 4-D -> 3-D boundary: (B, C, H, W) -> (B, H*W, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_tokens(x)


class EfficientFormerStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, num_vit: int, cfg: EfficientFormerConfig,
                 layout: str):
        super().__init__()
        self.downsample = (ConvNormAct(in_dim, dim, 3, 2, bias=True, act_layer=None)
                           if in_dim != dim else nn.Identity())
        blocks: list[nn.Module] = [Meta4D(dim, cfg) for _ in range(depth - num_vit)]
        if num_vit:
            # Layout principle: the nchw form never leaves 4-D, so its boundary is an Identity
            # (kept as a module so block indices match the checkpoint's in both layouts).
            blocks.append(ToTokens() if layout == "tokens" else nn.Identity())
            blocks += [Meta3D(dim, cfg, layout) for _ in range(num_vit)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class DistilledHead(nn.Module):
    """Classifier and distillation classifier on the same features; eval output is their mean."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        self.fc_dist = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fc(x) + self.fc_dist(x)) / 2

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """(W1 x + b1 + W2 x + b2) / 2 is one Linear with averaged weight and bias."""
        merged = nn.Linear(self.fc.in_features, self.fc.out_features)
        merged.weight.copy_((self.fc.weight + self.fc_dist.weight) / 2)
        merged.bias.copy_((self.fc.bias + self.fc_dist.bias) / 2)
        return merged


class EfficientFormer(nn.Module):
    def __init__(self, cfg: EfficientFormerConfig, layout: str = "nchw", num_classes: int = 1000):
        super().__init__()
        self.layout = layout
        w = cfg.widths
        self.stem = nn.Sequential(ConvNormAct(3, w[0] // 2, 3, 2, bias=True, act_layer=nn.ReLU),
                                  ConvNormAct(w[0] // 2, w[0], 3, 2, bias=True, act_layer=nn.ReLU))
        dims = (w[0],) + w
        last = len(cfg.depths) - 1
        self.stages = nn.Sequential(*[
            EfficientFormerStage(dims[i], dims[i + 1], d, cfg.num_vit if i == last else 0, cfg, layout)
            for i, d in enumerate(cfg.depths)])
        self.norm = Norm(w[-1], 1e-5, layout)
        self.head = DistilledHead(w[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.stages(self.stem(x)))
        # global average pool: over (H, W) in nchw -> (B, C) with no reshape; over N in tokens
        return self.head(x.mean((2, 3)) if self.layout == "nchw" else x.mean(1))


_TIMM_RENAMES = (
    (r"^stem\.conv1\.", "stem.0.conv."), (r"^stem\.norm1\.", "stem.0.bn."),
    (r"^stem\.conv2\.", "stem.1.conv."), (r"^stem\.norm2\.", "stem.1.bn."),
    (r"\.downsample\.norm\.", ".downsample.bn."),
    (r"\.mlp\.norm([12])\.", r".mlp.fc\1.bn."),
    (r"^head\.", "head.fc."), (r"^head_dist\.", "head.fc_dist."),
)


def _is_timm(sd: Mapping[str, torch.Tensor]) -> bool:
    return "stem.conv1.weight" in sd and "head_dist.weight" in sd


def _from_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith(".attention_bias_idxs"):
            continue  # derived from the grid size, rebuilt by the model
        m = re.match(r"(.*\.mlp\.)fc([12])\.(weight|bias)$", k)
        if m and f"{m.group(1)}norm1.weight" in sd:  # Meta4D: fc+BN pairs are ConvNormAct here
            k = f"{m.group(1)}fc{m.group(2)}.conv.{m.group(3)}"
        for pattern, repl in _TIMM_RENAMES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def _is_official(sd: Mapping[str, torch.Tensor]) -> bool:
    return "patch_embed.0.weight" in sd and "network.0.0.mlp.fc1.weight" in sd


def _official_key_to_timm(k: str) -> str:
    # snap-research/EfficientFormer: `network` interleaves stages (even) and downsamples (odd);
    # the stem is a plain Sequential; layer scales are bare parameters.
    k = re.sub(r"^patch_embed\.([0134])\.",
               lambda m: {"0": "stem.conv1.", "1": "stem.norm1.", "3": "stem.conv2.", "4": "stem.norm2."}[m[1]], k)
    k = re.sub(r"^network\.(\d+)\.(\d+)\.", lambda m: f"stages.{int(m[1]) // 2}.blocks.{m[2]}.", k)
    k = re.sub(r"^network\.(\d+)\.(proj|norm)\.",
               lambda m: f"stages.{(int(m[1]) + 1) // 2}.downsample.{'conv' if m[2] == 'proj' else 'norm'}.", k)
    k = re.sub(r"\.layer_scale_([12])$", r".ls\1.gamma", k)
    return re.sub(r"^dist_head\.", "head_dist.", k)


def _from_official(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return _from_timm({_official_key_to_timm(k): v for k, v in sd.items()}, model)


EFFICIENTFORMER = Family(
    "efficientformer", "Li et al., EfficientFormer: Vision Transformers at MobileNet Speed (NeurIPS 2022)",
    converters=(Converter("timm", _is_timm, _from_timm), Converter("official", _is_official, _from_official)))
# The attention-bias table covers only the 7x7 last-stage grid of a 224 px input and is not
# interpolated (as in the original), so 224x224 is the one size it takes.
_RULE = InputRule(fixed=224)

CONFIGS = {
    "l1": EfficientFormerConfig((48, 96, 224, 448), (3, 2, 6, 4), num_vit=1),
    "l3": EfficientFormerConfig((64, 128, 320, 512), (4, 4, 12, 6), num_vit=4),
    "l7": EfficientFormerConfig((96, 192, 384, 768), (6, 6, 18, 8), num_vit=8),
}


@register_model(EFFICIENTFORMER, 224, _RULE)
def efficientformer_l1(layout: str = "nchw", num_classes: int = 1000) -> EfficientFormer:
    return EfficientFormer(CONFIGS["l1"], layout, num_classes)


@register_model(EFFICIENTFORMER, 224, _RULE)
def efficientformer_l3(layout: str = "nchw", num_classes: int = 1000) -> EfficientFormer:
    return EfficientFormer(CONFIGS["l3"], layout, num_classes)


@register_model(EFFICIENTFORMER, 224, _RULE)
def efficientformer_l7(layout: str = "nchw", num_classes: int = 1000) -> EfficientFormer:
    return EfficientFormer(CONFIGS["l7"], layout, num_classes)

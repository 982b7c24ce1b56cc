"""MobileViT (Mehta & Rastegari, "MobileViT: Light-weight, General-purpose, and Mobile-friendly
Vision Transformer", ICLR 2022).

MobileNetV2 blocks, then MobileViT blocks: a local 3x3 conv and 1x1 projection, a transformer
over *unfolded* 2x2 patches (pixel p of every patch attends to pixel p of all other patches),
fold back, 1x1 projection, and a 3x3 fusion conv over [input, output].

The unfold/fold is where the layouts differ (see `MobileViTBlock`):
* `tokens` (reference): the paper's code path, `(B, C, H, W) -> (B*P, N, C)` by three
  reshapes and two transposes each way, nn.LayerNorm + nn.Linear, and the head split of
  standard multi-head attention.
* `nchw` (deploy): one SpaceToDepth and one transpose each way, and channels-first token
  matrices `(B, P, 1, C, N)` inside the transformer, on which projections are `W @ x` and
  heads come out of the weight's shape, so attention moves only k (its transpose) and the merged
  heads (a free view).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mobilehv.layers import Attention, ConvNormAct, InvertedResidual, Mlp
from mobilehv.registry import Converter, Family, InputRule, register_model

PATCH = 2  # every MobileViT variant unfolds 2x2 patches; P = PATCH * PATCH pixels per patch


# --- nchw (deploy) transformer parts: channels-first token matrices (..., C, N) -----------------
# Layout principle: keep channels before tokens, as NCHW does, so that no transpose is needed to
# enter or leave the transformer; a projection is then `W @ x` (a 1x1 conv in matrix form, which
# broadcasts over the leading batch and pixel-in-patch dims) and a norm reduces over dim -2.


class ChannelsFirstLinear(nn.Linear):
    """`W x + b` on `(..., C_in, N) -> (..., C_out, N)`; nn.Linear's parameters, so checkpoint
    keys and shapes are those of the tokens layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.weight, x) + self.bias[:, None]


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of `(..., C, N)` (dim -2): reductions, no permute to
    channels-last and back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=-2, keepdim=True)
        x = centred * torch.rsqrt((centred * centred).mean(dim=-2, keepdim=True) + self.eps)
        return x * self.weight[:, None] + self.bias[:, None]


class HeadSplitQKV(nn.Linear):
    """The fused qkv projection, returning q, k, v already split into heads.

    Layout principle: reshape the weight, not the activation. `(3C, C) -> 3 x (heads, d, C)`
    applied to `(..., 1, C, N)` broadcasts to `(..., heads, d, N)`; weight-only ops (the split,
    the softmax scale folded into q) are constants in every deploy runtime.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, 3 * dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        head_dim = self.in_features // self.num_heads
        w = self.weight.reshape(3, self.num_heads, head_dim, self.in_features)
        b = self.bias.reshape(3, self.num_heads, head_dim, 1)
        scale = head_dim ** -0.5
        q = torch.matmul(w[0] * scale, x) + b[0] * scale  # (B, P, heads, d, N)
        return q, torch.matmul(w[1], x) + b[1], torch.matmul(w[2], x) + b[2]


class ChannelsFirstAttention(nn.Module):
    """Multi-head self-attention over the N tokens of `(B, P, 1, C, N)`, batched over P.

    Scores are formed key-major, `k^T q: (N_k, N_q)`, and normalised over the keys (dim -2),
    so `v @ attn` is already `(d, N_q)`: one transpose (of k) per attention instead of three.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.qkv = HeadSplitQKV(dim, num_heads)
        self.proj = ChannelsFirstLinear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)                                 # (B, P, heads, d, N) each
        attn = (k.transpose(-2, -1) @ q).softmax(dim=-2)      # (B, P, heads, N_k, N_q)
        return self.proj((v @ attn).reshape(x.shape))         # heads -> channels: (B, P, 1, C, N)


class ChannelsFirstMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = ChannelsFirstLinear(dim, hidden)
        self.act = nn.SiLU()
        self.fc2 = ChannelsFirstLinear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --- blocks -------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (attention, then SiLU MLP), in either layout."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layout: str):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        if layout == "nchw":
            self.norm1 = ChannelsFirstLayerNorm(dim)
            self.attn = ChannelsFirstAttention(dim, num_heads)
            self.norm2 = ChannelsFirstLayerNorm(dim)
            self.mlp = ChannelsFirstMlp(dim, hidden)
        else:
            self.norm1 = nn.LayerNorm(dim)
            self.attn = Attention(dim, num_heads, qkv_bias=True, layout="tokens")
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, hidden, act_layer=nn.SiLU, layout="tokens")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MobileViTBlock(nn.Module):
    """Local conv -> unfold -> transformer -> fold -> 1x1 projection -> fusion with the input."""

    def __init__(self, chs: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, layout: str):
        super().__init__()
        self.layout = layout
        self.conv_kxk = ConvNormAct(chs, chs, 3, act_layer=nn.SiLU)
        self.conv_1x1 = nn.Conv2d(chs, dim, 1, bias=False)
        self.transformer = nn.Sequential(*[TransformerBlock(dim, num_heads, mlp_ratio, layout)
                                           for _ in range(depth)])
        self.norm = ChannelsFirstLayerNorm(dim) if layout == "nchw" else nn.LayerNorm(dim)
        self.conv_proj = ConvNormAct(dim, chs, 1, act_layer=nn.SiLU)
        self.conv_fusion = ConvNormAct(2 * chs, chs, 3, act_layer=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_1x1(self.conv_kxk(x))
        b, c, h, w = y.shape
        if self.layout == "nchw":
            # One SpaceToDepth: (B, C, H, W) -> (B, C*P, H/2, W/2), channel c*P + p where p is the
            # pixel's place in its 2x2 patch. A free view splits it to (B, C, P, 1, N); the one
            # transpose the math needs moves p in front of c, making it a batch dim of attention.
            y = F.pixel_unshuffle(y, PATCH).reshape(b, c, PATCH * PATCH, 1, -1).permute(0, 2, 3, 1, 4)
            y = self.norm(self.transformer(y))                              # (B, P, 1, C, N)
            y = y.permute(0, 3, 1, 2, 4).reshape(b, c * PATCH * PATCH, h // PATCH, w // PATCH)
            y = F.pixel_shuffle(y, PATCH)                                   # DepthToSpace
        else:
            nh, nw = h // PATCH, w // PATCH
            # The paper's unfold: (B, C, H, W) -> (B*C*nh, nw, ph, pw) -> (B, C, N, P) -> (B*P, N, C)
            y = y.reshape(b * c * nh, PATCH, nw, PATCH).transpose(1, 2)
            y = y.reshape(b, c, nh * nw, PATCH * PATCH).transpose(1, 3).reshape(b * PATCH * PATCH, nh * nw, c)
            y = self.norm(self.transformer(y))
            # and its inverse: (B*P, N, C) -> (B, C, N, P) -> (B*C*nh, ph, nw, pw) -> (B, C, H, W)
            y = y.reshape(b, PATCH * PATCH, nh * nw, c).transpose(1, 3).reshape(b * c * nh, nw, PATCH, PATCH)
            y = y.transpose(1, 2).reshape(b, c, h, w)
        return self.conv_fusion(torch.cat((x, self.conv_proj(y)), dim=1))


class ClassifierHead(nn.Module):
    def __init__(self, chs: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(chs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))  # (B, C, H, W) -> (B, C): pooling leaves nothing to flatten


# --- model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageConfig:
    out_chs: int
    depth: int                  # MobileNetV2 blocks (the first one strided)
    stride: int
    transformer_dim: int = 0    # 0: no MobileViT block in this stage
    transformer_depth: int = 0


@dataclass(frozen=True)
class MobileViTConfig:
    stages: tuple[StageConfig, ...]
    expand: float               # MobileNetV2 expansion ratio
    num_features: int
    stem_chs: int = 16
    num_heads: int = 4
    mlp_ratio: float = 2.0


class MobileViT(nn.Module):
    def __init__(self, cfg: MobileViTConfig, num_classes: int = 1000, layout: str = "nchw"):
        super().__init__()
        self.stem = ConvNormAct(3, cfg.stem_chs, 3, stride=2, act_layer=nn.SiLU)
        chs, stages = cfg.stem_chs, []
        for s in cfg.stages:
            blocks: list[nn.Module] = []
            for i in range(s.depth):
                blocks.append(InvertedResidual(chs, s.out_chs, s.stride if i == 0 else 1, cfg.expand,
                                               act_layer=nn.SiLU))
                chs = s.out_chs
            if s.transformer_dim:
                blocks.append(MobileViTBlock(chs, s.transformer_dim, s.transformer_depth, cfg.num_heads,
                                             cfg.mlp_ratio, layout))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_conv = ConvNormAct(chs, cfg.num_features, 1, act_layer=nn.SiLU)
        self.head = ClassifierHead(cfg.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_conv(self.stages(self.stem(x))))


# --- checkpoints --------------------------------------------------------------------------------

# timm builds the MobileNetV2 blocks as byobnet bottlenecks (conv1_1x1, conv2_kxk, conv3_1x1);
# everything else, transformer included, already has mobilehv's names and (Linear) shapes.
_TIMM_MV2 = {"conv1_1x1": "conv_pw", "conv2_kxk": "conv_dw", "conv3_1x1": "conv_pwl"}
_TIMM_MV2_KEY = re.compile(r"\.(conv1_1x1|conv2_kxk|conv3_1x1)\.")


def _is_timm(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(_TIMM_MV2_KEY.search(k) for k in sd)


def _from_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return {_TIMM_MV2_KEY.sub(lambda m: f".{_TIMM_MV2[m.group(1)]}.", k): v for k, v in sd.items()}


MOBILEVIT = Family("mobilevit", "Mehta & Rastegari, MobileViT: Light-weight, General-purpose, "
                   "and Mobile-friendly Vision Transformer (ICLR 2022)",
                   converters=(Converter("timm", _is_timm, _from_timm),))
# The last MobileViT block (stride 32) unfolds 2x2 patches, so H/32 and W/32 must be even.
_RULE = InputRule(multiple=64, minimum=64)

CONFIGS = {
    "xxs": MobileViTConfig((StageConfig(16, 1, 1), StageConfig(24, 3, 2), StageConfig(48, 1, 2, 64, 2),
                            StageConfig(64, 1, 2, 80, 4), StageConfig(80, 1, 2, 96, 3)),
                           expand=2.0, num_features=320),
    "xs": MobileViTConfig((StageConfig(32, 1, 1), StageConfig(48, 3, 2), StageConfig(64, 1, 2, 96, 2),
                           StageConfig(80, 1, 2, 120, 4), StageConfig(96, 1, 2, 144, 3)),
                          expand=4.0, num_features=384),
    "s": MobileViTConfig((StageConfig(32, 1, 1), StageConfig(64, 3, 2), StageConfig(96, 1, 2, 144, 2),
                          StageConfig(128, 1, 2, 192, 4), StageConfig(160, 1, 2, 240, 3)),
                         expand=4.0, num_features=640),
}


@register_model(MOBILEVIT, 256, _RULE)
def mobilevit_xxs(layout: str = "nchw", num_classes: int = 1000) -> MobileViT:
    return MobileViT(CONFIGS["xxs"], num_classes, layout)


@register_model(MOBILEVIT, 256, _RULE)
def mobilevit_xs(layout: str = "nchw", num_classes: int = 1000) -> MobileViT:
    return MobileViT(CONFIGS["xs"], num_classes, layout)


@register_model(MOBILEVIT, 256, _RULE)
def mobilevit_s(layout: str = "nchw", num_classes: int = 1000) -> MobileViT:
    return MobileViT(CONFIGS["s"], num_classes, layout)

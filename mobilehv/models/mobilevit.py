"""MobileViT (Mehta & Rastegari, "MobileViT: Light-weight, General-purpose, and Mobile-friendly
Vision Transformer", ICLR 2022).

MobileNetV2 blocks, then MobileViT blocks: a local 3x3 conv and 1x1 projection, a transformer
over *unfolded* 2x2 patches (pixel p of every patch attends to pixel p of all other patches),
fold back, 1x1 projection, and a 3x3 fusion conv over [input, output].

The unfold/fold is where the layouts differ (see `MobileViTBlock`):
* `tokens` (reference): the paper's code path, `(B, C, H, W) -> (B*P, N, C)` by three
  reshapes and two transposes each way, nn.LayerNorm + nn.Linear, and the head split of
  standard multi-head attention.
* `nchw` (deploy): one permute each way makes the pixel-in-patch offset a batch dim, so the
  transformer runs on ordinary `(B*P, C, h, w)` maps (1x1 convs, norms over dim 1, heads split
  along channels); only attention's matmuls see `(d, N)` matrices (see `PatchAttention`).
  `fold` computes the unfold's pixel interleave with a depthwise 0/1 conv, moves conv_1x1
  after it and does both permutes as block moves (`MobileViTBlockDeploy`), splits qkv into q,
  k, v convs and runs attention's matmuls and softmax on 3-D `(B'*heads, ., .)` tensors
  (`PatchAttentionDeploy`), moves the norms' affines into the 1x1 convs after them, and splits
  the fusion conv over [input, output] into two convs summed (no concat).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from mobilehv.layers import Attention, ConvNormAct, InvertedResidual, Linear, Mlp
from mobilehv.registry import Converter, Family, InputRule, register_model

PATCH = 2  # every MobileViT variant unfolds 2x2 patches; P = PATCH * PATCH pixels per patch


# --- nchw (deploy) transformer parts: the 2x2 patch offset as a batch dim, (B*P, C, h, w) maps ---
# Layout principle: after the unfold every pixel-in-patch p is its own (C, h, w) map, so the
# transformer is ordinary 4-D conv-net code: projections are 1x1 convs and norms reduce over dim 1.
# Only attention leaves the map, and only for its matmuls. LiteRT's converter turns these maps
# into NHWC as it does for any conv net, so projections and norms run without transposes there.


class PatchLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels (dim 1) of `(B*P, C, h, w)`, with nn.LayerNorm's parameters.

    The affine is broadcast as a 4-D `(1, C, 1, 1)` constant: litert-torch's layout pass keeps an
    op NHWC only if all its operands are 4-D, and a `(C, 1, 1)` operand would cost a TRANSPOSE
    pair around every norm of the .tflite.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=1, keepdim=True)
        x = centred * torch.rsqrt((centred * centred).mean(dim=1, keepdim=True) + self.eps)
        if not self.elementwise_affine:  # deploy form: the affine was absorbed into the next 1x1 conv
            return x
        return x * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)


@torch.no_grad()
def _absorb_affine(norm: PatchLayerNorm, conv: nn.Conv2d) -> PatchLayerNorm:
    """conv(norm(x)) with the norm's per-channel affine moved into the 1x1 conv that follows it."""
    conv.bias.add_(conv.weight[:, :, 0, 0] @ norm.bias)
    conv.weight.mul_(norm.weight.reshape(1, -1, 1, 1))
    return PatchLayerNorm(norm.normalized_shape, norm.eps, elementwise_affine=False)


class PatchAttention(nn.Module):
    """Multi-head self-attention over the N = h*w pixels of each `(C, h, w)` map of the batch.

    Heads are split along channels: `(B', 3C, h, w) -> (B', 3*heads, C/heads, N)` is a view.
    Scores are query-major `(N_q, N_k)`, so the softmax is over the last axis (a softmax over
    dim -2 costs a transpose pair in onnxruntime and an unfused exp/sum/div in LiteRT), and the
    value product is `attn @ v^T`: the three transposes (q, v, output) move small `(d, N)`
    matrices and the `(N, N)` scores are never transposed.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, 3 * dim, True, "nchw")
        self.proj = Linear(dim, dim, True, "nchw")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3 * self.num_heads, c // self.num_heads, h * w).chunk(3, dim=1)
        attn = ((q.transpose(-2, -1) * self.scale) @ k).softmax(dim=-1)  # (B', heads, N_q, N_k)
        out = (attn @ v.transpose(-2, -1)).transpose(-2, -1)              # (B', heads, d, N_q)
        return self.proj(out.reshape(b, c, h, w))                         # heads -> channels: a view

    def fold(self) -> nn.Module:
        return PatchAttentionDeploy(self)


class PatchAttentionDeploy(nn.Module):
    """PatchAttention with q, k and v as three 1x1 convs and every matmul on 3-D `(B'*heads, ., .)`.

    Three convs instead of the fused qkv + chunk: each output is its own tensor, so the head
    split is a view and no SLICE/Split copies q, k and v out of one big tensor (~65 us per
    attention at stride 16 on both runtimes). 3-D operands: litert-torch lowers a rank-4 matmul
    to a rank-3 BATCH_MATMUL with RESHAPEs around it, and XNNPACK copies the `(N, N)` scores in
    each of them (~290 us per reshape at stride 16, 1.5 ms of the model). The scale is folded
    into q's weights. The scores are the left operand of the value product (see forward).
    """

    def __init__(self, src: PatchAttention):
        super().__init__()
        self.num_heads, self.proj = src.num_heads, src.proj
        self.q, self.k, self.v = (nn.Conv2d(w.shape[1], w.shape[0], 1).to(w)
                                  for w in src.qkv.weight.chunk(3))
        scales = (src.scale, 1.0, 1.0)
        with torch.no_grad():
            for conv, w, b, scale in zip((self.q, self.k, self.v), src.qkv.weight.chunk(3),
                                         src.qkv.bias.chunk(3), scales):
                conv.weight.copy_(w * scale)
                conv.bias.copy_(b * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads = (b * self.num_heads, c // self.num_heads, h * w)                # (B'*heads, d, N): views
        q, k, v = (proj(x).reshape(heads) for proj in (self.q, self.k, self.v))
        attn = (q.transpose(1, 2) @ k).softmax(dim=-1)                         # (B'*heads, N_q, N_k)
        # `attn @ v^T`, not `v @ attn^T`: with the (N, N) scores as the right operand, LiteRT's
        # BATCH_MATMUL took 0.73 instead of 0.46 ms per attention at stride 16 (MobileViT-XXS
        # 4% slower end to end than `tokens`). The view keeps litert-torch from rewriting
        # (attn @ v^T)^T back into v @ attn^T; the transpose moves a small (N, d) per head.
        out = (attn @ v.transpose(1, 2)).reshape(b, self.num_heads, h * w, -1)  # (B', heads, N_q, d)
        return self.proj(out.transpose(2, 3).reshape(b, c, h, w))              # heads -> channels


# --- blocks -------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (attention, then SiLU MLP), in either layout."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layout: str):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        if layout == "nchw":
            self.norm1 = PatchLayerNorm(dim)
            self.attn = PatchAttention(dim, num_heads)
            self.norm2 = PatchLayerNorm(dim)
            self.mlp = Mlp(dim, hidden, act_layer=nn.SiLU, layout="nchw")
        else:
            self.norm1 = nn.LayerNorm(dim)
            self.attn = Attention(dim, num_heads, qkv_bias=True, layout="tokens")
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, hidden, act_layer=nn.SiLU, layout="tokens")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def fold(self) -> nn.Module:
        """nchw: each norm's affine goes into the 1x1 conv after it (qkv, fc1): two multiply-adds
        per norm fewer on the full map, as Conv-BN folding does for convs."""
        if isinstance(self.norm1, PatchLayerNorm) and self.norm1.elementwise_affine:
            self.norm1 = _absorb_affine(self.norm1, self.attn.qkv)
            self.norm2 = _absorb_affine(self.norm2, self.mlp.fc1)
        return self


class MobileViTBlock(nn.Module):
    """Local conv -> unfold -> transformer -> fold -> 1x1 projection -> fusion with the input."""

    def __init__(self, chs: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, layout: str):
        super().__init__()
        self.layout = layout
        self.conv_kxk = ConvNormAct(chs, chs, 3, act_layer=nn.SiLU)
        self.conv_1x1 = nn.Conv2d(chs, dim, 1, bias=False)
        self.transformer = nn.Sequential(*[TransformerBlock(dim, num_heads, mlp_ratio, layout)
                                           for _ in range(depth)])
        self.norm = PatchLayerNorm(dim) if layout == "nchw" else nn.LayerNorm(dim)
        self.conv_proj = ConvNormAct(dim, chs, 1, act_layer=nn.SiLU)
        self.conv_fusion = ConvNormAct(2 * chs, chs, 3, act_layer=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_1x1(self.conv_kxk(x))
        b, c, h, w = y.shape
        nh, nw = h // PATCH, w // PATCH
        if self.layout == "nchw":
            # Unfold: the one permute the math needs moves the pixel-in-patch offset (ph, pw) into
            # the batch, (B, C, nh, ph, nw, pw) -> (B*P, C, nh, nw); the reshapes around it are views.
            y = y.reshape(b, c, nh, PATCH, nw, PATCH).permute(0, 3, 5, 1, 2, 4).reshape(-1, c, nh, nw)
            # conv_proj is per pixel, so it runs before the fold, which then moves chs <= dim channels
            y = self.conv_proj(self.norm(self.transformer(y)))              # (B*P, chs, nh, nw)
            # Fold: (B, ph, pw, chs, nh, nw) -> (B, chs, nh, ph, nw, pw) -> (B, chs, H, W)
            y = y.reshape(b, PATCH, PATCH, -1, nh, nw).permute(0, 3, 4, 1, 5, 2).reshape(b, -1, h, w)
        else:
            # The paper's unfold: (B, C, H, W) -> (B*C*nh, nw, ph, pw) -> (B, C, N, P) -> (B*P, N, C)
            y = y.reshape(b * c * nh, PATCH, nw, PATCH).transpose(1, 2)
            y = y.reshape(b, c, nh * nw, PATCH * PATCH).transpose(1, 3).reshape(b * PATCH * PATCH, nh * nw, c)
            y = self.norm(self.transformer(y))
            # and its inverse: (B*P, N, C) -> (B, C, N, P) -> (B*C*nh, ph, nw, pw) -> (B, C, H, W)
            y = y.reshape(b, PATCH * PATCH, nh * nw, c).transpose(1, 3).reshape(b * c * nh, nw, PATCH, PATCH)
            y = self.conv_proj(y.transpose(1, 2).reshape(b, c, h, w))
        return self.conv_fusion(torch.cat((x, y), dim=1))

    def fold(self) -> nn.Module:
        return MobileViTBlockDeploy(self) if self.layout == "nchw" else self


@torch.no_grad()
def _pixel_scatter(chs: int, like: torch.Tensor) -> nn.Conv2d:
    """Depthwise stride-2 2x2 conv with P outputs per channel: output `c*P + p` is pixel p of
    channel c's patch (a 0/1 kernel), i.e. the unfold computed as a conv."""
    conv = nn.Conv2d(chs, chs * PATCH * PATCH, PATCH, PATCH, groups=chs, bias=False).to(like)
    onehot = torch.eye(PATCH * PATCH, dtype=like.dtype, device=like.device)
    conv.weight.copy_(onehot.reshape(-1, 1, PATCH, PATCH).repeat(chs, 1, 1, 1))
    return conv


class MobileViTBlockDeploy(nn.Module):
    """The nchw MobileViTBlock with an unfold and a fold both runtimes run as block copies.

    Unfold: the pixel-in-patch interleave (element by element) is a depthwise stride-2 2x2 conv
    with a 0/1 kernel, `(B, chs, H, W) -> (B, chs*P, nh, nw)`; moving p to the batch is then a
    single-axis move of whole `(nh, nw)` maps. A 6-D permute instead is an element-by-element
    Transpose in onnxruntime (~230 us at stride 16), and fusing conv_1x1 with the unfold into one
    2x2 conv costs 4x its MACs (~280 us more on LiteRT). conv_1x1 (per pixel) runs after the
    unfold, so the transformer's residual stream starts at a conv output: LiteRT then keeps it in
    its native NHWC, where starting at the moved tensor cost a TRANSPOSE pair around every
    residual add. Fold: the mirror in two moves (a depthwise transposed conv is slower in
    LiteRT): pw in, then whole rows with ph. The final norm's affine goes into conv_proj, and
    conv_fusion over [x, y] becomes two convs summed, so no concat copies x and y.
    """

    def __init__(self, src: MobileViTBlock):
        super().__init__()
        self.conv_kxk, self.conv_1x1, self.transformer = src.conv_kxk, src.conv_1x1, src.transformer
        fusion = src.conv_fusion.fold()  # Sequential(Conv+BN fused, SiLU)
        self.fuse_x, self.fuse_y = _input_slice(fusion[0], 0), _input_slice(fusion[0], 1)
        self.fuse_act = fusion[1]
        self.unfold = _pixel_scatter(src.conv_1x1.weight.shape[1], src.conv_1x1.weight)
        self.conv_proj = src.conv_proj.fold()  # Conv+BN fused (+ SiLU)
        conv = self.conv_proj[0] if isinstance(self.conv_proj, nn.Sequential) else self.conv_proj
        self.norm = _absorb_affine(src.norm, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unfold(self.conv_kxk(x))                              # (B, chs*P, nh, nw), c-major
        b, _, nh, nw = y.shape
        # p to the batch, moving (nh, nw) maps: (B, chs, P, N) -> (B, P, chs, N) -> (B*P, chs, nh, nw)
        y = y.reshape(b, -1, PATCH * PATCH, nh * nw).transpose(1, 2).reshape(b * PATCH * PATCH, -1, nh, nw)
        y = self.conv_proj(self.norm(self.transformer(self.conv_1x1(y))))  # (B*P, chs, nh, nw)
        # Fold, pw in: (B*ph, pw, chs*nh*nw) -> (B*ph, chs*nh*nw, pw), i.e. (B, ph, chs, nh, W) rows;
        y = y.reshape(b * PATCH, PATCH, -1).transpose(1, 2)
        # then ph in, moving whole W-rows: (B, ph, chs, nh, W) -> (B, chs, nh, ph, W) = (B, chs, H, W)
        y = y.reshape(b, PATCH, -1, nh, nw * PATCH).permute(0, 2, 3, 1, 4).reshape(b, -1, nh * PATCH, nw * PATCH)
        return self.fuse_act(self.fuse_x(x) + self.fuse_y(y))          # = conv_fusion(cat(x, y))


@torch.no_grad()
def _input_slice(conv: nn.Conv2d, half: int) -> nn.Conv2d:
    """The conv restricted to one half of its input channels; the first half carries the bias."""
    chs = conv.in_channels // 2
    part = nn.Conv2d(chs, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     bias=half == 0).to(conv.weight)
    part.weight.copy_(conv.weight[:, half * chs:(half + 1) * chs])
    if half == 0:
        part.bias.copy_(conv.bias)
    return part


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
# The published weights take RGB in [0, 1] as is: no mean/std normalisation.
_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@register_model(MOBILEVIT, 256, _RULE, **_NORM)
def mobilevit_xxs(layout: str = "nchw", num_classes: int = 1000) -> MobileViT:
    return MobileViT(CONFIGS["xxs"], num_classes, layout)


@register_model(MOBILEVIT, 256, _RULE, **_NORM)
def mobilevit_xs(layout: str = "nchw", num_classes: int = 1000) -> MobileViT:
    return MobileViT(CONFIGS["xs"], num_classes, layout)


@register_model(MOBILEVIT, 256, _RULE, **_NORM)
def mobilevit_s(layout: str = "nchw", num_classes: int = 1000) -> MobileViT:
    return MobileViT(CONFIGS["s"], num_classes, layout)

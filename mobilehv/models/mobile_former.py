"""Mobile-Former (Chen et al., "Mobile-Former: Bridging MobileNet and Transformer", CVPR 2022).

Two branches run in parallel: Mobile, a MobileNet on the `(B, C, H, W)` feature map whose
dynamic ReLUs take their coefficients from the first global token, and Former, a one-layer
transformer on a handful (M = 3..6) of global tokens. Each block bridges them both ways with
light cross attention: Mobile->Former (tokens query the unprojected feature map) before the
Mobile sub-block, Former->Mobile (the map queries the projected tokens) after it.

Layouts. `tokens` (reference form) is the paper's: tokens `(B, M, D)`, nn.Linear/LayerNorm, and
`(B, HW, C)` sequences at every bridge. `nchw` (deploy form) keeps the feature map 4-D and
holds the tokens as a `(B, D, 1, M)` map, so token projections are 1x1 convs and token norms
LayerNorm2d (LiteRT runs that map as NHWC `(B, 1, M, D)`: the token layout, no transposes).
Attention heads are split along channels into explicit 3-D `(B*heads, C/h, HW or M)` tensors,
one reshape per operand: the map is never transposed, transposed operands stay matmul flags,
and batch matmuls are not wrapped in rank-4 reshapes. Its `fold()` also moves the attention
scales and the dynamic ReLU's hard-sigmoid into the projections; `tokens` folds only BatchNorms
and splits fc2. Both split each stride-1 depthwise conv with a channel multiplier into plain ones
(`DepthwiseSplit`: XNNPACK has no fast kernel for it), so the layouts still differ only in layout.
Checkpoints: the official code's key layout (AAboys/MobileFormer), mapped by `convert_official`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from mobilehv.layers import ConvNormAct, DepthwiseSplit, Linear, Mlp, Norm, to_2d, to_tokens
from mobilehv.registry import Converter, Family, InputRule, register_model


@dataclass(frozen=True)
class BlockConfig:
    """One block of the official table: `down` is DnaBlock3 (dw -> pw -> dw -> pw, used to
    downsample), otherwise DnaBlock (pw -> dw -> pw). `expand2 == 0` means a plain conv block
    without bridges (the first block)."""

    down: bool
    expand: int
    out_chs: int
    stride: int
    expand2: int


@dataclass(frozen=True)
class MobileFormerConfig:
    blocks: tuple[BlockConfig, ...]
    stem_chs: int
    num_features: int
    token_num: int
    token_dim: int
    groups: int = 1  # grouped 1x1 convs + channel shuffles (26m only)
    bridge_heads: int = 2
    former_heads: int = 4
    head_expand: int = 6
    hyper_reduction: int = 4


def _blocks(*rows: tuple[str, int, int, int, int]) -> tuple[BlockConfig, ...]:
    """Rows as in the official code: (block, e1, channels, stride, e2)."""
    return tuple(BlockConfig(kind == "dna3", e1, c, s, e2) for kind, e1, c, s, e2 in rows)


_SMALL = _blocks(("dna3", 3, 12, 2, 0), ("dna", 3, 12, 1, 3), ("dna3", 6, 24, 2, 4), ("dna", 3, 24, 1, 3),
                 ("dna3", 6, 48, 2, 4), ("dna", 4, 48, 1, 4), ("dna", 6, 64, 1, 4), ("dna3", 6, 96, 2, 4),
                 ("dna", 6, 96, 1, 4))


def _large(c: tuple[int, int, int, int, int, int], b3: tuple[int, int], b5: tuple[int, int]) -> tuple[BlockConfig, ...]:
    """The 12-block table of 151m..508m; `c` its six widths, `b3`/`b5` the (e1, e2) of blocks 3 and 5."""
    return _blocks(("dna3", 2, c[0], 1, 0), ("dna3", 6, c[1], 2, 4), ("dna", b3[0], c[1], 1, b3[1]),
                   ("dna3", 6, c[2], 2, 4), ("dna", b5[0], c[2], 1, b5[1]), ("dna3", 6, c[3], 2, 4),
                   ("dna", 4, c[3], 1, 4), ("dna", 6, c[4], 1, 4), ("dna", 6, c[4], 1, 4),
                   ("dna3", 6, c[5], 2, 4), ("dna", 6, c[5], 1, 4), ("dna", 6, c[5], 1, 4))


CONFIGS = {
    "26m": MobileFormerConfig(_SMALL, 8, 1024, 3, 128, groups=4),
    "52m": MobileFormerConfig(_SMALL, 8, 1024, 3, 128),
    "96m": MobileFormerConfig(
        _blocks(("dna3", 2, 12, 1, 0), ("dna3", 6, 16, 2, 4), ("dna3", 6, 32, 2, 4), ("dna", 3, 32, 1, 3),
                ("dna3", 6, 64, 2, 4), ("dna", 4, 64, 1, 4), ("dna", 6, 88, 1, 4), ("dna3", 6, 128, 2, 4),
                ("dna", 6, 128, 1, 4)), 12, 1280, 4, 128),
    "151m": MobileFormerConfig(_large((12, 16, 32, 64, 88, 128), (3, 3), (3, 3)), 12, 1280, 6, 192),
    "214m": MobileFormerConfig(_large((12, 20, 40, 80, 112, 160), (3, 4), (4, 4)), 12, 1600, 6, 192),
    "294m": MobileFormerConfig(_large((16, 24, 48, 96, 128, 192), (4, 4), (4, 4)), 16, 1920, 6, 192),
    "508m": MobileFormerConfig(_large((24, 40, 72, 128, 176, 240), (3, 3), (3, 3)), 24, 1920, 6, 192),
}


class ChannelShuffle(nn.Module):
    """(B, g, C/g, H, W) -> (B, C/g, g, H, W): lets the next grouped conv see every group.

    A pure permutation the architecture needs (26m only); it cannot be folded into the grouped
    convs around it without making them dense, so both layouts keep it. The one exception: after
    a depthwise conv with channel multiplier, `DepthwiseSplit` already emits the shuffled order.
    """

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _shuffle(groups: int, enabled: bool) -> nn.Module:
    return ChannelShuffle(groups) if enabled else nn.Identity()


@torch.no_grad()
def _split_depthwise(block: nn.Module, dw: str, shuffle: str, act: str | None, pw: str) -> nn.Module:
    """Fold step of the blocks with a depthwise conv `dw` with channel multiplier: at stride 1 it
    becomes a DepthwiseSplit. Its `(E, C_in)` output order is exactly the order the shuffle after
    it produces (26m), so the shuffle goes; without a shuffle, the dynamic ReLU `act` and the input
    columns of the 1x1 conv `pw` after it are reordered to match."""
    src = getattr(block, dw)
    if not isinstance(src, ConvNormAct) or src.conv.stride != (1, 1):
        return block
    folded = src.fold()
    conv, act_layer = (folded[0], folded[1]) if isinstance(folded, nn.Sequential) else (folded, None)
    split = DepthwiseSplit(conv, act_layer)
    setattr(block, dw, split)
    if isinstance(getattr(block, shuffle), ChannelShuffle):
        setattr(block, shuffle, nn.Identity())
        return block
    if act is not None:
        getattr(block, act).reorder_channels_(split.order)
    consumer = getattr(block, pw).conv
    consumer.weight.copy_(consumer.weight[:, split.order])
    return block


def _coefficients(a1: torch.Tensor, a2: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    if layout == "tokens":  # (B, C) -> (B, C, 1, 1) to scale a (B, C, H, W) map
        a1, a2 = a1.reshape(*a1.shape, 1, 1), a2.reshape(*a2.shape, 1, 1)
    # hard-sigmoid outputs in [0, 1] -> slopes in [0, 2] and [-1, 1]
    return (a1 - 0.5) * 2.0 + 1.0, (a2 - 0.5) * 2.0


class DynamicReLU(nn.Module):
    """max(a1 * x, a2 * x) per channel; a1, a2 come from the first global token through a
    bottleneck MLP (the official HyperFunc + DyReLU with two linear pieces).

    It is given all tokens, `(B, D, 1, M)` (nchw) or the first one, `(B, D)` (tokens). In nchw
    fc1 is a 1x1 conv with stride M along the token axis, so it reads token 0 itself: no slice
    op per block (a Slice costs onnxruntime ~5 us even on a (1, 192, 1, 6) map).
    """

    def __init__(self, chs: int, token_dim: int, reduction: int = 4, layout: str = "nchw", token_num: int = 1):
        super().__init__()
        self.layout = layout
        self.fc1 = Linear(token_dim, token_dim // reduction, True, layout)
        if layout == "nchw":
            self.fc1.stride = (1, token_num)  # (B, D, 1, M) -> (B, D/r, 1, 1): the first token only
        self.act = nn.ReLU()
        self.fc2 = Linear(token_dim // reduction, 2 * chs, True, layout)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        a1, a2 = self.gate(self.fc2(self.act(self.fc1(token)))).chunk(2, dim=1)
        a1, a2 = _coefficients(a1, a2, self.layout)
        return torch.maximum(x * a1, x * a2)

    @torch.no_grad()
    def reorder_channels_(self, order: torch.Tensor) -> None:
        """In place: channel j gets the slopes channel order[j] had (fc2 rows, both halves)."""
        rows = torch.cat([order, order + self.fc2.weight.shape[0] // 2])
        self.fc2.weight.copy_(self.fc2.weight[rows])
        self.fc2.bias.copy_(self.fc2.bias[rows])

    def fold(self) -> nn.Module:
        return DynamicReLUDeploy(self)


class DynamicReLUDeploy(nn.Module):
    """DynamicReLU with fc2 split into its two halves: two small projections instead of one
    projection followed by a split (one data-movement op less per dynamic ReLU).

    nchw also folds the hard-sigmoid and its map to slopes into the halves:
    2 * hsig(u) = clamp(u / 3 + 1, 0, 2) and 2 * hsig(u) - 1 = clamp(u / 3, -1, 1), so a
    coefficient is one projection and one clamp, not five ops (22 dynamic ReLUs in 294m:
    0.4-0.5 ms less on onnxruntime). The tokens reference form keeps the original ops.
    """

    def __init__(self, src: DynamicReLU):
        super().__init__()
        self.layout = src.layout
        self.fc1, self.act = src.fc1, src.act
        self.fc2_a, self.fc2_b = (_half(src.fc2, i) for i in range(2))
        if self.layout == "nchw":
            _affine_(self.fc2_a, 1 / 3, 1.0)
            _affine_(self.fc2_b, 1 / 3)
        else:
            self.gate = src.gate

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(token))
        if self.layout == "nchw":
            a1 = nn.functional.hardtanh(self.fc2_a(h), 0.0, 2.0)
            a2 = nn.functional.hardtanh(self.fc2_b(h), -1.0, 1.0)
        else:
            a1, a2 = _coefficients(self.gate(self.fc2_a(h)), self.gate(self.fc2_b(h)), self.layout)
        return torch.maximum(x * a1, x * a2)


@torch.no_grad()
def _affine_(layer: nn.Module, scale: float, shift: float = 0.0) -> nn.Module:
    """In place: `layer(x) * scale + shift` becomes `layer(x)` (a constant folded into the weights)."""
    layer.weight.mul_(scale)
    layer.bias.mul_(scale).add_(shift)
    return layer


def _projection_like(layer: nn.Module, out_features: int) -> nn.Module:
    """A fresh projection of the same kind (1x1 conv or Linear), device and dtype as `layer`."""
    layout = "nchw" if isinstance(layer, nn.Conv2d) else "tokens"
    return Linear(layer.weight.shape[1], out_features, True, layout).to(layer.weight)


@torch.no_grad()
def _half(layer: nn.Module, index: int) -> nn.Module:
    out = layer.weight.shape[0] // 2
    half = _projection_like(layer, out)
    half.weight.copy_(layer.weight[index * out:(index + 1) * out])
    half.bias.copy_(layer.bias[index * out:(index + 1) * out])
    return half


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1.0 else x * scale


def _fold_scale(block: nn.Module, layer: nn.Module) -> nn.Module:
    """nchw deploy: the attention scale goes into the query (or key) projection, one Mul less
    per bridge and Former (33 in 294m); the tokens reference form is left as it is."""
    if block.layout == "nchw" and block.scale != 1.0:
        _affine_(layer, block.scale)
        block.scale = 1.0
    return block


class LinearNormAct(nn.Module):
    """Linear -> BatchNorm -> act on `(B, C, 1, 1)` (1x1 conv, BN2d) or `(B, C)` (Linear, BN1d)."""

    def __init__(self, in_features: int, out_features: int, act_layer: type[nn.Module], layout: str = "nchw"):
        super().__init__()
        self.fc = Linear(in_features, out_features, True, layout)
        self.bn = nn.BatchNorm2d(out_features) if layout == "nchw" else nn.BatchNorm1d(out_features)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.fc(x)))

    @torch.no_grad()
    def fold(self) -> nn.Module:
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        fused = _projection_like(self.fc, self.fc.weight.shape[0])
        fused.weight.copy_(self.fc.weight * scale.reshape(-1, *[1] * (self.fc.weight.dim() - 1)))
        fused.bias.copy_((self.fc.bias - self.bn.running_mean) * scale + self.bn.bias)
        return nn.Sequential(fused, self.act)


class MobileToFormer(nn.Module):
    """Tokens attend to the feature map: queries are projected tokens, keys and values are the
    map itself (no projection); a dynamic per-token channel gate, then proj + post-norm."""

    def __init__(self, chs: int, token_dim: int, num_heads: int = 2, layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        self.num_heads = num_heads
        self.scale = (chs // num_heads) ** -0.5
        self.gate = Linear(token_dim, chs, True, layout)
        self.gate_act = nn.Hardsigmoid()
        self.gate_scale = 2.0
        self.q = Linear(token_dim, chs, True, layout)
        self.proj = Linear(chs, token_dim, True, layout)
        self.norm = Norm(token_dim, 1e-5, layout)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads, d = self.num_heads, c // self.num_heads
        if self.layout == "nchw":
            m = z.shape[-1]
            # (B, C, H, W) -> (B*heads, C/h, HW): heads split along channels, H*W flattened only
            # because matmul contracts a single axis (a view, no copy); explicit 3-D so the
            # converters emit one batch matmul, not reshapes to and from rank 4
            kv = x.reshape(b * heads, d, h * w)
            q = _scaled(self.q(z), self.scale).reshape(b * heads, d, m)  # (B, C, 1, M) -> (B*heads, C/h, M)
            # transposed operands stay matmul flags (FusedMatMul on ORT, adj_x/adj_y on LiteRT),
            # and the softmax is over the last axis: one op (over another axis LiteRT expands
            # it into seven, one of them a reshape)
            attn = torch.bmm(q.transpose(1, 2), kv).softmax(dim=-1)  # (B*heads, M, HW)
            out = torch.bmm(kv, attn.transpose(1, 2)).reshape(b, c, 1, m)  # (B*heads, C/h, M) -> (B, C, 1, M)
        else:
            m = z.shape[1]
            kv = to_tokens(x).reshape(b, h * w, heads, d).permute(0, 2, 1, 3)  # (B, heads, HW, C/h)
            q = _scaled(self.q(z), self.scale).reshape(b, m, heads, d).permute(0, 2, 1, 3)  # (B, heads, M, C/h)
            attn = (q @ kv.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, M, HW)
            out = (attn @ kv).transpose(1, 2).reshape(b, m, c)  # (B, M, C)
        out = out * _scaled(self.gate_act(self.gate(z)), self.gate_scale)
        return self.norm(z + self.proj(out))

    def fold(self) -> nn.Module:
        """nchw: the gate's 2 * hsig(u) becomes clamp(u / 3 + 1, 0, 2) (as in DynamicReLUDeploy)
        and the attention scale moves into q."""
        if self.layout == "nchw" and self.gate_scale != 1.0:
            _affine_(self.gate, 1 / 3, 1.0)
            self.gate_act, self.gate_scale = nn.Hardtanh(0.0, 2.0), 1.0
        return _fold_scale(self, self.q)


class Former(nn.Module):
    """Post-norm transformer layer on the tokens: attention whose keys and values are the tokens
    themselves (only q is projected), an output projection, then a GELU FFN."""

    def __init__(self, token_dim: int, num_heads: int = 4, mlp_ratio: int = 2, layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        self.num_heads = num_heads
        self.scale = (token_dim // num_heads) ** -0.5
        self.q = Linear(token_dim, token_dim, True, layout)
        self.proj = Linear(token_dim, token_dim, True, layout)
        self.norm1 = Norm(token_dim, 1e-5, layout)
        self.mlp = Mlp(token_dim, token_dim * mlp_ratio, act_layer=nn.GELU, layout=layout)
        self.norm2 = Norm(token_dim, 1e-5, layout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        heads = self.num_heads
        q = _scaled(self.q(z), self.scale)
        if self.layout == "nchw":
            b, dim, _, m = z.shape
            # (B, D, 1, M) -> (B*heads, D/h, M): heads along channels, 3-D for one batch matmul
            q, kv = q.reshape(b * heads, dim // heads, m), z.reshape(b * heads, dim // heads, m)
            attn = torch.bmm(q.transpose(1, 2), kv).softmax(dim=-1)  # (B*heads, M_q, M_k), transposes as matmul flags
            out = torch.bmm(kv, attn.transpose(1, 2)).reshape(b, dim, 1, m)
        else:
            b, m, dim = z.shape
            q = q.reshape(b, m, heads, dim // heads).permute(0, 2, 1, 3)  # (B, heads, M, D/h)
            kv = z.reshape(b, m, heads, dim // heads).permute(0, 2, 1, 3)
            attn = (q @ kv.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, M_q, M_k)
            out = (attn @ kv).transpose(1, 2).reshape(b, m, dim)
        z = self.norm1(z + self.proj(out))
        return self.norm2(z + self.mlp(z))

    def fold(self) -> nn.Module:
        return _fold_scale(self, self.q)


class FormerToMobile(nn.Module):
    """The feature map attends to the tokens: queries are the map itself (no projection), keys
    and values projected tokens; the result is added to the map."""

    def __init__(self, chs: int, token_dim: int, num_heads: int = 2, layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        self.num_heads = num_heads
        self.scale = (chs // num_heads) ** -0.5
        self.k = Linear(token_dim, chs, True, layout)
        self.v = Linear(token_dim, chs, True, layout)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads, d = self.num_heads, c // self.num_heads
        k = _scaled(self.k(z), self.scale)
        if self.layout == "nchw":
            m = z.shape[-1]
            # (B, C, H, W) -> (B*heads, C/h, HW): heads along channels, HW for the matmul, 3-D as in MobileToFormer
            q = x.reshape(b * heads, d, h * w)
            k, v = k.reshape(b * heads, d, m), self.v(z).reshape(b * heads, d, m)  # (B*heads, C/h, M)
            # scores laid out (tokens, pixels), softmax over the tokens on dim 1: the map is never
            # transposed and v @ attn lands directly in (B*heads, C/h, HW). (Pixels-last scores
            # with a last-axis softmax save LiteRT six tiny ops but cost onnxruntime ~0.5 ms in
            # 294m: its softmax over rows of M = 6 and the transposed-map matmul are slow.)
            attn = torch.bmm(k.transpose(1, 2), q).softmax(dim=1)  # (B*heads, M, HW)
            return x + torch.bmm(v, attn).reshape(b, c, h, w)
        m = z.shape[1]
        q = to_tokens(x).reshape(b, h * w, heads, d).permute(0, 2, 1, 3)  # (B, heads, HW, C/h)
        k = k.reshape(b, m, heads, d).permute(0, 2, 1, 3)  # (B, heads, M, C/h)
        v = self.v(z).reshape(b, m, heads, d).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, HW, M)
        return x + to_2d((attn @ v).transpose(1, 2).reshape(b, h * w, c), h, w)

    def fold(self) -> nn.Module:
        return _fold_scale(self, self.k)


class ConvBlock(nn.Module):
    """dw 3x3 (with channel multiplier) -> ReLU6 -> pw: the first block, no bridges."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand: int, groups: int):
        super().__init__()
        mid = in_chs * expand
        self.conv_dw = ConvNormAct(in_chs, mid, 3, stride, groups=in_chs, act_layer=nn.ReLU6)
        self.shuffle = _shuffle(in_chs, groups > 1)
        self.conv_pwl = ConvNormAct(mid, out_chs, 1, groups=groups, act_layer=None)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv_pwl(self.shuffle(self.conv_dw(x)))
        return (x + y if self.has_skip else y), z

    def fold(self) -> nn.Module:
        return _split_depthwise(self, "conv_dw", "shuffle", None, "conv_pwl")


class Bottleneck(nn.Module):
    """Mobile sub-block pw -> dw -> pw with dynamic ReLUs after the first two convs."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand: int, groups: int, token_dim: int,
                 reduction: int, layout: str, token_num: int = 1):
        super().__init__()
        mid = round(in_chs * expand)
        self.conv_pw = ConvNormAct(in_chs, mid, 1, groups=groups, act_layer=None)
        self.shuffle_pw = _shuffle(groups, groups > 1)
        self.act_pw = DynamicReLU(mid, token_dim, reduction, layout, token_num)
        self.conv_dw = ConvNormAct(mid, mid, 3, stride, groups=mid, act_layer=None)
        self.act_dw = DynamicReLU(mid, token_dim, reduction, layout, token_num)
        self.conv_pwl = ConvNormAct(mid, out_chs, 1, groups=groups, act_layer=None)
        self.shuffle_pwl = _shuffle(groups, groups > 1)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        y = self.act_pw(self.shuffle_pw(self.conv_pw(x)), token)
        y = self.shuffle_pwl(self.conv_pwl(self.act_dw(self.conv_dw(y), token)))
        return x + y if self.has_skip else y


class DownBottleneck(nn.Module):
    """Downsampling Mobile sub-block dw -> pw -> dw -> pw (inner residual around the second pair).

    Always stride 2 (as in every official configuration), hence no outer identity skip.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand: int, expand2: int, groups: int,
                 token_dim: int, reduction: int, layout: str, token_num: int = 1):
        super().__init__()
        if stride != 2:
            raise ValueError(f"a downsampling Mobile-Former block has stride 2, got {stride}")
        mid1, mid2 = round(in_chs * expand), round(out_chs * expand2)
        self.conv_dw1 = ConvNormAct(in_chs, mid1, 3, stride, groups=in_chs, act_layer=None)
        self.shuffle_dw1 = _shuffle(in_chs, groups > 1)
        self.act_dw1 = DynamicReLU(mid1, token_dim, reduction, layout, token_num)
        self.conv_pw1 = ConvNormAct(mid1, out_chs, 1, groups=groups, act_layer=None)
        self.conv_dw2 = ConvNormAct(out_chs, mid2, 3, groups=out_chs, act_layer=None)
        self.shuffle_dw2 = _shuffle(out_chs, groups > 1)
        self.act_dw2 = DynamicReLU(mid2, token_dim, reduction, layout, token_num)
        self.conv_pw2 = ConvNormAct(mid2, out_chs, 1, groups=groups, act_layer=None)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        y = self.conv_pw1(self.act_dw1(self.shuffle_dw1(self.conv_dw1(x)), token))
        return y + self.conv_pw2(self.act_dw2(self.shuffle_dw2(self.conv_dw2(y)), token))

    def fold(self) -> nn.Module:
        return _split_depthwise(self, "conv_dw2", "shuffle_dw2", "act_dw2", "conv_pw2")  # conv_dw1 is stride 2


class MobileFormerBlock(nn.Module):
    """Mobile->Former, Former, Mobile (dynamic ReLU from the first token), Former->Mobile."""

    def __init__(self, mobile: nn.Module, in_chs: int, out_chs: int, cfg: MobileFormerConfig, layout: str):
        super().__init__()
        self.layout = layout
        self.mobile_to_former = MobileToFormer(in_chs, cfg.token_dim, cfg.bridge_heads, layout)
        self.former = Former(cfg.token_dim, cfg.former_heads, layout=layout)
        self.mobile = mobile
        self.former_to_mobile = FormerToMobile(out_chs, cfg.token_dim, cfg.bridge_heads, layout)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.former(self.mobile_to_former(x, z))
        token = z if self.layout == "nchw" else z[:, 0]  # nchw: fc1 of each dynamic ReLU picks token 0
        return self.former_to_mobile(self.mobile(x, token), z), z


class MergeHead(nn.Module):
    """1x1 expand -> ReLU6 -> pool -> h-swish, concatenated with the first token, FC-BN-h-swish, classifier."""

    def __init__(self, in_chs: int, cfg: MobileFormerConfig, num_classes: int, layout: str):
        super().__init__()
        self.layout = layout
        mid = in_chs * cfg.head_expand
        self.shuffle = _shuffle(cfg.groups, cfg.groups > 1)
        self.conv = ConvNormAct(in_chs, mid, 1, groups=cfg.groups, act_layer=nn.ReLU6)
        self.pool_act = nn.Hardswish()
        self.fc = LinearNormAct(mid + cfg.token_dim, cfg.num_features, nn.Hardswish, layout)
        self.classifier = Linear(cfg.num_features, num_classes, True, layout)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.shuffle(x))
        if self.layout == "nchw":
            # stays (B, C, 1, 1) through fc and classifier (1x1 convs); one flatten for the logits
            x = torch.cat([self.pool_act(x.mean((2, 3), keepdim=True)), z[..., :1]], dim=1)
            return self.classifier(self.fc(x)).flatten(1)
        x = torch.cat([self.pool_act(x.mean((2, 3))), z[:, 0]], dim=1)
        return self.classifier(self.fc(x))


class MobileFormer(nn.Module):
    def __init__(self, cfg: MobileFormerConfig, num_classes: int = 1000, layout: str = "nchw"):
        super().__init__()
        self.layout = layout
        self.tokens = nn.Parameter(torch.randn(cfg.token_num, cfg.token_dim))  # (M, D) learned global tokens
        self.stem = ConvNormAct(3, cfg.stem_chs, 3, 2, act_layer=nn.ReLU6)
        blocks, chs = [], cfg.stem_chs
        for b in cfg.blocks:
            if b.expand == 1 or b.expand2 == 0:
                blocks.append(ConvBlock(chs, b.out_chs, b.stride, b.expand, cfg.groups))
            else:
                mobile = (DownBottleneck(chs, b.out_chs, b.stride, b.expand, b.expand2, cfg.groups,
                                         cfg.token_dim, cfg.hyper_reduction, layout, cfg.token_num) if b.down else
                          Bottleneck(chs, b.out_chs, b.stride, b.expand, cfg.groups, cfg.token_dim,
                                     cfg.hyper_reduction, layout, cfg.token_num))
                blocks.append(MobileFormerBlock(mobile, chs, b.out_chs, cfg, layout))
            chs = b.out_chs
        self.blocks = nn.ModuleList(blocks)
        self.mobile_to_former = MobileToFormer(chs, cfg.token_dim, cfg.bridge_heads, layout)
        self.head = MergeHead(chs, cfg, num_classes, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        # computed from the weight alone, so constant at export
        if self.layout == "nchw":
            z = self.tokens.t()[None, :, None, :].repeat(b, 1, 1, 1)  # (M, D) -> (B, D, 1, M)
        else:
            z = self.tokens[None].repeat(b, 1, 1)  # (M, D) -> (B, M, D)
        x = self.stem(x)
        for block in self.blocks:
            x, z = block(x, z)
        return self.head(x, self.mobile_to_former(x, z))


# --- official checkpoints (AAboys/MobileFormer) ---

_BRIDGES = {
    "local_global.alpha.0": "mobile_to_former.gate", "local_global.q": "mobile_to_former.q",
    "local_global.proj": "mobile_to_former.proj", "local_global.layer_norm": "mobile_to_former.norm",
    "global_block.q": "former.q", "global_block.channel_mlp": "former.proj",
    "global_block.layer_norm": "former.norm1", "global_block.ffn.0": "former.mlp.fc1",
    "global_block.ffn.2": "former.mlp.fc2", "global_block.ffn_norm": "former.norm2",
    "global_local.k": "former_to_mobile.k", "global_local.proj": "former_to_mobile.v",
}


def _mobile_names(convs: dict[str, str], hypers: dict[str, str]) -> dict[str, str]:
    """`convN.{0,1}` -> `mobile.<name>.{conv,bn}`, `hyperN.hyper.{0,2}` -> `mobile.<name>.{fc1,fc2}`."""
    names = {f"{o}.{i}": f"mobile.{n}.{p}" for o, n in convs.items() for i, p in (("0", "conv"), ("1", "bn"))}
    names.update({f"{o}.hyper.{i}": f"mobile.{n}.{p}"
                  for o, n in hypers.items() for i, p in (("0", "fc1"), ("2", "fc2"))})
    return {**names, **_BRIDGES}


_BLOCK_NAMES = {
    "conv": {"conv.0": "conv_dw.conv", "conv.1": "conv_dw.bn", "conv.4": "conv_pwl.conv", "conv.5": "conv_pwl.bn"},
    "down": _mobile_names({"conv1": "conv_dw1", "conv2": "conv_pw1", "conv3": "conv_dw2", "conv4": "conv_pw2"},
                          {"hyper1": "act_dw1", "hyper3": "act_dw2"}),
    "bottleneck": _mobile_names({"conv1": "conv_pw", "conv2": "conv_dw", "conv3": "conv_pwl"},
                                {"hyper1": "act_pw", "hyper2": "act_dw"}),
}
_TOP_NAMES = {"stem.0": "stem.conv", "stem.1": "stem.bn", "classifier.conv.1": "head.conv.conv",
              "classifier.conv.2": "head.conv.bn", "classifier.fc.0": "head.fc.fc", "classifier.fc.1": "head.fc.bn",
              "classifier.classifier.1": "head.classifier",
              **{k: v for k, v in _BRIDGES.items() if k.startswith("local_global.")}}


def _rename(key: str, names: Mapping[str, str]) -> str:
    for old, new in names.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    return key


def is_official(sd: Mapping[str, torch.Tensor]) -> bool:
    return "tokens.weight" in sd and any(k.startswith("features.") and ".global_block." in k for k in sd)


def convert_official(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official keys -> mobilehv: `features.i.convN.{0,1}` -> `blocks.i.mobile.<conv>.{conv,bn}`,
    `hyperN.hyper.{0,2}` -> dynamic ReLU `fc1/fc2`, `local_global/global_block/global_local` ->
    `mobile_to_former/former/former_to_mobile`, `classifier` -> `head`, `tokens.weight` -> `tokens`."""
    out = {}
    for key, value in sd.items():
        if key == "tokens.weight":
            key = "tokens"
        elif m := re.match(r"features\.(\d+)\.(.*)", key):
            i, rest = m.groups()
            kind = ("conv" if f"features.{i}.conv.0.weight" in sd else
                    "down" if f"features.{i}.conv4.0.weight" in sd else "bottleneck")
            key = f"blocks.{i}.{_rename(rest, _BLOCK_NAMES[kind])}"
        else:
            key = _rename(key, _TOP_NAMES)
        out[key] = value
    return out


FAMILY = Family("mobile_former", "Chen et al., Mobile-Former: Bridging MobileNet and Transformer, CVPR 2022",
                converters=(Converter("official", is_official, convert_official),))
# Convolutions with padding, attention over however many pixels there are, global pooling and
# no position embedding: every input size works (odd sizes round up at each stride-2 conv).
RULE = InputRule(multiple=1, minimum=1)


def _create(variant: str, layout: str, num_classes: int) -> MobileFormer:
    return MobileFormer(CONFIGS[variant], num_classes, layout)


@register_model(FAMILY, 224, RULE)
def mobile_former_26m(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return _create("26m", layout, num_classes)


@register_model(FAMILY, 224, RULE)
def mobile_former_52m(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return _create("52m", layout, num_classes)


@register_model(FAMILY, 224, RULE)
def mobile_former_96m(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return _create("96m", layout, num_classes)


@register_model(FAMILY, 224, RULE)
def mobile_former_151m(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return _create("151m", layout, num_classes)


@register_model(FAMILY, 224, RULE)
def mobile_former_214m(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return _create("214m", layout, num_classes)


@register_model(FAMILY, 224, RULE)
def mobile_former_294m(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return _create("294m", layout, num_classes)


@register_model(FAMILY, 224, RULE)
def mobile_former_508m(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return _create("508m", layout, num_classes)

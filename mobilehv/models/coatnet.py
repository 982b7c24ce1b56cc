"""CoAtNet (Dai et al., NeurIPS 2021): C-C-T-T, MBConv stages then relative-attention stages.

The paper's layout as timm's `coatnet_{0,1,2}_224`: a two-conv stem, two stages of pre-norm
MBConv blocks (BatchNorm, GELU, SE), two stages of transformer blocks whose attention logits
get a learned bias indexed by the relative offset of query and key (w[i - j]). Every stage
halves the resolution in its first block: MBConv with a strided depthwise conv, transformer
with 2x2 average pooling of the normalised input, both with a pooled, 1x1-projected shortcut.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from mobilehv.layers import ConvNormAct, Linear, Mlp, Norm, SqueezeExcite, to_2d, to_tokens
from mobilehv.registry import Converter, Family, InputRule, register_model


@dataclass(frozen=True)
class CoAtNetCfg:
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    stem_width: int
    head_hidden: int
    block_types: tuple[str, ...] = ("C", "C", "T", "T")
    img_size: int = 224
    dim_head: int = 32
    expand_ratio: int = 4
    se_ratio: float = 0.25
    conv_eps: float = 1e-5
    attn_eps: float = 1e-6


class Downsample(nn.Module):
    """Shortcut of a stride-2 block: 2x2 average pool, then a 1x1 projection to the new width.
    The pool needs the 2-D map; in the tokens layout the projection runs on `(B, N, C)`."""

    def __init__(self, dim: int, dim_out: int, layout: str = "nchw"):
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.expand = Linear(dim, dim_out, True, layout) if dim != dim_out else nn.Identity()
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        return self.expand(x if self.layout == "nchw" else to_tokens(x))


class MbConvBlock(nn.Module):
    """Pre-norm MBConv: shortcut(x) + conv3(se(dw3x3(expand1x1(bn(x))))), expansion from out_chs."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, cfg: CoAtNetCfg):
        super().__init__()
        mid = out_chs * cfg.expand_ratio
        self.shortcut = Downsample(in_chs, out_chs) if stride == 2 else nn.Identity()
        self.pre_norm = nn.BatchNorm2d(in_chs, eps=cfg.conv_eps)
        self.conv1 = ConvNormAct(in_chs, mid, 1, act_layer=nn.GELU)
        self.conv2 = ConvNormAct(mid, mid, 3, stride, groups=mid, act_layer=nn.GELU)
        self.se = SqueezeExcite(mid, int(out_chs * cfg.se_ratio), act_layer=nn.SiLU)
        self.conv3 = nn.Conv2d(mid, out_chs, 1)
        for bn in (self.conv1.bn, self.conv2.bn):
            bn.eps = cfg.conv_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv3(self.se(self.conv2(self.conv1(self.pre_norm(x)))))

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """The pre-norm BN feeds only the 1x1 expansion (the shortcut takes x unnormalised), so it
        folds forward into that conv: W' = W * s over inputs, b' = W @ t."""
        if isinstance(self.pre_norm, nn.BatchNorm2d):
            bn, conv = self.pre_norm, self.conv1.conv
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=True)
            fused.weight.copy_(conv.weight * scale.reshape(1, -1, 1, 1))
            fused.bias.copy_(conv.weight.flatten(1) @ shift)
            self.conv1.conv, self.pre_norm = fused, nn.Identity()
        return self


def _relative_index(window: int) -> torch.Tensor:
    """index[i, j] of the offset (yi - yj, xi - xj) in a (2w-1) x (2w-1) table, row-major tokens."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)          # (2, N, N), in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


class RelPosBias(nn.Module):
    """The learned bias w[i - j] of every attention logit, one table column per head.

    The table covers the offsets of one window of `window x window` tokens: the whole feature
    map of its stage, so the bias (and the model) is tied to the training resolution."""

    def __init__(self, window: int, num_heads: int):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", _relative_index(window), persistent=False)

    def forward(self) -> torch.Tensor:
        # (N, N, heads) gather -> (heads, N, N)
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)

    def fold(self) -> nn.Module:
        return FixedBias(self())


class FixedBias(nn.Module):
    """Deploy form of RelPosBias: the gathered `(heads, N, N)` bias as a constant."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("bias", bias.detach().clone())

    def forward(self) -> torch.Tensor:
        return self.bias


class RelAttention(nn.Module):
    """Multi-head self-attention with relative position bias; qkv channels are ordered
    (head, q|k|v, d) as in the checkpoint. nchw: heads split along channels of `(B, C, H, W)`;
    tokens: `(B, N, C)`."""

    def __init__(self, dim: int, dim_out: int, dim_head: int, window: int, layout: str):
        super().__init__()
        self.num_heads = dim_out // dim_head
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.layout = layout
        self.qkv = Linear(dim, 3 * dim_out, True, layout)
        self.rel_pos = RelPosBias(window, self.num_heads)
        self.proj = Linear(dim_out, dim_out, True, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "nchw":
            b, _, h, w = x.shape
            # (B, heads*3*d, H, W) -> (B, heads, 3d, N) -> q, k, v (B, heads, d, N): no permute
            q, k, v = self.qkv(x).reshape(b, self.num_heads, 3 * self.dim_head, h * w).chunk(3, dim=2)
            attn = (q.transpose(-2, -1) * self.scale) @ k + self.rel_pos()            # (B, heads, N, N)
            out = v @ attn.softmax(dim=-1).transpose(-2, -1)                           # (B, heads, d, N)
            return self.proj(out.reshape(b, -1, h, w))
        b, n, _ = x.shape
        # (B, N, heads*3*d) -> (B, heads, N, 3d) -> q, k, v (B, heads, N, d)
        q, k, v = self.qkv(x).reshape(b, n, self.num_heads, 3 * self.dim_head).transpose(1, 2).chunk(3, dim=3)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.rel_pos()
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1))


class TransformerBlock(nn.Module):
    """x = shortcut(x) + attn(pool(norm1(x))); x = x + mlp(norm2(x)); pool/shortcut only at stride 2.

    nchw: 4-D throughout (LayerNorm2d, 1x1 convs). tokens: a stride-2 block takes the 4-D map
    (pooling is 2-D) and returns `(B, N, C)`; the other blocks stay in tokens.
    """

    def __init__(self, dim: int, dim_out: int, stride: int, window: int, cfg: CoAtNetCfg, layout: str):
        super().__init__()
        self.layout = layout
        self.downsample = stride == 2
        self.shortcut = Downsample(dim, dim_out, layout) if self.downsample else nn.Identity()
        self.norm1 = Norm(dim, cfg.attn_eps, layout)
        self.pool = nn.AvgPool2d(2) if self.downsample else nn.Identity()
        self.attn = RelAttention(dim, dim_out, cfg.dim_head, window, layout)
        self.norm2 = Norm(dim_out, cfg.attn_eps, layout)
        self.mlp = Mlp(dim_out, dim_out * cfg.expand_ratio, layout=layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "nchw":
            x = self.shortcut(x) + self.attn(self.pool(self.norm1(x)))
        elif self.downsample:
            h, w = x.shape[-2:]
            # tokens: LayerNorm on (B, N, C), back to 2-D to pool, tokens again for attention
            y = to_tokens(self.pool(to_2d(self.norm1(to_tokens(x)), h, w)))
            x = self.shortcut(x) + self.attn(y)
        else:
            x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    """Blocks of one type; the first halves the resolution. Returns `(B, C, H, W)` in both layouts."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, block_type: str, window: int,
                 cfg: CoAtNetCfg, layout: str):
        super().__init__()
        self.tokens_out = layout == "tokens" and block_type == "T"  # blocks end in (B, N, C)
        blocks: list[nn.Module] = []
        for i in range(depth):
            stride, dim = (2, in_chs) if i == 0 else (1, out_chs)
            blocks.append(MbConvBlock(dim, out_chs, stride, cfg) if block_type == "C"
                          else TransformerBlock(dim, out_chs, stride, window, cfg, layout))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self.blocks(x)
        return to_2d(x, h // 2, w // 2) if self.tokens_out else x


class Stem(nn.Module):
    """3x3 stride-2 conv-BN-GELU, then a 3x3 conv (its BN is the next block's pre-norm)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.conv1 = ConvNormAct(3, width, 3, 2, act_layer=nn.GELU)
        self.conv1.bn.eps = eps
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class Head(nn.Module):
    """Global average pool -> LayerNorm -> Linear + tanh (pre-logits) -> Linear."""

    def __init__(self, dim: int, hidden: int, num_classes: int, eps: float, layout: str):
        super().__init__()
        self.layout = layout
        self.norm = Norm(dim, eps, layout)
        self.pre_logits = Linear(dim, hidden, True, layout)
        self.act = nn.Tanh()
        self.fc = Linear(hidden, num_classes, True, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nchw = self.layout == "nchw"
        x = x.mean((2, 3), keepdim=nchw)  # nchw: (B, C, 1, 1), norms/projections stay 4-D
        x = self.fc(self.act(self.pre_logits(self.norm(x))))
        return x.flatten(1) if nchw else x


class CoAtNet(nn.Module):
    def __init__(self, cfg: CoAtNetCfg, layout: str = "nchw", num_classes: int = 1000):
        super().__init__()
        self.stem = Stem(cfg.stem_width, cfg.conv_eps)
        size, in_chs, stages = cfg.img_size // 2, cfg.stem_width, []
        for dim, depth, kind in zip(cfg.embed_dims, cfg.depths, cfg.block_types):
            size = (size - 1) // 2 + 1  # attention window = the stage's whole feature map
            stages.append(Stage(in_chs, dim, depth, kind, size, cfg, layout))
            in_chs = dim
        self.stages = nn.Sequential(*stages)
        self.head = Head(in_chs, cfg.head_hidden, num_classes, cfg.attn_eps, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


# timm -> mobilehv renames (MBConv blocks are recognised by their depthwise conv key)
_MBCONV_RENAMES = (("conv1_1x1.", "conv1.conv."), ("norm1.", "conv1.bn."), ("conv2_kxk.", "conv2.conv."),
                   ("norm2.", "conv2.bn."), ("conv3_1x1.", "conv3."), ("se.fc1.", "se.conv_reduce."),
                   ("se.fc2.", "se.conv_expand."))


def _is_timm(sd: Mapping[str, torch.Tensor]) -> bool:
    return "stem.norm1.weight" in sd and any(k.endswith("rel_pos.relative_position_bias_table") for k in sd)


def _from_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    mbconv = {k.removesuffix("conv2_kxk.weight") for k in sd if k.endswith("conv2_kxk.weight")}
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^stem\.norm1\.", "stem.conv1.bn.", re.sub(r"^stem\.conv1\.", "stem.conv1.conv.", key))
        key = key.replace(".norm1.norm.", ".norm1.").replace("head.pre_logits.fc.", "head.pre_logits.")
        prefix = next((p for p in mbconv if key.startswith(p)), None)
        if prefix is not None:
            rest = key[len(prefix):]
            for old, new in _MBCONV_RENAMES:
                if rest.startswith(old):
                    key = prefix + new + rest[len(old):]
                    break
        out[key] = value
    return out


FAMILY = Family("coatnet", "Dai et al., CoAtNet: Marrying Convolution and Attention for All Data Sizes, "
                "NeurIPS 2021", converters=(Converter("timm", _is_timm, _from_timm),))

# The relative-position tables span the 14x14 and 7x7 maps of a 224 px input (timm's
# coatnet_*_224 is built for exactly that size): 224 px only.
_RULE = InputRule(fixed=224)


@register_model(FAMILY, 224, _RULE)
def coatnet_0(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return CoAtNet(CoAtNetCfg((96, 192, 384, 768), (2, 3, 5, 2), 64, 768), layout, num_classes)


@register_model(FAMILY, 224, _RULE)
def coatnet_1(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return CoAtNet(CoAtNetCfg((96, 192, 384, 768), (2, 6, 14, 2), 64, 768), layout, num_classes)


@register_model(FAMILY, 224, _RULE)
def coatnet_2(layout: str = "nchw", num_classes: int = 1000) -> nn.Module:
    return CoAtNet(CoAtNetCfg((128, 256, 512, 1024), (2, 6, 14, 2), 128, 1024), layout, num_classes)

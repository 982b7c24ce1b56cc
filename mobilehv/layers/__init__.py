"""Building blocks shared by the model families; layer types are passed in, not hard-coded."""
from mobilehv.layers.blocks import Attention, InvertedResidual, Mlp, SqueezeExcite
from mobilehv.layers.conv import ConvNormAct, DepthwiseSplit, fuse_conv_bn
from mobilehv.layers.layout import Affine, LayerNorm2d, Linear, Norm, linear_layer, norm_layer, to_2d, to_tokens

__all__ = [
    "Affine", "Attention", "ConvNormAct", "DepthwiseSplit", "InvertedResidual", "Mlp", "SqueezeExcite", "LayerNorm2d",
    "Linear", "Norm", "fuse_conv_bn", "linear_layer", "norm_layer", "to_2d", "to_tokens",
]

"""Op types of every runtime, sorted into the latency categories of DESIGN.md.

One table, used by `mobilehv info` (data-movement counts of the torch.export graph), the
exporters' sidecars (op counts of the artifact) and the profiler (category of each op when no
module context decides it). Names are compared lower-case with '_' removed, so aten
`permute`, ONNX `Transpose`, TFLite `TRANSPOSE` and MIL `transpose` all land in one place.
"""
from __future__ import annotations

CATEGORIES = ("patch_embed", "attention", "conv", "linear", "norm", "activation", "pooling",
              "reshape", "elementwise", "other")

_BY_CATEGORY: dict[str, tuple[str, ...]] = {
    "reshape": (
        "view", "unsafeview", "reshape", "reshapealias", "permute", "transpose", "t", "flatten",
        "unflatten", "cat", "concat", "concatenation", "concatv2", "stack", "pack", "unpack",
        "split", "splitv", "splitwithsizes", "chunk", "unbind", "slice", "slicetensor",
        "stridedslice", "select", "narrow", "gather", "gathernd", "gatherelements", "indexselect",
        "index", "getitem", "pad", "padv2", "constantpadnd", "mirrorpad", "squeeze", "unsqueeze",
        "expanddims", "expand", "broadcastto", "tile", "repeat", "contiguous", "clone", "copy",
        "pixelshuffle", "pixelunshuffle", "depthtospace", "spacetodepth", "roll", "movedim",
        "swapaxes", "asstrided", "im2col", "col2im", "unfold", "fold", "identity", "shape",
        "sliceupdate", "scatter", "scatternd", "slicebyindex", "slicebysize",
        "reshapelike", "gatheralongaxis", "splitnd", "concatnd", "reorderinput", "reorderoutput",
    ),
    "conv": ("conv", "conv2d", "convolution", "depthwiseconv2d", "convtranspose",
             "transposeconv", "cudnnconvolution", "mkldnnconvolution", "fusedconv", "nhwcconv",
             "qlinearconv"),
    "linear": ("linear", "matmul", "mm", "bmm", "addmm", "gemm", "fullyconnected",
               "batchmatmul", "einsum", "baddbmm", "fusedmatmul", "fusedgemm"),
    "norm": ("layernorm", "nativelayernorm", "layernormalization", "groupnorm", "nativegroupnorm",
             "groupnormalization", "batchnorm", "batchnormalization", "nativebatchnorm",
             "nativebatchnormlegit", "nativebatchnormlegitnostats", "instancenorm",
             "instancenormalization", "rsqrt", "sqrt", "var", "varmean", "std",
             "simplifiedlayernormalization", "skiplayernormalization", "l2normalization",
             "l2norm", "normalize"),
    "activation": ("relu", "relu6", "gelu", "silu", "swish", "hardswish", "hardsigmoid", "sigmoid",
                   "logistic", "tanh", "elu", "leakyrelu", "prelu", "clip", "clamp", "clamp_min",
                   "clampmin", "clampmax", "hardtanh", "erf", "mish", "quickgelu", "fastgelu",
                   "biasgelu", "threshold", "softplus"),
    "pooling": ("avgpool2d", "averagepool", "averagepool2d", "maxpool2d", "maxpool",
                "globalaveragepool", "globalmaxpool", "adaptiveavgpool2d", "adaptivemaxpool2d",
                "mean", "reducemean", "avgpool", "meanreduce", "reducemax", "amax", "maxpool2dwithindices"),
    "attention": ("softmax", "logsoftmax", "scaleddotproductattention", "sdpa", "attention",
                  "multiheadattention", "flashattention", "efficientattention",
                  "scaleddotproductflashattentionforcpu", "scaleddotproductefficientattention"),
    "elementwise": ("add", "sub", "mul", "div", "neg", "pow", "exp", "log", "abs", "max",
                    "min", "maximum", "minimum", "where", "addcmul", "rsub", "reciprocal",
                    "squareddifference", "square", "sum", "reducesum", "floor", "ceil", "round",
                    "equal", "greater", "less", "cast", "to", "tocopy", "type", "fill", "full",
                    "zeros", "ones", "zeroslike", "oneslike", "alias", "lift", "liftfreshcopy",
                    "scalartensor", "constant", "constantofshape", "dequantize", "quantize",
                    "realdiv", "floordiv", "mod", "sign", "bitwiseand", "logicaland", "not"),
}

_LOOKUP = {op: cat for cat, ops in _BY_CATEGORY.items() for op in ops}


def normalise(op_type: str) -> str:
    """`aten.permute.default` -> `permute`; `DEPTHWISE_CONV_2D` -> `depthwiseconv2d`."""
    name = op_type.rsplit("::", 1)[-1]
    if name.startswith("aten."):
        name = name.split(".")[1]
    return name.lower().replace("_", "").replace(" ", "")


def op_category(op_type: str) -> str:
    """Category of an op by its type alone (module context, where known, takes precedence)."""
    return _LOOKUP.get(normalise(op_type), "other")


def is_data_movement(op_type: str) -> bool:
    return op_category(op_type) == "reshape"

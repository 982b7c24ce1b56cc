"""Op -> module -> latency category, the same way for every runtime.

A runner reports, for each op, the chain of modules it ran in (`Scope`s from the root model to
the innermost module, as recovered from torch hooks, ONNX node metadata or TFLite tensor
names) and its runtime op type. The category then follows DESIGN.md: module context first,
op type second.

Convention for model families (explicit beats heuristic):

* `latency_category = "<category>"` as a class attribute puts every op inside the module
  (children included) in that category. Stems and patch/token embeddings set
  `latency_category = "patch_embed"`; a dynamic ReLU sets `"activation"`.
* `attention_scores = True` as a class attribute marks an attention module: the ops its own
  `forward` runs directly (q·kᵀ, scaling, bias, softmax, attn·v) are `attention`, except data
  movement (reshape/transpose/split...), which stays `reshape`; its child modules (qkv, proj,
  norms) are categorised by their own context.

Families that set neither are still attributed by names (attribute path and class name):

* patch_embed: a module attribute called `stem`, `patch_embed`, `conv_stem`, `token_embed`...
  or a class named `*Stem*`, `*PatchEmbed*`, `*ConvEmbed*`, `*TokenEmbed*`, anywhere in the chain;
* norm / activation / pooling: the innermost module whose class is a norm (`LayerNorm`,
  `LayerNorm2d`, `GroupNorm`, `BatchNorm2d`, `Affine`, ...), an activation (`GELU`, `DyReLU`,
  ...) or a pooling (`AvgPool2d`, `Pooling`, ...) decides for everything inside it;
* attention: ops run directly in a module whose class ends in `Attention`/`Attn` (or
  `MHSA`, `LiteMLA`, `MobileToFormer`, `FormerToMobile`) or whose attribute is `attn`,
  `attention`, `mhsa`, `m2f`, `f2m`, ... as with `attention_scores = True`.
"""
from __future__ import annotations

import functools
import importlib
import re
import sys
from dataclasses import dataclass

from mobilehv.taxonomy import CATEGORIES, op_category

_STEM_ATTR = re.compile(r"^(stem|stem\d|conv_stem|stem_conv|patch_embed\w*|token_embed\w*|"
                        r"patch_embedding\w*|conv_embed\w*)$")
_STEM_CLASS = re.compile(r"Stem|PatchEmbed|ConvEmbed|TokenEmbed|PatchEmbedding")
_NORM_CLASS = re.compile(r"(Norm(\d*d?|Channels?|alization)?|^Affine)$")
_ACT_CLASS = re.compile(r"^(DyReLU\w*|DynamicReLU\w*|ReLU6?|GELU|SiLU|Swish|HSwish|Hardswish|"
                        r"HardSwish|Hardsigmoid|HardSigmoid|HSigmoid|Sigmoid|Tanh|Mish|ELU|"
                        r"LeakyReLU|PReLU|QuickGELU|StarReLU)$")
_POOL_CLASS = re.compile(r"(Pool\d*d?|Pooling)$")
_ATTN_CLASS = re.compile(r"((Attention|Attn)(\d*d|4D|Subsample|Downsample)?|MHSA|LiteMLA|"
                         r"^Mobile(2|To)Former|^Former(2|To)Mobile)$")
_ATTN_ATTR = re.compile(r"^(attn|attention|mhsa|self_attn|cross_attn|m2f|f2m|mobile2former|"
                        r"former2mobile)$")


@dataclass(frozen=True)
class Scope:
    """One module of the chain an op ran in: its dotted path from the root ('' for the root)
    and its class, qualified (`mobilehv.models.mobilevit.MobileVitBlock`) where known."""

    path: str
    cls: str

    @property
    def attr(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def short_cls(self) -> str:
        return self.cls.rsplit(".", 1)[-1]


@functools.lru_cache(maxsize=None)
def _class_attrs(qualified: str) -> tuple[str | None, bool]:
    """(`latency_category`, `attention_scores`) of a class given by qualified name, where its
    module is mobilehv's or already imported; the names alone decide otherwise."""
    module, _, name = qualified.rpartition(".")
    # only mobilehv's own modules or ones already imported: a name in an artifact never
    # triggers importing arbitrary code
    if not module.startswith("mobilehv.") and module not in sys.modules:
        return None, False
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None, False
    category = getattr(cls, "latency_category", None)
    return (category if category in CATEGORIES else None), bool(getattr(cls, "attention_scores", False))


def _is_stem(scope: Scope) -> bool:
    return bool(_STEM_ATTR.match(scope.attr) or _STEM_CLASS.search(scope.short_cls)
                or _class_attrs(scope.cls)[0] == "patch_embed")


def _is_attention(scope: Scope) -> bool:
    return bool(_class_attrs(scope.cls)[1] or _ATTN_CLASS.search(scope.short_cls)
                or (scope.path and _ATTN_ATTR.match(scope.attr)))


def _subtree_category(scope: Scope) -> str | None:
    explicit = _class_attrs(scope.cls)[0]
    if explicit:
        return explicit
    name = scope.short_cls
    if name == "ConvNormAct":  # a conv block, not a norm
        return None
    if _NORM_CLASS.search(name):
        return "norm"
    if _ACT_CLASS.match(name):
        return "activation"
    if _POOL_CLASS.search(name):
        return "pooling"
    return None


def categorise(op_type: str, scopes: list[Scope] | tuple[Scope, ...]) -> str:
    """Category of an op of `op_type` run directly in `scopes[-1]` (root first)."""
    if any(_is_stem(s) for s in scopes if s.path):
        return "patch_embed"
    for scope in reversed(scopes):
        category = _subtree_category(scope)
        if category:
            return category
    by_type = op_category(op_type)
    if scopes and _is_attention(scopes[-1]) and by_type != "reshape":
        return "attention"
    return by_type

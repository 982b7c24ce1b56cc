"""The deploy form: every block's own `fold()` applied by one walker.

Protocol (as in MobileOne/FastViT): a module with a `fold()` method returns its inference-only
replacement (Conv+BN fused, heads merged, layer scales absorbed...). The walker visits modules
top-down, so a block folds with its original children, then continues inside the result.
A BatchNorm that no block folded becomes a per-channel `Affine`. Applying `fold` to a folded
model changes nothing.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from mobilehv.layers import Affine


def _standalone_bn(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return Affine(scale, bn.bias - bn.running_mean * scale)


def _walk(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _standalone_bn(module)
    folder = getattr(module, "fold", None)
    if callable(folder):
        module = folder()
    for name, child in list(module.named_children()):
        new = _walk(child)
        if new is not child:
            setattr(module, name, new)
    return module


def fold(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the deploy form of `model` (eval mode); `model` is untouched unless `inplace`."""
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    with torch.no_grad():
        folded = _walk(model)
    if folded is not model:  # a root that folds itself keeps its identity and input check
        folded.mobilehv = getattr(model, "mobilehv", None)
        folded._forward_pre_hooks.update(model._forward_pre_hooks)
    left = [n for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise RuntimeError(f"fold left BatchNorm modules: {', '.join(left[:3])}")
    return folded.eval()

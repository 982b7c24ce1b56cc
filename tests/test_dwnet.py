"""DWNet specifics: the dynamic depthwise conv, official key layout of the dynamic variants,
input rule, data movement. (Fixture logits, parameter counts and per-variant fold/layout
equivalence are in test_zoo.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_bn, rel_err
from torch import nn

import mobilehv
from mobilehv.graph import data_movement_count, export_graph_ops
from mobilehv.models.dwnet import DynamicDWConv
from mobilehv.registry import ResolutionError


def test_dynamic_layouts_agree():
    """The fixture covers the static blocks in both layouts; this covers the dynamic ones."""
    nchw = randomise_bn(mobilehv.create_model("dwnet_tiny_dynamic", layout="nchw"))
    tokens = mobilehv.create_model("dwnet_tiny_dynamic", layout="tokens", pretrained=nchw.state_dict())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = nchw(x)
        assert rel_err(tokens(x), expected) <= 1e-4
        assert rel_err(mobilehv.fold(tokens, inplace=True)(x), expected) <= 1e-4


def test_dynamic_conv_is_per_image_depthwise_conv():
    conv = randomise_bn(DynamicDWConv(16, 7)).eval()
    x = torch.randn(3, 16, 9, 11)
    with torch.no_grad():
        out = conv(x)
        for i in range(3):  # each image convolved with its own predicted kernels
            xi = x[i:i + 1]
            kernel = conv.expand(conv.reduce(xi.mean((2, 3), keepdim=True))).reshape(16, 1, 7, 7)
            ref = conv.act(conv.bn(F.conv2d(xi, kernel, conv.bias, padding=3, groups=16)))
            assert rel_err(out[i:i + 1], ref) <= 1e-5
        folded = conv.fold()
        assert isinstance(folded.bn, nn.Identity)
        assert rel_err(folded(x), out) <= 1e-5


def _official_dynamic_keys(key: str) -> str:
    """mobilehv key -> the official code's key for a dynamic block (written out independently)."""
    table = {
        "attn2conv.conv0.conv.weight": "attn2conv.conv0.weight",
        "attn2conv.conv1.reduce.conv.weight": "attn2conv.conv.conv1.weight",
        "attn2conv.conv1.expand.weight": "attn2conv.conv.conv2.weight",
        "attn2conv.conv1.expand.bias": "attn2conv.conv.conv2.bias",
        "attn2conv.conv1.bias": "attn2conv.conv.bias",
        "attn2conv.conv2.conv.weight": "attn2conv.conv2.weight",
    }
    for ours, theirs in table.items():
        if key.endswith(ours):
            return key[: -len(ours)] + theirs
    for ours, theirs in (("attn2conv.conv0.bn.", "attn2conv.bn0."), ("attn2conv.conv2.bn.", "attn2conv.bn2."),
                         ("attn2conv.conv1.reduce.bn.", "attn2conv.conv.bn."),
                         ("attn2conv.conv1.bn.", "attn2conv.bn.")):
        if ours in key:
            return key.replace(ours, theirs)
    return key


def test_official_dynamic_checkpoint_loads():
    source = randomise_bn(mobilehv.create_model("dwnet_tiny_dynamic"))
    official = {_official_dynamic_keys(k): v for k, v in source.state_dict().items()}
    assert "layers.0.blocks.0.attn2conv.conv.conv1.weight" in official
    model = mobilehv.create_model("dwnet_tiny_dynamic", layout="tokens", pretrained=official)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), source(x)) <= 1e-4


def test_input_rule():
    model = mobilehv.create_model("dwnet_tiny")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 96)).shape == (1, 1000)
        with pytest.raises(ResolutionError, match="multiples of 32"):
            model(torch.randn(1, 3, 100, 96))


def test_nchw_moves_less_data_than_tokens():
    counts = {layout: data_movement_count(export_graph_ops(
        mobilehv.fold(mobilehv.create_model("dwnet_tiny", layout=layout)), 64))
        for layout in ("nchw", "tokens")}
    assert counts["nchw"] == 21  # patch merging only: 6 strided slices + 1 concat, three times
    assert counts["tokens"] > 3 * counts["nchw"]

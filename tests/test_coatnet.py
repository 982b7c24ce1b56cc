"""CoAtNet specifics: the relative-bias indexing, weights crossing layouts, the fixed input size
and a wrong-variant checkpoint. (Fixture logits, parameter counts and per-variant fold/layout
equivalence are in test_zoo.py.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mobilehv
from mobilehv.models.coatnet import RelPosBias
from conftest import refweights, rel_err


def _randomise(model: nn.Module) -> nn.Module:
    """Weights and BatchNorm statistics far from their init, so a wrong fold shows."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point():
                t.normal_(0, 0.1 if t.dim() < 2 else t[0].numel() ** -0.5)
    return model


def test_relative_bias_depends_on_offset_only():
    """bias[h, i, j] = table[offset(i - j)] for a 3x3 window (tokens row-major)."""
    rel = RelPosBias(3, num_heads=2)
    with torch.no_grad():
        rel.relative_position_bias_table.copy_(torch.arange(50.).reshape(25, 2))
    bias = rel.fold()()                                   # (heads, 9, 9)
    assert bias.shape == (2, 9, 9)
    assert bias[0, 0, 8] == 0 and bias[1, 0, 8] == 1          # offset (-2, -2): first entry
    assert bias[0, 8, 0] == 48                                 # offset (+2, +2): last entry
    assert torch.all(bias[0].diagonal() == 24)                 # offset (0, 0): centre
    assert bias[0, 1, 0] == bias[0, 5, 4] == 26                # offset (0, +1) anywhere


def test_tokens_layout_loads_nchw_weights():
    nchw = _randomise(mobilehv.create_model("coatnet_0"))
    tokens = mobilehv.create_model("coatnet_0", layout="tokens", pretrained=nchw.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(tokens(x), nchw(x)) <= 1e-4


def test_other_size_is_refused():
    model = mobilehv.create_model("coatnet_0")
    with pytest.raises(mobilehv.ResolutionError, match="only 224x224"):
        model(torch.zeros(1, 3, 256, 256))


def test_wrong_variant_checkpoint_is_named():
    with pytest.raises(mobilehv.CheckpointError, match="missing key 'stages.1.blocks.3"):
        mobilehv.create_model("coatnet_1", pretrained=refweights.make_state_dict("coatnet_0_224"))



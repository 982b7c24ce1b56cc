"""DeiT: timm checkpoint logits in both layouts, parameter counts, fold, fixed input size,
and the nchw deploy form's smaller data-movement count."""
from __future__ import annotations

import pytest
import torch

import mobilehv
from mobilehv.graph import data_movement_count, export_graph_ops
from conftest import refweights, rel_err

PARAMS = {"deit_tiny": 5_717_416, "deit_small": 22_050_664}


@pytest.mark.parametrize("layout", ["nchw", "tokens"])
def test_timm_checkpoint_logits(layout):
    x, expected = refweights.load_io("deit_tiny_patch16_224")
    model = mobilehv.create_model("deit_tiny", layout=layout,
                                  pretrained=refweights.make_state_dict("deit_tiny_patch16_224"))
    with torch.no_grad():
        assert rel_err(model(x), expected) <= 1e-4
        assert rel_err(mobilehv.fold(model)(x), expected) <= 1e-4


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count(name):
    info = mobilehv.model_info(name)
    assert info["params"] == PARAMS[name]
    assert info["family"] == "deit" and info["checkpoint_formats"] == ["timm"]


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_layouts_and_fold_agree(name):
    """Random weights (position embedding and class token included) saved from the tokens
    layout load into nchw and give the same logits, before and after fold."""
    tokens = mobilehv.create_model(name, layout="tokens")
    with torch.no_grad():
        for p in tokens.parameters():
            p.normal_(0, 0.5 if p.dim() < 2 else p.shape[-1] ** -0.5)
    nchw = mobilehv.create_model(name, layout="nchw", pretrained=tokens.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = tokens(x)
        assert rel_err(nchw(x), ref) <= 1e-4
        assert rel_err(mobilehv.fold(nchw)(x), ref) <= 1e-4


def test_other_size_is_refused():
    model = mobilehv.create_model("deit_tiny")
    with pytest.raises(mobilehv.ResolutionError, match="only 224x224"):
        model(torch.zeros(1, 3, 256, 256))


def test_nchw_has_fewer_data_movement_ops():
    counts = {layout: data_movement_count(export_graph_ops(
        mobilehv.fold(mobilehv.create_model("deit_tiny", layout=layout)), 224)) for layout in ("nchw", "tokens")}
    assert counts["nchw"] < counts["tokens"], counts

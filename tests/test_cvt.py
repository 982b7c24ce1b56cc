"""CvT: official-checkpoint logits in both layouts and after fold, parameter counts, fold of
the depthwise conv-BN projections, any input size from 3 px, and data movement per layout."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mobilehv
from mobilehv.graph import data_movement_count, export_graph_ops
from conftest import refweights, rel_err

PARAMS = {"cvt_13": 19_997_480, "cvt_21": 31_622_696}  # official code; w24 below (~277.2M)


@pytest.mark.parametrize("layout", ["nchw", "tokens"])
def test_official_checkpoint_logits(layout):
    x, expected = refweights.load_io("cvt_13")
    model = mobilehv.create_model("cvt_13", layout=layout, pretrained=refweights.make_state_dict("cvt_13"))
    with torch.no_grad():
        assert rel_err(model(x), expected) <= 1e-4
        deploy = mobilehv.fold(model)
        assert rel_err(deploy(x), expected) <= 1e-4
    # the q/k/v depthwise conv + BN pairs became single convs
    assert isinstance(deploy.stages[2].blocks[0].attn.conv_proj_k, nn.Conv2d)


def test_official_keys_detected():
    sd = refweights.make_state_dict("cvt_13")
    model = mobilehv.create_model("cvt_13")
    assert all(k.startswith("stages.") or k in ("norm.weight", "norm.bias", "head.weight", "head.bias")
               for k in model.state_dict())
    mobilehv.load_checkpoint(model, sd)
    del sd["stage2.cls_token"]
    with pytest.raises(ValueError, match="missing key 'stages.2.cls_token'"):
        mobilehv.load_checkpoint(model, sd)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count(name):
    info = mobilehv.model_info(name)
    assert info["params"] == PARAMS[name]
    assert info["family"] == "cvt" and info["checkpoint_formats"] == ["official"]


def test_param_count_w24():
    info = mobilehv.model_info("cvt_w24")
    assert info["params"] == 277_196_392 and info["resolution"] == 384


@pytest.mark.parametrize("name", ["cvt_13", "cvt_21", pytest.param("cvt_w24", marks=pytest.mark.full)])
def test_fold_and_layouts_agree(name):
    """Random weights and BN statistics: fold and the tokens layout compute the nchw function."""
    nchw = mobilehv.create_model(name)
    with torch.no_grad():
        for key, t in nchw.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in key else
                        torch.randn_like(t) * (t.shape[1] if t.dim() > 1 else 10) ** -0.5)
    x = torch.randn(1, 3, 64, 64)
    tokens = mobilehv.create_model(name, layout="tokens", pretrained=nchw.state_dict())
    with torch.no_grad():
        ref = nchw(x)
        assert rel_err(mobilehv.fold(nchw)(x), ref) <= 1e-4
        assert rel_err(tokens(x), ref) <= 1e-4
        assert rel_err(mobilehv.fold(tokens)(x), ref) <= 1e-4


def test_any_size_from_3px_and_refused_below():
    nchw, tokens = (mobilehv.create_model("cvt_13", layout=lay) for lay in ("nchw", "tokens"))
    mobilehv.load_checkpoint(tokens, nchw.state_dict())
    x = torch.randn(1, 3, 37, 50)  # no multiple needed: convolutions only, no position embedding
    with torch.no_grad():
        assert rel_err(tokens(x), nchw(x)) <= 1e-4
        assert nchw(torch.randn(1, 3, 3, 3)).shape == (1, 1000)
    with pytest.raises(mobilehv.ResolutionError, match="at least 3"):
        nchw(torch.zeros(1, 3, 2, 2))


def test_nchw_has_fewer_data_movement_ops():
    counts = {layout: data_movement_count(export_graph_ops(
        mobilehv.fold(mobilehv.create_model("cvt_13", layout=layout)), 64)) for layout in ("nchw", "tokens")}
    assert counts["nchw"] < counts["tokens"], counts

"""CvT specifics: official key detection, the cvt_w24 parameter count, any input size from 3 px.
(Fixture logits, parameter counts and per-variant fold/layout
equivalence are in test_zoo.py.)"""
from __future__ import annotations

import pytest
import torch

import mobilehv
from conftest import refweights, rel_err


def test_official_keys_detected():
    sd = refweights.make_state_dict("cvt_13")
    model = mobilehv.create_model("cvt_13")
    assert all(k.startswith("stages.") or k in ("norm.weight", "norm.bias", "head.weight", "head.bias")
               for k in model.state_dict())
    mobilehv.load_checkpoint(model, sd)
    del sd["stage2.cls_token"]
    with pytest.raises(ValueError, match="missing key 'stages.2.cls_token'"):
        mobilehv.load_checkpoint(model, sd)


def test_param_count_w24():
    info = mobilehv.model_info("cvt_w24")
    assert info["params"] == 277_196_392 and info["resolution"] == 384


def test_any_size_from_3px_and_refused_below():
    nchw, tokens = (mobilehv.create_model("cvt_13", layout=lay) for lay in ("nchw", "tokens"))
    mobilehv.load_checkpoint(tokens, nchw.state_dict())
    x = torch.randn(1, 3, 37, 50)  # no multiple needed: convolutions only, no position embedding
    with torch.no_grad():
        assert rel_err(tokens(x), nchw(x)) <= 1e-4
        assert nchw(torch.randn(1, 3, 3, 3)).shape == (1, 1000)
    with pytest.raises(mobilehv.ResolutionError, match="at least 3"):
        nchw(torch.zeros(1, 3, 2, 2))



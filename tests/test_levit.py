"""LeViT specifics: timm-checkpoint logits and the fixed input size.
(Parameter counts and per-variant fold/layout equivalence are in test_zoo.py.)

The levit_128 fixture is ill-conditioned: its calibrated statistics let attention scores
grow to ~1e4, so a 1e-7 relative change of the input moves the logits by ~10%
(`test_fixture_is_ill_conditioned`). Only an fp32 computation in timm's exact op order can
reproduce it (the tokens layout does, bit for bit); the nchw layout and the folded forms are
checked against that same function in float64, where rounding cannot be amplified that far.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mobilehv
from conftest import refweights, rel_err


@pytest.fixture
def two_threads():
    """The fixture was recorded with 2 intra-op threads; matmul blocking follows the count."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def fixture_io():
    return refweights.make_state_dict("levit_128"), *refweights.load_io("levit_128")


def test_timm_checkpoint_logits_tokens(fixture_io, two_threads):
    sd, x, expected = fixture_io
    model = mobilehv.create_model("levit_128", layout="tokens", pretrained=sd)
    with torch.no_grad():
        assert rel_err(model(x), expected) <= 1e-4


def test_fixture_is_ill_conditioned(fixture_io):
    sd, x, _ = fixture_io
    model = mobilehv.create_model("levit_128", layout="tokens", pretrained=sd)
    with torch.no_grad():
        assert rel_err(model(x * (1 + 1e-7)), model(x)) > 1e-2


def test_nchw_and_fold_compute_the_timm_function(fixture_io):
    """float64, same checkpoint: nchw, folded nchw and folded tokens equal the tokens layout."""
    sd, x, _ = fixture_io
    x = x.double()
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # folded layers are created in the default dtype
    try:
        with torch.no_grad():
            tokens = mobilehv.create_model("levit_128", layout="tokens", pretrained=sd).double()
            nchw = mobilehv.create_model("levit_128", layout="nchw", pretrained=sd).double()
            ref = tokens(x)
            assert rel_err(nchw(x), ref) <= 1e-6
            deploy = mobilehv.fold(nchw)
            assert rel_err(deploy(x), ref) <= 1e-6
            assert rel_err(mobilehv.fold(tokens)(x), ref) <= 1e-6
    finally:
        torch.set_default_dtype(dtype)
    # deploy form: no gather for the biases, one merged head
    assert not any(type(m).__name__ in ("AttentionBias", "LinearNorm", "DistilledHead") for m in deploy.modules())
    assert isinstance(deploy.head, nn.Conv2d)


def test_timm_keys_detected(fixture_io):
    sd = dict(fixture_io[0])
    model = mobilehv.create_model("levit_128")
    assert "stages.1.downsample.attn_downsample.q.linear.weight" in model.state_dict()
    mobilehv.load_checkpoint(model, sd)
    del sd["stages.0.blocks.0.attn.attention_biases"]
    with pytest.raises(ValueError, match="missing key 'stages.0.blocks.0.attn.rel_bias.biases'"):
        mobilehv.load_checkpoint(model, sd)


def test_other_size_is_refused():
    model = mobilehv.create_model("levit_128")
    with pytest.raises(mobilehv.ResolutionError, match="only 224x224"):
        model(torch.zeros(1, 3, 256, 256))



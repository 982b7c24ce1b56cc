"""EfficientViT specifics: the linear-attention rewrite, the input rule, one layout only.
(Fixture logits, parameter counts and per-variant fold are in test_zoo.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_bn, refweights, rel_err

import mobilehv
from mobilehv.checkpoints import CheckpointError
from mobilehv.models.efficientvit import LiteMLA
from mobilehv.registry import ResolutionError


def _lite_mla_original(m: LiteMLA, x: torch.Tensor) -> torch.Tensor:
    """The original formulation: per-head (N, d) rows, V padded with a column of ones."""
    b, _, h, w = x.shape
    qkv = m.qkv(x)
    qkv = torch.cat([qkv] + [op(qkv) for op in m.aggreg], dim=1)
    qkv = qkv.reshape(b, -1, 3 * m.head_dim, h * w).transpose(-1, -2)
    q, k, v = qkv.chunk(3, dim=-1)
    q, k, v = F.relu(q), F.relu(k), F.pad(v, (0, 1), value=1.0)
    out = q @ (k.transpose(-1, -2) @ v)
    out = out[..., :-1] / (out[..., -1:] + m.eps)
    return m.proj(out.transpose(-1, -2).reshape(b, -1, h, w))


def test_linear_attention_matches_original_form():
    m = randomise_bn(LiteMLA(64, 16)).eval()
    x = torch.randn(2, 64, 5, 7)  # non-square, so an H/W mix-up cannot pass
    with torch.no_grad():
        assert rel_err(m(x), _lite_mla_original(m, x)) <= 1e-5


def test_input_rule():
    model = mobilehv.create_model("efficientvit_b0")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 72, 100)).shape == (1, 1000)  # any size from 32 up
        with pytest.raises(ResolutionError, match="at least 32"):
            model(torch.randn(1, 3, 16, 64))


def test_only_nchw_layout_and_wrong_checkpoint():
    with pytest.raises(ValueError, match="layouts nchw"):
        mobilehv.create_model("efficientvit_b0", layout="tokens")
    with pytest.raises(CheckpointError, match="wrong shape"):
        mobilehv.create_model("efficientvit_b1", pretrained=refweights.make_state_dict("efficientvit_b0"))

"""EfficientFormer specifics: the original (snap-research) key layout, what fold does to the
distilled head, attention bias and layer scales, the fixed input size, and the nchw graph
staying 4-D. (Fixture logits, parameter counts and per-variant fold/layout equivalence are in
test_zoo.py.)"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import mobilehv
from mobilehv.graph import data_movement_count, export_graph_ops
from mobilehv.models.efficientformer import DistilledHead, FoldedAttention, Meta3D, Meta4D
from mobilehv.models.poolformer import LayerScale
from mobilehv.registry import ResolutionError
from conftest import refweights, rel_err

NAME = "efficientformer_l1"


@pytest.fixture(scope="module")
def timm_sd():
    return refweights.make_state_dict(NAME)


def _timm_to_official(key: str) -> str:
    """Key of the snap-research/EfficientFormer checkpoint holding the same tensor as timm's `key`."""
    key = re.sub(r"^stem\.(conv|norm)([12])\.",
                 lambda m: f"patch_embed.{(0 if m[1] == 'conv' else 1) + 3 * (int(m[2]) - 1)}.", key)
    key = re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"network.{2 * int(m[1])}.", key)
    key = re.sub(r"^stages\.(\d)\.downsample\.(conv|norm)\.",
                 lambda m: f"network.{2 * int(m[1]) - 1}.{'proj' if m[2] == 'conv' else 'norm'}.", key)
    key = re.sub(r"\.ls([12])\.gamma$", r".layer_scale_\1", key)
    return re.sub(r"^head_dist\.", "dist_head.", key)


def test_official_checkpoint_layout_loads(timm_sd):
    """The original repository's keys (patch_embed.N, network.N.M, layer_scale_N, dist_head)."""
    official = {_timm_to_official(k): v for k, v in timm_sd.items()}
    assert "network.6.4.token_mixer.qkv.weight" in official and "patch_embed.4.running_var" in official
    x, expected = refweights.load_io(NAME)
    model = mobilehv.create_model(NAME, layout="tokens", pretrained=official)
    with torch.no_grad():
        assert rel_err(model(x), expected) <= 1e-4


def test_fold_merges_heads_and_precomputes_attention_bias():
    model = mobilehv.create_model(NAME)
    deploy = mobilehv.fold(model)
    # one classifier: the two heads' mean is one Linear with averaged weight and bias
    assert isinstance(deploy.head, nn.Linear)
    assert not any(isinstance(m, DistilledHead) for m in deploy.modules())
    with torch.no_grad():
        feats = torch.randn(2, 448)
        assert torch.allclose(deploy.head(feats), model.head(feats), atol=1e-5)
    # attention bias is a constant (heads, N, N) table: no learned table, no index to gather with
    attn = [m for m in deploy.modules() if isinstance(m, FoldedAttention)]
    assert len(attn) == 1 and attn[0].attention_bias_const.shape == (8, 49, 49)
    names = [k for k, _ in deploy.named_parameters()] + [k for k, _ in deploy.named_buffers()]
    assert not any("attention_biases" in k or "attention_bias_idxs" in k for k in names)
    # layer scales: absorbed everywhere except after the pool mixer (no linear layer to take it)
    meta4d = [m for m in deploy.modules() if isinstance(m, Meta4D)]
    assert sum(isinstance(m, LayerScale) for m in deploy.modules()) == len(meta4d) == 14
    assert all(isinstance(b.ls1, nn.Identity) and isinstance(b.ls2, nn.Identity)
               for b in deploy.modules() if isinstance(b, Meta3D))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deploy.modules())


@pytest.mark.parametrize("size", [(192, 192), (256, 256), (224, 192)])
def test_other_sizes_are_refused_with_the_rule(size):
    model = mobilehv.create_model(NAME)
    with pytest.raises(ResolutionError, match="224x224"):
        model(torch.zeros(1, 3, *size))
    assert mobilehv.model_info(NAME)["input_rule"]["fixed"] == 224


def test_nchw_deploy_graph_stays_4d():
    """The nchw form has no 4-D/3-D boundary: only the attention's head split, q/attn
    transposes and head merge move data; tokens adds the flatten and the (B, N, C) permutes."""
    counts = {}
    for layout in ("nchw", "tokens"):
        ops = export_graph_ops(mobilehv.fold(mobilehv.create_model(NAME, layout=layout)), 224)
        counts[layout] = data_movement_count(ops)
        if layout == "nchw":
            assert not {"flatten", "permute"} & set(ops)
    assert counts["nchw"] < counts["tokens"]

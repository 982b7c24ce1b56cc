"""MobileViT specifics: the deploy form's unfold/fold and 3-D attention (data movement),
the input rule the unfold imposes, layouts agreeing on non-square inputs, and the timm key
mapping. (Parameter counts, fixtures in every layout and per-variant fold are in test_zoo.py.)"""
from __future__ import annotations

import pytest
import torch

import mobilehv
from mobilehv.graph import data_movement_count, export_graph_ops
from mobilehv.models.mobilevit import CONFIGS, MobileViTBlockDeploy, PatchAttentionDeploy, PatchLayerNorm
from mobilehv.registry import ResolutionError
from conftest import refweights, rel_err


def _deploy_ops(name: str, layout: str, resolution: int = 64):
    return export_graph_ops(mobilehv.fold(mobilehv.create_model(name, layout=layout)), resolution)


def test_nchw_data_movement_is_what_the_math_needs():
    """Per MobileViT block: the unfold is a conv plus one single-axis move (p to the batch) with
    its two views, and the fold two moves (pw, then whole rows with ph) with their three views
    (the fusion conv takes x and y as two convs, no concat); per attention: the three head-split
    views of q, k, v (separate convs: no chunk), the transposes of q and v (matmul operand flags
    on both runtimes), the view and transpose of the scores-first value product's small
    `(N, d)` output, and the view merging heads. The `(N, N)` scores are never moved. That is
    96 ops against `tokens`' 87, on fewer elements (test_zoo.py): each view beyond the minimum
    removes a measured copy, element-by-element transpose or slow matmul order on LiteRT or
    onnxruntime (see MobileViTBlockDeploy and PatchAttentionDeploy)."""
    ops = _deploy_ops("mobilevit_xs", "nchw")
    blocks = sum(1 for s in CONFIGS["xs"].stages if s.transformer_dim)
    attentions = sum(s.transformer_depth for s in CONFIGS["xs"].stages)
    assert ops["permute"] == blocks and "cat" not in ops and "chunk" not in ops
    assert ops["reshape"] == 5 * blocks + 5 * attentions
    assert ops["transpose"] == 2 * blocks + 3 * attentions
    assert data_movement_count(ops) == 8 * blocks + 8 * attentions
    assert ops["layernorm"] == 0 and ops["linear"] == 1  # channels-last LayerNorm/Linear: only the classifier


def test_deploy_block_equals_the_trained_block():
    """The depthwise-conv unfold and the two-move fold equal the permutes, the split
    q/k/v convs with 3-D attention equal their originals, and the norms' affines absorbed into
    the following 1x1 convs change nothing (non-trivial BN statistics, batch 2, non-square)."""
    model = mobilehv.create_model("mobilevit_xxs")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    deploy = mobilehv.fold(model)
    assert sum(isinstance(m, MobileViTBlockDeploy) for m in deploy.modules()) == 3
    assert sum(isinstance(m, PatchAttentionDeploy) for m in deploy.modules()) == 9
    assert not any(isinstance(m, PatchLayerNorm) and m.elementwise_affine for m in deploy.modules())
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        assert rel_err(deploy(x), model.eval()(x)) <= 1e-5
        assert torch.equal(mobilehv.fold(deploy)(x), deploy(x))


def test_input_rule_follows_the_unfold():
    model = mobilehv.create_model("mobilevit_xxs")
    assert mobilehv.model_info("mobilevit_xxs")["input_rule"] == {"multiple": 64, "minimum": 64, "fixed": None}
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 128)).shape == (1, 1000)
    # 224 / 32 = 7: the stride-32 MobileViT block could not unfold 2x2 patches
    with pytest.raises(ResolutionError, match="multiples of 64"):
        model(torch.zeros(1, 3, 224, 224))


def test_layouts_agree_on_non_square_inputs():
    """Unfold/fold in both layouts put every pixel back where it came from (H != W catches a
    swapped axis), and the fixture weights give the same logits."""
    sd = refweights.make_state_dict("mobilevit_xxs")
    x = torch.randn(2, 3, 64, 192)
    with torch.no_grad():
        ref = mobilehv.create_model("mobilevit_xxs", layout="tokens", pretrained=sd)(x)
        nchw = mobilehv.create_model("mobilevit_xxs", layout="nchw", pretrained=sd)
        assert rel_err(nchw(x), ref) <= 1e-4
        assert rel_err(mobilehv.fold(nchw)(x), ref) <= 1e-4


def test_timm_keys_are_mapped_onto_both_layouts():
    sd = refweights.make_state_dict("mobilevit_xs")
    for layout in ("nchw", "tokens"):
        model = mobilehv.create_model("mobilevit_xs", layout=layout, pretrained=sd)
        state = model.state_dict()
        assert torch.equal(state["stages.1.2.conv_dw.conv.weight"], sd["stages.1.2.conv2_kxk.conv.weight"].float())
        assert torch.equal(state["stages.2.1.transformer.1.attn.qkv.weight"].reshape(288, 96),
                           sd["stages.2.1.transformer.1.attn.qkv.weight"].float())
    with pytest.raises(ValueError, match="missing key 'stages.4.1.conv_fusion.bn.running_var'"):
        mobilehv.create_model("mobilevit_xs", pretrained={k: v for k, v in sd.items()
                                                          if k != "stages.4.1.conv_fusion.bn.running_var"})

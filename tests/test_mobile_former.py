"""Mobile-Former: official-checkpoint logits, exact parameter counts, folding of its own blocks,
the nchw layout's data-movement saving, input sizes and checkpoint mismatch messages."""
from __future__ import annotations

import pytest
import torch
from conftest import randomise_bn, refweights, rel_err
from torch import nn

import mobilehv
from mobilehv.checkpoints import CheckpointError
from mobilehv.graph import data_movement_count, export_graph_ops
from mobilehv.layers import DepthwiseSplit
from mobilehv.models.mobile_former import (ChannelShuffle, DynamicReLU, DynamicReLUDeploy, LinearNormAct,
                                           convert_official, is_official)
from mobilehv.registry import ResolutionError

PARAMS = {"26m": 3_232_788, "52m": 3_469_092, "96m": 4_585_252, "151m": 7_595_828, "214m": 9_425_920,
          "294m": 11_422_648, "508m": 13_976_976}


@pytest.mark.parametrize("variant", PARAMS)
def test_params_equal_official_code(variant):
    assert mobilehv.model_info(f"mobile_former_{variant}")["params"] == PARAMS[variant]


# One fixture run per layout (tests/test_zoo.py runs every fixture in both layouts): 26m has
# grouped convs and channel shuffles, 151m the 12-block table with 6 tokens of 192 dims.
@pytest.mark.parametrize("name,layout", [("mobile_former_26m", "tokens"), ("mobile_former_151m", "nchw")])
def test_official_checkpoint_logits(name, layout):
    x, expected = refweights.load_io(name)
    model = mobilehv.create_model(name, layout=layout, pretrained=refweights.make_state_dict(name))
    deploy = mobilehv.fold(model)
    with torch.no_grad():
        assert rel_err(model(x), expected) <= 1e-4
        assert rel_err(deploy(x), expected) <= 1e-4


@pytest.mark.parametrize("layout", ["nchw", "tokens"])
def test_fold_replaces_bn_and_splits_dynamic_relu(layout):
    model = randomise_bn(mobilehv.create_model("mobile_former_26m", layout=layout))
    x = torch.randn(2, 3, 96, 64)
    deploy = mobilehv.fold(model)
    kinds = {type(m) for m in deploy.modules()}
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert DynamicReLU not in kinds and LinearNormAct not in kinds and DynamicReLUDeploy in kinds
    with torch.no_grad():
        ref, out = model(x), deploy(x)
        assert rel_err(out, ref) <= 1e-5
        assert torch.equal(mobilehv.fold(deploy)(x), out)  # folding twice changes nothing


def _multiplier_convs(model: nn.Module, stride: int) -> int:
    return sum(isinstance(m, nn.Conv2d) and m.groups == m.in_channels < m.out_channels and m.stride[0] == stride
               for m in model.modules())


# 26m: the split's output order replaces a channel shuffle; 96m (no shuffles): the dynamic ReLU
# and the 1x1 conv after the split are reordered instead
@pytest.mark.parametrize("name,splits", [("mobile_former_26m", 3), ("mobile_former_96m", 5)])
def test_fold_splits_stride_1_depthwise_convs_with_a_channel_multiplier(name, splits):
    model = randomise_bn(mobilehv.create_model(name))
    deploy = mobilehv.fold(model)
    assert sum(isinstance(m, DepthwiseSplit) for m in deploy.modules()) == splits
    assert _multiplier_convs(deploy, 1) == 0 and _multiplier_convs(deploy, 2) == _multiplier_convs(model, 2)
    shuffles = [sum(isinstance(m, ChannelShuffle) for m in net.modules()) for net in (model, deploy)]
    assert shuffles[0] - shuffles[1] == (splits if name.endswith("26m") else 0)
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        assert rel_err(deploy(x), model(x)) <= 1e-5


def test_nchw_deploy_form_moves_less_data_than_tokens():
    """`mobilehv info mobile_former_151m`: the nchw deploy graph has under half the
    reshape/transpose/slice ops of the (B, M, D) tokens form (measured: 171 vs 383, not counting
    the concat of each DepthwiseSplit, which both layouts have: 176 vs 388 with them), and every
    transpose it has is a batch-matmul operand, which ONNX Runtime (FusedMatMul) and LiteRT
    (adj_x/adj_y) take as a flag: no data moves for them."""
    deploy = {layout: mobilehv.fold(mobilehv.create_model("mobile_former_151m", layout=layout))
              for layout in ("nchw", "tokens")}
    counts = {layout: data_movement_count(export_graph_ops(m, 224))
              - sum(isinstance(s, DepthwiseSplit) for s in m.modules()) for layout, m in deploy.items()}
    assert counts["nchw"] <= 0.45 * counts["tokens"], counts
    graph = torch.export.export(deploy["nchw"], (torch.zeros(1, 3, 224, 224),)).graph
    transposes = [n for n in graph.nodes if n.target == torch.ops.aten.transpose.int]
    assert transposes and all(u.target == torch.ops.aten.bmm.default for n in transposes for u in n.users)


def test_any_input_size_runs_and_layouts_agree():
    nchw = mobilehv.create_model("mobile_former_52m", layout="nchw")
    tokens = mobilehv.create_model("mobile_former_52m", layout="tokens", pretrained=nchw.state_dict())
    x = torch.randn(1, 3, 75, 41)  # odd, non-square: every stride-2 conv rounds up
    with torch.no_grad():
        assert rel_err(tokens(x), nchw(x)) <= 1e-5


def test_empty_input_is_refused_with_the_rule():
    model = mobilehv.create_model("mobile_former_26m")
    with pytest.raises(ResolutionError, match=r"cannot take a 0x32 input: .* at least 1"):
        model(torch.zeros(1, 3, 0, 32))


def test_official_format_is_detected_and_only_it():
    sd = refweights.make_state_dict("mobile_former_26m")
    assert is_official(sd)
    model = mobilehv.create_model("mobile_former_26m")
    assert not is_official(model.state_dict())
    assert set(convert_official(sd, model)) == set(model.state_dict())


def test_mismatched_checkpoint_names_first_missing_unexpected_and_wrong_shape_keys():
    sd = refweights.make_state_dict("mobile_former_26m")
    del sd["features.3.global_block.q.weight"]
    sd["features.3.global_block.extra"] = torch.zeros(1)
    sd["classifier.fc.0.weight"] = torch.zeros(1024, 703)
    with pytest.raises(CheckpointError) as info:
        mobilehv.create_model("mobile_former_26m", layout="tokens", pretrained=sd)
    message = str(info.value)
    assert "official" in message
    assert "missing key 'blocks.3.former.q.weight'" in message
    assert "unexpected key 'blocks.3.global_block.extra'" in message
    assert "wrong shape 'head.fc.fc.weight': checkpoint (1024, 703) vs model (1024, 704)" in message


def test_checkpoint_of_another_variant_is_refused():
    with pytest.raises(CheckpointError, match="does not fit mobile_former_26m"):
        mobilehv.create_model("mobile_former_26m", pretrained=refweights.make_state_dict("mobile_former_151m"))

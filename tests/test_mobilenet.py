"""MobileNetV2 / EfficientNet-B0 specifics: timm's EfficientNet key layout (for B0 there is no
fixture, so its keys are built here from timm's naming scheme), SE widths, width-multiplier
rounding, one layout, the input rule and a deploy graph free of data movement. (Parameter
counts, the mobilenetv2_100 fixture and per-variant fold are in test_zoo.py.)"""
from __future__ import annotations

import pytest
import torch

import mobilehv
from mobilehv.graph import data_movement_count, export_graph_ops
from mobilehv.registry import ResolutionError
from conftest import rel_err

# timm's efficientnet_b0 arch: (block type, repeats, kernel, stride, expansion, out channels)
B0_ARCH = [("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 2, 5, 2, 6, 40), ("ir", 3, 3, 2, 6, 80),
           ("ir", 3, 5, 1, 6, 112), ("ir", 4, 5, 2, 6, 192), ("ir", 1, 3, 1, 6, 320)]


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def timm_efficientnet_b0_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of timm's efficientnet_b0 state dict: bare convs with positional bn1/bn2/bn3,
    SE squeezing to a quarter of the block input."""
    shapes = {"conv_stem.weight": (32, 3, 3, 3), **_bn("bn1", 32)}
    cin = 32
    for s, (kind, repeats, k, _, e, cout) in enumerate(B0_ARCH):
        for i in range(repeats):
            p, mid, rd = f"blocks.{s}.{i}", cin * e, cin // 4
            if kind == "ir":
                shapes |= {f"{p}.conv_pw.weight": (mid, cin, 1, 1), **_bn(f"{p}.bn1", mid)}
            shapes |= {f"{p}.conv_dw.weight": (mid, 1, k, k), **_bn(f"{p}.bn1" if kind == "ds" else f"{p}.bn2", mid),
                       f"{p}.se.conv_reduce.weight": (rd, mid, 1, 1), f"{p}.se.conv_reduce.bias": (rd,),
                       f"{p}.se.conv_expand.weight": (mid, rd, 1, 1), f"{p}.se.conv_expand.bias": (mid,)}
            if kind == "ir":
                shapes |= {f"{p}.conv_pwl.weight": (cout, mid, 1, 1), **_bn(f"{p}.bn3", cout)}
            else:
                shapes |= {f"{p}.conv_pw.weight": (cout, mid, 1, 1), **_bn(f"{p}.bn2", cout)}
            cin = cout
    return shapes | {"conv_head.weight": (1280, 320, 1, 1), **_bn("bn2", 1280),
                     "classifier.weight": (1000, 1280), "classifier.bias": (1000,)}


def test_efficientnet_b0_loads_timm_keys_into_the_right_places():
    sd = {k: (torch.randn(s) if s else torch.tensor(7)) for k, s in timm_efficientnet_b0_shapes().items()}
    model = mobilehv.create_model("efficientnet_b0", pretrained=sd)  # raises on any key/shape mismatch
    state = model.state_dict()
    assert len(state) == len(sd)
    moved = {  # mobilehv key -> timm key, including the "ds" block whose conv_pw is the projection
        "conv_stem.conv.weight": "conv_stem.weight", "conv_stem.bn.running_var": "bn1.running_var",
        "blocks.0.0.conv_dw.bn.weight": "blocks.0.0.bn1.weight",
        "blocks.0.0.conv_pwl.conv.weight": "blocks.0.0.conv_pw.weight",
        "blocks.0.0.conv_pwl.bn.bias": "blocks.0.0.bn2.bias",
        "blocks.2.1.conv_pw.bn.running_mean": "blocks.2.1.bn1.running_mean",
        "blocks.2.1.conv_dw.conv.weight": "blocks.2.1.conv_dw.weight",
        "blocks.2.1.conv_dw.bn.weight": "blocks.2.1.bn2.weight",
        "blocks.2.1.se.conv_reduce.bias": "blocks.2.1.se.conv_reduce.bias",
        "blocks.5.3.conv_pwl.bn.running_var": "blocks.5.3.bn3.running_var",
        "conv_head.bn.bias": "bn2.bias", "classifier.weight": "classifier.weight",
    }
    for ours, theirs in moved.items():
        assert torch.equal(state[ours], sd[theirs]), ours


def test_efficientnet_b0_fold_with_timm_keys():
    sd = {k: (torch.rand(s) + 0.5 if k.endswith("running_var") else torch.randn(s) * 0.2) if s else torch.tensor(7)
          for k, s in timm_efficientnet_b0_shapes().items()}
    model = mobilehv.create_model("efficientnet_b0", pretrained=sd)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        ref = model(x)
        assert rel_err(mobilehv.fold(model)(x), ref) <= 1e-4


def test_se_and_width_rounding():
    b0 = mobilehv.create_model("efficientnet_b0")
    assert b0.blocks[0][0].se.conv_reduce.out_channels == 8    # 32 / 4 (block input, not mid)
    assert b0.blocks[3][0].se.conv_reduce.out_channels == 10   # 40 / 4 although mid is 240
    wide = mobilehv.create_model("mobilenetv2_140")  # timm's rounding: multiples of 8, >= 90% of c * 1.4
    assert wide.conv_stem.conv.out_channels == 48 and wide.conv_head.conv.out_channels == 1792
    assert [s[-1].conv_pwl.conv.out_channels for s in wide.blocks] == [24, 32, 48, 88, 136, 224, 448]


@pytest.mark.parametrize("name", ["mobilenetv2_100", "efficientnet_b0"])
def test_one_layout_input_rule_and_no_data_movement(name):
    assert mobilehv.model_info(name)["layouts"] == ["nchw"]
    with pytest.raises(ValueError, match="nchw"):
        mobilehv.create_model(name, layout="tokens")
    model = mobilehv.create_model(name)
    with pytest.raises(ResolutionError, match="multiples of 32"):
        model(torch.zeros(1, 3, 100, 100))
    ops = export_graph_ops(mobilehv.fold(model), 64)
    assert data_movement_count(ops) == 0, ops

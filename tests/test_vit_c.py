"""ViT_C specifics: the mobilehv key layout (a checkpoint saved from one layout loads into the
other and gives the same logits, before and after fold) and the fixed input size. No public
checkpoint exists, so no fixture; parameter counts are in test_zoo.py."""
from __future__ import annotations

import pytest
import torch

import mobilehv
from conftest import rel_err

# paper: 4.57M / 17.75M / 81.57M / 167.80M; ours, exactly:
PAPER = {"vit_c_1gf": 4.57e6, "vit_c_4gf": 17.75e6, "vit_c_18gf": 81.57e6, "vit_c_36gf": 167.80e6}


def test_key_layout():
    keys = mobilehv.create_model("vit_c_1gf").state_dict()
    for key in ("stem.convs.0.conv.weight", "stem.convs.3.bn.running_var", "stem.proj.bias", "cls_token",
                "pos_embed", "blocks.10.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "head.weight"):
        assert key in keys
    assert keys["pos_embed"].shape == (1, 197, 192)


def _randomise(model):
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in key else
                        torch.randn_like(t) * (t.shape[-1] if t.dim() > 1 else 10) ** -0.5)
    return model


@pytest.mark.parametrize("src,dst", [("nchw", "tokens"), ("tokens", "nchw")])
def test_saved_checkpoint_crosses_layouts(tmp_path, src, dst):
    model = _randomise(mobilehv.create_model("vit_c_1gf", layout=src))
    path = tmp_path / "vit_c_1gf.pth"
    torch.save(model.state_dict(), path)
    other = mobilehv.create_model("vit_c_1gf", layout=dst, pretrained=path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        assert rel_err(other(x), ref) <= 1e-4
        assert rel_err(mobilehv.fold(other)(x), ref) <= 1e-4


def test_other_size_is_refused():
    model = mobilehv.create_model("vit_c_1gf")
    with pytest.raises(mobilehv.ResolutionError, match="only 224x224"):
        model(torch.zeros(1, 3, 192, 192))



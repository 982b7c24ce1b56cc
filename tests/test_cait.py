"""CaiT specifics: LayerScale absorbed by fold, the timm `gamma_*` keys, fixed input sizes.
(Fixture logits, parameter counts and
per-variant fold/layout equivalence are in test_zoo.py.)"""
from __future__ import annotations

import pytest
import torch

import mobilehv
from mobilehv.models.cait import LayerScale
from conftest import refweights, rel_err

PARAMS = {"cait_xxs24": 11_956_264, "cait_xxs36": 17_299_720, "cait_xs24": 26_670_088,
          "cait_s24": 46_916_200}


def _randomise(model):
    """Layer scales around 1 (not the checkpoints' 1e-5), so a wrong absorption shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.5 if p.dim() < 2 else p.shape[1] ** -0.5)
    return model


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_fold_absorbs_layer_scale(name):
    """Every variant at its (only) size: fold removes every LayerScale into proj/fc2, computes the
    same logits and is idempotent (test_zoo checks the layouts agree)."""
    model = _randomise(mobilehv.create_model(name))
    r = mobilehv.model_info(name)["resolution"]
    x = torch.randn(1, 3, r, r)
    with torch.no_grad():
        ref = model(x)
        deploy = mobilehv.fold(model)
        assert not any(isinstance(m, LayerScale) for m in deploy.modules())
        assert sum(isinstance(m, LayerScale) for m in model.modules()) == 2 * len(model.blocks) + 4
        assert rel_err(deploy(x), ref) <= 1e-4
        assert rel_err(mobilehv.fold(deploy)(x), ref) <= 1e-4


def test_timm_layer_scale_keys_are_mapped():
    sd = refweights.make_state_dict("cait_xxs24_224")
    model = mobilehv.create_model("cait_xxs24", pretrained=sd)
    assert torch.equal(model.blocks[3].ls2.gamma.flatten(), sd["blocks.3.gamma_2"])
    assert torch.equal(model.blocks_token_only[1].ls1.gamma.flatten(), sd["blocks_token_only.1.gamma_1"])


@pytest.mark.parametrize("name,size", [("cait_xxs24", 384), ("cait_xs24", 224)])
def test_other_size_is_refused(name, size):
    model = mobilehv.create_model(name)
    with pytest.raises(mobilehv.ResolutionError, match=f"only {384 if size == 224 else 224}x"):
        model(torch.zeros(1, 3, size, size))



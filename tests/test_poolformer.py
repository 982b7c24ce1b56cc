"""PoolFormer specifics: the input rule, one layout only, and a graph with no data movement.
(Fixture logits, parameter counts and per-variant fold equivalence are in test_zoo.py.)"""
from __future__ import annotations

import pytest
import torch

import mobilehv
from mobilehv.graph import data_movement_count, export_graph_ops
from mobilehv.registry import ResolutionError
from conftest import rel_err

NAME = "poolformer_s12"


def test_input_rule():
    model = mobilehv.create_model(NAME)
    assert model(torch.zeros(1, 3, 64, 96)).shape == (1, 1000)
    with pytest.raises(ResolutionError, match="multiples of 32"):
        model(torch.zeros(1, 3, 100, 100))


def test_only_nchw_layout():
    assert mobilehv.model_info(NAME)["layouts"] == ["nchw"]
    with pytest.raises(ValueError, match="nchw"):
        mobilehv.create_model(NAME, layout="tokens")


def test_deploy_graph_has_no_data_movement():
    ops = export_graph_ops(mobilehv.fold(mobilehv.create_model(NAME)), 64)
    assert data_movement_count(ops) == 0, ops


def test_onnx_deploy_graph_has_no_reshape(tmp_path):
    """nn.GroupNorm exports as Reshape -> InstanceNormalization -> Reshape; the deploy form's
    reductions must keep the ONNX graph free of data movement, and run identically."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    deploy = mobilehv.fold(mobilehv.create_model(NAME))
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "poolformer.onnx"
    torch.onnx.export(deploy, (x,), str(path), dynamo=True, verbose=False)
    op_types = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not op_types & {"Reshape", "Transpose", "InstanceNormalization", "GroupNormalization"}, op_types
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(np.asarray(y)), deploy(x)) <= 1e-4


def test_fold_absorbs_layer_scales():
    from mobilehv.models.poolformer import LayerScale

    deploy = mobilehv.fold(mobilehv.create_model(NAME))
    assert not any(isinstance(m, LayerScale) for m in deploy.modules())

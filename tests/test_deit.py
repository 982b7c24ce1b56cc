"""DeiT specifics: the fixed input size and the nchw deploy form's smaller data-movement count.
(Fixture logits, parameter counts and per-variant fold/layout equivalence are in test_zoo.py.)"""
from __future__ import annotations

import pytest
import torch

import mobilehv
from mobilehv.graph import data_movement_count, export_graph_ops


def test_other_size_is_refused():
    model = mobilehv.create_model("deit_tiny")
    with pytest.raises(mobilehv.ResolutionError, match="only 224x224"):
        model(torch.zeros(1, 3, 256, 256))


def test_nchw_has_fewer_data_movement_ops():
    counts = {layout: data_movement_count(export_graph_ops(
        mobilehv.fold(mobilehv.create_model("deit_tiny", layout=layout)), 224)) for layout in ("nchw", "tokens")}
    assert counts["nchw"] < counts["tokens"], counts

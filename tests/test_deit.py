"""DeiT specifics: the fixed input size.
(Fixture logits, parameter counts and per-variant fold/layout equivalence are in test_zoo.py.)"""
from __future__ import annotations

import pytest
import torch

import mobilehv


def test_other_size_is_refused():
    model = mobilehv.create_model("deit_tiny")
    with pytest.raises(mobilehv.ResolutionError, match="only 224x224"):
        model(torch.zeros(1, 3, 256, 256))



"""Shared test helpers: the checkpoint fixtures of ../shared/reference and the error metric."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("MOBILEHV_REFERENCE", ROOT.parent / "shared" / "reference"))


def _load_refweights():
    spec = importlib.util.spec_from_file_location("refweights", REFERENCE / "refweights.py")
    if spec is None or not (REFERENCE / "refweights.py").is_file():
        raise FileNotFoundError(f"checkpoint fixtures not found at {REFERENCE} "
                                "(set MOBILEHV_REFERENCE to the shared/reference folder)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


refweights = _load_refweights()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the exactness metric of the fixtures."""
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


def randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics, so that folding has something to get wrong."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    return model


if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores: one thread each, not two each


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield

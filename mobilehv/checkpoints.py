"""Checkpoint loading: read a file, detect its source format, map it onto either layout.

Weights come from local files only (no hub). Formats are detected, not declared: a state
dict that already matches the model is loaded as is; otherwise each converter the family
registers (timm, official code) is asked whether it recognises the keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mobilehv.registry import get_spec

_WRAPPER_KEYS = ("model", "state_dict", "model_state", "state_dict_ema", "model_ema")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (one-line message)."""


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or `.pth`/`.pt`/`.bin` file, wrappers (`model`, `state_dict`) removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a .safetensors, .pth or .pt file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, pickled code: all one answer for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first[:200]}") from None
    return unwrap(obj, str(path))


def unwrap(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{where} is not a state dict of tensors")
    # DataParallel/DDP prefixes
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _fits(src: torch.Tensor, dst: torch.Tensor) -> bool:
    # Linear (O, I) <-> Conv1x1 (O, I, 1, 1), (C,) <-> (C, 1, 1): equal once singleton dims go.
    return src.shape == dst.shape or [d for d in src.shape if d != 1] == [d for d in dst.shape if d != 1]


def _mismatch(sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> str | None:
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    wrong = [k for k in target if k in sd and not _fits(sd[k], target[k])]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""
            parts.append(f"{label} key '{keys[0]}'{more}")
    if wrong:
        k = wrong[0]
        more = f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""
        parts.append(f"wrong shape '{k}': checkpoint {tuple(sd[k].shape)} vs model "
                     f"{tuple(target[k].shape)}{more}")
    return "; ".join(parts) or None


def load_checkpoint(model: nn.Module, checkpoint: str | Path | Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a checkpoint (path or state dict) of any known source format into `model`."""
    sd = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else unwrap(checkpoint)
    meta = getattr(model, "mobilehv", None)
    if meta is None:
        raise CheckpointError("load_checkpoint needs a model made by mobilehv.create_model")
    target = model.state_dict()
    converters = get_spec(meta.name).family.converters
    candidates = [("mobilehv", sd)] + [(c.source, c.convert(dict(sd), model))
                                        for c in converters if c.detect(sd)]
    problems = []
    for source, mapped in candidates:
        problem = _mismatch(mapped, target)
        if problem is None:
            model.load_state_dict({k: v.reshape(target[k].shape).to(target[k].dtype)
                                   for k, v in mapped.items()})
            return model
        problems.append((source, problem))
    source, problem = problems[-1]  # the most specific reading of the checkpoint
    fmt = f" read as {source} format" if source != "mobilehv" else ""
    raise CheckpointError(f"checkpoint does not fit {meta.name} ({meta.layout} layout){fmt}: {problem}")

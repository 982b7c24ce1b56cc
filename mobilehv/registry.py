"""Model registry: names -> builders, plus the facts `mobilehv list`/`info` report.

First stage of the data flow (registry -> model -> fold -> export -> profile): it imports
no later stage. Families register themselves when `mobilehv.models` is imported.
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

LAYOUTS = ("nchw", "tokens")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ResolutionError(ValueError):
    """An input size the architecture cannot take; the message states the rule."""


@dataclass(frozen=True)
class Converter:
    """Maps one source checkpoint format (timm, official code) onto mobilehv keys.

    `detect(sd)` says whether a state dict is in this format; `convert(sd, model)` renames
    (and, where the source stores something differently, transforms) entries so they match
    `model.state_dict()` up to singleton dimensions (Linear <-> Conv1x1 is handled generically).
    """

    source: str
    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    convert: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class InputRule:
    """Which input sizes an architecture takes: multiples of `multiple`, at least `minimum`,
    or exactly `fixed` (absolute position embeddings that are not interpolated)."""

    multiple: int = 32
    minimum: int = 32
    fixed: int | None = None

    def check(self, height: int, width: int, name: str = "model") -> None:
        if self.fixed is not None:
            if (height, width) != (self.fixed, self.fixed):
                raise ResolutionError(
                    f"{name} takes only {self.fixed}x{self.fixed} inputs (its position-embedding "
                    f"or attention-bias tables are built for that size), got {height}x{width}")
            return
        if height % self.multiple or width % self.multiple or min(height, width) < self.minimum:
            raise ResolutionError(
                f"{name} cannot take a {height}x{width} input: height and width must be "
                f"multiples of {self.multiple} and at least {self.minimum}")


@dataclass(frozen=True)
class Family:
    name: str
    paper: str
    converters: tuple[Converter, ...] = ()
    layouts: tuple[str, ...] = LAYOUTS  # pure CNNs and PoolFormer: ("nchw",)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: Family
    builder: Callable[..., nn.Module]
    resolution: int
    input_rule: InputRule = field(default_factory=InputRule)
    # input normalisation the weights were trained with (exporters build it into the artifact)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def variant(self) -> str:
        return self.name.removeprefix(self.family.name + "_")


@dataclass(frozen=True)
class ModelMeta:
    """Attached to every created model as `model.mobilehv`; later stages read it."""

    name: str
    family: str
    layout: str
    resolution: int
    input_rule: InputRule
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(family: Family, resolution: int, input_rule: InputRule | None = None,
                   mean: tuple[float, float, float] = IMAGENET_MEAN,
                   std: tuple[float, float, float] = IMAGENET_STD):
    """Decorator for a builder `fn(layout, num_classes) -> nn.Module` named after the variant."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model {fn.__name__} registered twice")
        _REGISTRY[fn.__name__] = ModelSpec(fn.__name__, family, fn, resolution,
                                          input_rule or InputRule(), tuple(mean), tuple(std))
        return fn

    return deco


def _ensure_loaded() -> None:
    import mobilehv.models  # noqa: F401  (registers every family)


def list_models(pattern: str = "*") -> list[str]:
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_spec(name: str) -> ModelSpec:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else "; see `mobilehv list`"
        raise UnknownModelError(f"unknown model {name!r}{hint}") from None


def create_model(name: str, *, layout: str = "nchw", pretrained: Any = None,
                 num_classes: int = 1000) -> nn.Module:
    """Build a registered model in `layout`; `pretrained` is a checkpoint path or state dict."""
    spec = get_spec(name)
    if layout not in spec.family.layouts:
        raise ValueError(f"{name} has layouts {', '.join(spec.family.layouts)}; got {layout!r}")
    model = spec.builder(layout=layout, num_classes=num_classes)
    model.mobilehv = ModelMeta(name, spec.family.name, layout, spec.resolution, spec.input_rule,
                               spec.mean, spec.std)
    # Refuse sizes the architecture cannot take with the rule, not a shape error deep inside.
    model.register_forward_pre_hook(functools.partial(_check_input, spec.input_rule, name))
    if pretrained is not None:
        from mobilehv.checkpoints import load_checkpoint  # same stage (model), imported lazily

        load_checkpoint(model, pretrained)
    return model.eval()


def _check_input(rule: InputRule, name: str, module: nn.Module, args: tuple) -> None:
    rule.check(int(args[0].shape[-2]), int(args[0].shape[-1]), name)


def count_macs(model: nn.Module, resolution: int, batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass (convolutions and matmuls, as papers count)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, 3, resolution, resolution, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter:  # not under no_grad: the counter fails on views of parameters made there
        model(x)
    return counter.get_total_flops() // 2


def smallest_per_family() -> list[str]:
    """The variant with the fewest parameters of every family, sorted by name."""
    smallest: dict[str, str] = {}
    for name in sorted(list_models(), key=lambda n: (model_info(n)["params"], n)):
        smallest.setdefault(get_spec(name).family.name, name)
    return sorted(smallest.values())


@functools.lru_cache(maxsize=None)
def model_info(name: str) -> dict:
    """Facts about a registered model; built on the meta device, so nothing is allocated."""
    spec = get_spec(name)
    with torch.device("meta"):
        model = spec.builder(layout=spec.family.layouts[0], num_classes=1000).eval()
        macs = count_macs(model, spec.resolution)
    return {
        "name": name,
        "family": spec.family.name,
        "variant": spec.variant,
        "resolution": spec.resolution,
        "params": sum(p.numel() for p in model.parameters()),
        "macs": macs,
        "layouts": list(spec.family.layouts),
        "input_rule": {"multiple": spec.input_rule.multiple, "minimum": spec.input_rule.minimum,
                       "fixed": spec.input_rule.fixed},
        "checkpoint_formats": [c.source for c in spec.family.converters],
        "mean": list(spec.mean),
        "std": list(spec.std),
        "paper": spec.family.paper,
    }

"""Core ML on macOS: measured predict latency plus per-op cost from Core ML's compute plan.

Core ML exposes no per-op timings. `MLComputePlan` gives each ML Program op an *estimated*
relative cost (`weight`, a fraction of the whole prediction); the runner multiplies it by the
measured median predict latency and labels the records `measure = "estimated"`. Module
attribution: the MIL ops keep the torch.export node names they came from (with suffixes such as
`_cast_fp16`), which are looked up in the `nn_module_stack` of the same model's torch.export
graph (rebuilt from the sidecar: model, layout, resolution).
Prediction and compute plans exist only on macOS; elsewhere `run` raises `NeedsMacOS`.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from mobilehv.profile.attribution import Scope
from mobilehv.profile.records import OpRecord, RunResult

METHOD = ("Core ML: measured predict latency; per-op cost ESTIMATED from MLComputePlan "
          "(relative cost x measured median)")


class NeedsMacOS(RuntimeError):
    pass


class ArtifactError(ValueError):
    """The file is not a usable Core ML model for profiling."""


def check_available() -> None:
    if platform.system() != "Darwin":
        raise NeedsMacOS(f"the coreml runtime needs macOS (Core ML prediction and compute plans "
                         f"exist only there); this machine runs {platform.system()}")


def _fx_scopes(name: str, layout: str, resolution: int) -> dict[str, tuple[Scope, ...]]:
    import torch

    import mobilehv

    model = mobilehv.fold(mobilehv.create_model(name, layout=layout))
    program = torch.export.export(model, (torch.zeros(1, 3, resolution, resolution),))
    out = {}
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            chain = [Scope("", f"{type(model).__module__}.{type(model).__qualname__}")]
            for path, cls in stack.values():
                path = path.removeprefix("L['self'].").removeprefix("L__self__.")
                qual = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
                if path and path != "L['self']":
                    chain.append(Scope(path, qual))
            out[node.name] = tuple(chain)
    return out


def run(path: str | Path, *, name: str, layout: str, threads: int = 1, warmup: int = 5,
        repeats: int = 20) -> RunResult:
    check_available()
    import coremltools as ct
    from coremltools.models.compute_plan import MLComputePlan

    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    spec_input = model.get_spec().description.input[0]
    resolution = int(info.get("resolution") or spec_input.type.imageType.width
                     or spec_input.type.multiArrayType.shape[-1])
    if spec_input.type.WhichOneof("Type") == "imageType":
        from PIL import Image

        feed = {spec_input.name: Image.fromarray(
            np.random.default_rng(0).integers(0, 255, (resolution, resolution, 3), dtype=np.uint8))}
    else:
        feed = {spec_input.name: np.random.default_rng(0).standard_normal(
            (1, 3, resolution, resolution)).astype(np.float32)}
    for _ in range(warmup):
        model.predict(feed)
    e2e = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        model.predict(feed)
        e2e.append((time.perf_counter_ns() - start) / 1e6)
    median_us = float(np.median(e2e)) * 1e3

    plan = MLComputePlan.load_from_path(path=model.get_compiled_model_path(),
                                        compute_units=ct.ComputeUnit.CPU_ONLY)
    scopes_by_node = _fx_scopes(info.get("model", name), info.get("layout", layout), resolution)
    names = sorted(scopes_by_node, key=len, reverse=True)
    ops = []
    for op in plan.model_structure.program.functions["main"].block.operations:
        cost = plan.get_estimated_cost_for_mlprogram_operation(op)
        if cost is None or op.operator_name == "const":
            continue
        out = op.outputs[0].name if op.outputs else op.operator_name
        node = next((n for n in names if out == n or out.startswith(n + "_")), None)
        ops.append(OpRecord(out, op.operator_name, scopes_by_node.get(node, ()), "",
                            [cost.weight * median_us], measure="estimated"))
    return RunResult(name, "coreml", layout, resolution, ops, e2e, METHOD, artifact=path.name,
                     extra={"clock": "wall"})

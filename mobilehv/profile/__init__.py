"""Per-op latency profiling and EfficientFormer-style breakdowns (`mobilehv profile`).

`profile(names, runtime=..., layout=...) -> ProfileResult` runs one runner per runtime
(`torch`, `onnxruntime`, `tflite`, `coreml`; modules of this package) on the deploy form or its
exported artifact, sorts every op into the latency categories of DESIGN.md (`attribution`),
and writes `latency_tables/<machine>/...` (`tables`, `figures`). Heavy imports (pandas,
runtimes, matplotlib) happen inside the functions that need them.
"""
from __future__ import annotations

import importlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

RUNTIMES = ("onnxruntime", "tflite", "torch", "coreml")
LAYOUT_CHOICES = ("nchw", "tokens", "both")
DEVICES = ("cpu",)
# The EfficientFormer latency study set (issue 6); models not registered yet are skipped.
DEFAULT_MODELS = ("mobilenetv2_140", "efficientnet_b0", "deit_small", "levit_256", "poolformer_s24",
                  "efficientformer_l1", "mobilevit_xs", "mobile_former_294m")
DEFAULT_RUNTIMES = ("onnxruntime", "tflite")  # the study's: a server/desktop and a phone runtime
_TARGET = {"onnxruntime": "onnx", "tflite": "tflite", "coreml": "coreml"}
_SUFFIX = {".onnx": "onnxruntime", ".tflite": "tflite", ".mlpackage": "coreml", ".mlmodel": "coreml"}
_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "tflite": ("ai_edge_litert", "flatbuffers"),
             "torch": ("torch",), "coreml": ("coremltools",)}
_PIP = {"onnxruntime": "onnxruntime", "onnx": "onnx", "ai_edge_litert": "ai-edge-litert",
        "flatbuffers": "flatbuffers", "coremltools": "coremltools", "torch": "torch",
        "litert_torch": "litert-torch"}


class ProfileError(ValueError):
    """Bad profiling input (runtime, device, model, layout, artifact); nothing was written."""


@dataclass
class ProfileResult:
    """`ops`: one row per op of every profiled (model, runtime, layout); `summary`: one row per
    (model, runtime, layout) with e2e latency, the sum of ops and each category's ms and %."""

    ops: Any
    summary: Any
    machine: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class _Job:
    model: str
    runtime: str
    layout: str
    resolution: int | None
    artifact: Path | None = None


def _check_installed(runtime: str, exporting: bool) -> None:
    if runtime == "coreml":
        from mobilehv.profile.coreml import NeedsMacOS, check_available

        try:
            check_available()
        except NeedsMacOS as e:
            raise ProfileError(str(e)) from None
    needed = _PACKAGES[runtime] + (("litert_torch",) if runtime == "tflite" and exporting else ())
    for module in needed:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ProfileError(f"runtime {runtime} is not installed: cannot import {module} "
                               f"(pip install {_PIP[module]})") from None


def _runtimes(runtime: str | Iterable[str] | None) -> list[str]:
    wanted = [runtime] if isinstance(runtime, str) or runtime is None else list(runtime)
    out = []
    for r in wanted:
        r = getattr(r, "value", r)
        if r == "all":
            out += [x for x in RUNTIMES if x != "coreml" or platform.system() == "Darwin"]
        elif r in RUNTIMES:
            out.append(r)
        else:
            raise ProfileError(f"unknown runtime {r!r}; accepted: {', '.join(RUNTIMES)}, all")
    return list(dict.fromkeys(out))


def _artifact_job(artifact: Path, runtime: str | None, layout: str, resolution: int | None) -> _Job:
    if not artifact.exists():
        raise ProfileError(f"artifact {artifact} does not exist (expected a .onnx, .tflite or .mlpackage)")
    kind = _SUFFIX.get(artifact.suffix.lower())
    if kind is None:
        raise ProfileError(f"artifact {artifact.name}: unknown kind {artifact.suffix!r}; accepted: "
                           f"{', '.join(_SUFFIX)}")
    if runtime not in (None, "all", kind):
        raise ProfileError(f"artifact {artifact.name} is a {artifact.suffix} file, which runs on "
                           f"{kind}, not {runtime}")
    sidecar = artifact.with_name(artifact.name + ".json")
    info = {}
    if sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text())
        except ValueError:
            raise ProfileError(f"sidecar {sidecar.name} is not valid JSON") from None
    model = info.get("model") or artifact.stem
    return _Job(model, kind, info.get("layout", layout), info.get("resolution", resolution), artifact)


def _model_jobs(names: list[str] | None, runtimes: list[str], layout: str,
                resolution: int | None) -> list[_Job]:
    from mobilehv.registry import ResolutionError, UnknownModelError, get_spec, list_models

    if not names:
        names = [n for n in DEFAULT_MODELS if n in set(list_models())]
        if not names:
            raise ProfileError(f"none of the default models ({', '.join(DEFAULT_MODELS)}) is registered; "
                               "name the models to profile")
    jobs = []
    for name in names:
        try:
            spec = get_spec(name)
        except UnknownModelError as e:
            raise ProfileError(str(e)) from None
        layouts = list(spec.family.layouts) if layout == "both" else [layout]
        if layout not in LAYOUT_CHOICES:
            raise ProfileError(f"unknown layout {layout!r}; accepted: {', '.join(LAYOUT_CHOICES)}")
        if layout != "both" and layout not in spec.family.layouts:
            raise ProfileError(f"{name} has layouts {', '.join(spec.family.layouts)}; got {layout!r}")
        res = int(resolution or spec.resolution)
        try:
            spec.input_rule.check(res, res, name)
        except ResolutionError as e:
            raise ProfileError(str(e)) from None
        jobs += [_Job(name, r, lay, res) for lay in layouts for r in runtimes]
    return jobs


def _run_job(job: _Job, *, threads: int, warmup: int, repeats: int, export_dir: Path):
    if job.runtime == "torch":
        from mobilehv.profile import torch as runner

        return runner.run(job.model, layout=job.layout, resolution=job.resolution,
                          threads=threads, warmup=warmup, repeats=repeats)
    runner = importlib.import_module(f"mobilehv.profile.{job.runtime}")
    path = job.artifact
    if path is None:
        from mobilehv.export import ExportError, ExportFailed, export

        try:
            path = export(job.model, _TARGET[job.runtime], export_dir, resolution=job.resolution,
                          layout=job.layout, precision="fp32", verify=True, cache=True).path
        except (ExportError, ExportFailed) as e:
            raise ProfileError(str(e)) from None
    try:
        return runner.run(path, name=job.model, layout=job.layout, threads=threads,
                          warmup=warmup, repeats=repeats)
    except runner.ArtifactError as e:
        raise ProfileError(str(e)) from None


def profile(names: str | Iterable[str] | None = None, *, runtime: str | Iterable[str] | None = None,
            device: str = "cpu", threads: int = 1, warmup: int = 5, repeats: int = 20,
            resolution: int | None = None, layout: str = "both", artifact: str | Path | None = None,
            out: str | Path | None = "latency_tables", export_dir: str | Path = "export",
            progress: Callable[[int, int, str], None] | None = None) -> ProfileResult:
    """Profile registered models (or one exported `artifact`) on `runtime` ("onnxruntime",
    "tflite", "torch", "coreml", "all"; default onnxruntime and tflite); `layout="both"` (the
    default) profiles every layout the family has. Without names: the study set DEFAULT_MODELS.

    Artifacts are exported to (and reused from) `export_dir`. Tables and the figure go to
    `out/<machine>/` (nothing is written when `out` is None). Bad input raises ProfileError
    before anything runs; a failure anywhere leaves no file behind.
    """
    import pandas as pd

    from mobilehv.profile import machine, records

    device = getattr(device, "value", device)
    layout = getattr(layout, "value", layout)
    if device not in DEVICES:
        raise ProfileError(f"unknown device {device!r}; accepted: {', '.join(DEVICES)}")
    if layout not in LAYOUT_CHOICES:
        raise ProfileError(f"unknown layout {layout!r}; accepted: {', '.join(LAYOUT_CHOICES)}")
    if threads < 1 or warmup < 0 or repeats < 1:
        raise ProfileError(f"need threads >= 1, warmup >= 0, repeats >= 1; got {threads}, {warmup}, {repeats}")
    names = [names] if isinstance(names, str) else list(names or [])
    if artifact is not None:
        if names:
            raise ProfileError("give model names or --artifact, not both")
        asked = [] if runtime is None else [runtime] if isinstance(runtime, str) else list(runtime)
        # "all" with an artifact means: whichever runtime runs it
        runtimes = _runtimes([r for r in asked if getattr(r, "value", r) != "all"]) if asked else []
        if len(runtimes) > 1:
            raise ProfileError(f"an artifact runs on one runtime; got {', '.join(runtimes)}")
        jobs = [_artifact_job(Path(artifact), runtimes[0] if runtimes else None,
                              "nchw" if layout == "both" else layout, resolution)]
    else:
        jobs = _model_jobs(names, _runtimes(runtime or DEFAULT_RUNTIMES), layout, resolution)
    for rt in dict.fromkeys(j.runtime for j in jobs):
        _check_installed(rt, exporting=artifact is None)

    slug = machine.slug(threads)
    frames, rows = [], []
    for i, job in enumerate(jobs):
        if progress:
            progress(i, len(jobs), f"{job.model} {job.runtime} {job.layout}")
        run = _run_job(job, threads=threads, warmup=warmup, repeats=repeats,
                       export_dir=Path(export_dir))
        ops = records.ops_frame(run)
        frames.append(ops)
        rows.append(records.summary_row(run, ops, machine=slug, threads=threads, warmup=warmup,
                                        repeats=repeats))
    if progress:
        progress(len(jobs), len(jobs), "done")
    summary = pd.DataFrame(rows).reindex(columns=records.summary_columns())
    result = ProfileResult(pd.concat(frames, ignore_index=True), summary, machine.facts(threads))
    if out is not None:
        result.files = write_tables(result, Path(out))
    return result


def write_tables(result: ProfileResult, out: Path) -> list[Path]:
    """Per-op CSVs, the merged summary.csv, machine.json and the breakdown figure, atomically."""
    from mobilehv.profile import figures, tables

    slug = result.machine["slug"]
    folder = Path(out) / slug
    writer = tables.AtomicWriter()
    try:
        for (model, runtime, layout), ops in result.ops.groupby(["model", "runtime", "layout"], sort=False):
            writer.csv(ops, tables.op_table_path(out, slug, runtime, model, layout))
        summary = tables.merged_summary(folder / "summary.csv", result.summary)
        writer.csv(summary, folder / "summary.csv")
        writer.json(result.machine, folder / "machine.json")
        fig = figures.breakdown_figure(summary, title=f"{result.machine['cpu']}, "
                                                      f"{result.machine['threads']} thread(s)")
        for suffix in ("png", "svg"):
            writer.figure(fig, folder / f"breakdown.{suffix}")
        import matplotlib.pyplot as plt

        plt.close(fig)
    except BaseException:
        writer.discard()
        raise
    return writer.commit()


__all__ = ["DEFAULT_MODELS", "DEFAULT_RUNTIMES", "RUNTIMES", "ProfileError", "ProfileResult", "profile", "write_tables"]

"""`mobilehv` command line: thin commands over the library functions."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

import mobilehv
from mobilehv.registry import UnknownModelError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Hybrid CNN/Transformer mobile backbones: models, export, latency breakdowns.")
console = Console()
err = Console(stderr=True)


class Layout(str, Enum):
    nchw = "nchw"
    tokens = "tokens"


def fail(message: str, code: int = 2) -> None:
    """One line on stderr saying what was wrong, then a non-zero exit."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command("list")
def list_cmd(pattern: str = typer.Argument("*", help="glob over model names, e.g. 'mobilevit*'"),
             as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
             markdown: bool = typer.Option(False, "--markdown", help="print a Markdown table (the README's zoo)")) -> None:
    """List the registered models with params, GMACs and default resolution."""
    infos = [mobilehv.model_info(n) for n in mobilehv.list_models(pattern)]
    if as_json:
        print(json.dumps(infos, indent=1))
        return
    if markdown:
        print("| model | family | params (M) | GMACs | resolution | layouts | paper |\n|---|---|--:|--:|--:|---|---|")
        for i in infos:
            print(f"| `{i['name']}` | {i['family']} | {i['params'] / 1e6:.2f} | {i['macs'] / 1e9:.2f} | "
                  f"{i['resolution']} | {', '.join(i['layouts'])} | {i['paper']} |")
        return
    table = Table(title=f"mobilehv models ({len(infos)})")
    for col, justify in (("name", "left"), ("family", "left"), ("params (M)", "right"),
                         ("GMACs", "right"), ("resolution", "right"), ("layouts", "left")):
        table.add_column(col, justify=justify, no_wrap=col == "name")
    for i in infos:
        table.add_row(i["name"], i["family"], f"{i['params'] / 1e6:.2f}", f"{i['macs'] / 1e9:.2f}",
                      str(i["resolution"]), ",".join(i["layouts"]))
    console.print(table)


@app.command()
def info(name: str = typer.Argument(..., help="a registered model name"),
         as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """Params, MACs and data movement (ops, elements) of the deploy form, for each layout."""
    from mobilehv.graph import data_movement_count, graph_inventory

    try:
        facts = dict(mobilehv.model_info(name))
    except UnknownModelError as e:
        fail(str(e))
    facts["data_movement_ops"], facts["data_movement_elements"], facts["graph_ops"] = {}, {}, {}
    for layout in facts["layouts"]:
        deploy = mobilehv.fold(mobilehv.create_model(name, layout=layout))
        ops, moved = graph_inventory(deploy, facts["resolution"])
        facts["data_movement_ops"][layout] = data_movement_count(ops)
        facts["data_movement_elements"][layout] = moved
        facts["graph_ops"][layout] = sum(ops.values())
    if as_json:
        print(json.dumps(facts, indent=1))
        return
    table = Table(title=f"{name} ({facts['family']}, {facts['paper']})", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("params", f"{facts['params']:,}")
    table.add_row("MACs", f"{facts['macs'] / 1e9:.3f} G at {facts['resolution']}x{facts['resolution']}")
    rule = facts["input_rule"]
    table.add_row("input sizes", f"{rule['fixed']} only" if rule["fixed"] else
                  f"multiples of {rule['multiple']}, >= {rule['minimum']}")
    table.add_row("checkpoint formats", ", ".join(facts["checkpoint_formats"]) or "mobilehv")
    for layout in facts["layouts"]:
        table.add_row(f"data-movement ops ({layout})", f"{facts['data_movement_ops'][layout]} of "
                      f"{facts['graph_ops'][layout]} ops in the torch.export graph, moving "
                      f"{facts['data_movement_elements'][layout]:,} elements")
    console.print(table)


# --- export command (issue 3) ---
class Target(str, Enum):
    coreml = "coreml"
    onnx = "onnx"
    tflite = "tflite"
    all = "all"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


@app.command("export")
def export_cmd(
    names: Optional[list[str]] = typer.Argument(None, help="registered model names (see `mobilehv list`)"),
    target: Target = typer.Option(Target.all, "--target", "-t", help="artifact format, or all three"),
    out: Path = typer.Option(Path("export"), "--out", help="output folder: OUT/<name>/<name>.<suffix> + .json sidecar"),
    resolution: Optional[int] = typer.Option(None, help="input height = width (default: the model's)"),
    batch: int = typer.Option(1, help="batch size of the artifact's input"),
    layout: Optional[Layout] = typer.Option(None, help="nchw (deploy form, default) or tokens (reference form)"),
    weights: Optional[Path] = typer.Option(None, help="checkpoint of the one model exported (default: seeded random init)"),
    precision: Optional[Precision] = typer.Option(None, help="default: fp16 for coreml, fp32 for onnx/tflite"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip the parity check against PyTorch"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Core ML class names, one per line (default: ImageNet-1k)"),
    no_labels: bool = typer.Option(False, "--no-labels", help="Core ML outputs raw logits, no class labels"),
    deployment_target: str = typer.Option("iOS16", "--deployment-target", help="Core ML minimum deployment target (iOS16, iOS17, macOS13, ...)"),
    all_models: bool = typer.Option(False, "--all", help="export every registered model"),
    cache: bool = typer.Option(False, "--cache", help="reuse artifacts whose sidecar has the same model, options, weights and versions"),
) -> None:
    """Export verified Core ML / ONNX / TFLite artifacts of the deploy form, with sidecar JSON."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mobilehv.checkpoints import CheckpointError
    from mobilehv.export import TARGETS, ExportError, ExportFailed, check_options, export
    from mobilehv.export._common import quiet_native_output
    from mobilehv.registry import ResolutionError, get_spec

    if bool(names) == all_models:
        fail("give one or more model names, or --all (not both)")
    if labels is not None and no_labels:
        fail("--labels and --no-labels exclude each other")
    if all_models:
        names = [n for n in mobilehv.list_models()
                 if layout is None or layout.value in get_spec(n).family.layouts]
    if weights is not None and len(names) > 1:
        fail(f"--weights is the checkpoint of one model; got {len(names)} models")
    targets = list(TARGETS) if target is Target.all else [target.value]
    options = dict(resolution=resolution, batch=batch, layout=layout.value if layout else None,
                   weights=weights, precision=precision.value if precision else None,
                   labels=False if no_labels else labels, deployment_target=deployment_target)
    bad_input = (ExportError, ResolutionError, UnknownModelError, CheckpointError)
    jobs = [(n, t) for n in names for t in targets]
    try:  # every job's options are checked before the first artifact is written
        with quiet_native_output():  # importing coremltools chats on stderr
            for n, t in jobs:
                check_options(n, t, out, **options)
    except bad_input as e:
        fail(str(e))
    results, failures = [], []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True)
    with progress:
        task = progress.add_task("exporting", total=len(jobs))
        for n, t in jobs:
            progress.update(task, description=f"{n} -> {t}")
            try:
                with quiet_native_output():
                    results.append(export(n, t, out, verify=not no_verify, cache=cache, **options))
            except ExportFailed as e:
                results.append(e.result)
                failures.append(str(e))
            except bad_input as e:  # e.g. a checkpoint for another architecture: nothing written
                fail(f"{n}: {e}")
            progress.advance(task)
    table = Table(title=f"mobilehv export -> {out}")
    for col, justify in (("model", "left"), ("target", "left"), ("status", "left"), ("size MB", "right"),
                         ("max error", "right"), ("seconds", "right")):
        table.add_column(col, justify=justify)
    for r in results:
        status = "[red]failed[/]" if r.errors else ("cached" if r.cached else "[green]ok[/]")
        if r.max_error is not None:
            error = f"{r.max_error:.1e}"
        else:
            error = "-" if r.errors else ("n/a (macOS)" if r.target == "coreml" and not no_verify else "not run")
        size = f"{r.size_bytes / 1e6:.2f}" if r.size_bytes else "-"
        table.add_row(r.model, r.target, status, size, error, f"{r.seconds:.1f}")
    console.print(table)
    for note in dict.fromkeys(f"{r.model} {r.target}: {n}" for r in results for n in r.notes):
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    for message in failures:
        err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if failures:
        raise typer.Exit(1)


# --- profile command (issue 4) ---
class Runtime(str, Enum):
    onnxruntime = "onnxruntime"
    tflite = "tflite"
    torch = "torch"
    coreml = "coreml"
    all = "all"


class ProfileLayout(str, Enum):
    nchw = "nchw"
    tokens = "tokens"
    both = "both"


class Device(str, Enum):
    cpu = "cpu"


@app.command("profile")
def profile_cmd(
    names: Optional[list[str]] = typer.Argument(None, help="registered model names (default: the EfficientFormer study set)"),
    device: Device = typer.Option(Device.cpu, help="where to run (cpu)"),
    runtime: Optional[list[Runtime]] = typer.Option(None, help="repeatable; default onnxruntime and tflite; with --artifact, the artifact's runtime"),
    threads: int = typer.Option(1, help="intra-op threads of every runtime"),
    warmup: int = typer.Option(5, help="untimed runs before timing"),
    repeats: int = typer.Option(20, help="timed runs; per-op and e2e figures are medians over them"),
    resolution: Optional[int] = typer.Option(None, help="input height = width (default: the model's)"),
    layout: ProfileLayout = typer.Option(ProfileLayout.both, help="nchw, tokens, or both side by side (an artifact has its own)"),
    artifact: Optional[Path] = typer.Option(None, help="profile this .onnx / .tflite / .mlpackage instead of a model"),
    out: Path = typer.Option(Path("latency_tables"), help="tables go to OUT/<machine>/"),
    export_dir: Path = typer.Option(Path("export"), "--export-dir", help="where artifacts are exported to and reused from"),
) -> None:
    """Per-op latency breakdown (EfficientFormer categories) -> latency_tables/<machine>/."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mobilehv.export._common import quiet_native_output
    from mobilehv.profile import ProfileError, profile
    from mobilehv.taxonomy import CATEGORIES

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True)
    with progress:
        task = progress.add_task("profiling", total=None)

        def step(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, total=total, description=label)

        try:
            with quiet_native_output():
                result = profile(names, runtime=[r.value for r in runtime] if runtime else None, device=device.value,
                                 threads=threads, warmup=warmup, repeats=repeats, resolution=resolution,
                                 layout=layout.value, artifact=artifact, out=out, export_dir=export_dir,
                                 progress=step)
        except ProfileError as e:
            fail(str(e))
    table = Table(title=f"mobilehv profile ({result.machine['slug']}) -> {out}")
    for col, justify in (("model", "left"), ("runtime", "left"), ("layout", "left"), ("e2e median ms", "right"),
                         ("sum of ops ms", "right"), ("top categories", "left")):
        table.add_column(col, justify=justify, no_wrap=col in ("model", "runtime", "layout"))
    for _, row in result.summary.iterrows():
        top = sorted(CATEGORIES, key=lambda c: -row[f"{c}_pct"])[:3]
        table.add_row(row["model"], row["runtime"], row["layout"], f"{row['e2e_median_ms']:.2f}",
                      f"{row['ops_sum_ms']:.2f}", ", ".join(f"{c} {row[f'{c}_pct']:.0f}%" for c in top))
    console.print(table)

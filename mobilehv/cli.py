"""`mobilehv` command line: thin commands over the library functions."""
from __future__ import annotations

import json
from enum import Enum

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
             as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """List the registered models with params, GMACs and default resolution."""
    infos = [mobilehv.model_info(n) for n in mobilehv.list_models(pattern)]
    if as_json:
        print(json.dumps(infos, indent=1))
        return
    table = Table(title=f"mobilehv models ({len(infos)})")
    for col, justify in (("name", "left"), ("family", "left"), ("params (M)", "right"),
                         ("GMACs", "right"), ("resolution", "right"), ("layouts", "left")):
        table.add_column(col, justify=justify)
    for i in infos:
        table.add_row(i["name"], i["family"], f"{i['params'] / 1e6:.2f}", f"{i['macs'] / 1e9:.2f}",
                      str(i["resolution"]), ",".join(i["layouts"]))
    console.print(table)


@app.command()
def info(name: str = typer.Argument(..., help="a registered model name"),
         as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """Params, MACs and data-movement ops of the deploy form, for each layout."""
    from mobilehv.graph import data_movement_count, export_graph_ops

    try:
        facts = dict(mobilehv.model_info(name))
    except UnknownModelError as e:
        fail(str(e))
    facts["data_movement_ops"], facts["graph_ops"] = {}, {}
    for layout in facts["layouts"]:
        deploy = mobilehv.fold(mobilehv.create_model(name, layout=layout))
        ops = export_graph_ops(deploy, facts["resolution"])
        facts["data_movement_ops"][layout] = data_movement_count(ops)
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
                      f"{facts['graph_ops'][layout]} ops in the torch.export graph")
    console.print(table)


# --- export command (issue 3) ---

# --- profile command (issue 4) ---

"""`corral nodes list`: the machines whose engines run sandboxes (admin key)."""

from __future__ import annotations

import json

import typer
from rich.table import Column, Table

from corral.cli._common import ApiKey, Json, Url, app, out, session

nodes_app = typer.Typer(help="The machines that run sandboxes.", no_args_is_help=True)
app.add_typer(nodes_app, name="nodes")


@nodes_app.command("list")
def nodes_list(url: Url = None, api_key: ApiKey = None, as_json: Json = False) -> None:
    """Each node: its runtimes, sandboxes, what they ask of its capacity, load and pools."""
    with session(url, api_key) as sdk:
        nodes = sdk.nodes()
    if as_json:
        print(json.dumps([node.to_dict() for node in nodes]))
        return
    table = Table(Column("name", no_wrap=True), "state", "runtimes", "sandboxes", "cpu")
    for column in ("memory", "disk", "load", "pools"):
        table.add_column(column)
    for node in nodes:
        used, room = node.allocated, node.capacity
        table.add_row(
            node.name,
            node.state,
            ", ".join(node.runtimes),
            f"{node.sandboxes}/{node.max_sandboxes}",
            f"{used['cpu']:g}/{room['cpu']:g}",
            f"{used['memory_mb'] / 1024:.1f}/{room['memory_mb'] / 1024:.0f} GiB",
            f"{used['disk_mb'] / 1024:.1f}/{room['disk_mb'] / 1024:.0f} GiB",
            f"{node.load:.2f}",
            ", ".join(f"{p['name']} {p['idle']}/{p['size']}" for p in node.pools) or "-",
        )
    out.print(table)

"""`corral nodes list` and `drain`: the machines whose engines run sandboxes (admin key)."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.table import Column, Table

from corral.cli._common import ApiKey, Json, Url, app, out, session
from corral.core.models import NodeInfo

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


@nodes_app.command("drain")
def nodes_drain(
    name: Annotated[str, typer.Argument(help="The node, as `corral nodes list` names it.")],
    undo: Annotated[bool, typer.Option("--undo", help="Place sandboxes on it again.")] = False,
    wait: Annotated[
        float, typer.Option("--wait", help="Wait this many seconds for its sandboxes to end.")
    ] = 0.0,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Place no new sandboxes on a cluster's node; its sandboxes run on until they end
    (`--wait` waits for that, and fails if some still run then)."""
    with session(url, api_key) as sdk:
        node = sdk.drain_node(name, draining=not undo)
        deadline = time.monotonic() + wait
        while not undo and _in_use(node) and time.monotonic() < deadline:
            time.sleep(1)
            node = next(n for n in sdk.nodes() if n.name == name)
    out.print(f"{node.name}: {node.state}, {_in_use(node)} sandboxes in use")
    if not undo and wait and _in_use(node):
        raise typer.Exit(1)  # still running some when the wait ran out


def _in_use(node: NodeInfo) -> int:
    """The node's sandboxes but the idle ones of its pools."""
    return node.sandboxes - sum(int(pool["idle"]) for pool in node.pools)

"""`corral top`: your live sandboxes and what each uses, refreshed like top(1)."""

from __future__ import annotations

import json
import time
from typing import Any

import typer
from rich.live import Live
from rich.table import Table

from corral.cli._common import ApiKey, Json, Url, app, out, session
from corral.core.models import UsageSample


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table("sandbox", "state", "runtime", "cpu %", "memory", "procs", "disk", "net in",
                  "net out", title=f"{len(rows)} sandboxes")  # fmt: skip
    ordered = sorted(rows, key=lambda r: -(r["sample"].cpu_percent if r["sample"] else 0))
    for row in ordered:
        sample: UsageSample | None = row["sample"]
        figures = (
            [f"{sample.cpu_percent:.1f}", _size(sample.memory_bytes), str(sample.processes),
             _size(sample.disk_bytes), _size(sample.net_rx_bytes), _size(sample.net_tx_bytes)]
            if sample is not None else ["-"] * 6
        )  # fmt: skip
        table.add_row(row["sandbox_id"], row["state"], row["runtime"], *figures)
    return table


@app.command()
def top(
    interval: float = typer.Option(2.0, help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print the table once and exit."),
    url: Url = None,
    api_key: ApiKey = None,
    as_json: Json = False,
) -> None:
    """Your live sandboxes with their CPU, memory, processes, disk and network, busiest first,
    refreshed every few seconds (Ctrl-C ends it); figures are sampled every 5 s."""
    with session(url, api_key) as sdk:
        if once or as_json:
            rows = sdk.sandbox_usage()
            if as_json:
                shown = [{**r, "sample": r["sample"] and r["sample"].to_dict()} for r in rows]
                print(json.dumps(shown))
            else:
                out.print(_table(rows))
            return
        with Live(_table(sdk.sandbox_usage()), console=out, screen=False) as live:
            try:
                while True:
                    time.sleep(max(0.2, interval))
                    live.update(_table(sdk.sandbox_usage()))
            except KeyboardInterrupt:
                pass

"""The sandbox spec as command-line options: each takes its default and help from the field's
one definition (`corral.core.spec.SPEC_FIELDS`); tests/unit/test_spec_fields.py checks that
`corral sandbox create` offers every field."""

from __future__ import annotations

from typing import Annotated

import typer

from corral.client import Network as Rules
from corral.core.spec import DEFAULT_SPEC as D
from corral.core.spec import FIELD


def _help(name: str) -> str:
    text = FIELD[name].description
    return text[0].upper() + text[1:] + "."


Image = Annotated[str | None, typer.Option(help=_help("image"))]
Runtime = Annotated[str | None, typer.Option(help=_help("runtime"))]
Cpu = Annotated[float, typer.Option(help=_help("cpu"))]
Memory = Annotated[int, typer.Option("--memory", help=_help("memory_mb"))]
Disk = Annotated[int, typer.Option("--disk", help=_help("disk_mb"))]
MaxProcesses = Annotated[int, typer.Option(help=_help("max_processes"))]
Timeout = Annotated[float, typer.Option(help=_help("timeout"))]
Network = Annotated[str, typer.Option(help=_help("network"))]
Allow = Annotated[
    list[str] | None,
    typer.Option(
        help="Egress rule: reach only these host names, *.wildcards and IPv4 CIDRs "
        "(repeatable; implies --network internet; see docs/network.md)."
    ),
]
Deny = Annotated[
    list[str] | None,
    typer.Option(help="Egress rule: never reach these (repeatable; implies --network internet)."),
]
Workdir = Annotated[str | None, typer.Option(help=_help("workdir"))]
AutoResume = Annotated[bool, typer.Option(help=_help("auto_resume"))]
IdleTimeout = Annotated[float | None, typer.Option(help=_help("idle_timeout"))]
OnIdle = Annotated[str, typer.Option(help=_help("on_idle"))]
KeepAlive = Annotated[bool, typer.Option(help=_help("keep_alive"))]
OnTimeout = Annotated[str, typer.Option(help=_help("on_timeout"))]
Pairs = Annotated[list[str] | None, typer.Option(help="KEY=VALUE; repeat for more.")]
NoPool = Annotated[bool, typer.Option("--no-pool", help="Start fresh, even if a pool matches.")]

# The defaults, from the same place.
IMAGE = None  # the server's default image
CPU = D.cpu
MEMORY = D.memory_mb
DISK = D.disk_mb
MAX_PROCESSES = D.max_processes
TIMEOUT = D.timeout
NETWORK: str = D.network
WORKDIR = D.workdir
AUTO_RESUME = D.auto_resume
IDLE_TIMEOUT = D.idle_timeout
ON_IDLE: str = D.on_idle
KEEP_ALIVE = D.keep_alive
ON_TIMEOUT: str = D.on_timeout


def network_of(network: str, allow: list[str] | None, deny: list[str] | None) -> str | Rules:
    """`--network`, or the egress rules `--allow` and `--deny` give (an internet sandbox)."""
    if allow is None and deny is None:
        return network
    if network == "none":
        network = "internet"
    if network != "internet":
        return network  # the server says what is wrong with it
    return Rules(allow=allow, deny=deny or ())

"""A node of a Ray cluster that a front joins (`corral serve --cluster auto|HOST:PORT|ray://…`):
how its Corral server is started there, and where the front finds it.

Run on the node itself, in its keeper actor (`corral.server.cluster.agent`). Every Ray node
that offers the resource ``corral_node`` runs one Corral node. It is named by
``CORRAL_NODE_NAME`` in the Ray node's environment (default: its host name), a name that must
stay the same across restarts since the store maps sandboxes to it; ``CORRAL_HOST_SCOPE``
gives it a host scope, for several nodes on one machine. Its server listens on the node's Ray
address, on a port free there, with TLS from a CA of its own (`--tls auto` in its data
directory, ``<CORRAL_NODE_DATA_DIR>/<name>``, by default under the front's data directory's
``nodes/``, at the same path on the node's machine); the CA's certificate travels back to the
front through Ray, and the front trusts it. No secret travels through Ray: the node finds the
store's URL and the key for data at rest in its own environment, and the front's key in the
store.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from corral.server import tls
from corral.server.config import NODE_NAME

RESOURCE = "corral_node"  # what a Ray node offers to run a Corral node
NAME_ENV = "CORRAL_NODE_NAME"
SCOPE_ENV = "CORRAL_HOST_SCOPE"
# What a node takes from its own environment, not through Ray: the store's URL (a password)
# and the path of the key for data at rest, as `corral serve` reads them.
STORE_ENV = "CORRAL_DATABASE_URL"
KEY_ENV = "CORRAL_AT_REST_KEY"
# Where the node keeps its data directory (`<it>/<name>`); default: the front's `nodes/`.
DATA_ENV = "CORRAL_NODE_DATA_DIR"


@dataclass(frozen=True)
class Joined:
    """Where the front finds a joined node's server, and the CA it trusts for it."""

    name: str
    url: str
    ca: str  # PEM
    scope: int | None

    def said(self) -> dict[str, Any]:
        return asdict(self)


def node_name() -> str:
    """This Ray node's Corral name, checked."""
    name = os.environ.get(NAME_ENV) or socket.gethostname().split(".")[0]
    if not NODE_NAME.fullmatch(name):
        raise ValueError(
            f"node name {name!r} is not 1 to 64 letters, digits, '.', '_' or '-': set "
            f"{NAME_ENV} in the Ray node's environment"
        )
    return name


def node_scope() -> int | None:
    text = os.environ.get(SCOPE_ENV, "")
    if not text:
        return None
    if not text.isdigit() or not 0 <= int(text) <= 15:
        raise ValueError(f"{SCOPE_ENV}={text!r} is not a host scope, 0 to 15")
    return int(text)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def node_server(settings: dict[str, Any]) -> tuple[list[str], Joined]:
    """The command that runs this node's Corral server, and where the front finds it.
    `settings`: ``host`` (the node's address in Ray), ``data_dir`` (where nodes keep their
    data directories) and ``args`` (what every node's `corral serve` is given)."""
    name, scope, host = node_name(), node_scope(), str(settings["host"])
    missing = [var for var in (STORE_ENV, KEY_ENV) if not os.environ.get(var)]
    if missing:  # a node on a store of its own would answer for none of the cluster's keys
        raise ValueError(
            f"set {' and '.join(missing)} in the Ray node's environment: the cluster's "
            "PostgreSQL URL and the path of its key for data at rest (docs/cluster.md)"
        )
    data = Path(os.environ.get(DATA_ENV) or settings["data_dir"]) / name
    data.mkdir(parents=True, exist_ok=True)
    files = tls.auto_files(data / "tls", host)  # the server finds and keeps them
    assert files.ca is not None
    port = _free_port(host)
    argv = [
        sys.executable, "-m", "corral", "serve", "--host", host, "--port", str(port),
        "--data-dir", str(data), "--node-name", name, "--tls", "auto", *settings["args"],
    ]  # fmt: skip
    if scope is not None:
        argv += ["--host-scope", str(scope)]
    shown = f"[{host}]" if ":" in host else host
    joined = Joined(name, f"https://{shown}:{port}", files.ca.read_text(), scope)
    return logged(argv, data / "server.log"), joined


def logged(argv: list[str], log: Path) -> list[str]:
    """`argv` with its output appended to `log`."""
    return ["sh", "-c", 'exec "$@" >>"$0" 2>&1', str(log), *argv]

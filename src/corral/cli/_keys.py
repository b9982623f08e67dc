"""`corral keys`: API keys, their quotas and default egress rules, on the server's machine
(its database, directly; a running server picks changes up within seconds)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.table import Table

from corral.cli import _spec as S
from corral.cli._common import DATABASE_URL_VAR, DataDir, Json, app, console, fail, out
from corral.core.egress import EgressPolicy
from corral.core.errors import CorralError, InvalidRequest
from corral.engine import default_data_dir
from corral.engine.snapshots import SnapshotStore

if TYPE_CHECKING:
    from corral.server.store import Store

T = TypeVar("T")

QuotaLimits = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="A limit, NAME=VALUE (cpu, memory_mb, disk_mb, volume_mb, snapshot_bytes, "
        "blob_bytes; VALUE 'none' for no limit); repeatable.",
    ),
]

keys_app = typer.Typer(help="Manage API keys (on the server's machine).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _with_store(data_dir: Path | None, action: Callable[[Store], Awaitable[T]]) -> T:
    from corral.server.config import ServerConfig
    from corral.server.store import Store

    async def go() -> T:
        url = os.environ.get(DATABASE_URL_VAR) or None  # a store shared with other servers
        config = ServerConfig(data_dir or default_data_dir(), database_url=url)
        store = await Store.open(config.database, config.key_ring())
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except CorralError as error:
        fail(error)


@keys_app.command("create")
def keys_create(
    name: str,
    admin: bool = typer.Option(False, help="May manage keys over the API."),
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """Make an API key; its secret is printed once."""
    key, secret = _with_store(data_dir, lambda store: store.create_key(name, admin=admin))
    if as_json:
        print(json.dumps({**key.to_dict(), "secret": secret}))
        return
    console.print(f"key {key.id} ({name}) created; its secret, shown once:")
    print(secret)


@keys_app.command("list")
def keys_list(data_dir: DataDir = None, as_json: Json = False) -> None:
    """Every API key (never their secrets)."""
    keys = _with_store(data_dir, lambda store: store.list_keys())
    if as_json:
        print(json.dumps([key.to_dict() for key in keys]))
        return
    table = Table("id", "name", "starts with", "admin", "created", "status")
    for key in keys:
        created = datetime.fromtimestamp(key.created_at, UTC).strftime("%Y-%m-%d %H:%M")
        status = "[green]active[/green]" if key.active else "[red]revoked[/red]"
        table.add_row(key.id, key.name, key.hint + "…", "yes" if key.admin else "", created, status)
    out.print(table)


@keys_app.command("quota")
def keys_quota(
    key: str = typer.Argument(help="Key id or name."),
    limit: QuotaLimits = None,
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """Show a key's quota and what it takes now; change limits with --set."""
    from corral.core.quota import Quota

    async def act(store: Store) -> dict[str, Any]:
        found = await store.find_key(key)
        quota = (await store.quotas()).get(found.id, Quota())
        if limit:
            changes = dict(_quota_item(item) for item in limit)
            quota = Quota.from_dict({**quota.to_dict(), **changes})
            await store.set_quota(found.id, quota)
        snapshots = _snapshot_bytes(data_dir, found.id)
        usage = await store.usage(found.id, snapshot_bytes=snapshots)
        return {"key_id": found.id, "quota": quota.to_dict(), "usage": usage.to_dict()}

    shown = _with_store(data_dir, act)
    if as_json:
        print(json.dumps(shown))
        return
    table = Table("of key " + shown["key_id"], "quota", "in use")
    for name, used in shown["usage"].items():
        limit_value = shown["quota"][name]
        table.add_row(name, "none" if limit_value is None else f"{limit_value:g}", f"{used:g}")
    out.print(table)


@keys_app.command("network")
def keys_network(
    key: str = typer.Argument(help="Key id or name."),
    allow: S.Allow = None,
    deny: S.Deny = None,
    clear: bool = typer.Option(False, "--clear", help="Drop the key's default rules."),
    data_dir: DataDir = None,
) -> None:
    """Show a key's default egress rules, which its internet sandboxes get when they give none;
    set them with --allow and --deny (see docs/network.md). A running server picks the change
    up within seconds."""

    async def act(store: Store) -> EgressPolicy | None:
        found = await store.find_key(key)
        if clear or allow is not None or deny is not None:
            rules = None if clear else EgressPolicy.parse({"allow": allow, "deny": deny or []})
            await store.key_networks.set(found.id, rules)
        return (await store.key_networks.all()).get(found.id)

    rules = _with_store(data_dir, act)
    out.print("none" if rules is None else json.dumps(rules.to_dict()), highlight=False)


def _quota_item(item: str) -> tuple[str, float | None]:
    name, _, value = item.partition("=")
    if value == "none":
        return name, None
    try:
        return name, float(value)
    except ValueError:
        raise InvalidRequest(
            f"--set {item!r}: give NAME=NUMBER or NAME=none, e.g. --set memory_mb=8192",
            code="invalid_quota",
        ) from None


def _snapshot_bytes(data_dir: Path | None, key_id: str) -> int:
    """The bytes of the key's snapshots, as the engine keeps them on this machine."""
    from corral.server.config import ServerConfig

    config = ServerConfig(data_dir or default_data_dir())
    root = config.data_dir / "snapshots"
    if not root.is_dir():
        return 0
    snapshots = SnapshotStore(root, config.key_ring())
    snapshots.load()
    return sum(s.info.size_bytes for s in snapshots.all() if s.info.owner == key_id)


@keys_app.command("revoke")
def keys_revoke(
    key: str = typer.Argument(help="Key id or name."), data_dir: DataDir = None
) -> None:
    """Revoke a key: it stops working at once, and the server ends its live sandboxes."""
    revoked = _with_store(data_dir, lambda store: store.revoke_key(key))
    console.print(f"revoked {revoked.id} ({revoked.name})")

"""`corral volume`: make, list and delete persistent volumes; `--volume` for sandboxes."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.table import Column, Table

from corral.cli._common import ApiKey, Json, Url, app, console, fail, out, session
from corral.client import Client, Volume
from corral.core.errors import InvalidRequest

volume_app = typer.Typer(help="Persistent volumes that outlive sandboxes.", no_args_is_help=True)
app.add_typer(volume_app, name="volume")

Volumes = Annotated[
    list[str] | None,
    typer.Option(
        "--volume",
        "-v",
        help="Mount a volume: NAME:/path, or NAME:/path:ro read-only; repeatable.",
    ),
]


def parse_volume(item: str) -> tuple[str, str, bool]:
    """`NAME:/path[:ro|:rw]` as (name, path, read_only)."""
    name, sep, path = item.partition(":")
    read_only = False
    for suffix, flag in ((":ro", True), (":rw", False)):
        if path.endswith(suffix):
            path, read_only = path[: -len(suffix)], flag
            break
    if not sep or not name or not path.startswith("/"):
        fail(InvalidRequest(f"--volume {item!r} must read NAME:/path or NAME:/path:ro"))
    return name, path, read_only


def volume_mounts(items: list[str] | None, sdk: Client) -> dict[str, Volume | str]:
    """The `volumes` argument of `Sandbox.create` for repeated `--volume` options."""
    mounts: dict[str, Volume | str] = {}
    for item in items or []:
        name, path, read_only = parse_volume(item)
        if path in mounts:
            fail(InvalidRequest(f"two volumes are mounted at {path}"))
        mounts[path] = Volume.from_name(name, client=sdk).read_only() if read_only else name
    return mounts


@volume_app.command("create")
def volume_create(
    name: str = typer.Argument(help="A name unique among your volumes."),
    size: int = typer.Option(1024, "--size", help="Size in MiB, which is the volume's quota."),
    url: Url = None,
    api_key: ApiKey = None,
    as_json: Json = False,
) -> None:
    """Make an empty volume and print its id."""
    with session(url, api_key) as sdk:
        volume = Volume.create(name, size_mb=size, client=sdk)
    if as_json:
        print(json.dumps(_as_dict(volume)))
    else:
        print(volume.id)


@volume_app.command("list")
def volume_list(url: Url = None, api_key: ApiKey = None, as_json: Json = False) -> None:
    """Your volumes: id, name, size, use, and the live sandboxes mounting them."""
    with session(url, api_key) as sdk:
        volumes = Volume.list(client=sdk)
    if as_json:
        print(json.dumps([_as_dict(v) for v in volumes]))
        return
    table = Table(Column("id", no_wrap=True), "name", "size", "used", "created", "mounted by")
    for volume in volumes:
        table.add_row(
            volume.id,
            volume.name,
            f"{volume.size_mb} MiB",
            f"{volume.used_bytes / 2**20:.1f} MiB",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(volume.created_at)),
            " ".join(volume.sandboxes),
        )
    out.print(table)


@volume_app.command("rm")
def volume_rm(
    ref: str = typer.Argument(help="Volume name or id."),
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Delete a volume and its files (refused while live sandboxes mount it)."""
    with session(url, api_key) as sdk:
        Volume.from_name(ref, client=sdk).delete()
    console.print(f"deleted {ref}")


def _as_dict(volume: Volume) -> dict[str, object]:
    return {
        "id": volume.id,
        "name": volume.name,
        "size_mb": volume.size_mb,
        "created_at": volume.created_at,
        "used_bytes": volume.used_bytes,
        "sandboxes": list(volume.sandboxes),
    }

"""`corral deploy`: an image, a snapshot or a sandbox as a service with a stable URL (a new
version if the name is yours already); `corral deployments` lists them, shows their logs and
events, and deletes them."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import typer

from corral.cli import _spec as S
from corral.cli._common import ApiKey, Json, Url, app, fail, out, pairs, session
from corral.client import Deployment, Sandbox
from corral.core.errors import InvalidRequest, NotFound

say = partial(out.print, highlight=False, soft_wrap=True, markup=False)
deployments_app = typer.Typer(help="Deployed services: list, logs, events, delete.")
app.add_typer(deployments_app, name="deployments")


@app.command()
def deploy(
    name: str = typer.Argument(..., help="Its name, which is part of its URL."),
    port: int = typer.Option(..., help="The port its server listens on."),
    cmd: str | None = typer.Option(None, help="What serves the port (run by /bin/sh)."),
    image: str | None = typer.Option(None, help="The image to run (name or id)."),
    snapshot: str | None = typer.Option(None, help="Or a memory snapshot to restore."),
    sandbox: str | None = typer.Option(None, help="Or a sandbox whose files to deploy (sb-…)."),
    env: S.Pairs = None,
    runtime: str | None = typer.Option(None, help="namespaces or gvisor."),
    cpu: float | None = typer.Option(None, help="CPU cores."),
    memory_mb: int | None = typer.Option(None, help="Memory in MiB."),
    network: str | None = typer.Option(None, help="none (default) or internet."),
    always_on: bool = typer.Option(False, help="Never sleep (min_instances=1)."),
    idle_timeout: float | None = typer.Option(None, help="Seconds idle before it sleeps."),
    health_path: str | None = typer.Option(None, help="A path that answers 2xx when healthy."),
    start_timeout: float | None = typer.Option(None, help="Seconds to become healthy (60)."),
    as_json: Json = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Deploy NAME, or a new version of it if it is yours already (no request fails during
    the switch). Returns once it answers its health check; prints its URL."""
    fields: dict[str, Any] = {
        "port": port,
        "command": cmd,
        "env": pairs(env, "env") or None,
        "min_instances": 1 if always_on else None,
        "idle_timeout": idle_timeout,
        "health_path": health_path,
        "start_timeout": start_timeout,
    }
    sandbox_fields = {"runtime": runtime, "cpu": cpu, "memory_mb": memory_mb, "network": network}
    with session(url, api_key) as sdk:
        if sandbox is not None:
            if image or snapshot or cmd is None:
                fail(InvalidRequest("--sandbox takes --cmd, and no --image or --snapshot"))
            deployed = Sandbox.connect(sandbox, client=sdk).deploy(name, **fields)
        else:
            fields |= sandbox_fields | {"image": image, "snapshot": snapshot}
            try:
                deployed = Deployment.get(name, client=sdk).update(**fields)
            except NotFound:
                deployed = Deployment.create(name, client=sdk, **fields)
    _show(deployed, as_json)


@deployments_app.callback(invoke_without_command=True)
def listing(
    ctx: typer.Context, as_json: Json = False, url: Url = None, api_key: ApiKey = None
) -> None:
    """Your deployments (without a subcommand)."""
    if ctx.invoked_subcommand is not None:
        return
    with session(url, api_key) as sdk:
        found = Deployment.list(client=sdk)
    if as_json:
        print(json.dumps([_fields(d) for d in found]))
        return
    for deployed in found:
        say(f"{deployed.name}  v{deployed.version}  {deployed.status}  {deployed.url}")


@deployments_app.command()
def logs(
    name: str = typer.Argument(..., help="The deployment."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Go on printing what it writes."),
    tail: int | None = typer.Option(None, help="Only the last TAIL lines."),
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Its output, every version's, as kept on the server."""
    with session(url, api_key) as sdk:
        try:
            for text in Deployment.get(name, client=sdk).logs(tail=tail, follow=follow):
                out.file.write(text)
                out.file.flush()
        except KeyboardInterrupt:
            return


@deployments_app.command()
def events(
    name: str = typer.Argument(..., help="The deployment."),
    as_json: Json = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """What happened to it: serving, crashed, start_failed, slept..."""
    with session(url, api_key) as sdk:
        found = Deployment.get(name, client=sdk).events()
    if as_json:
        print(json.dumps(found))
        return
    for event in found:
        say(f"{event['time']:.0f}  {event['kind']:<16} {event['message']}")


@deployments_app.command()
def delete(
    name: str = typer.Argument(..., help="The deployment."),
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """End it: its instance, URL and logs."""
    with session(url, api_key) as sdk:
        Deployment.get(name, client=sdk).delete()
    say(f"deleted {name}")


def _fields(deployed: Deployment) -> dict[str, Any]:
    names = ("id", "name", "url", "status", "version", "instance", "restarts")
    return {field: getattr(deployed, field) for field in names}


def _show(deployed: Deployment, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_fields(deployed)))
        return
    say(f"{deployed.name} v{deployed.version}: {deployed.status} at {deployed.url}")

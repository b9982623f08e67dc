"""`corral expose`: a port of a sandbox opened to HTTP clients; `corral previews` lists and
revokes them."""

from __future__ import annotations

import json
from functools import partial

import typer

from corral.cli._common import ApiKey, Json, Url, app, out, session
from corral.client import Sandbox

say = partial(out.print, highlight=False, soft_wrap=True, markup=False)


@app.command()
def expose(
    sandbox_id: str = typer.Argument(..., help="The sandbox (sb-…)."),
    port: int = typer.Argument(..., help="The port a server listens on inside it."),
    public: bool = typer.Option(False, help="Anyone with the URL gets in, no token needed."),
    ttl: float | None = typer.Option(None, help="Seconds until the preview expires."),
    as_json: Json = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Open PORT of a sandbox to HTTP clients: prints its URL, a link for a browser (with the
    token, which it then keeps in a cookie) and the header other clients send."""
    with session(url, api_key) as sdk:
        preview = Sandbox.connect(sandbox_id, client=sdk).expose(port, public=public, ttl=ttl)
    if as_json:
        fields = ("id", "url", "token", "signed_url", "public", "expires_at")
        print(json.dumps({name: getattr(preview, name) for name in fields}))
        return
    say(f"{preview.id}: port {port} of {sandbox_id}")
    say(f"  url:      {preview.url}" + ("  (public)" if public else ""))
    if not public:
        say(f"  browser:  {preview.signed_url}")
        header = next(iter(preview.headers.items()))
        say(f"  clients:  curl -H '{header[0]}: {header[1]}' {preview.url}")


@app.command()
def previews(
    sandbox_id: str = typer.Argument(..., help="The sandbox (sb-…)."),
    revoke: str | None = typer.Option(None, help="Revoke this preview (pv-…) instead."),
    as_json: Json = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """List a sandbox's previews, or revoke one."""
    with session(url, api_key) as sdk:
        sandbox = Sandbox.connect(sandbox_id, client=sdk)
        found = sandbox.previews()
        if revoke is not None:
            match = [p for p in found if p.id == revoke]
            if not match:
                say(f"{sandbox_id} has no preview {revoke}")
                raise typer.Exit(2)
            match[0].revoke()
            say(f"revoked {revoke}")
            return
    if as_json:
        print(
            json.dumps(
                [{"id": p.id, "port": p.port, "url": p.url, "public": p.public} for p in found]
            )
        )
        return
    for preview in found:
        say(
            f"{preview.id}  port {preview.port}  {preview.url}"
            + ("  public" if preview.public else "")
        )

"""`corral expose`: a port of a sandbox opened to HTTP clients; `corral previews` lists and
revokes them; `corral port-forward` carries a local TCP port to one in a sandbox."""

from __future__ import annotations

import asyncio
import json
from functools import partial

import typer

from corral.cli._common import ApiKey, Json, Url, app, console, fail, out, session
from corral.client import AsyncClient, AsyncSandbox, Sandbox
from corral.client._transport import Socket
from corral.core.errors import CorralError, InvalidRequest

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


@app.command("port-forward")
def port_forward(
    sandbox_id: str = typer.Argument(..., help="The sandbox (sb-…)."),
    ports: str = typer.Argument(..., help="LOCAL:REMOTE, or one PORT for both."),
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Forward a local TCP port to a port inside a sandbox, through the API (the sandbox needs
    no network). Each local connection is one connection in the sandbox; Ctrl-C stops."""
    local, _, remote = ports.partition(":")
    if not local.isdigit() or not (remote or local).isdigit():
        fail(InvalidRequest("give ports as LOCAL:REMOTE or PORT, e.g. 8080:8000"))
    try:
        asyncio.run(_forward(sandbox_id, int(local), int(remote or local), url, api_key))
    except KeyboardInterrupt:
        pass
    except CorralError as error:
        fail(error)


async def _forward(
    sandbox_id: str, local: int, remote: int, url: str | None, key: str | None
) -> None:
    async with AsyncClient(url=url, api_key=key) as client:
        await (await AsyncSandbox.connect(sandbox_id, client=client)).info()  # it is there
        path = f"/v1/sandboxes/{sandbox_id}/ports/{remote}/connect"

        async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                socket = await client.websocket(path)
            except CorralError as error:
                console.print(f"error ({error.code}): {error.message}", markup=False)
                writer.close()
                return
            sending = asyncio.create_task(_upstream(reader, socket))
            try:
                async for message in socket.messages():
                    if isinstance(message, bytes):
                        writer.write(message)
                        await writer.drain()
                    else:
                        console.print(message, markup=False)  # the server's error
            finally:
                sending.cancel()
                writer.close()
                await socket.close()

        server = await asyncio.start_server(carry, "127.0.0.1", local)
        say(f"forwarding 127.0.0.1:{local} -> {sandbox_id} port {remote} (Ctrl-C stops)")
        async with server:
            await server.serve_forever()


async def _upstream(reader: asyncio.StreamReader, socket: Socket) -> None:
    while data := await reader.read(65536):
        await socket.send(data)
    await socket.send("eof")  # the local side is done sending: half-close in the sandbox

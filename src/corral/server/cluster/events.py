"""A key's event stream at the front (`GET /v1/events`): the streams of every node it may
concern, merged and numbered afresh, with the events only the front knows (the sandboxes that
ended with a lost node, in the front's own `EventHub`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from corral.core.errors import ServiceUnavailable
from corral.server.errors import error_response
from corral.server.events import EventHub, server_sent
from corral.server.store import Store

Events = asyncio.Queue[dict[str, Any]]


async def merged_events(
    http: httpx.AsyncClient,
    urls: list[str],
    request: Request,
    headers: list[tuple[bytes, bytes]],
    *,
    store: Store,
    hub: EventHub,
) -> Response:
    """The caller's events from the nodes at `urls` and from the front's `hub`."""
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    opened: list[httpx.Response] = []
    for url in urls:
        try:
            answer = await http.send(http.build_request("GET", url + path, headers=headers),
                                     stream=True)  # fmt: skip
        except httpx.HTTPError:
            continue  # down: a lost node's events come from the front
        if answer.status_code != 200:  # a bad key, a sandbox not the caller's: said once
            body = await answer.aread()
            for other in (answer, *opened):
                await other.aclose()
            kept = {k: v for k, v in answer.headers.items() if k.lower() != "content-length"}
            return Response(body, status_code=answer.status_code, headers=kept)
        opened.append(answer)
    if not opened:
        return error_response(
            ServiceUnavailable("no node of the cluster is ready; retry", code="no_node_ready")
        )
    secret = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    key = await store.authenticate(secret) if secret else None
    sandbox_id = request.query_params.get("sandbox_id")
    stream = _stream(hub, opened, key.id if key else None, sandbox_id)
    return StreamingResponse(stream, media_type="text/event-stream")


async def _stream(
    hub: EventHub, opened: list[httpx.Response], owner: str | None, sandbox_id: str | None
) -> AsyncIterator[bytes]:
    queue: Events = asyncio.Queue()
    with contextlib.ExitStack() as stack:
        pumps = [asyncio.create_task(_pump(answer, queue)) for answer in opened]
        if owner is not None:
            own = stack.enter_context(hub.subscribe(owner))
            pumps.append(asyncio.create_task(_relay(own, queue)))
        try:
            async for chunk in server_sent(queue, sandbox_id):
                yield chunk
        finally:
            for pump in pumps:
                pump.cancel()
            for answer in opened:
                await answer.aclose()


async def _pump(answer: httpx.Response, queue: Events) -> None:
    """One node's server-sent events, each `data:` line as an event, into `queue`."""
    with contextlib.suppress(httpx.HTTPError):
        async for line in answer.aiter_lines():
            if line.startswith("data: "):
                with contextlib.suppress(ValueError):
                    queue.put_nowait(json.loads(line.removeprefix("data: ")))


async def _relay(source: Events, queue: Events) -> None:
    while True:
        queue.put_nowait(await source.get())

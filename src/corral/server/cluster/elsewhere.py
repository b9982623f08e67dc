"""On a cluster's node: a request about a live sandbox that the shared store places on another
node is answered 421 `sandbox_on_another_node`, before anything reads it or acts on it. The
answer does not name that node: whoever reaches a node, any key or none, learns nothing of
where sandboxes run; the front finds the node in the store.

Such a request comes from a front whose memory of where the sandbox runs is out of date: the
sandbox moved through another front, or by another front's drain. The front sends it on to the
node the store names (`corral.server.cluster.proxy.forward`). Answered from the store instead,
a DELETE said the sandbox had ended while it ran on elsewhere. A front that sends a request on
purpose to another node than the sandbox's (that node is not ready: lost, or being ended) marks
it `X-Corral-From-Store`, and it is answered from the store as before; and a move's own steps
are the front's (`migration`).
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from corral.core.state import SandboxState
from corral.server.cluster.proxy import FROM_STORE, sandbox_of
from corral.server.service import Service

CODE = "sandbox_on_another_node"
# A move's own steps, the front's: about a sandbox the store places on the other node.
MOVE_STEP = re.compile(r"/v1/sandboxes/sb-[0-9a-z]+/(take-in|hand-off|hand-off/done)")


class Elsewhere:
    """The node's check, outside every route and gateway: nothing has read the request."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            sent = scope.get("headers", ())
            path = scope.get("path", "")
            sandbox = sandbox_of(path, sent)
            asked = FROM_STORE.encode() in dict(sent) or MOVE_STEP.fullmatch(path) is not None
            if sandbox is not None and not asked:
                node = await runs_elsewhere(self.service, sandbox)
                if node is not None:
                    await _refuse(scope, receive, send, sandbox)
                    return
        await self.app(scope, receive, send)


async def runs_elsewhere(service: Service, sandbox_id: str) -> str | None:
    """The node that runs `sandbox_id` as the store has it, where that is another node than
    this one and the sandbox lives."""
    record = service.engine.registry.find(sandbox_id)
    if record is not None and record.leaving is None:
        return None  # this node's (one it hands off may be taken in already: the store says)
    found = await service.store.get_sandbox(sandbox_id)
    if found is None or found[1].state is SandboxState.TERMINATED:
        return None
    return found[1].node if found[1].node not in (None, service.engine.node) else None


async def _refuse(scope: Scope, receive: Receive, send: Send, sandbox: str) -> None:
    message = f"sandbox {sandbox} runs on another node: send requests about it to a front"
    body = json.dumps({"error": {"code": CODE, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if scope["type"] == "websocket":
        await receive()  # its handshake, answered here
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 4421, "reason": CODE})
            return
        kind = "websocket.http.response"
    else:
        kind = "http.response"
    await send({"type": f"{kind}.start", "status": 421, "headers": headers})
    await send({"type": f"{kind}.body", "body": body})

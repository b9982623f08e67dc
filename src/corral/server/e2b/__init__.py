"""E2B compatibility: E2B's SDKs, unmodified, against `corral serve`.

    E2B_API_URL=http://127.0.0.1:8000 E2B_SANDBOX_URL=http://127.0.0.1:8000 \\
    E2B_API_KEY=<a Corral API key> python my_e2b_program.py

A separate front end over the same resources as the native API (tenancy, quotas, limits are
theirs), so the native API is not bent to E2B's shapes:

    gateway      routing by E2B's headers on the same port; keys and sandbox access tokens
    wire         Connect's JSON envelopes and error codes; E2B's error bodies
    control      the control plane: create, connect, list, info, timeout, pause, kill
    process      envd's process service: start, connect, list, input, signals, terminals
    filesystem   envd's filesystem service and /files
    interpreter  the code interpreter's /execute and /contexts

docs/e2b.md says what works, what differs and what does not.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, ExceptionHandler

from corral.server.e2b import control, filesystem, interpreter, process, wire
from corral.server.e2b.gateway import E2bGateway
from corral.server.e2b.process import ProcessTable
from corral.server.service import Service

__all__ = ["E2bApps", "E2bGateway"]


class E2bApps:
    """The three E2B surfaces of one server, and the commands they keep running."""

    def __init__(self, service: Service) -> None:
        self.processes = ProcessTable()
        self.control = self._app(service, control.ROUTES, _rest_unknown)
        self.envd = self._app(service, [*process.ROUTES, *filesystem.ROUTES], _envd_unknown)
        self.interpreter = self._app(service, interpreter.ROUTES, _code_unknown)

    def _app(
        self, service: Service, routes: Sequence[BaseRoute], unknown: ExceptionHandler
    ) -> ASGIApp:
        app = Starlette(routes=routes, exception_handlers={HTTPException: unknown})
        app.state.service = service
        app.state.processes = self.processes
        return app

    async def close(self) -> None:
        """Stop reading the output of commands still running (they keep running)."""
        await self.processes.close()


def _unsupported(request: Request, exc: HTTPException) -> tuple[int, str]:
    if exc.status_code == 405:
        return 405, f"{request.method} is not allowed on {request.url.path}"
    return 404, f"{request.url.path} is not part of E2B's API that Corral serves (docs/e2b.md)"


async def _rest_unknown(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return wire.rest_error(*_unsupported(request, exc))


async def _envd_unknown(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status, message = _unsupported(request, exc)
    if request.url.path.startswith(("/process.", "/filesystem.")):
        return JSONResponse({"code": "unimplemented", "message": message}, status_code=501)
    return wire.rest_error(status, message)


async def _code_unknown(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status, message = _unsupported(request, exc)
    return PlainTextResponse(message, status_code=status)

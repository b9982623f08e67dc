"""E2B's control plane (its REST API) over Corral's sandboxes: create, connect, list, info,
timeout, pause, resume, kill. Bodies and answers are E2B's (camelCase, `{"code", "message"}`
errors, 201 on create); what they do is Corral's, through the same tenant-checked resources
as the native API."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from corral.core.errors import CorralError, InvalidRequest, InvalidState, SandboxNotFound
from corral.core.models import SandboxInfo
from corral.core.spec import SandboxSpec
from corral.core.state import SandboxState
from corral.server.e2b import wire
from corral.server.e2b.gateway import (
    access_token,
    api_tenant,
    checked_id,
    handled,
    service_of,
)
from corral.server.resources.sandboxes import Sandboxes

ENVD_VERSION = "0.6.4"  # the newest envd whose behaviour the SDK gates on, all of it served
# E2B's template names for Corral's built-in images; any other name is one of Corral's images.
TEMPLATES = {"base": "debian", "code-interpreter-v1": "code-interpreter"}
TEMPLATE_OF = {image: template for template, image in TEMPLATES.items()}
LIVE = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.HIBERNATED)
MAX_PAGE = 1000
ASLEEP = (SandboxState.PAUSED, SandboxState.HIBERNATED)
_FIELDS = {
    "templateID",
    "timeout",
    "autoPause",
    "autoPauseMemory",
    "autoResume",
    "allow_internet_access",
    "network",
    "metadata",
    "envVars",
    "mcp",
    "iam",
    "volumeMounts",
    "secure",
}


def _rest_error(error: CorralError) -> Response:
    return wire.rest_error_of(error)


rest = handled(_rest_error)


def spec_of(body: Mapping[str, Any], default_timeout: float) -> SandboxSpec:
    """The Corral spec for E2B's `NewSandbox`; what Corral cannot do is refused by name."""
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)}")
    template = body.get("templateID")
    if not isinstance(template, str) or not template:
        raise InvalidRequest("templateID is required: base, code-interpreter-v1, or an image")
    for name in ("mcp", "iam"):
        if body.get(name):
            raise InvalidRequest(f"{name} is not supported by Corral; leave it out")
    network = body.get("network") or {}
    if not isinstance(network, dict):
        raise InvalidRequest("network must be an object")
    rules = sorted(k for k, v in network.items() if v and k != "allowPublicTraffic")
    if rules:
        raise InvalidRequest(
            f"network {', '.join(rules)}: Corral has no per-address rules; "
            "use allow_internet_access (true: the internet, false: no network)"
        )
    internet = body.get("allow_internet_access")
    auto_resume = body.get("autoResume")
    data: dict[str, Any] = {
        "image": TEMPLATES.get(template, template),
        "timeout": body.get("timeout", default_timeout),
        "metadata": body.get("metadata") or {},
        "env": body.get("envVars") or {},
        "volumes": [_mount(m) for m in body.get("volumeMounts") or []],
    }
    if internet is not None:
        data["network"] = "internet" if internet is True else "none"
    if isinstance(auto_resume, dict) and "enabled" in auto_resume:
        data["auto_resume"] = auto_resume["enabled"]
    if body.get("autoPause") is True:
        data["on_timeout"] = "hibernate"  # E2B's pause keeps memory across the timeout
    return SandboxSpec.from_dict(data)


def _mount(mount: object) -> dict[str, Any]:
    if not isinstance(mount, dict) or not {"name", "path"} <= set(mount):
        raise InvalidRequest("each volumeMounts entry needs a name and a path")
    return {"volume": mount["name"], "path": mount["path"]}


def sandbox_out(request: Request, info: SandboxInfo) -> dict[str, Any]:
    """E2B's `Sandbox`: what the SDK needs to reach the sandbox."""
    token = access_token(service_of(request), info.id)
    return {
        "templateID": TEMPLATE_OF.get(info.spec.image, info.spec.image),
        "sandboxID": info.id,
        "clientID": "corral",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": token,
        "trafficAccessToken": token,
        "domain": None,
    }


def detail_out(request: Request, info: SandboxInfo) -> dict[str, Any]:
    """E2B's `SandboxDetail` (and, less the token, `ListedSandbox`)."""
    spec = info.spec
    left = info.timeout_remaining
    end = info.expires_at or (time.time() + left if left is not None else info.created_at)
    return {
        **sandbox_out(request, info),
        "alias": TEMPLATE_OF.get(spec.image, spec.image),
        "startedAt": wire.timestamp(info.created_at),
        "endAt": wire.timestamp(end),
        "cpuCount": max(1, round(spec.cpu)),
        "memoryMB": spec.memory_mb,
        "diskSizeMB": spec.disk_mb,
        "state": "running"
        if info.state in (SandboxState.RUNNING, SandboxState.CREATING)
        else "paused",
        "metadata": dict(spec.metadata),
        "allowInternetAccess": spec.network == "internet",
        "lifecycle": {
            "autoResume": spec.auto_resume,
            "onTimeout": "pause" if spec.on_timeout == "hibernate" else "kill",
        },
    }


def _sandbox_id(request: Request) -> str:
    return checked_id(request.path_params["sandbox_id"])


async def _live(sandboxes: Sandboxes, sandbox_id: str) -> SandboxInfo:
    info = await sandboxes.info(sandbox_id)
    if info.state not in LIVE:
        raise SandboxNotFound(f"sandbox {sandbox_id} ended ({info.end_reason or 'unknown'})")
    return info


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise InvalidRequest(f"{name} must be a number of seconds")
    return value


@rest
async def create(request: Request) -> Response:
    """POST /v2/sandboxes (and the older /sandboxes): 201 and the new sandbox."""
    sandboxes = Sandboxes(await api_tenant(request))
    default = 300.0 if request.url.path.startswith("/v2/") else 15.0
    info = await sandboxes.create(spec_of(await wire.message(request), default))
    return JSONResponse(sandbox_out(request, info), status_code=201)


@rest
async def connect(request: Request) -> Response:
    """Connect to a sandbox: 200 if it was running, 201 if it had to be resumed. A `timeout`
    longer than what it has left extends it, as E2B's does."""
    sandboxes = Sandboxes(await api_tenant(request))
    sandbox_id = _sandbox_id(request)
    body = await wire.message(request)
    timeout = _number(body, "timeout")
    info = await _live(sandboxes, sandbox_id)
    status = 200
    if info.state is SandboxState.PAUSED:
        info, status = await sandboxes.resume(sandbox_id), 201
    elif info.state is SandboxState.HIBERNATED:
        info, status = await sandboxes.wake(sandbox_id), 201
    if request.url.path.endswith("/resume") and status == 200:
        raise InvalidState(f"sandbox {sandbox_id} is already running")
    left = (info.expires_at or 0) - time.time()
    if timeout is not None and timeout > left:
        info = await sandboxes.set_timeout(sandbox_id, timeout)
    return JSONResponse(sandbox_out(request, info), status_code=status)


@rest
async def listing(request: Request) -> Response:
    """GET /v2/sandboxes (paged by `nextToken`/`x-next-token`) and GET /sandboxes."""
    sandboxes = Sandboxes(await api_tenant(request))
    query = request.query_params
    metadata = dict(parse_qsl(query.get("metadata", ""), keep_blank_values=True))
    states = {s for s in query.get("state", "").split(",") if s}
    if states - {"running", "paused"}:
        raise InvalidRequest("state must be running, paused, or both (comma-separated)")
    found = [
        detail_out(request, info)
        for info in await sandboxes.list(None, metadata)
        if info.state in LIVE
    ]
    found = [item for item in found if not states or item["state"] in states]
    if "template" in query:
        found = [item for item in found if item["templateID"] == query["template"]]
    if "startedAfter" in query:
        after_time = wire.timestamp(_time(query["startedAfter"]))
        found = [item for item in found if item["startedAt"] >= after_time]
    if query.get("order", "asc") == "desc":
        found.reverse()
    if not request.url.path.startswith("/v2/"):
        return JSONResponse(found)
    limit = _limit(query.get("limit"))
    after = query.get("nextToken")
    if after:
        ids = [item["sandboxID"] for item in found]
        found = found[ids.index(after) + 1 :] if after in ids else []
    page = found[:limit]
    response = JSONResponse(page)
    if len(found) > limit:
        response.headers["x-next-token"] = page[-1]["sandboxID"]
    return response


def _time(value: str) -> float:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise InvalidRequest("startedAfter must be an RFC 3339 time") from None


def _limit(value: str | None) -> int:
    if value is None:
        return 100
    if not value.isdigit() or not 1 <= int(value) <= MAX_PAGE:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_PAGE}")
    return int(value)


@rest
async def info(request: Request) -> Response:
    sandboxes = Sandboxes(await api_tenant(request))
    found = await _live(sandboxes, _sandbox_id(request))
    return JSONResponse(detail_out(request, found))


@rest
async def kill(request: Request) -> Response:
    """DELETE /sandboxes/{id}: 204, or 404 for one that is not (or no longer) there."""
    sandboxes = Sandboxes(await api_tenant(request))
    sandbox_id = _sandbox_id(request)
    await _live(sandboxes, sandbox_id)
    await sandboxes.terminate(sandbox_id)
    return wire.no_content()


@rest
async def set_timeout(request: Request) -> Response:
    sandboxes = Sandboxes(await api_tenant(request))
    timeout = _number(await wire.message(request), "timeout")
    if timeout is None:
        raise InvalidRequest("timeout is required (seconds from now)")
    await sandboxes.set_timeout(_sandbox_id(request), timeout)
    return wire.no_content()


@rest
async def pause(request: Request) -> Response:
    """204, or 409 for a sandbox that is already paused."""
    sandboxes = Sandboxes(await api_tenant(request))
    sandbox_id = _sandbox_id(request)
    if (await _live(sandboxes, sandbox_id)).state is not SandboxState.RUNNING:
        raise InvalidState(f"sandbox {sandbox_id} is already paused")
    await sandboxes.pause(sandbox_id)
    return wire.no_content()


ROUTES = [
    Route("/v2/sandboxes", create, methods=["POST"]),
    Route("/sandboxes", create, methods=["POST"]),
    Route("/v2/sandboxes", listing, methods=["GET"]),
    Route("/sandboxes", listing, methods=["GET"]),
    Route("/v2/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/resume", connect, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}", info, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}", kill, methods=["DELETE"]),
    Route("/sandboxes/{sandbox_id}/timeout", set_timeout, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/pause", pause, methods=["POST"]),
]

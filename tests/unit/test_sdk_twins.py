"""The sync SDK is the async one, method for method: every public async method and parameter has
its sync twin, with the same parameters and defaults, and the same documentation."""

from __future__ import annotations

import inspect

import pytest

import corral
from corral.client._process import AsyncOutput, AsyncStdin, Output, Stdin

TWINS = [
    (corral.AsyncClient, corral.Client),
    (corral.AsyncSandbox, corral.Sandbox),
    (corral.AsyncFiles, corral.Files),
    (corral.AsyncProcess, corral.Process),
    (AsyncOutput, Output),
    (AsyncStdin, Stdin),
    (corral.AsyncVolume, corral.Volume),
    (corral.AsyncDeployment, corral.Deployment),
    (corral.AsyncPreview, corral.Preview),
]
# Async members whose sync twin has another name, or that only async code can use (a transport
# handing out httpx responses and WebSockets is the async SDK's own plumbing).
RENAMED = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__"}
ASYNC_ONLY = {
    (corral.AsyncClient, "request"),
    (corral.AsyncClient, "stream"),
    (corral.AsyncClient, "download"),
    (corral.AsyncClient, "websocket"),
    (corral.AsyncClient, "has_blob"),
    (corral.AsyncClient, "api_key"),
    (corral.AsyncVolume, "client"),
    (corral.AsyncDeployment, "client"),
    (corral.AsyncPreview, "client"),
    (corral.AsyncProcess, "start"),  # made from the exec WebSocket by `AsyncSandbox.exec`
}


def _public(cls: type) -> dict[str, object]:
    members: dict[str, object] = {}
    for klass in reversed(cls.__mro__[:-1]):
        for name, member in vars(klass).items():
            if not name.startswith("_") or name in RENAMED:
                members[name] = member
    fields = getattr(cls, "__dataclass_fields__", {})
    members.update({name: None for name in fields if not name.startswith("_")})
    return members


def _parameters(function: object) -> list[tuple[str, object, object]]:
    assert callable(function)
    signature = inspect.signature(function)
    return [
        (p.name, p.kind, p.default)
        for p in signature.parameters.values()
        if p.name not in ("self", "cls")
    ]


@pytest.mark.parametrize(("aio", "sync"), TWINS, ids=lambda cls: cls.__name__)
def test_every_async_member_has_its_sync_twin(aio: type, sync: type) -> None:
    missing, different = [], []
    for name in _public(aio):
        if (aio, name) in ASYNC_ONLY:
            continue
        twin_name = RENAMED.get(name, name)
        twin = getattr(sync, twin_name, None)
        if twin is None and not hasattr(sync, twin_name):
            missing.append(name)
            continue
        function = getattr(aio, name, None)
        if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
            if name in RENAMED:
                continue  # (self, exc_type, ...) in both
            if _parameters(function) != _parameters(twin):
                different.append(f"{name}: {_parameters(function)} != {_parameters(twin)}")
            if inspect.getdoc(function) and inspect.getdoc(function) != inspect.getdoc(twin):
                different.append(f"{name}: its docstring differs")
    assert not missing, f"{sync.__name__} lacks {missing}"
    assert not different, different


def test_the_check_sees_a_missing_twin() -> None:
    class AsyncThing:
        async def poke(self, hard: bool = False) -> None:
            """Poke it."""

    class Thing:
        pass

    assert "poke" in _public(AsyncThing) and not hasattr(Thing, "poke")


def test_sync_signatures_name_sync_types() -> None:
    create = inspect.signature(corral.Sandbox.create)
    assert str(create.return_annotation) == "Sandbox"
    assert "Client | None" in str(create.parameters["client"])
    assert "AsyncClient" not in str(create.parameters["client"])
    assert str(inspect.signature(corral.Sandbox.fork).return_annotation) == "list[Sandbox]"
    assert "Iterator[bytes]" in str(inspect.signature(corral.Files.read_stream))


def test_a_sync_client_refuses_to_serve_async_code() -> None:
    import asyncio

    client = corral.Client(url="http://127.0.0.1:9", api_key="corral_x")
    try:

        async def misuse() -> None:
            await corral.AsyncSandbox.create(client=client)

        with pytest.raises(corral.InvalidRequest) as refused:
            asyncio.run(misuse())
        assert "AsyncClient" in refused.value.message
    finally:
        client.close()

"""The synchronous SDK, derived from the async one: a portal, the sync `Client`, and the helpers
that make each sync class a twin of its async class.

Each `Client` owns one event loop in a daemon thread (its portal); a synchronous method hands
the matching coroutine of the async SDK to that loop and waits for it. Sync classes declare
their methods as twins, `run = blocking(AsyncSandbox.run)`: signature, docstring and behaviour
come from the async method, so the two cannot drift, and nothing here does I/O of its own.
Output callbacks (`on_stdout`, `on_stderr`, `on_progress`) run on the portal's thread.
"""

from __future__ import annotations

import functools
import inspect
import re
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from corral.client._client import AsyncClient, default_client
from corral.core.errors import InvalidRequest

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")
A = TypeVar("A")
A_co = TypeVar("A_co", covariant=True)  # a twin of a subclass is a twin of its base class
W = TypeVar("W", bound="Twin[Any]")


class Portal:
    """An event loop on a daemon thread that runs coroutines for synchronous callers."""

    def __init__(self) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="corral-sdk", daemon=True
        )
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        import asyncio

        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError(
                "a sync Corral call from an output callback would wait on itself; "
                "use the async SDK (AsyncSandbox) for that"
            )
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Twin(Generic[A_co]):
    """A synchronous object that drives the async object `_async` on its client's portal."""

    def __init__(self, client: Client, inner: A_co) -> None:
        self.client = client
        self._async = inner

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.client.call(coroutine)


# -- deriving sync methods from async ones -------------------------------------------------------

_ASYNC_NAME = re.compile(
    r"\bAsync(Client|Sandbox|Files|Process|Output|Stdin|Volume|Deployment|Preview)\b"
)
_ASYNC_ITER = re.compile(r"^Async(?:Iterator\[(.*)\]|Generator\[(.*), None\])$")


class _Annotation(str):
    """An annotation as written in the source: shown unquoted in signatures."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def _twin_of(fn: Callable[..., Any], call: Callable[..., Any], *, method: bool) -> None:
    """Give `call` the name, docstring and signature of `fn`, with sync types in its annotations
    (`AsyncSandbox` reads `Sandbox`), so `help()` and the reference docs show the sync API."""
    functools.update_wrapper(call, fn)
    delattr(call, "__wrapped__")  # inspect must show the sync signature below, not fn's
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())
    if method and params and params[0].name in ("self", "cls"):
        params[0] = params[0].replace(annotation=inspect.Parameter.empty)
    returns = _sync_text(signature.return_annotation)
    if isinstance(returns, str) and (found := _ASYNC_ITER.match(returns)):
        returns = _Annotation(f"Iterator[{found.group(1) or found.group(2)}]")
    call.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(annotation=_sync_text(p.annotation)) for p in params],
        return_annotation=returns,
    )


def _sync_text(annotation: Any) -> Any:
    """A string annotation with the async SDK's names made sync (`AsyncSandbox`: `Sandbox`)."""
    if not isinstance(annotation, str):
        return annotation
    text = annotation.replace("AsyncClient | Client", "Client").replace("builtins.", "")
    return _Annotation(_ASYNC_NAME.sub(r"\1", text))


def blocking(
    fn: Callable[Concatenate[A, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Twin[A], P], T]:
    """The twin of async method `fn`: same arguments, same result, waited for."""

    def call(self: Twin[A], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(fn(self._async, *args, **kwargs))

    _twin_of(fn, call, method=True)
    return call


def blocking_as(
    wrap: Callable[[Client, R], T], fn: Callable[Concatenate[A, P], Coroutine[Any, Any, R]]
) -> Callable[Concatenate[Twin[A], P], T]:
    """The twin of async method `fn` whose result is an async object: `wrap`s it in its twin."""

    def call(self: Twin[A], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return wrap(self.client, self._run(fn(self._async, *args, **kwargs)))

    _twin_of(fn, call, method=True)
    return call


def blocking_self(
    fn: Callable[Concatenate[A, P], Coroutine[Any, Any, A]],
) -> Callable[Concatenate[W, P], W]:
    """The twin of an async method that returns another object of its own class (`refresh`)."""

    def call(self: W, /, *args: P.args, **kwargs: P.kwargs) -> W:
        return type(self)(self.client, self._run(fn(self._async, *args, **kwargs)))

    _twin_of(fn, call, method=True)
    return call


def blocking_self_each(
    fn: Callable[Concatenate[A, P], Coroutine[Any, Any, list[A]]],
) -> Callable[Concatenate[W, P], list[W]]:
    """The twin of an async method that returns a list of objects of its own class (`fork`)."""

    def call(self: W, /, *args: P.args, **kwargs: P.kwargs) -> list[W]:
        made = self._run(fn(self._async, *args, **kwargs))
        return [type(self)(self.client, item) for item in made]

    _twin_of(fn, call, method=True)
    return call


def blocking_iter(
    fn: Callable[Concatenate[A, P], AsyncIterator[T]],
) -> Callable[Concatenate[Twin[A], P], Iterator[T]]:
    """The twin of an async generator method: a generator, each item fetched on the portal."""

    def call(self: Twin[A], /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        stream = fn(self._async, *args, **kwargs)
        try:
            while True:
                try:
                    yield self._run(_next(stream))
                except StopAsyncIteration:
                    return
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                self._run(close())

    _twin_of(fn, call, method=True)
    return call


async def _next(iterator: AsyncIterator[T]) -> T:
    return await anext(iterator)


class constructor(Generic[P, A]):
    """The twin of an async classmethod that takes `client=` and makes one object: a
    classmethod of the sync class that runs on the given sync client (else the default one)
    and wraps what it returns in the sync class."""

    def __init__(self, fn: Callable[P, Coroutine[Any, Any, A]]) -> None:
        self._fn = fn
        self._bound: dict[type[Any], Callable[P, Any]] = {}

    def __get__(self, obj: object, owner: type[W]) -> Callable[P, W]:
        if owner not in self._bound:
            self._bound[owner] = _classmethod_twin(self._fn, owner)
        return self._bound[owner]


class constructor_each(Generic[P, A]):
    """`constructor` for an async classmethod that returns a list (`Volume.list`)."""

    def __init__(self, fn: Callable[P, Coroutine[Any, Any, list[A]]]) -> None:
        self._fn = fn
        self._bound: dict[type[Any], Callable[P, Any]] = {}

    def __get__(self, obj: object, owner: type[W]) -> Callable[P, list[W]]:
        if owner not in self._bound:
            self._bound[owner] = _classmethod_twin(self._fn, owner)
        return self._bound[owner]


def _classmethod_twin(fn: Callable[..., Coroutine[Any, Any, Any]], owner: type[W]) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        client = sync_client(kwargs.get("client"))
        kwargs["client"] = client
        made = client.call(fn(*args, **kwargs))
        if isinstance(made, list):
            return [owner(client, item) for item in made]
        return owner(client, made)

    _twin_of(fn, call, method=False)
    return call


class static(Generic[P, R]):
    """The twin of an async classmethod whose result needs no wrapping (plain data)."""

    def __init__(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> None:
        fn_ = fn

        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            client = sync_client(kwargs.get("client"))  # type: ignore[arg-type]
            kwargs["client"] = client
            return client.call(fn_(*args, **kwargs))

        _twin_of(fn, call, method=False)
        self._call = call

    def __get__(self, obj: object, owner: type[Any]) -> Callable[P, R]:
        return self._call


# -- the client ---------------------------------------------------------------------------------


async def _make_client(url: str | None, api_key: str | None, **options: Any) -> AsyncClient:
    return AsyncClient(url, api_key, **options)


class Client(Twin[AsyncClient]):
    """A connection to a Corral server for synchronous code.

    `url` defaults to `$CORRAL_URL` (else http://127.0.0.1:8470), `api_key` to
    `$CORRAL_API_KEY`; `ca` and `verify` check an `https` server's certificate (see
    `AsyncClient`).

    Example:
        >>> client = corral.Client(url="http://127.0.0.1:8470", api_key="corral_...")
        >>> with corral.Sandbox.create(client=client) as sandbox:
        ...     print(sandbox.run("echo hi").stdout)
        hi
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        ca: str | None = None,
        verify: bool | None = None,
    ) -> None:
        self._portal = Portal()
        made = _make_client(url, api_key, timeout=timeout, ca=ca, verify=verify)
        super().__init__(self, self._portal.call(made))
        self.url = self._async.url

    @property
    def aio(self) -> AsyncClient:
        """The async client this one drives (usable on this client's own event loop only)."""
        return self._async

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine of the async SDK on this client's event loop; its result."""
        return self._portal.call(coroutine)

    sandbox_usage = blocking(AsyncClient.sandbox_usage)
    create_webhook = blocking(AsyncClient.create_webhook)
    list_webhooks = blocking(AsyncClient.list_webhooks)
    delete_webhook = blocking(AsyncClient.delete_webhook)
    audit = blocking(AsyncClient.audit)
    audit_replay = blocking(AsyncClient.audit_replay)
    list_pools = blocking(AsyncClient.list_pools)
    set_pool = blocking(AsyncClient.set_pool)
    remove_pool = blocking(AsyncClient.remove_pool)
    list_all_sandboxes = blocking(AsyncClient.list_all_sandboxes)
    nodes = blocking(AsyncClient.nodes)
    drain_node = blocking(AsyncClient.drain_node)
    end_sandbox = blocking(AsyncClient.end_sandbox)
    events = blocking_iter(AsyncClient.events)
    list_snapshots = blocking(AsyncClient.list_snapshots)
    get_snapshot = blocking(AsyncClient.get_snapshot)
    delete_snapshot = blocking(AsyncClient.delete_snapshot)
    list_images = blocking(AsyncClient.list_images)
    get_image = blocking(AsyncClient.get_image)
    remove_image = blocking(AsyncClient.remove_image)
    prune_images = blocking(AsyncClient.prune_images)
    image_usage = blocking(AsyncClient.image_usage)

    def close(self) -> None:
        """Close the connections and stop the background event loop."""
        self._portal.call(self._async.aclose())
        self._portal.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_default: Client | None = None
_default_lock = threading.Lock()


def sync_client(client: Client | None) -> Client:
    """`client`, else the default client (made on first use from the environment)."""
    global _default  # noqa: PLW0603 - one lazily made default, like httpx's top-level functions
    if client is not None:
        return client
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def async_client(client: AsyncClient | Client | None) -> AsyncClient:
    """The async client for the running event loop: `client` itself, the one a sync `Client`
    drives (on that client's own loop only), or this loop's default."""
    import asyncio

    if client is None:
        return default_client()
    if isinstance(client, Client):
        if asyncio.get_running_loop() is not client._portal.loop:
            raise InvalidRequest(
                "a synchronous corral.Client cannot serve async code; "
                "pass a corral.AsyncClient (or nothing, for the default one)"
            )
        return client.aio
    return client

"""What every command shares: the Typer app, option types, error output, the SDK client."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from corral.client import Client
from corral.core.errors import CorralError, InvalidRequest

app = typer.Typer(
    help="Corral: secure sandboxes for AI agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# No emoji codes: `:ab:` in a fingerprint, a path or a command's output is text, not 🆎.
console = Console(stderr=True, emoji=False)
out = Console(emoji=False)
if not out.is_terminal:
    out.width = 160  # piped tables: wide enough for ids and end reasons on one line

DATABASE_URL_VAR = "CORRAL_DATABASE_URL"  # the store's PostgreSQL URL (`corral serve`, keys)
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Where Corral keeps its state.")]
Url = Annotated[
    str | None, typer.Option("--url", envvar="CORRAL_URL", help="The server (default local).")
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="CORRAL_API_KEY", help="Your API key.", show_default=False),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]


def fail(error: CorralError) -> NoReturn:
    console.print(f"[red]error[/red] ({error.code}): {escape(error.message)}", highlight=False)
    raise typer.Exit(2)


def client(url: str | None, api_key: str | None) -> Client:
    return Client(url=url, api_key=api_key)


@contextlib.contextmanager
def session(url: str | None, api_key: str | None) -> Iterator[Client]:
    """An SDK client whose errors end the command with their code and message."""
    try:
        sdk = client(url, api_key)
    except CorralError as error:
        fail(error)
    try:
        yield sdk
    except CorralError as error:
        fail(error)
    finally:
        sdk.close()


def pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """KEY=VALUE options as a dict; a malformed one ends the command saying so."""
    found = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            fail(InvalidRequest(f"{what} {item!r} must read KEY=VALUE"))
        found[name] = value
    return found

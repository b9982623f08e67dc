"""`corral run-code` and `corral repl`: the code interpreter of a sandbox from a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from corral.cli._common import ApiKey, Json, Url, app, console, fail, session
from corral.client import AsyncClient, AsyncSandbox, Sandbox
from corral.core.code import BINARY_MIMES, Execution, ExecutionError, Result
from corral.core.errors import CorralError, InvalidRequest

Language = Annotated[str, typer.Option(help="python, javascript or bash (where the image has it).")]
Context = Annotated[
    str | None, typer.Option(help="A code context's id (default: the language's own).")
]
Timeout = Annotated[
    float | None, typer.Option(help="Seconds; past it the code is interrupted, state kept.")
]


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _show_result(result: Result) -> None:
    """The result's text on stdout; its other kinds named on stderr (all of it with --json)."""
    if result.text is not None:
        _stdout(result.text + "\n")
    others = [mime for mime in result.formats() if mime != "text/plain"]
    if others:
        sizes = [
            f"{mime} ({len(result.data[mime])} base64 chars)" if mime in BINARY_MIMES else mime
            for mime in others
        ]
        console.print(f"[dim]also as {', '.join(sizes)}; --json has them[/dim]", highlight=False)


def _show_error(error: ExecutionError) -> None:
    _stderr(error.traceback or f"{error.name}: {error.value}\n")


@app.command("run-code")
def run_code(
    sandbox_id: str,
    source: Annotated[str, typer.Argument(help="A file of code, or - to read it from stdin.")],
    language: Language = "python",
    context: Context = None,
    timeout: Timeout = None,
    as_json: Json = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Run code in a sandbox's code context (its variables stay for the next run), streaming
    its output; exits 1 if the code raised."""
    try:
        code = sys.stdin.read() if source == "-" else Path(source).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(InvalidRequest(f"cannot read the code from {source}: {exc}", code="invalid_source"))
    with session(url, api_key) as sdk:
        sandbox = Sandbox.connect(sandbox_id, client=sdk)
        if as_json:
            execution = sandbox.run_code(code, language, context=context, timeout=timeout)
            print(json.dumps(execution.to_dict()))
        else:
            execution = sandbox.run_code(
                code,
                language,
                context=context,
                timeout=timeout,
                on_stdout=_stdout,
                on_stderr=_stderr,
                on_result=_show_result,
                on_error=_show_error,
            )
    if execution.error is not None:
        raise typer.Exit(1)


@app.command("repl")
def repl(
    sandbox_id: str,
    language: Language = "python",
    context: Context = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """An interactive session with a sandbox's code interpreter. A line ending in ':' opens a
    block, ended by an empty line; Ctrl-C interrupts the running code; Ctrl-D leaves."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_repl(loop, sandbox_id, language, context, url, api_key))
    except CorralError as error:
        fail(error)
    finally:
        loop.close()


async def _repl(
    loop: asyncio.AbstractEventLoop,
    sandbox_id: str,
    language: str,
    context: str | None,
    url: str | None,
    api_key: str | None,
) -> None:
    async with AsyncClient(url=url, api_key=api_key) as client:
        sandbox = await AsyncSandbox.connect(sandbox_id, client=client)
        interactive = sys.stdin.isatty()
        if interactive:
            console.print(f"{language} in {sandbox.id}; Ctrl-D leaves", highlight=False)
        while (cell := _read_cell(interactive)) is not None:
            if cell.strip():
                await _run_cell(loop, sandbox, cell, language, context)


def _read_cell(interactive: bool) -> str | None:
    """The next cell from the terminal (or stdin), or None at its end."""
    lines: list[str] = []
    while True:
        prompt = ("... " if lines else ">>> ") if interactive else ""
        try:
            line = input(prompt)
        except EOFError:
            return "\n".join(lines) if lines else None
        except KeyboardInterrupt:
            _stdout("\n")
            lines = []
            continue
        lines.append(line)
        if len(lines) == 1 and not line.rstrip().endswith(":"):
            return line
        if len(lines) > 1 and not line.strip():
            return "\n".join(lines)


async def _run_cell(
    loop: asyncio.AbstractEventLoop,
    sandbox: AsyncSandbox,
    cell: str,
    language: str,
    context: str | None,
) -> Execution | None:
    task = loop.create_task(
        sandbox.run_code(
            cell,
            language,
            context=context,
            on_stdout=_stdout,
            on_stderr=_stderr,
            on_result=_show_result,
            on_error=_show_error,
        )
    )
    # Ctrl-C cancels the request; the server then interrupts the code (its state stays).
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        _stderr("KeyboardInterrupt\n")
        return None
    finally:
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGINT)

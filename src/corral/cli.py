"""The `corral` command line.

    corral doctor                      which runtimes and images this machine can use
    corral image build [NAME]          build an image ahead of time (debian takes ~30 s once)
    corral run [OPTIONS] -- CMD ...    run one command in a fresh sandbox, then end it

The engine runs inside the command itself for now (the HTTP server comes next), so these need
root, like the engine.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from corral.engine import Engine, default_data_dir
from corral.errors import CorralError
from corral.runtimes import PREFERENCE
from corral.spec import SandboxSpec

app = typer.Typer(help="Corral: secure sandboxes for AI agents.", no_args_is_help=True)
image_app = typer.Typer(help="Manage images.", no_args_is_help=True)
app.add_typer(image_app, name="image")
console = Console(stderr=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Where Corral keeps its state.")]


def _fail(error: CorralError) -> None:
    console.print(f"[red]error[/red] ({error.code}): {error.message}")
    raise typer.Exit(2)


@app.command()
def doctor(data_dir: DataDir = None, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show which runtimes this machine can run, and why not where it cannot."""
    engine = Engine(data_dir)
    rows = {name: engine.unavailable_reason(name) for name in PREFERENCE}
    if as_json:
        print(json.dumps({name: {"available": r is None, "reason": r} for name, r in rows.items()}))
        return
    table = Table("runtime", "status")
    for name, reason in rows.items():
        table.add_row(
            name, "[green]available[/green]" if reason is None else f"[red]{reason}[/red]"
        )
    Console().print(table)
    console.print(f"data directory: {engine.data_dir}")


@image_app.command("build")
def image_build(name: str = typer.Argument("debian"), data_dir: DataDir = None) -> None:
    """Build a built-in image now rather than on first use."""
    engine = Engine(data_dir)
    try:
        with console.status(f"building image {name}…") as status:
            image = engine.images.resolve(name, progress=lambda line: status.update(line[:100]))
    except CorralError as error:
        _fail(error)
    console.print(f"image {name}: {', '.join(str(p) for p in image.layers)}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    image: str = typer.Option("debian", help="Image to start from (debian, host)."),
    runtime: str | None = typer.Option(None, help="namespaces or gvisor (default: strongest)."),
    network: str = typer.Option("none", help="none or internet."),
    memory: int = typer.Option(512, help="Memory limit in MiB."),
    cpu: float = typer.Option(1.0, help="CPU limit in cores."),
    timeout: float = typer.Option(300, help="Lifetime of the sandbox in seconds."),
    data_dir: DataDir = None,
) -> None:
    """Run a command in a new sandbox, stream its output, end the sandbox; exit with its code."""
    argv = list(ctx.args)
    if not argv:
        console.print("give a command after --, e.g. corral run -- python3 -c 'print(6*7)'")
        raise typer.Exit(2)
    try:
        spec = SandboxSpec(
            image=image,
            runtime=runtime,
            network=network,  # type: ignore[arg-type]
            memory_mb=memory,
            cpu=cpu,
            timeout=timeout,
        )
        code = asyncio.run(_run(spec, argv, data_dir))
    except CorralError as error:
        _fail(error)
    raise typer.Exit(code)


async def _run(spec: SandboxSpec, argv: list[str], data_dir: Path | None) -> int:
    async with Engine(data_dir or default_data_dir()) as engine:
        with console.status("starting sandbox…") as status:
            info = await engine.create(spec, progress=lambda line: status.update(line[:100]))
        console.print(f"[dim]{info.id} ({info.runtime}): {shlex.join(argv)}[/dim]")
        try:
            # One word is a shell command line ('ls | wc -l'); several are an argv.
            if len(argv) == 1:
                process = await engine.exec(info.id, cmd=argv[0])
            else:
                process = await engine.exec(info.id, argv)
            async for name, data in process.output():
                stream = sys.stdout if name == "stdout" else sys.stderr
                stream.buffer.write(data)
                stream.flush()
            result = await process.wait()
        finally:
            await engine.terminate(info.id)
        if result.timed_out:
            console.print("[red]command timed out[/red]")
        if result.oom_killed:
            console.print("[red]command was killed: out of memory[/red]")
        return result.exit_code if result.exit_code is not None else 1


def main() -> None:
    app()

"""Commands that talk to a Corral server through the SDK: sandboxes, run, exec, shell, cp."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import shutil
import signal
import sys
import termios
import threading
import time
import tty
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Column, Table

from corral.cli import _spec as S
from corral.cli._common import ApiKey, Json, Url, app, console, fail, out, pairs, session
from corral.cli._volumes import Volumes, volume_mounts
from corral.client import Network, Process, Sandbox
from corral.core.errors import CorralError, InvalidRequest
from corral.core.models import SandboxInfo

sandbox_app = typer.Typer(help="Create, list, inspect and end sandboxes.", no_args_is_help=True)
pools_app = typer.Typer(help="Warm pools of started sandboxes.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(pools_app, name="pools")
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    delta = timestamp - time.time()
    span = abs(delta)
    text = (
        f"{span:.0f}s"
        if span < 120
        else f"{span / 60:.0f}m"
        if span < 7200
        else f"{span / 3600:.1f}h"
    )
    return f"in {text}" if delta >= 0 else f"{text} ago"


@sandbox_app.command("create")
def sandbox_create(
    image: S.Image = S.IMAGE,
    runtime: S.Runtime = None,
    cpu: S.Cpu = S.CPU,
    memory: S.Memory = S.MEMORY,
    disk: S.Disk = S.DISK,
    max_processes: S.MaxProcesses = S.MAX_PROCESSES,
    timeout: S.Timeout = S.TIMEOUT,
    network: S.Network = S.NETWORK,
    allow: S.Allow = None,
    deny: S.Deny = None,
    env: S.Pairs = None,
    workdir: S.Workdir = S.WORKDIR,
    metadata: S.Pairs = None,
    auto_resume: S.AutoResume = S.AUTO_RESUME,
    idle_timeout: S.IdleTimeout = S.IDLE_TIMEOUT,
    on_idle: S.OnIdle = S.ON_IDLE,
    keep_alive: S.KeepAlive = S.KEEP_ALIVE,
    on_timeout: S.OnTimeout = S.ON_TIMEOUT,
    volume: Volumes = None,
    no_pool: S.NoPool = False,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: Json = False,
) -> None:
    """Create a sandbox and print its id."""
    with session(url, api_key) as sdk, console.status("creating sandbox…"):
        mounts = volume_mounts(volume, sdk)
        sandbox = Sandbox.create(
            image,
            runtime,
            cpu=cpu,
            memory_mb=memory,
            disk_mb=disk,
            max_processes=max_processes,
            timeout=timeout,
            env=pairs(env, "env"),
            metadata=pairs(metadata, "metadata"),
            workdir=workdir,
            network=S.network_of(network, allow, deny),
            volumes=mounts,
            pool=not no_pool,
            auto_resume=auto_resume,
            idle_timeout=idle_timeout,
            on_idle=on_idle,
            keep_alive=keep_alive,
            on_timeout=on_timeout,
            client=sdk,
        )
        info = sandbox.info()
    if as_json:
        print(json.dumps(info.to_dict()))
    else:
        print(sandbox.id)


@sandbox_app.command("list")
def sandbox_list(
    state: str | None = typer.Option(None, help="Only sandboxes in this state."),
    metadata: S.Pairs = None,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: Json = False,
) -> None:
    """Your sandboxes (ended ones stay listed for 7 days)."""
    with session(url, api_key) as sdk:
        found = Sandbox.list(pairs(metadata, "metadata"), state, client=sdk)
    if as_json:
        print(json.dumps([info.to_dict() for info in found]))
        return
    table = Table(Column("id", no_wrap=True), "state", "runtime", "image", "created")
    table.add_column("ends / ended")
    table.add_column("metadata")
    for info in found:
        ending = _when(info.expires_at) if info.expires_at else ""
        if info.end_reason is not None:
            ending = f"{info.end_reason.value} {_when(info.ended_at)}"
        labels = " ".join(f"{k}={v}" for k, v in info.metadata.items())
        table.add_row(
            info.id,
            info.state.value,
            info.runtime,
            info.spec.image,
            _when(info.created_at),
            ending,
            labels,
        )
    out.print(table)


@sandbox_app.command("info")
def sandbox_info(
    sandbox_id: str, url: Url = None, api_key: ApiKey = None, as_json: Json = False
) -> None:
    """A sandbox's state, limits and, once ended, why it ended."""
    with session(url, api_key) as sdk:
        info = Sandbox.connect(sandbox_id, client=sdk).info()
    if as_json:
        print(json.dumps(info.to_dict()))
        return
    spec = info.spec
    rows = {
        "id": info.id,
        "state": info.state.value,
        "runtime": info.runtime,
        "image": spec.image,
        "limits": f"{spec.cpu:g} cpu, {spec.memory_mb} MiB memory, {spec.disk_mb} MiB disk",
        "network": _network(info),
        "volumes": " ".join(
            f"{m.volume}:{m.path}{':ro' if m.read_only else ''}" for m in spec.volumes
        ),
        "created": _when(info.created_at),
        "expires": _when(info.expires_at),
        "metadata": " ".join(f"{k}={v}" for k, v in info.metadata.items()),
    }
    if info.end_reason is not None:
        rows["ended"] = f"{_when(info.ended_at)}: {info.end_reason.value}"
        rows["detail"] = info.end_detail or ""
    for name, value in rows.items():
        if value:
            out.print(f"[bold]{name:>9}[/bold]  {escape(str(value))}", highlight=False)


def _network(info: SandboxInfo) -> str:
    rules = info.spec.egress
    if info.spec.network == "none" or rules is None or not rules.restricts:
        return info.spec.network
    shown = rules.to_dict()
    allow = "anywhere" if shown["allow"] is None else ", ".join(shown["allow"]) or "nothing"
    return f"internet; allow {allow}" + (
        f"; deny {', '.join(shown['deny'])}" if shown["deny"] else ""
    )


@sandbox_app.command("network")
def sandbox_network(
    sandbox_id: str,
    allow: S.Allow = None,
    deny: S.Deny = None,
    clear: bool = typer.Option(False, "--clear", help="Drop the sandbox's own rules."),
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Show an internet sandbox's egress rules, or replace them: with --allow and --deny (no
    --allow: anywhere not denied; `--allow ''`: nothing), or none of its own with --clear."""
    with session(url, api_key) as sdk:
        sandbox = Sandbox.connect(sandbox_id, client=sdk)
        if clear or allow is not None or deny is not None:
            allowed = None if allow is None else [rule for rule in allow if rule]
            sandbox.set_network(Network(allow=allowed, deny=deny or ()))
        info = sandbox.info()
    out.print(_network(info), highlight=False)


@sandbox_app.command("kill")
def sandbox_kill(sandbox_id: str, url: Url = None, api_key: ApiKey = None) -> None:
    """End a sandbox now."""
    with session(url, api_key) as sdk:
        info = Sandbox.connect(sandbox_id, client=sdk).terminate()
    console.print(f"{info.id}: {info.state.value}")


@sandbox_app.command("kill-all")
def sandbox_kill_all(sandbox_id: str, url: Url = None, api_key: ApiKey = None) -> None:
    """Kill every process in a sandbox but Corral's agent (the sandbox and its files stay)."""
    with session(url, api_key) as sdk:
        killed = Sandbox.connect(sandbox_id, client=sdk).kill_all()
    console.print(f"{sandbox_id}: {killed} processes killed")


@sandbox_app.command("timeout")
def sandbox_timeout(
    sandbox_id: str,
    seconds: float = typer.Argument(help="Seconds from now until the sandbox ends."),
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Extend (or shorten) a sandbox's life."""
    with session(url, api_key) as sdk:
        info = Sandbox.connect(sandbox_id, client=sdk).set_timeout(seconds)
    console.print(f"{info.id} now ends {_when(info.expires_at)}")


def _command(ctx: typer.Context) -> list[str]:
    argv = list(ctx.args)
    if not argv:
        console.print("give a command after --, e.g. -- python3 -c 'print(6*7)'")
        raise typer.Exit(2)
    return argv


def _stream(sandbox: Sandbox, argv: list[str], timeout: float | None) -> int:
    """Run `argv` (one word: a shell command line) with its output on ours; its exit code."""

    def to(stream: Any) -> Any:
        def write(data: bytes) -> None:
            stream.buffer.write(data)
            stream.flush()

        return write

    shell = len(argv) == 1
    process = sandbox.exec(
        *([] if shell else argv),
        cmd=argv[0] if shell else None,
        timeout=timeout,
        on_stdout=to(sys.stdout),
        on_stderr=to(sys.stderr),
    )
    result = process.result()
    if result.timed_out:
        console.print("[red]command timed out[/red]")
    if result.oom_killed:
        console.print("[red]command was killed: out of memory[/red]")
    if result.exit_code is not None:
        return result.exit_code
    return 128 + (result.signal or 1)


@app.command(context_settings=PASS_THROUGH)
def run(
    ctx: typer.Context,
    image: S.Image = S.IMAGE,
    runtime: S.Runtime = None,
    network: S.Network = S.NETWORK,
    memory: S.Memory = S.MEMORY,
    cpu: S.Cpu = S.CPU,
    timeout: S.Timeout = S.TIMEOUT,
    volume: Volumes = None,
    no_pool: S.NoPool = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Run a command in a new sandbox, stream its output, end the sandbox; exit with its code."""
    argv = _command(ctx)
    with session(url, api_key) as sdk:
        with console.status("starting sandbox…"):
            sandbox = Sandbox.create(
                image,
                runtime,
                cpu=cpu,
                memory_mb=memory,
                timeout=timeout,
                network=network,
                volumes=volume_mounts(volume, sdk),
                pool=not no_pool,
                client=sdk,
            )
        try:
            console.print(f"[dim]{sandbox.id}: {escape(shlex.join(argv))}[/dim]", highlight=False)
            code = _stream(sandbox, argv, None)
        finally:
            with contextlib.suppress(CorralError):
                sandbox.terminate()
    raise typer.Exit(code)


@app.command("exec", context_settings=PASS_THROUGH)
def exec_command(
    ctx: typer.Context,
    sandbox_id: str,
    timeout: float | None = typer.Option(None, help="Kill the command after this many seconds."),
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Run a command in a sandbox, streaming its output; exit with its code."""
    argv = _command(ctx)
    with session(url, api_key) as sdk:
        code = _stream(Sandbox.connect(sandbox_id, client=sdk), argv, timeout)
    raise typer.Exit(code)


@app.command()
def shell(sandbox_id: str, url: Url = None, api_key: ApiKey = None) -> None:
    """An interactive shell (bash, else sh) on a terminal in the sandbox."""
    if not os.isatty(0):
        fail(InvalidRequest("corral shell needs a terminal; use corral exec for scripts"))
    with session(url, api_key) as sdk:
        sandbox = Sandbox.connect(sandbox_id, client=sdk)
        size = shutil.get_terminal_size()

        def write(data: bytes) -> None:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()

        process = sandbox.exec(
            cmd="command -v bash >/dev/null && exec bash -l; exec sh -l",
            pty=(size.lines, size.columns),
            stdin=True,
            on_stdout=write,
        )
        code = _interact(process)
    raise typer.Exit(code)


def _interact(process: Process) -> int:
    """Relay our terminal to the process's in raw mode until it exits."""
    done = threading.Event()
    codes: list[int] = []

    def waiter() -> None:
        try:
            codes.append(process.wait())
        finally:
            done.set()

    threading.Thread(target=waiter, daemon=True).start()

    def resized(signum: int, frame: object) -> None:
        size = shutil.get_terminal_size()
        with contextlib.suppress(CorralError):
            process.resize(size.lines, size.columns)

    previous = signal.signal(signal.SIGWINCH, resized)
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        while not done.is_set():
            ready, _, _ = select.select([0], [], [], 0.1)
            if ready:
                data = os.read(0, 4096)
                if not data:
                    process.stdin.close()
                    break
                process.stdin.write(data)
        done.wait()
    except CorralError:
        pass
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, previous)
    return codes[0] if codes else 1


def _split(location: str) -> tuple[str | None, str]:
    """("sb-…", "/path") for a sandbox location, (None, path) for a local one."""
    head, sep, tail = location.partition(":")
    if sep and head.startswith("sb-"):
        return head, tail
    return None, location


@app.command()
def cp(
    source: str = typer.Argument(help="A local path or sb-ID:/path."),
    target: str = typer.Argument(help="A local path or sb-ID:/path."),
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Copy a file into a sandbox or out of one (streamed, any size)."""
    src_sandbox, src = _split(source)
    dst_sandbox, dst = _split(target)
    if (src_sandbox is None) == (dst_sandbox is None):
        fail(InvalidRequest("exactly one side must be a sandbox path such as sb-…:/root/file"))
    with session(url, api_key) as sdk:
        if dst_sandbox is not None:
            local = Path(src)
            if not local.is_file():
                fail(InvalidRequest(f"{src} is not a file (directories are not copied yet)"))
            remote = dst + local.name if dst.endswith("/") else dst
            written = Sandbox.connect(dst_sandbox, client=sdk).files.upload(local, remote)
        else:
            assert src_sandbox is not None
            local = Path(dst)
            if local.is_dir():
                local = local / Path(src).name
            written = Sandbox.connect(src_sandbox, client=sdk).files.download(src, local)
    console.print(f"copied {written} bytes")


@pools_app.command("list")
def pools_list(url: Url = None, api_key: ApiKey = None, as_json: Json = False) -> None:
    """Each pool: template, target size, idle sandboxes, hits and misses."""
    with session(url, api_key) as sdk:
        pools = sdk.list_pools()
    if as_json:
        print(json.dumps(pools))
        return
    table = Table(Column("name", no_wrap=True), "runtime", "image", "cpu", "memory", "size")
    for column in ("idle", "hits", "misses", "last error"):
        table.add_column(column)
    for pool in pools:
        table.add_row(
            pool["name"],
            pool["runtime"],
            pool["image"],
            f"{pool['cpu']:g}",
            f"{pool['memory_mb']} MiB",
            str(pool["size"]),
            str(pool["idle"]),
            str(pool["hits"]),
            str(pool["misses"]),
            pool["last_error"] or "",
        )
    out.print(table)


@pools_app.command("set")
def pools_set(
    name: str,
    size: int = typer.Option(..., help="Idle sandboxes to keep started."),
    image: str = typer.Option("debian", help="Image."),
    runtime: str | None = typer.Option(None, help="namespaces or gvisor (default: strongest)."),
    cpu: float = typer.Option(1.0, help="CPU limit in cores."),
    memory: int = typer.Option(512, help="Memory limit in MiB."),
    disk: int = typer.Option(2048, help="Disk quota in MiB."),
    network: str = typer.Option("none", help="none or internet."),
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Create or resize a pool (admin key); creates with the same settings claim from it."""
    template = {"image": image, "runtime": runtime, "cpu": cpu, "memory_mb": memory}
    template.update(disk_mb=disk, network=network)
    with session(url, api_key) as sdk:
        pool = sdk.set_pool(name, size, **template)
    console.print(f"pool {pool['name']}: {pool['size']} x {pool['runtime']}/{pool['image']}")


@pools_app.command("remove")
def pools_remove(name: str, url: Url = None, api_key: ApiKey = None) -> None:
    """Remove a pool and end its idle sandboxes (admin key)."""
    with session(url, api_key) as sdk:
        sdk.remove_pool(name)
    console.print(f"pool {name} removed")

"""Commands that act on this machine directly: serve and doctor (as root)."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from corral.cli._common import DATABASE_URL_VAR, DataDir, app, console, fail, out
from corral.core.egress import EgressPolicy
from corral.core.errors import CorralError, InvalidRequest
from corral.core.spec import SandboxSpec
from corral.engine import Engine, default_data_dir, lock_data_dir
from corral.engine.doze import DOZE_AFTER
from corral.runtimes import PREFERENCE

if TYPE_CHECKING:
    from corral.server.config import ServerConfig
    from corral.server.tls import TlsFiles

T = TypeVar("T")
# Seconds an idle HTTP connection stays open: longer than clients keep theirs (httpx, and so
# the SDKs: 5 s), so a client never sends a request on a connection the server is closing at
# that moment; uvicorn's 5 s lost commands to that race in bursts of gVisor creates.
KEEP_ALIVE = 30

PoolOption = Annotated[
    list[str] | None,
    typer.Option(help="A warm pool, RUNTIME:IMAGE:SIZE (IMAGE 'default' is debian); repeatable."),
]

RegistryOption = Annotated[
    list[str] | None,
    typer.Option(
        envvar="CORRAL_ALLOWED_REGISTRIES",
        help="A registry (host or host:port) image pulls may reach though it is not a public "
        "address; repeatable. Without it, pulls reach public addresses only.",
    ),
]

TlsOption = Annotated[
    str,
    typer.Option(
        help="'auto': serve TLS 1.3 with a certificate from a local CA kept in the data "
        "directory (clients trust it with CORRAL_CA); 'off': plain HTTP, for loopback."
    ),
]
TlsCert = Annotated[
    Path | None, typer.Option(help="Serve TLS 1.3 with this certificate (PEM, chain included).")
]
TlsKey = Annotated[Path | None, typer.Option(help="The private key of --tls-cert (PEM).")]
TlsName = Annotated[
    list[str] | None,
    typer.Option(help="Another name or address clients use, for --tls auto; repeatable."),
]

AtRestKey = Annotated[
    Path | None,
    typer.Option(
        envvar="CORRAL_AT_REST_KEY",
        help="Key file sealing hibernation images, snapshots and sandbox secrets (0600, one "
        "hex key per line, the first seals). Default: at-rest.key in the data directory, "
        "made on first start.",
    ),
]

ImageQuota = Annotated[
    int, typer.Option(help="Disk one API key's images may take (MiB); checked before each build.")
]
EgressAllow = Annotated[
    list[str] | None,
    typer.Option(
        envvar="CORRAL_EGRESS_ALLOW",
        help="The operator's floor: internet sandboxes reach only these names, *.wildcards and "
        "IPv4 CIDRs, whatever their own rules say; repeatable. Default: anywhere public.",
    ),
]
EgressDeny = Annotated[
    list[str] | None,
    typer.Option(
        envvar="CORRAL_EGRESS_DENY",
        help="The operator's floor: internet sandboxes never reach these; repeatable.",
    ),
]
DnsUpstream = Annotated[
    list[str] | None,
    typer.Option(
        envvar="CORRAL_DNS_UPSTREAM",
        help="Nameservers Corral's resolver asks for sandboxes; default: the host's.",
    ),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar=DATABASE_URL_VAR,
        help="A PostgreSQL database for the store (postgresql://USER:PASSWORD@HOST/DB), shared "
        "by servers; set it in the environment to keep the password out of process lists. "
        "sqlite:////PATH shares a SQLite file between servers of one machine. "
        "Default: SQLite in the data directory.",
        show_default=False,
    ),
]
WebhookUrl = Annotated[
    str | None,
    typer.Option(
        "--webhook",
        envvar="CORRAL_WEBHOOK_URL",
        help="POST every key's sandbox events here, signed with CORRAL_WEBHOOK_SECRET.",
    ),
]
WebhookHosts = Annotated[
    list[str] | None,
    typer.Option(
        envvar="CORRAL_ALLOWED_WEBHOOK_HOSTS",
        help="A host (or host:port) keys' webhooks may name though it is not a public "
        "address; repeatable.",
    ),
]
AuditRetention = Annotated[
    float,
    typer.Option(
        envvar="CORRAL_AUDIT_RETENTION",
        help="Days the audit log keeps each entry; 0 records nothing.",
        min=0,
    ),
]
PreviewDomain = Annotated[
    str | None,
    typer.Option(
        envvar="CORRAL_PREVIEW_DOMAIN",
        help="Serve previews at {port}-{sandbox}.DOMAIN (wildcard DNS to this server; "
        "host[:port] as clients reach it). Without it, previews are under /preview/.",
    ),
]
OpenHostImage = Annotated[
    bool,
    typer.Option(help="Let every key use the host image (this machine's files), not only admins."),
]


class LogFormats(enum.StrEnum):
    text = "text"
    json = "json"


LogFormat = Annotated[
    LogFormats,
    typer.Option(help="json: one object per line with the request id, key and sandbox id."),
]
ClusterOption = Annotated[
    str | None,
    typer.Option(help="Serve as the front of a cluster: local:N starts a Ray cluster of N "
                 "nodes on this machine, each running a Corral node; auto, HOST:PORT or "
                 "ray://HOST:PORT joins a running Ray cluster, whose nodes that offer the "
                 "resource corral_node run one each (needs --database-url postgresql://… and "
                 "--at-rest-key; docs/cluster.md)."),
]  # fmt: skip
NodeName = Annotated[
    str | None,
    typer.Option(help="This machine's name in sandboxes' info and `corral nodes list` "
                 "(default: its host name)."),
]  # fmt: skip
BootImages = Annotated[
    bool, typer.Option(help="Start gvisor sandboxes from a saved boot of their configuration.")
]
StartLimit = Annotated[
    int | None,
    typer.Option(min=0, help="Sandboxes starting at once, the others waiting their turn "
                 "(default: 2 per CPU; 0: no bound)."),
]  # fmt: skip
DozeAfter = Annotated[
    float,
    typer.Option(min=0, help="Seconds a gvisor sandbox with nothing of its own running may "
                 "stay unused before it is frozen until its next use (0: never)."),
]  # fmt: skip
Favordynmods = Annotated[
    bool,
    typer.Option(help="Turn on the kernel's favordynmods cgroup mode, for the whole host until "
                 "it reboots: every sandbox start moves processes between cgroups, which "
                 "otherwise waits on the kernel (docs/performance.md)."),
]  # fmt: skip
HostScopeOption = Annotated[
    int | None,
    typer.Option(
        "--host-scope",
        min=0,
        max=15,
        help="Share this machine with other Corral engines: each uses its own scope, 0 to 15 "
        "(its cgroup, firewall table, interface names and a sixteenth of the uid and address "
        "ranges). Without it, the engine takes the whole machine.",
    ),
]
Overcommit = Annotated[
    str,
    typer.Option(
        help="What live sandboxes may ask for together, as multiples of this machine's CPUs, "
        "memory and data disk: e.g. 'cpu=128,memory=16,disk=8' (the defaults); past it, "
        "creates get 429 node_full."
    ),
]


@app.command()
def doctor(data_dir: DataDir = None, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show which runtimes this machine can run, and why not where it cannot."""
    engine = Engine(data_dir)
    rows = {name: engine.runtimes.unavailable_reason(name) for name in PREFERENCE}
    if as_json:
        print(json.dumps({name: {"available": r is None, "reason": r} for name, r in rows.items()}))
        return
    table = Table("runtime", "status")
    for name, reason in rows.items():
        table.add_row(
            name, "[green]available[/green]" if reason is None else f"[red]{reason}[/red]"
        )
    out.print(table)
    console.print(f"data directory: {engine.data_dir}")


def _floor(allow: list[str] | None, deny: list[str] | None) -> EgressPolicy:
    return EgressPolicy.parse({"allow": _items(allow) or None, "deny": _items(deny)})


def _items(given: list[str] | None) -> tuple[str, ...]:
    """Repeated options, each of which may also be a comma-separated list."""
    return tuple(name.strip() for item in given or () for name in item.split(",") if name.strip())


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8470, help="Port to listen on."),
    data_dir: DataDir = None,
    runtime: str | None = typer.Option(None, help="Default runtime (default: strongest)."),
    prepare: bool = typer.Option(True, help="Build the default image before serving."),
    max_sandboxes_per_key: int = typer.Option(100, help="Live sandboxes one API key may have."),
    max_sandboxes: int = typer.Option(2000, help="Live sandboxes on this node, all keys."),
    pool: PoolOption = None,
    boot_images: BootImages = True,
    start_limit: StartLimit = None,
    doze_after: DozeAfter = DOZE_AFTER,
    favordynmods: Favordynmods = True,
    allow_registry: RegistryOption = None,
    tls: TlsOption = "off",
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_name: TlsName = None,
    at_rest_key: AtRestKey = None,
    max_image_mib_per_key: ImageQuota = 65536,
    open_host_image: OpenHostImage = False,
    preview_domain: PreviewDomain = None,
    egress_allow: EgressAllow = None,
    egress_deny: EgressDeny = None,
    dns_upstream: DnsUpstream = None,
    webhook: WebhookUrl = None,
    allow_webhook_host: WebhookHosts = None,
    audit_retention: AuditRetention = 90.0,
    database_url: DatabaseUrl = None,
    overcommit: Overcommit = "",
    host_scope: HostScopeOption = None,
    node_name: NodeName = None,
    cluster: ClusterOption = None,
    log_level: str = typer.Option("info", help="uvicorn log level."),
    log_format: LogFormat = LogFormats.text,
) -> None:
    """Start the Corral server; it prints its URL, an API key and an example to try."""
    from corral.server.config import ServerConfig  # only here: client commands start fast

    try:
        config = _with_overcommit(ServerConfig(
            data_dir=data_dir or default_data_dir(), default_runtime=runtime,
            max_sandboxes_per_key=max_sandboxes_per_key, max_sandboxes=max_sandboxes,
            pools=tuple(_parse_pool(item) for item in pool or ()), boot_images=boot_images,
            allowed_registries=_items(allow_registry), at_rest_key=at_rest_key,
            open_host_image=open_host_image, preview_domain=preview_domain,
            max_image_bytes_per_key=max_image_mib_per_key << 20, cluster=cluster,
            egress_floor=_floor(egress_allow, egress_deny), dns_upstream=_items(dns_upstream),
            webhook_url=webhook, webhook_secret=os.environ.get("CORRAL_WEBHOOK_SECRET"),
            webhook_hosts=_items(allow_webhook_host), audit_retention=audit_retention * 86400,
            database_url=database_url or None, host_scope=host_scope, node_name=node_name,
            start_limit=start_limit, doze_after=doze_after or None,
            favordynmods=favordynmods), overcommit)  # fmt: skip
        secure = _tls_files(config.data_dir, host, tls, tls_cert, tls_key, tuple(tls_name or ()))
        key_note = _ready(config, prepare)
    except CorralError as error:
        fail(error)
    _banner(host, port, key_note, secure)
    _run(config, host, port, (log_level, log_format), secure)


def _ready(config: ServerConfig, prepare: bool) -> tuple[str, str | None]:
    """Check the key file, make the first API key, take the data directory and (`prepare`)
    build the default image, so that a failure shows before the banner; the key's note."""
    config.key_ring().check()  # an unusable key file is refused before anything starts
    key_note = asyncio.run(_bootstrap_keys(config))
    os.close(lock_data_dir(config.data_dir))  # fail now, not after the banner
    if prepare:
        _prepare_image(config)
    return key_note


def _run(
    config: ServerConfig, host: str, port: int, logs: tuple[str, str], secure: TlsFiles | None
) -> None:
    import uvicorn

    from corral.server.app import create_app
    from corral.server.logs import use_json
    from corral.server.writes import HttpProtocol

    log_level, log_format = logs
    options: dict[str, Any] = {}
    if log_format == "json":
        use_json(log_level)
        options["log_config"] = None  # uvicorn's loggers go to the root's JSON handler
    if config.cluster is not None:
        from corral.server.cluster.api import create_front_app

        app = create_front_app(config)
    else:
        app = create_app(config)
    uvicorn.run(
        app,
        host=host,
        port=port,
        http=HttpProtocol,  # a response's head and body in one write
        log_level=log_level,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=KEEP_ALIVE,
        ws_max_size=16 * 1024 * 1024,
        ssl_context_factory=(lambda _config, _default: secure.context()) if secure else None,
        **options,
    )


def _with_overcommit(config: ServerConfig, text: str) -> ServerConfig:
    """`config` with `--overcommit`'s 'cpu=N,memory=N,disk=N' (any of them)."""
    ratios: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if name not in ("cpu", "memory", "disk") or not 0 < ratio <= 10_000:
            raise InvalidRequest(
                f"--overcommit {item!r}: give cpu=, memory= or disk= with a ratio above 0, "
                "e.g. --overcommit memory=4",
                code="invalid_overcommit",
            )
        ratios[name] = ratio
    return dataclasses.replace(
        config,
        cpu_overcommit=ratios.get("cpu", config.cpu_overcommit),
        memory_overcommit=ratios.get("memory", config.memory_overcommit),
        disk_overcommit=ratios.get("disk", config.disk_overcommit),
    )


def _tls_files(
    data_dir: Path,
    host: str,
    mode: str,
    cert: Path | None,
    key: Path | None,
    names: tuple[str, ...],
) -> TlsFiles | None:
    """What `--tls`, `--tls-cert/--tls-key` and `--tls-name` ask for, checked."""
    from corral.server import tls

    if mode not in ("off", "auto"):
        raise InvalidRequest(f"--tls must be 'auto' or 'off', not {mode!r}", code="invalid_tls")
    if mode == "auto" and (cert or key):
        raise InvalidRequest(
            "--tls auto makes its own certificate: drop --tls-cert/--tls-key, or --tls auto",
            code="invalid_tls",
        )
    if names and mode != "auto":
        raise InvalidRequest("--tls-name is for --tls auto certificates", code="invalid_tls")
    if mode == "auto":
        return tls.auto_files(data_dir / "tls", host, names)
    return tls.operator_files(cert, key)


def _parse_pool(item: str) -> tuple[str, SandboxSpec, int]:
    """RUNTIME:IMAGE:SIZE, as in `--pool gvisor:default:4`."""
    parts = item.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        raise InvalidRequest(f"--pool {item!r} must read RUNTIME:IMAGE:SIZE, e.g. gvisor:default:4")
    runtime, image, size = parts
    image = "debian" if image == "default" else image
    return f"{runtime}-{image}", SandboxSpec(image=image, runtime=runtime), int(size)


MIN_KEY_LENGTH = 32
MIN_KEY_SYMBOLS = 16


def check_key_strength(secret: str) -> None:
    """Refuse a key an operator chose that could be guessed: short, or of few symbols."""
    if len(secret) < MIN_KEY_LENGTH or len(set(secret)) < MIN_KEY_SYMBOLS:
        raise InvalidRequest(
            f"CORRAL_API_KEY is too weak: use at least {MIN_KEY_LENGTH} characters of at least "
            f"{MIN_KEY_SYMBOLS} different symbols, such as the output of "
            "python3 -c 'import secrets; print(\"corral_\" + secrets.token_urlsafe(32))'",
            code="weak_key",
        )


async def _bootstrap_keys(config: ServerConfig) -> tuple[str, str | None]:
    """("env" | "new" | "existing", the secret to show once)."""
    from corral.server.store import Store

    store = await Store.open(config.database, config.key_ring())
    try:
        secret = os.environ.get("CORRAL_API_KEY")
        if secret:
            check_key_strength(secret)
            await store.ensure_key(secret, "admin (CORRAL_API_KEY)", admin=True)
            return "env", None  # the operator's own: never printed
        if not await store.has_keys():
            _, secret = await store.create_key("admin", admin=True)
            return "new", secret
        return "existing", None
    finally:
        await store.close()


def _prepare_image(config: ServerConfig) -> None:
    engine = Engine(config.data_dir, default_runtime=config.default_runtime)
    try:
        engine.runtimes.default  # noqa: B018 - raises, with the reason, when no runtime can run
    except CorralError as error:
        console.print(f"[yellow]warning[/yellow]: {escape(error.message)}")
        return
    with console.status("preparing the debian image (about 30 s, once)…") as status:
        engine.images.resolve("debian", progress=lambda line: status.update(line[:100]))


def _banner(
    host: str, port: int, key_note: tuple[str, str | None], secure: TlsFiles | None
) -> None:
    from corral.server.tls import plain_http_warning

    shown_host = f"[{host}]" if ":" in host else host
    url = f"{'https' if secure else 'http'}://{shown_host}:{port}"
    kind, secret = key_note
    # A key is printed once, when it is made: never again, so never into a log of every start.
    shown = secret if kind == "new" else "<your key>"
    say = console.print
    text = functools.partial(say, highlight=False, soft_wrap=True, markup=False)  # paths, keys
    say(f"\n[bold green]Corral[/bold green] serves on [bold]{url}[/bold] (API: {url}/docs)")
    exports = f"CORRAL_URL={url} CORRAL_API_KEY={shown}"
    if secure is not None and secure.ca is not None:
        text(f"TLS 1.3, certificate from the local CA {secure.ca}")
        text(f"  its SHA-256 fingerprint: {secure.fingerprint()}")
        exports += f" CORRAL_CA={secure.ca}"
    elif secure is not None:
        text(f"TLS 1.3 with {secure.cert} (SHA-256 {secure.fingerprint()})")
    elif warning := plain_http_warning(host):
        say(f"[yellow]warning[/yellow]: {escape(warning)}", highlight=False, soft_wrap=True)
    if kind == "new":
        say(f"Admin API key (shown once, keep it): [bold]{secret}[/bold]", soft_wrap=True)
    elif kind == "env":
        say("Using the API key in CORRAL_API_KEY (admin); it is not shown.")
    else:
        say("API keys exist already; `corral keys create NAME` makes another.")
    python = (
        "import corral; sb = corral.Sandbox.create(); "
        'print(sb.run(["python3", "-c", "print(6*7)"]).stdout); sb.terminate()'
    )
    text(
        "Try it from another terminal:\n"
        f"  export {exports}\n"
        "  .venv/bin/corral run -- python3 -c 'print(6*7)'\n"
        f"  .venv/bin/python -c '{python}'\n"
    )

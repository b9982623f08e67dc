"""How a server runs: every setting has an embedded default."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from corral.core.egress import EgressPolicy
from corral.core.errors import InvalidRequest
from corral.core.spec import SandboxSpec
from corral.engine.doze import DOZE_AFTER
from corral.engine.sealing import KEY_FILE, KeyRing

SQLITE = "sqlite:///"  # a --database-url naming a SQLite file: sqlite:////abs/path
MAX_LOCAL_NODES = 16  # one host scope each (corral.host.scope)
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# What a front joins: the local Ray node (`auto`), a GCS address, or a Ray Client address.
RAY_ADDRESS = re.compile(r"auto|(ray://)?[A-Za-z0-9][A-Za-z0-9.-]*:[0-9]{1,5}")


FRONT_KEY_ENV = "CORRAL_CLUSTER_FRONT_KEY_ID"


@dataclass
class ServerConfig:
    """The settings of one `corral serve`."""

    data_dir: Path
    default_runtime: str | None = None
    max_body_bytes: int = 1024 * 1024  # JSON bodies; file uploads stream and are not limited
    max_sandboxes_per_key: int = 100
    max_sandboxes: int = 2000  # live sandboxes on this node, all keys together
    pools: tuple[tuple[str, SandboxSpec, int], ...] = ()  # (name, template, size)
    boot_images: bool = True  # start gvisor sandboxes from saved boots (corral.engine.boots)
    start_limit: int | None = None  # runtimes starting at once (corral.engine.gate); 0: any
    doze_after: float | None = DOZE_AFTER  # idle seconds before dozing (corral.engine.doze)
    favordynmods: bool = True  # the host's cgroup mode (corral.host.cgroups)
    max_output_bytes: int = 8 * 1024 * 1024  # per stream of a command run to completion
    max_blob_bytes: int = 8 * 1024**3  # one upload for an image build (an archive, copied files)
    max_volumes_per_key: int = 100
    max_image_bytes_per_key: int = 64 * 1024**3  # what one key's images take, checked per build
    # What live sandboxes may ask for together, as multiples of the machine's CPUs, memory and
    # data disk: limits are ceilings (an idle sandbox uses a few MiB of its memory_mb, CPU is
    # a share, disks are sparse), so the node holds more than it could if all were used at once.
    cpu_overcommit: float = 128.0
    memory_overcommit: float = 16.0
    disk_overcommit: float = 8.0
    auth_failures_per_minute: int = 30  # per client address, then 429 until the minute passes
    # Registries image pulls may reach though they are not public addresses (`host[:port]`).
    allowed_registries: tuple[str, ...] = ()
    open_host_image: bool = False  # the `host` image for every key, not only admin keys
    # Previews by host name, `{port}-{sandbox}.{preview_domain}` (wildcard DNS to this server;
    # host[:port] as clients reach it); without it, by path (`/preview/{sandbox}/{port}/`).
    preview_domain: str | None = None
    # The operator's key file for data at rest; without it, the data directory's own.
    at_rest_key: Path | None = None
    # Egress rules every internet sandbox is held to, whatever its own say (docs/network.md).
    egress_floor: EgressPolicy = field(default_factory=EgressPolicy)
    dns_upstream: tuple[str, ...] = ()  # where Corral's resolver asks; default: the host's
    # The operator's webhook: every key's sandbox events, signed with this secret.
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_hosts: tuple[str, ...] = ()  # hosts keys' webhooks may name though not public
    audit_retention: float = 90 * 86400.0  # seconds the audit log keeps an entry; 0: no log
    # The store shared by servers: a postgresql:// URL; without one, SQLite in `data_dir`.
    database_url: str | None = None
    host_scope: int | None = None  # this engine's share of a machine others run on too
    node_name: str | None = None  # in each sandbox's info; default: the host name
    # Serve as a cluster's front: `local:N`, or the Ray cluster to join (corral.server.cluster).
    cluster: str | None = None
    # Set on a cluster's node (the id of the key of the front that started it): only a
    # front's own key (`corral-front…`) may copy snapshots (their memory) between nodes.
    front_key_id: str | None = field(default_factory=lambda: os.environ.get(FRONT_KEY_ENV) or None)

    def __post_init__(self) -> None:
        if self.cluster is not None:
            self._check_cluster()
        sqlite = self.database_url or ""
        if sqlite.startswith(SQLITE) and not Path(sqlite.removeprefix(SQLITE)).is_absolute():
            raise InvalidRequest(
                f"--database-url {self.database_url!r} names a relative SQLite file; "
                "use sqlite:////absolute/path/corral.db",
                code="invalid_database_url",
            )
        if self.node_name is not None and not NODE_NAME.fullmatch(self.node_name):
            raise InvalidRequest(
                f"node name {self.node_name!r} is not 1 to 64 letters, digits, '.', '_' or "
                "'-'; choose another with --node-name",
                code="invalid_node_name",
            )
        if self.webhook_url is not None and not self.webhook_secret:
            raise InvalidRequest(
                "--webhook needs a secret to sign with: set CORRAL_WEBHOOK_SECRET",
                code="invalid_webhook",
            )

    @property
    def database(self) -> Path | str:
        """Where the store is: the PostgreSQL URL, or the SQLite file in the data directory."""
        if self.database_url and self.database_url.startswith(SQLITE):
            return Path(self.database_url.removeprefix(SQLITE))  # servers on one machine
        return self.database_url or self.data_dir / "corral.db"

    @property
    def cluster_nodes(self) -> int:
        """The node count of a ``local:N`` cluster; 0 for a Ray cluster the front joins."""
        kind, _, count = (self.cluster or "").partition(":")
        return int(count) if kind == "local" and count.isdigit() else 0

    @property
    def ray_address(self) -> str | None:
        """The Ray cluster a front joins (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``), or
        None for a local one."""
        local = self.cluster is None or self.cluster.startswith("local:")
        return None if local else self.cluster

    def _check_cluster(self) -> None:
        """Refuse a `--cluster` that is not one of its forms, saying what they are, and a
        joined cluster without what its nodes on other machines must share."""
        cluster = self.cluster or ""
        if not (
            1 <= self.cluster_nodes <= MAX_LOCAL_NODES
            if cluster.startswith("local:")
            else RAY_ADDRESS.fullmatch(cluster)
        ):
            raise InvalidRequest(
                f"--cluster {cluster!r} is not supported: use local:N, a Ray cluster of N (1 to "
                f"{MAX_LOCAL_NODES}) nodes on this machine, or join a running Ray cluster with "
                "auto (this machine is one of its nodes), HOST:PORT (its GCS address) or "
                "ray://HOST:PORT (Ray Client)",
                code="invalid_cluster",
            )
        if self.ray_address is None:
            return
        if isinstance(self.database, Path):
            raise InvalidRequest(
                "a joined Ray cluster's nodes run on other machines and share one store: give "
                "--database-url postgresql://USER@HOST/DB (docs/cluster.md)",
                code="invalid_cluster",
            )
        if self.at_rest_key is None:
            raise InvalidRequest(
                "a joined Ray cluster's nodes share one key for data at rest: give "
                "--at-rest-key FILE, a file present at that path on every node (docs/cluster.md)",
                code="invalid_cluster",
            )

    @property
    def key_file(self) -> Path:
        """The file of the keys of data at rest: the operator's, or the data directory's own."""
        return self.at_rest_key or self.data_dir / KEY_FILE

    def key_ring(self) -> KeyRing:
        """The keys of data at rest (read when first used; see `corral.engine.sealing`)."""
        return KeyRing(path=self.key_file, create=self.at_rest_key is None)

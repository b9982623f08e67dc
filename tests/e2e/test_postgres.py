"""A server whose store is PostgreSQL (`--database-url`, CORRAL_DATABASE_URL): a real server
from Debian's package (tests/postgres.py), one database per test.

The store-heavy tests of other modules run here again on PostgreSQL (imported below: pytest
runs them with this module's `server`), and these add what only PostgreSQL has: a store that
outlives the server's data directory, shared by the CLI, and its errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral import Sandbox
from corral.core.errors import InvalidRequest, ServiceUnavailable
from corral.engine.sealing import KeyRing
from corral.server.audit.log import AuditLog
from corral.server.store import Store
from tests.conftest import require_runtime
from tests.e2e.conftest import SERVER_DIR, Server, free_port, start_server
from tests.e2e.test_audit import (  # noqa: F401 - run again on PostgreSQL
    test_each_key_reads_its_own_and_an_admin_reads_all,
    test_pages_and_filters,
)
from tests.e2e.test_keys import (  # noqa: F401 - run again on PostgreSQL
    test_an_admin_sees_and_ends_any_sandbox,
    test_quotas_limit_a_key_and_show_its_usage,
)
from tests.e2e.test_tenancy import (  # noqa: F401 - run again on PostgreSQL
    owned,
    test_every_route_hides_one_keys_resources_from_another,
)
from tests.postgres import Postgres, running_postgres
from tests.unit.test_audit_pieces import entry as audit_entry

PG_SERVER_DIR = SERVER_DIR.with_name(SERVER_DIR.name + "-pg")


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as running:
        yield running


@pytest.fixture(scope="module")
def server(data_dir: Path, postgres: Postgres) -> Iterator[Server]:
    """One server for the module (as test_tenancy's `owned` needs), its store in PostgreSQL;
    the CLI commands the tests run get the same URL."""
    require_runtime("namespaces")
    url = postgres.database()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CORRAL_DATABASE_URL", url)
        running = start_server(PG_SERVER_DIR, data_dir / "images")
        yield running
        running.stop_and_clean()


def test_the_store_lives_in_postgresql_across_restarts(server: Server) -> None:
    tenant = server.new_key("pg-tenant")
    with server.client(tenant) as sdk:
        sandbox = Sandbox.create(runtime="namespaces", timeout=600, metadata={"k": "v"}, client=sdk)
        assert sandbox.run("echo hi").stdout == "hi\n"
    server.stop()
    assert not list(server.data_dir.glob("corral.db*"))  # nothing went to SQLite
    server.start()
    with server.client(tenant) as sdk:
        again = Sandbox.connect(sandbox.id, client=sdk)
        assert again.state is corral.SandboxState.RUNNING
        assert again.info().spec.metadata == {"k": "v"}
        assert [s.id for s in corral.Sandbox.list(client=sdk)] == [sandbox.id]
        again.terminate()
    # The CLI manages keys in the same database, given the same URL.
    listed = subprocess.run(
        [sys.executable, "-m", "corral", "keys", "list", "--json", "--data-dir",
         str(server.data_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "pg-tenant" in {key["name"] for key in json.loads(listed.stdout)}


async def test_a_long_value_from_a_tenant_never_costs_the_audit_log_its_batch(
    postgres: Postgres,
) -> None:
    """PostgreSQL refuses text longer than its column, and would drop the whole batch with it
    (SQLite keeps it): an error name comes from the tenant's code, so it is cut to fit."""
    keys = KeyRing([bytes(32)])
    store = await Store.open(postgres.database(), keys)
    log = AuditLog(retention=3600)
    await log.start(store.sessions, keys)
    for error in ("fine", "E" * 5000, "also_fine"):
        log.add(audit_entry(time.time(), error=error, operation="code " + "x" * 500))
    entries = await log.query()
    await log.close()
    await store.close()
    assert [len(e.error or "") for e in entries] == [4, 64, 9]
    assert all(len(e.operation) == 200 for e in entries)


async def test_a_bad_or_unreachable_database_is_refused_clearly(tmp_path: Path) -> None:
    keys = KeyRing([bytes(32)])
    for bad in ("mysql://db/corral", "sqlite:///x.db", "postgresql://", "corral"):
        with pytest.raises(InvalidRequest) as refused:
            await Store.open(bad, keys)
        assert refused.value.code == "invalid_database_url" and refused.value.status_code == 400
    with pytest.raises(ServiceUnavailable) as down:
        await Store.open(f"postgresql://corral@127.0.0.1:{free_port()}/corral", keys)
    assert down.value.code == "store_unavailable" and "database URL" in down.value.message


def test_serve_refuses_a_bad_database_url_before_starting(tmp_path: Path) -> None:
    started = subprocess.run(
        [sys.executable, "-m", "corral", "serve", "--data-dir", str(tmp_path), "--no-prepare",
         "--port", str(free_port())],
        env={**os.environ, "CORRAL_DATABASE_URL": "mysql://db/corral"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert started.returncode != 0
    assert "invalid_database_url" in started.stderr and "postgresql://" in started.stderr


async def test_a_data_directory_with_a_percent_sign_opens(tmp_path: Path) -> None:
    """SQLite's URL goes through Alembic's config parser, where "%" is interpolation."""
    store = await Store.open(tmp_path / "50%-full" / "corral.db", KeyRing([bytes(32)]))
    key, _ = await store.create_key("percent")
    assert (await store.find_key("percent")).id == key.id
    await store.close()

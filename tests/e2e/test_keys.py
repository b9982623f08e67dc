"""Keys: never printed after creation, strong enough, not guessable at speed; revoking one ends its
sandboxes; an admin can see and end any sandbox."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import corral
from corral import Sandbox
from corral.core.state import EndReason
from corral.server.throttle import FailedLogins
from tests.e2e.conftest import Server


def test_the_banner_never_shows_the_environments_key(server: Server) -> None:
    assert server.admin_key not in server.log.read_text()


def test_a_weak_key_from_the_environment_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "CORRAL_API_KEY": "secret123"}
    done = subprocess.run(
        [sys.executable, "-m", "corral", "serve", "--data-dir", str(tmp_path), "--no-prepare"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
        start_new_session=True,
    )
    assert done.returncode == 2
    assert "weak_key" in done.stderr and "secret123" not in done.stderr


def test_failed_logins_are_throttled_per_address(server: Server) -> None:
    """From one address, past the limit, every key (the right one too) is refused for a
    while; other addresses are not affected."""
    other = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=server.url, transport=other, timeout=30) as http:
        for _ in range(30):
            bad = http.get("/v1/sandboxes", headers={"Authorization": "Bearer corral_guess"})
            assert bad.status_code == 401
        throttled = http.get("/v1/sandboxes", headers={"Authorization": "Bearer corral_guess"})
        assert throttled.status_code == 429
        assert throttled.json()["error"]["code"] == "auth_throttled"
        assert int(throttled.headers["retry-after"]) > 0
        right = {"Authorization": f"Bearer {server.admin_key}"}
        assert http.get("/v1/sandboxes", headers=right).status_code == 429
    good = httpx.get(
        f"{server.url}/v1/sandboxes", headers={"Authorization": f"Bearer {server.admin_key}"}
    )
    assert good.status_code == 200


def test_the_throttle_forgets_and_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("corral.server.throttle.time.monotonic", lambda: now[0])
    throttle = FailedLogins(limit=3, window=60)
    for _ in range(3):
        throttle.check("a")
        throttle.failed("a")
    with pytest.raises(corral.LimitReached) as refused:
        throttle.check("a")
    assert refused.value.retry_after == 60
    throttle.check("b")
    now[0] += 61
    throttle.check("a")  # the window has passed


def test_revoking_a_key_ends_its_sandboxes(server: Server) -> None:
    secret = server.new_key("short-lived-worker")
    with server.client(secret) as tenant:
        sandbox = Sandbox.create(runtime="namespaces", client=tenant)
        key_id = next(k["id"] for k in _keys(server) if k["name"] == "short-lived-worker")
        revoked = httpx.delete(
            f"{server.url}/v1/keys/{key_id}",
            headers={"Authorization": f"Bearer {server.admin_key}"},
        )
        assert revoked.status_code == 200
    with server.client() as admin:
        live = [info.id for _owner, info in admin.list_all_sandboxes()]
        assert sandbox.id not in live
    with server.client(secret) as revoked_client, pytest.raises(corral.AuthError):
        Sandbox.connect(sandbox.id, client=revoked_client)
    with sqlite3.connect(server.data_dir / "corral.db") as db:  # why it ended, as recorded
        (reason,) = db.execute(
            "SELECT end_reason FROM sandboxes WHERE id = ?", (sandbox.id,)
        ).fetchone()
    assert reason == EndReason.KEY_REVOKED.value


def test_an_admin_sees_and_ends_any_sandbox(server: Server) -> None:
    secret = server.new_key("ordinary")
    with server.client(secret) as tenant, server.client() as admin:
        sandbox = Sandbox.create(runtime="namespaces", client=tenant)
        owners = {info.id: owner for owner, info in admin.list_all_sandboxes()}
        assert sandbox.id in owners
        with pytest.raises(corral.PermissionDenied):
            tenant.list_all_sandboxes()
        with pytest.raises(corral.PermissionDenied):
            tenant.end_sandbox(sandbox.id)
        ended = admin.end_sandbox(sandbox.id)
        assert ended.end_reason is EndReason.ADMIN
        assert sandbox.info().end_reason is EndReason.ADMIN  # the owner sees why
        with pytest.raises(corral.SandboxNotFound):
            admin.end_sandbox(sandbox.id)


def _keys(server: Server) -> list[dict[str, object]]:
    listed = httpx.get(
        f"{server.url}/v1/keys", headers={"Authorization": f"Bearer {server.admin_key}"}
    )
    listed.raise_for_status()
    return list(listed.json())


def test_quotas_limit_a_key_and_show_its_usage(server: Server) -> None:
    tenant = server.new_key("quota-tenant")
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    quota_url = f"{server.url}/v1/keys/quota-tenant/quota"
    for bad in ({"memory_mb": -1}, {"memory": 5}, {"cpu": "lots"}):
        refused = httpx.put(quota_url, json=bad, headers=admin, timeout=30)
        assert refused.status_code == 400, refused.text
    limits = {"memory_mb": 1024, "volume_mb": 64, "blob_bytes": 100}
    assert httpx.put(quota_url, json=limits, headers=admin, timeout=30).status_code == 200
    blob = b"x" * 200
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    mine = {"Authorization": f"Bearer {tenant}"}
    with server.client(tenant) as client:
        first = Sandbox.create(runtime="namespaces", memory_mb=512, client=client)
        try:
            with pytest.raises(corral.LimitReached) as past:
                Sandbox.create(runtime="namespaces", memory_mb=1024, client=client)
            assert past.value.code == "quota_exceeded" and "memory_mb" in past.value.message
            corral.Volume.create("quota-vol", size_mb=64, client=client)
            with pytest.raises(corral.LimitReached):
                corral.Volume.create("quota-vol-2", size_mb=16, client=client)
            put = httpx.put(f"{server.url}/v1/blobs/{digest}", content=blob, headers=mine)
            assert put.status_code == 201
            again = httpx.put(f"{server.url}/v1/blobs/{digest}", content=blob, headers=mine)
            assert again.status_code == 429 and again.json()["error"]["code"] == "quota_exceeded"
            shown = httpx.get(quota_url, headers=admin, timeout=30).json()
            assert shown["quota"]["memory_mb"] == 1024 and shown["quota"]["cpu"] is None
            used = shown["usage"]
            assert (used["memory_mb"], used["volume_mb"], used["blob_bytes"]) == (512, 64, 200)
            cli = [sys.executable, "-m", "corral", "keys", "quota", "quota-tenant"]
            cli += ["--data-dir", str(server.data_dir)]
            listed = subprocess.run([*cli, "--json"], capture_output=True, text=True, check=True)
            assert json.loads(listed.stdout)["usage"]["volume_mb"] == 64
            lifted = subprocess.run(
                [*cli, "--set", "memory_mb=none", "--json"],
                capture_output=True,
                text=True,
                check=True,
            )
            assert json.loads(lifted.stdout)["quota"]["memory_mb"] is None
            wrong = subprocess.run(
                [*cli, "--set", "cpu=lots"], capture_output=True, text=True, check=False
            )
            assert wrong.returncode != 0 and "invalid_quota" in wrong.stdout + wrong.stderr
            deadline = time.monotonic() + 30  # the server rereads quotas every few seconds
            while True:
                try:
                    Sandbox.create(runtime="namespaces", memory_mb=1024, client=client).terminate()
                    break
                except corral.LimitReached:
                    assert time.monotonic() < deadline, "the lifted quota never took effect"
                    time.sleep(1)
        finally:
            first.terminate()
            corral.Volume.from_name("quota-vol", client=client).delete()


def test_a_cluster_fronts_key_name_is_reserved(server: Server) -> None:
    """Only a cluster's front's own key may move a sandbox's memory between nodes, and a key is
    known as one by its name: no key made through the API or the CLI may take such a name."""
    admin = {"Authorization": f"Bearer {server.admin_key}"}
    for name in ("corral-front", "corral-front-1a2b3c"):
        refused = httpx.post(f"{server.url}/v1/keys", json={"name": name, "admin": True},
                             headers=admin)  # fmt: skip
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "reserved_name"
    assert not [k for k in _keys(server) if k["name"].startswith("corral-front")]
    made = subprocess.run(
        [sys.executable, "-m", "corral", "keys", "create", "corral-front-x",
         "--data-dir", str(server.data_dir)],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    said = " ".join((made.stderr + made.stdout).split())  # however the console wrapped it
    assert made.returncode != 0 and "a cluster front's own" in said

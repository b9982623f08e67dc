"""The audit log through a real server: what each action records (and what it never does), who
reads what, every bad query, the CLI, and replays of recorded commands in a fork of a snapshot."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import corral
from corral import AuditEntry, Client, Sandbox
from tests.conftest import require_runtime
from tests.e2e.conftest import Server

SECRET_ENV = "env-value-" + "9f3c1a77"
SECRET_FILE = "file-content-" + "42b8e0d1"
SECRET_STDIN = "stdin-text-" + "c0ffee55"


def only(entries: list[AuditEntry], operation: str, **detail: object) -> AuditEntry:
    found = [
        e for e in entries
        if e.operation == operation and all(e.detail.get(k) == v for k, v in detail.items())
    ]  # fmt: skip
    assert len(found) == 1, (operation, detail, [(e.operation, e.detail) for e in entries])
    return found[0]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def cli(server: Server, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "corral", *args], env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip


def test_actions_are_recorded_with_outcomes_and_never_secrets(server: Server) -> None:
    key = server.new_key("audited")
    with server.client(key) as client, Sandbox.create(runtime="namespaces", client=client) as sb:
        assert sb.run("echo out; echo err >&2; exit 3", env={"TOKEN": SECRET_ENV}).exit_code == 3
        assert sb.run(["cat"], stdin=SECRET_STDIN).stdout == SECRET_STDIN
        sb.files.write("/root/notes.txt", SECRET_FILE)
        assert sb.files.read_text("/root/notes.txt") == SECRET_FILE
        assert sb.run_code("x = 6 * 7\nprint('hi')\nx").text == "42"
        process = sb.exec(cmd="echo streamed; exit 5")
        assert process.wait() == 5
        with pytest.raises(corral.FileNotFound):
            sb.files.read_text("/root/missing")
        sandbox_id = sb.id
    with server.client(key) as client:
        entries = client.audit(sandbox=sandbox_id)
    me = {e.key_id for e in entries}
    assert len(me) == 1 and me != {None}
    assert all(e.client == "127.0.0.1" and e.request_id for e in entries)
    ran = only(entries, "exec", cmd="echo out; echo err >&2; exit 3")
    assert ran.exit_code == 3 and ran.error is None and ran.status is None
    assert ran.detail["env"] == ["TOKEN"]  # the name, never the value
    outcome = ran.detail["outcome"]
    assert outcome["stdout_sha256"] == sha("out\n") and outcome["stderr_sha256"] == sha("err\n")
    assert ran.bytes_out == 8 and ran.duration > 0
    piped = only(entries, "exec", argv=["cat"])
    assert piped.detail["stdin"] is True and piped.exit_code == 0
    written = only(entries, "files.write", path="/root/notes.txt")
    assert written.status == 201 and written.bytes_in == len(SECRET_FILE)
    read = only(entries, "files.read", path="/root/notes.txt")
    assert read.status == 200 and read.bytes_out == len(SECRET_FILE)
    missing = only(entries, "files.read", path="/root/missing")
    assert missing.status == 404 and missing.error == "file_not_found"
    code = only(entries, "code")
    assert (
        code.detail["code"] == "x = 6 * 7\nprint('hi')\nx" and code.detail["language"] == "python"
    )
    assert code.detail["outcome"]["stdout_sha256"] == sha("hi\n")
    assert code.detail["outcome"]["results_sha256"] == sha("42\n")
    streamed = only(entries, "exec", cmd="echo streamed; exit 5")
    assert streamed.exit_code == 5 and streamed.detail["outcome"]["stdout_sha256"] == sha(
        "streamed\n"
    )
    ended = [e for e in entries if e.operation == "DELETE /v1/sandboxes/{sandbox_id}"]
    assert len(ended) == 1 and ended[0].status == 200
    made = [e for e in entries if e.operation == "POST /v1/sandboxes"]
    assert len(made) == 1 and made[0].status == 201 and made[0].bytes_out > 0
    with server.client() as admin:
        everything = json.dumps([e.to_dict() for e in admin.audit(limit=1000)])
    for secret in (SECRET_ENV, SECRET_FILE, SECRET_STDIN):
        assert secret not in everything
        for db in server.data_dir.glob("corral.db*"):
            assert secret.encode() not in db.read_bytes(), db


def test_each_key_reads_its_own_and_an_admin_reads_all(server: Server) -> None:
    first, second = server.new_key("first"), server.new_key("second")
    with server.client(first) as one, server.client(second) as two, ExitStack() as stack:
        with Sandbox.create(runtime="namespaces", client=one) as sb:
            sb.run("true")
            theirs = sb.id
        assert one.audit(sandbox=theirs)
        assert two.audit(sandbox=theirs) == []  # another key's sandbox: nothing, not an error
        mine = two.audit()
        assert all(e.key_id == mine[0].key_id for e in mine) if mine else True
        first_id = one.audit(sandbox=theirs)[0].key_id
        with pytest.raises(corral.PermissionDenied):
            two.audit(key=first_id)
        admin = stack.enter_context(server.client())
        assert {e.key_id for e in admin.audit(key=first_id, limit=1000)} == {first_id}
        assert {e.sandbox_id for e in admin.audit(sandbox=theirs)} == {theirs}
    refused = httpx.post(
        f"{server.url}/v1/sandboxes", json={}, headers={"Authorization": "Bearer not-a-key"}
    )
    assert refused.status_code == 401
    with server.client() as admin:
        failed = admin.audit(operation="POST /v1/sandboxes", newest_first=True, limit=50)
    login = [e for e in failed if e.status == 401]
    assert login and login[0].key_id is None and login[0].error == "unauthorized"

    async def knock() -> None:  # a WebSocket with a bad key: refused, and recorded
        url = f"ws://127.0.0.1:{server.port}/v1/sandboxes/{theirs}/exec/stream"
        with pytest.raises(InvalidStatus):
            async with connect(url, additional_headers={"Authorization": "Bearer nope"}):
                pass

    asyncio.run(knock())
    with server.client() as admin:
        sockets = admin.audit(operation="WEBSOCKET /v1/sandboxes/{sandbox_id}/exec/stream",
                              newest_first=True, limit=20)  # fmt: skip
        assert sockets[0].key_id is None and sockets[0].status == 401
        assert sockets[0].sandbox_id == theirs
        reads = admin.audit(operation="audit.read", newest_first=True, limit=5)
        assert reads[0].detail == {"operation": "WEBSOCKET /v1/sandboxes/{sandbox_id}/exec/stream",
                                   "order": "desc", "limit": 20}  # fmt: skip


def test_pages_and_filters(server: Server, client: Client) -> None:
    with Sandbox.create(runtime="namespaces", client=client) as sb:
        started = time.time()
        for n in range(5):
            sb.run(f"echo {n}")
        headers = {"Authorization": f"Bearer {server.admin_key}"}
        params: dict[str, object] = {"sandbox": sb.id, "operation": "exec", "limit": 2}
        seen: list[str] = []
        while True:
            page = httpx.get(f"{server.url}/v1/audit", params=params, headers=headers).json()
            seen += [e["detail"]["cmd"] for e in page["entries"]]
            if page["next"] is None:
                break
            params["cursor"] = page["next"]
        assert seen == [f"echo {n}" for n in range(5)]
        newest = client.audit(sandbox=sb.id, operation="exec", newest_first=True, limit=2)
        assert [e.detail["cmd"] for e in newest] == ["echo 4", "echo 3"]
        later = client.audit(sandbox=sb.id, since=started, until=time.time() + 1, limit=1000)
        assert {e.detail.get("cmd") for e in later if e.operation == "exec"} == {
            f"echo {n}" for n in range(5)
        }
        assert client.audit(sandbox=sb.id, until=started - 3600) == []


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"since": 10, "until": 5}, "invalid_request"),
        ({"since": 5, "until": 5}, "invalid_request"),
        ({"limit": 0}, "invalid_request"),
        ({"limit": 5000}, "invalid_request"),
        ({"order": "sideways"}, "invalid_request"),
        ({"since": "yesterday"}, "invalid_request"),
        ({"cursor": "abc"}, "invalid_request"),
        ({"cursor": 2**70}, "invalid_request"),  # past SQLite's integers (was a 500)
        ({"cursor": -1}, "invalid_request"),
        ({"colour": "red"}, "invalid_request"),
    ],
)
def test_bad_queries_are_refused_clearly(
    server: Server, params: dict[str, object], code: str
) -> None:
    answer = httpx.get(
        f"{server.url}/v1/audit", params=params,
        headers={"Authorization": f"Bearer {server.admin_key}"},
    )  # fmt: skip
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == code and answer.json()["error"]["message"]


def test_the_cli_lists_and_refuses_bad_times(server: Server, client: Client) -> None:
    with Sandbox.create(runtime="namespaces", client=client) as sb:
        sb.run("echo from-the-cli")
        listed = cli(server, server.admin_key, "audit", "--sandbox", sb.id, "--json")
        assert listed.returncode == 0, listed.stderr
        assert any(e["detail"].get("cmd") == "echo from-the-cli" for e in json.loads(listed.stdout))
        table = cli(server, server.admin_key, "audit", "--sandbox", sb.id, "--since", "10m")
        assert table.returncode == 0 and "echo from-the-cli" in table.stdout
    bad = cli(server, server.admin_key, "audit", "--since", "last tuesday")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_replay_reruns_in_a_fork_and_shows_what_differs(server: Server) -> None:
    require_runtime("gvisor")
    key = server.new_key("replayer")
    with server.client(key) as client, Sandbox.create(runtime="gvisor", client=client) as sb:
        sb.run("echo base > /root/a")
        snapshot = sb.snapshot(name="before")
        sb.run("cat /root/a")  # same
        sb.run("head -c 16 /dev/urandom | od -x")  # different every time
        sb.run_code("total = 40 + 2\ntotal")  # same
        sb.files.write("/root/b", "not recorded")  # skipped: contents are never kept
        sb.files.mkdir("/root/made")  # repeated
        sb.run(["ls", "/root"], env={"HIDDEN": "x"})  # same, run without HIDDEN's value
        sb.run("exit 7")  # same exit code
        with pytest.raises(corral.CommandTimeout):
            sb.run("sleep 5", timeout=1)
        report = client.audit_replay(sb.id, snapshot.id)
        results = [(step.operation, step.result) for step in report.steps]
        assert results == [
            ("exec", "same"),
            ("exec", "different"),
            ("code", "same"),
            ("files.write", "skipped"),
            ("files.mkdir", "same"),
            ("exec", "different"),  # /root/b is missing from the fork: ls shows it
            ("exec", "same"),
            ("exec", "same"),  # timed out both times
        ], report.steps
        uuid = report.steps[1]
        assert uuid.differences == ["stdout_sha256"] and uuid.replayed["output"]["stdout"]
        assert "HIDDEN" in (report.steps[5].reason or "")
        assert report.steps[5].replayed["output"]["stdout"] == "a\nmade\n"
        assert len(report.differences) == 2
        headers = {"Authorization": f"Bearer {key}"}
        fork = httpx.get(f"{server.url}/v1/sandboxes/{report.fork_id}", headers=headers).json()
        assert fork["state"] == "terminated" and fork["spec"]["metadata"] == {
            "corral.replay_of": sb.id
        }
        # The replay's own commands are in the log too, under the fork.
        assert client.audit(sandbox=report.fork_id, operation="exec")
        replayed = cli(server, key, "audit", "replay", sb.id, "--from", "before", "--json")
        assert replayed.returncode == 1, replayed.stderr  # differences: exit status 1
        assert len(json.loads(replayed.stdout)["steps"]) == 8
        for body, status, code in (
            ({"sandbox_id": sb.id, "snapshot": "nope"}, 404, "snapshot_not_found"),
            ({"sandbox_id": "sb-0000000000000000", "snapshot": "before"}, 400, "nothing_to_replay"),
            ({"sandbox_id": "not an id", "snapshot": "before"}, 400, "invalid_id"),
            ({"snapshot": "before"}, 400, "invalid_request"),
        ):
            answer = httpx.post(f"{server.url}/v1/audit/replay", json=body, headers=headers)
            assert answer.status_code == status, answer.text
            assert answer.json()["error"]["code"] == code
        asked = client.audit(operation="audit.replay", sandbox=sb.id)
        assert [(e.status, e.detail["snapshot"]) for e in asked][:2] == [
            (200, snapshot.id), (200, "before")
        ]  # fmt: skip
        assert [e.error for e in asked[2:]] == ["snapshot_not_found"]
        other = server.client(server.new_key("other"))
        with other, pytest.raises(corral.NotFound):  # another key's snapshot: not theirs to fork
            other.audit_replay(sb.id, snapshot.id)
        sb.run("sleep 4")  # a replay long enough to hang up in the middle of
        with httpx.stream(
            "POST",
            f"{server.url}/v1/audit/replay",
            headers=headers,
            json={"sandbox_id": sb.id, "snapshot": "before"},
            timeout=60,
        ) as cut:
            started = json.loads(next(cut.iter_lines()))
            assert started["type"] == "started" and started["steps"] == 9
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/v1/sandboxes/{started['fork_id']}",
                        headers=headers).json()["state"] != "terminated":  # fmt: skip
            assert time.monotonic() < deadline, "the fork of an abandoned replay lived on"
            time.sleep(0.5)
        client.delete_snapshot(snapshot.id)

"""The `corral` command, run as a user would run it, against a real server."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.conftest import Server

CORRAL = [sys.executable, "-m", "corral"]


def corral(
    server: Server | None, *args: str, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("CORRAL_API_KEY", None)
    if server is not None:
        env.update(CORRAL_URL=server.url, CORRAL_API_KEY=key or server.admin_key)
    return subprocess.run(
        [*CORRAL, *args], capture_output=True, text=True, timeout=300, check=False, env=env
    )


def test_run_prints_output_and_passes_the_exit_code(server: Server) -> None:
    done = corral(server, "run", "--runtime", "namespaces", "--", "python3", "-c", "print(6*7)")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"
    failed = corral(server, "run", "--runtime", "namespaces", "--", "echo oops >&2; exit 3")
    assert failed.returncode == 3
    assert "oops" in failed.stderr
    listed = json.loads(corral(server, "sandbox", "list", "--state", "running", "--json").stdout)
    assert listed == []  # run ends its sandbox


def test_run_reports_bad_input_clearly(server: Server) -> None:
    done = corral(server, "run", "--memory", "-5", "--", "true")
    assert done.returncode == 2
    assert "memory_mb" in done.stderr and "invalid_request" in done.stderr
    done = corral(server, "run", "--runtime", "nope", "--", "true")
    assert done.returncode == 2
    assert "unknown_runtime" in done.stderr
    done = corral(server, "sandbox", "info", "sb-0000000000000000")
    assert done.returncode == 2 and "sandbox_not_found" in done.stderr


def test_missing_key_or_server_is_explained(server: Server) -> None:
    done = corral(server, "sandbox", "list", key="corral_wrong")
    assert done.returncode == 2 and "unauthorized" in done.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    done = subprocess.run(
        [*CORRAL, "sandbox", "list", "--url", "http://127.0.0.1:9", "--api-key", "k"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 2 and "connection_failed" in done.stderr


def test_sandbox_commands_exec_and_cp(server: Server, tmp_path: Path) -> None:
    made = corral(
        server, "sandbox", "create", "--runtime", "namespaces", "--metadata", "team=red", "--json"
    )
    assert made.returncode == 0, made.stderr
    sandbox_id = json.loads(made.stdout)["id"]
    try:
        listed = corral(server, "sandbox", "list", "--metadata", "team=red", "--json")
        assert [item["id"] for item in json.loads(listed.stdout)] == [sandbox_id]
        table = corral(server, "sandbox", "list")
        assert sandbox_id in table.stdout
        info = json.loads(corral(server, "sandbox", "info", sandbox_id, "--json").stdout)
        assert info["state"] == "running" and info["spec"]["metadata"] == {"team": "red"}

        done = corral(server, "exec", sandbox_id, "--", "sh", "-c", "echo hi; exit 5")
        assert (done.returncode, done.stdout) == (5, "hi\n")

        local = tmp_path / "in.txt"
        local.write_text("payload")
        assert corral(server, "cp", str(local), f"{sandbox_id}:/root/").returncode == 0
        assert corral(server, "exec", sandbox_id, "--", "cat /root/in.txt").stdout == "payload"
        back = tmp_path / "out"
        back.mkdir()
        assert corral(server, "cp", f"{sandbox_id}:/root/in.txt", str(back)).returncode == 0
        assert (back / "in.txt").read_text() == "payload"
        both_local = corral(server, "cp", str(local), str(back))
        assert both_local.returncode == 2 and "invalid_request" in both_local.stderr

        assert corral(server, "sandbox", "timeout", sandbox_id, "600").returncode == 0
        left = corral(server, "exec", sandbox_id, "--", "setsid -f sleep 900; setsid -f sleep 901")
        assert left.returncode == 0
        cleared = corral(server, "sandbox", "kill-all", sandbox_id)
        assert cleared.stderr == f"{sandbox_id}: 2 processes killed\n", cleared
    finally:
        assert corral(server, "sandbox", "kill", sandbox_id).returncode == 0
    info = json.loads(corral(server, "sandbox", "info", sandbox_id, "--json").stdout)
    assert info["end_reason"] == "terminated_by_user"


def test_keys_on_the_servers_machine(server: Server) -> None:
    data = ["--data-dir", str(server.data_dir)]
    made = corral(None, "keys", "create", "ci-bot", *data, "--json")
    assert made.returncode == 0, made.stderr
    secret = json.loads(made.stdout)["secret"]
    assert corral(server, "sandbox", "list", key=secret).returncode == 0
    listed = json.loads(corral(None, "keys", "list", *data, "--json").stdout)
    assert any(k["name"] == "ci-bot" and k["revoked_at"] is None for k in listed)
    assert all("secret" not in k and "digest" not in k for k in listed)
    assert corral(None, "keys", "revoke", "ci-bot", *data).returncode == 0
    # Revoked from another process, the key stops working within the server's 1 s key cache.
    deadline = time.monotonic() + 10
    while corral(server, "sandbox", "list", key=secret).returncode != 2:
        assert time.monotonic() < deadline, "a revoked key still works"
        time.sleep(0.2)
    missing = corral(None, "keys", "revoke", "no-such-key", *data)
    assert missing.returncode == 2 and "key_not_found" in missing.stderr


def test_doctor_lists_runtimes() -> None:
    done = corral(None, "doctor", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"namespaces", "gvisor"}
    assert all(isinstance(entry["available"], bool) for entry in report.values())


def test_shell_is_an_interactive_terminal(server: Server) -> None:
    made = corral(server, "sandbox", "create", "--runtime", "namespaces")
    sandbox_id = made.stdout.strip()
    leader, follower = pty.openpty()
    env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_API_KEY": server.admin_key}
    shell = subprocess.Popen(
        [*CORRAL, "shell", sandbox_id], stdin=follower, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    try:
        _read_until(leader, b"# ")  # the prompt: bash drops what is typed before it
        # ...and readline may still flush the terminal's input just after printing it (what
        # pexpect's `delaybeforesend` is for): give it a moment.
        time.sleep(0.5)
        os.write(leader, b"echo $((6*7)) $(tty)\n")
        _read_until(leader, b"42 /dev/pts/")
        os.write(leader, b"exit 7\n")
        assert shell.wait(timeout=30) == 7
    finally:
        os.close(leader)
        if shell.poll() is None:
            shell.kill()
            shell.wait(timeout=30)
        corral(server, "sandbox", "kill", sandbox_id)


def _read_until(fd: int, wanted: bytes) -> bytes:
    seen = b""
    while wanted not in seen:
        ready, _, _ = select.select([fd], [], [], 30)  # bounds a hang only
        assert ready, seen
        seen += os.read(fd, 4096)
    return seen
